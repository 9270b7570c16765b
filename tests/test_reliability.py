"""Reliability and security faults, injected for real on a provisioned 3-host testbed.

The session's one shared cluster (the `cluster` fixture, tests/support/cluster.py): a
testbed of its own (name and subnet), a Hub server on its bridge that also serves a gated
repo, and site.yml run once from a snapshot of the tree, shared with tests/test_e2e.py.
Each test injects one fault for real and reverts it, so the tests are independent:
a rank SIGKILLed mid-generation, a host's link cut mid-generation, a host down or a
ring port taken before the run, a different mlxnode on one host, a flipped byte and a
truncated weight file, two runs at once, a token that must not leak anywhere, a
changed host key, and repeated runs that must leave nothing behind.

    .venv/bin/pytest tests/test_reliability.py -s            # the default part (~6 min)
    MLXNODE_SOAK_RUNS=30 .venv/bin/pytest tests/test_reliability.py -m soak -s

Set MLXNODE_RELIABILITY_RESULTS=FILE to append every measured figure to FILE as JSON lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from secrets import token_hex

import pytest
import yaml
from conftest import requires

from tests.support.cluster import (
    CACHE_DIR,
    GATED,
    HOSTS,
    LOCK,
    MODEL,
    RING_PORT,
    ROOT,
    SPLIT,
    TOKEN,
    VENV_BIN,
    Cluster,
    Play,
    wait_for,
)

GATED_SPLIT = [2, 1, 1]
VENV_DIR = "/root/.mlxnode/venv"
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\] \[Rank (\d+)/3\] (\w+) ", re.M)

# Missing root, iproute2, sshd or rsync skips these tests, or fails them under CI.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, requires("root", "iproute2", "sshd", "rsync")]


def record(test: str, **figures: object) -> None:
    """Print a test's measured figures, and append them to $MLXNODE_RELIABILITY_RESULTS."""
    print(f"\n{test}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    path = os.environ.get("MLXNODE_RELIABILITY_RESULTS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": test, **figures}) + "\n")


@pytest.fixture(autouse=True)
def _fault_free(cluster) -> Iterator[None]:
    """Each test starts and ends with every link up and no rank of any run left.

    A rank the test left running is killed, and fails the test: cleanup is the
    launcher's job, and a test must not pass because this fixture did it.
    """
    yield
    for host in HOSTS:
        cluster.bed.set_link(host, True)
    killed = {}
    for host in HOSTS:
        wait_for(lambda h=host: cluster.ssh(h, "true", check=False).returncode == 0, 30, host)
        pids = cluster.bed.kill_host_processes(host, r"mlxnode run", sig=signal.SIGKILL)
        if pids:
            killed[host] = pids
    assert killed == {}, f"ranks were left running and had to be killed: {killed}"


# -- a rank dies, the network splits


def test_a_rank_killed_mid_generation_fails_the_run_naming_it(cluster):
    run_id = "rel-kill"
    running = cluster.start_run(run_id)
    wait_for(lambda: cluster.generating(run_id), 120, "generation to start")
    killed = cluster.bed.kill_host_processes(
        "h2", rf"mlxnode run --run-id {run_id}\b", sig=signal.SIGKILL
    )
    killed_at = time.monotonic()
    assert killed, "rank 1 was not running on h2"
    play = running.wait()
    after = time.monotonic() - killed_at
    message = play.failure()
    record("dead rank", seconds_after_kill=round(after, 1))
    assert after < 15, f"run.yml took {after:.1f}s after the kill"
    assert "rank 1 on h2 was killed" in message, message[-3000:]
    # Every rank's log came back, the killed one's too (it wrote until it died).
    for host, log in cluster.rank_logs(run_id).items():
        assert log.is_file(), f"{host}: {sorted((cluster.logs / run_id).rglob('*'))}"
    assert (cluster.logs / run_id / "h1" / "launcher.stderr.log").is_file()
    assert cluster.leftovers() == {}


def test_a_partitioned_host_trips_the_watchdog_and_the_rest_is_collected(cluster):
    run_id = "rel-partition"
    running = cluster.start_run(run_id, "--step-timeout", "5")
    wait_for(lambda: cluster.generating(run_id), 120, "generation to start")
    cut = datetime.now().replace(microsecond=0)  # the hosts log local time, as this clock
    cluster.bed.set_link("h3", False)
    cut_at = time.monotonic()
    try:
        play = running.wait()
        after = time.monotonic() - cut_at
    finally:
        cluster.bed.set_link("h3", True)
    message = play.failure()
    assert "lost contact with h3 (rank 2)" in message, message[-3000:]
    # Rank 0 or rank 1, whichever noticed first, is named with its own words.
    assert re.search(
        r"rank [01] on h[12] exited with code 6: (no progress for 5s|lost a peer) while generating",
        message,
    ), message[-3000:]
    assert "not reachable: h3" in message
    # The ranks that could still be reached failed on their own, within timeout + 10 s.
    logs = cluster.rank_logs(run_id)
    assert logs["h1"].is_file() and logs["h2"].is_file()
    assert not (cluster.logs / run_id / "h3").exists()  # unreachable: skipped, not waited on
    waited = {}
    for host in ("h1", "h2"):
        for stamp, _rank, level in LOG_TIME.findall(logs[host].read_text()):
            if level == "ERROR":
                waited[host] = (datetime.fromisoformat(stamp) - cut).total_seconds()
                break
    assert "h1" in waited, logs["h1"].read_text()[-2000:]
    assert all(s <= 5 + 10 for s in waited.values()), waited
    assert "DistributedSetupError" not in message  # the user sees the sentence, not the type
    record(
        "partition",
        rank_error_after_cut_s=waited,
        play_seconds_after_cut=round(after, 1),
    )
    # h3's own rank gave up too (its watchdog), so nothing is left once the link is back.
    wait_for(lambda: cluster.leftovers() == {}, 30, "rank 2 on h3 to exit")


# -- the launcher refuses to start


def test_an_unreachable_host_is_named_by_the_preflight_within_seconds(cluster):
    cluster.bed.set_link("h2", False)
    try:
        play = cluster.run("rel-down")
    finally:
        cluster.bed.set_link("h2", True)
    message = play.failure()
    report = json.loads((cluster.logs / "rel-down" / "h1" / "launcher.json").read_text())
    record(
        "unreachable host",
        play_seconds=round(play.seconds, 1),
        preflight_seconds=round(report["preflight_seconds"], 1),
    )
    # The pre-flight gives up on h2 at its 5 s connect timeout, where mlx.launch's ssh would
    # retry for minutes; the rest of the play is Ansible's own time, which load stretches
    # (about 12 s on a quiet machine, 21 s at a load average of 10).
    assert report["preflight_seconds"] < 10, report
    assert play.seconds < 60
    assert "exit 6): pre-flight failed: rank 1 on h2: unreachable over SSH" in message
    assert re.search(r"- 1 h2 NO \(unreachable over SSH", message), message[-3000:]
    assert "not reachable: h2" in message
    # Ansible itself never waited on h2: the launcher's pre-flight refused first.
    recap = {host: counts["unreachable"] for host, counts in play.recap().items()}
    assert recap.get("h2") == 0, recap
    cluster.assert_nothing_started("rel-down")


def test_a_ring_port_in_use_is_named_by_the_preflight(cluster):
    port = RING_PORT + 2  # rank 2's, on h3
    # SO_REUSEADDR: the previous runs' ring connections on this port may be in TIME_WAIT.
    squat = (
        "import socket, time\ns = socket.socket()\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('0.0.0.0', {port}))\ns.listen()\ntime.sleep(600)\n"
    )
    cluster.ssh("h3", f"cat > /root/squat.py <<'EOF'\n{squat}EOF")
    cluster.ssh(
        "h3",
        "setsid nohup python3 /root/squat.py >/dev/null 2>&1 </dev/null & "
        f"for i in $(seq 50); do ss -Htln 'sport = :{port}' | grep -q . && exit 0; sleep 0.1; "
        "done; exit 1",
    )
    try:
        play = cluster.run("rel-port")
    finally:
        cluster.ssh("h3", "pkill -f '[s]quat.py'; rm -f /root/squat.py", check=False)
    message = play.failure()
    record("busy ring port", play_seconds=round(play.seconds, 1))
    assert f"pre-flight failed: rank 2 on h3: port {port} already in use" in message
    assert re.search(rf"- 2 h3 yes \S+ \S+ \S+ \S+ {port}", message), message[-3000:]
    cluster.assert_nothing_started("rel-port")


def test_a_different_mlxnode_on_one_host_is_refused_with_a_table(cluster):
    init = f"{VENV_DIR}/lib/python3*/site-packages/mlxnode/__init__.py"
    cluster.ssh("h3", f"cp -p {init} /root/init.py.orig")
    cluster.ssh("h3", f"sed -i 's/^__version__ = .*/__version__ = \"0.0.0+skew\"/' {init}")
    try:
        play = cluster.run("rel-skew")
    finally:
        cluster.ssh("h3", f"cp -p /root/init.py.orig {init} && rm /root/init.py.orig")
    message = play.failure()
    record("version skew", play_seconds=round(play.seconds, 1))
    assert "mlxnode differs between hosts: 0.1.0 on h1, h2 vs 0.0.0+skew on h3" in message
    for rank, host in enumerate(HOSTS):
        version = "0.0.0+skew" if host == "h3" else "0.1.0"
        assert re.search(rf"- {rank} {host} yes \S+ \S+ \S+ {re.escape(version)} -", message)
    cluster.assert_nothing_started("rel-skew")


# -- the model cache is damaged


def test_a_flipped_byte_fails_verify_and_health_naming_file_and_host(cluster):
    target = cluster.weight_file(1)
    name = target.rsplit("/", 1)[1]
    flip = (
        "import sys; f = open(sys.argv[1], 'r+b'); f.seek(-100, 2); b = f.read(1); "
        "f.seek(-100, 2); f.write(bytes([b[0] ^ 0xFF])); f.close()"
    )
    cluster.ssh("h2", f'cp -p {target} /root/weight.orig && python3 -c "{flip}" {target}')
    try:
        verify = cluster.ssh(
            "h2",
            f"cd /tmp && {VENV_DIR}/bin/mlxnode cache verify {MODEL} --rank 1 --world-size 3 "
            f"--strategy pipeline --split {','.join(map(str, SPLIT))} --offline",
            check=False,
        )
        health = cluster.playbook("health.yml")
    finally:
        cluster.ssh("h2", f"cp -p /root/weight.orig {target} && rm /root/weight.orig")
    assert verify.returncode == 3, verify.stdout + verify.stderr
    assert re.search(rf"CORRUPT\s+{name}", verify.stdout) and name in verify.stderr
    assert health.rc != 0 and "Not ready: h2" in health.output
    row = next(line for line in health.output.splitlines() if line.strip().startswith("h2 "))
    assert f"corrupt {name}" in row, row
    record("flipped byte", health_seconds=round(health.seconds, 1))


def test_a_truncated_weight_file_is_refused_with_exit_3(cluster):
    target = cluster.weight_file(1)
    name = target.rsplit("/", 1)[1]
    cluster.ssh("h2", f"cp -p {target} /root/weight.orig && truncate -s 1000 {target}")
    try:
        play = cluster.run("rel-truncated")
    finally:
        cluster.ssh("h2", f"cp -p /root/weight.orig {target} && rm /root/weight.orig")
    message = play.failure()
    record("truncated file", play_seconds=round(play.seconds, 1))
    # The rank's CacheError (exit 3) is passed through, not turned into a crash.
    assert "mlxnode launch failed on h1 (exit 3): run rel-truncated: rank 1 on h2 " in message
    assert re.search(rf"{name} is 1000 bytes, expected \d+", message), message[-3000:]
    rank1 = cluster.rank_logs("rel-truncated")["h2"].read_text()
    assert "ERROR" in rank1 and f"{name} is 1000 bytes" in rank1
    assert cluster.leftovers() == {}


# -- two runs at once


def test_a_second_run_is_refused_while_the_first_holds_the_cluster(cluster):
    # The first run holds the lock for as long as the test needs, not for as long as some
    # number of tokens happens to take.
    holder = (
        "import time\nfrom mlxnode.launcher import DEFAULT_LOCK_FILE, cluster_lock\n"
        "with cluster_lock(DEFAULT_LOCK_FILE, 'rel-busy-a'):\n    time.sleep(600)\n"
    )
    cluster.ssh("h1", f"cat > /root/hold_lock.py <<'EOF'\n{holder}EOF")
    cluster.ssh(
        "h1",
        f"setsid nohup {VENV_DIR}/bin/python /root/hold_lock.py >/dev/null 2>&1 </dev/null & "
        f"for i in $(seq 100); do test -s {LOCK} && exit 0; sleep 0.1; done; exit 1",
    )
    try:
        second = cluster.run("rel-busy-b")
    finally:
        cluster.ssh("h1", "pkill -f '[h]old_lock.py'; rm -f /root/hold_lock.py", check=False)
    message = second.failure()
    assert re.search(
        r"\(exit 8\): cluster busy: run rel-busy-a started \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", message
    ), message[-3000:]
    cluster.assert_nothing_started("rel-busy-b")
    wait_for(lambda: cluster.leftovers() == {}, 10, "the lock to be free")
    third = cluster.run("rel-busy-c").check()
    record("concurrent", refused_after_s=round(second.seconds, 1), third_s=round(third.seconds, 1))


# -- secrets and host keys


# Where a leaked token could land: the controller's temporary directories and Ansible's own,
# and on every host its home (venv, config, runs, cache) and the shared temporary places.
HOST_SCAN = ("/root", "/tmp", "/var/tmp", "/dev/shm", "/run")


def _files_holding(token: str, dirs: list[str], since: str) -> str:
    """A shell command listing the files under `dirs`, changed after `since`, holding `token`."""
    return (
        f"find {' '.join(dirs)} -xdev -type f -cnewer {since} -print0 2>/dev/null"
        f" | xargs -0r grep -lF -D skip {token} 2>/dev/null; true"
    )


def test_the_hub_token_appears_in_no_output_log_or_file(cluster, tmp_path):
    import tempfile

    since = tmp_path / "since"
    since.touch()
    for host in HOSTS:
        cluster.ssh(host, "touch /root/.mlxrel-since")
    # The documented way: the token in an ansible-vault file as vault_hf_token, which the
    # cluster's group_vars hand to mlxnode_hf_token (inventory/example); never in plain text.
    password = tmp_path / "vault-password"
    password.write_text(token_hex(16))
    password.chmod(0o600)
    vault = tmp_path / "vault.yml"
    encrypted = subprocess.run(
        [str(VENV_BIN / "ansible-vault"), "encrypt_string", "--vault-password-file",
         str(password), "--stdin-name", "vault_hf_token"],
        input=TOKEN, capture_output=True, text=True, check=True,
    )  # fmt: skip
    vault.write_text(encrypted.stdout)
    gated = tmp_path / "gated.yml"
    gated.write_text(
        yaml.safe_dump(
            {
                "mlxnode_hf_token": "{{ vault_hf_token }}",
                "mlxnode_model": GATED,
                "mlxnode_split": GATED_SPLIT,
            }
        )
    )
    args = ("-vvv", "--vault-password-file", str(password), "-e", f"@{vault}", "-e", f"@{gated}")
    controller_gated = cluster.work / "controller-cache" / GATED.replace("/", "--")
    gated_dir = f"{CACHE_DIR}/{GATED.replace('/', '--')}"

    def forget_gated() -> None:
        shutil.rmtree(controller_gated, ignore_errors=True)
        for host in HOSTS:
            cluster.ssh(host, f"rm -rf {gated_dir}")

    plays: dict[str, Play] = {}
    try:
        plays["site.yml"] = cluster.playbook("site.yml", *args).check()
        plays["run.yml"] = cluster.playbook(
            "run.yml", *args, *cluster.run_vars("rel-secret")
        ).check()
        forget_gated()
        plays["prewarm.yml fanout"] = cluster.playbook(
            "prewarm.yml", *args, "-e", "mlxnode_cache_mode=fanout"
        ).check()
        # The token was needed and used: every host holds the gated model now.
        for host in HOSTS:
            cluster.ssh(host, f"ls {gated_dir}/snapshots/*/config.json")
        # A download that fails prints its error, from the host or the controller.
        missing = "model-00002-of-00002.safetensors"
        cluster.hub.faults.add(f"*/{missing}", "status", status=404, times=None)
        try:
            for mode in ("direct", "fanout"):
                forget_gated()
                play = cluster.playbook("prewarm.yml", *args, "-e", f"mlxnode_cache_mode={mode}")
                assert play.rc != 0 and missing in play.failure(), play.output[-4000:]
                plays[f"failing prewarm.yml {mode}"] = play
        finally:
            cluster.hub.faults.clear()
    finally:
        cluster.playbook("configure.yml").check()  # back to the ungated model
    assert len(plays["site.yml"].output) > 100_000  # -vvv really was verbose
    for name, play in plays.items():
        assert TOKEN not in play.output, f"{name} -vvv printed the token"
    home = Path.home()
    controller = [str(cluster.logs), str(cluster.work), tempfile.gettempdir(), "/var/tmp",
                  "/dev/shm", str(home / ".ansible"), str(home / ".cache")]  # fmt: skip
    leaked = subprocess.run(
        ["sh", "-c", _files_holding(TOKEN, controller, str(since))], capture_output=True, text=True
    )
    assert leaked.stdout == "", f"the token is in {leaked.stdout}"
    for host in HOSTS:
        found = cluster.ssh(host, _files_holding(TOKEN, list(HOST_SCAN), "/root/.mlxrel-since"))
        assert found.stdout == "", f"{host}: {found.stdout}"
        assert cluster.ssh(host, "ls -d /tmp/mlxnode-hub.* 2>/dev/null", check=False).stdout == ""
        writable = cluster.ssh(
            host, f"find /root/.mlxnode {CACHE_DIR} -perm -0002 ! -type l"
        ).stdout
        assert writable == "", f"{host}: world-writable: {writable}"
    assert not [p for p in cluster.logs.rglob("*") if p.stat().st_mode & 0o002]
    record(
        "secrets",
        site_vvv_seconds=round(plays["site.yml"].seconds, 1),
        run_vvv_bytes=len(plays["run.yml"].output),
    )


FORBIDDEN_SSH = re.compile(
    r"StrictHostKeyChecking[= ]+(no|off|accept-new)|UserKnownHostsFile[= ]+/dev/null"
    r"|host_key_checking\s*=\s*(false|no|0)|AutoAddPolicy|WarningPolicy",
    re.I,
)


def test_host_keys_are_checked_and_a_changed_key_is_refused(cluster, tmp_path):
    config = (ROOT / "ansible.cfg").read_text()
    assert re.search(r"^host_key_checking = True$", config, re.M)
    sources = [ROOT / "ansible.cfg", cluster.inventory]
    for folder in ("inventory", "roles", "playbooks", "mlxnode"):
        sources += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".yml", ".py", ".j2")]
    offending = [str(p) for p in sources if FORBIDDEN_SSH.search(p.read_text(errors="replace"))]
    assert offending == []

    # A key that is not h2's, as if h2 had been reinstalled or were an impostor.
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True
    )
    other = (tmp_path / "other.pub").read_text().split()[:2]
    h2 = cluster.bed.host("h2").ip

    # Ansible, through a fresh connection (not an already open master), refuses h2.
    known = tmp_path / "known_hosts"
    known.write_text(
        "".join(
            f"{h2} {' '.join(other)}\n" if line.startswith(f"{h2} ") else line + "\n"
            for line in cluster.bed.known_hosts_path.read_text().splitlines()
        )
    )
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        cluster.inventory.read_text().replace(str(cluster.bed.known_hosts_path), str(known))
    )
    ping = subprocess.run(
        [str(VENV_BIN / "ansible"), "-i", str(inventory), "h2", "-m", "ansible.builtin.ping"],
        cwd=ROOT, capture_output=True, stdin=subprocess.DEVNULL, text=True, timeout=120,
        env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
             "ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp_path / "cp"), "ANSIBLE_NOCOLOR": "1"},
    )  # fmt: skip
    assert ping.returncode != 0 and "UNREACHABLE" in ping.stdout
    assert "Host key verification failed" in ping.stdout + ping.stderr

    # The launcher (on h1, for its pre-flight and for mlx.launch) refuses h2 as well.
    known_on_h1 = "/root/.ssh/known_hosts"
    cluster.ssh("h1", f"cp -p {known_on_h1} /root/known_hosts.orig")
    cluster.ssh("h1", f"sed -i 's|^{h2} .*|{h2} {' '.join(other)}|' {known_on_h1}")
    try:
        play = cluster.run("rel-hostkey")
    finally:
        cluster.ssh("h1", f"mv /root/known_hosts.orig {known_on_h1}")
    assert "rank 1 on h2: host key does not match known_hosts" in play.failure()
    cluster.assert_nothing_started("rel-hostkey")


# -- repeated runs leave nothing behind


def _soak(cluster: Cluster, runs: int, label: str) -> None:
    seconds, rss = [], []
    for i in range(runs):
        run_id = f"rel-{label}-{i:03d}"
        play = cluster.run(run_id)
        assert play.rc == 0, f"run {i}: {play.output[-6000:]}"
        assert cluster.leftovers() == {}, f"after run {i}"
        report = json.loads((cluster.logs / run_id / "h1" / "launcher.json").read_text())
        assert report["exit_code"] == 0 and report["unreachable"] == {}
        seconds.append(play.seconds)
        rss.append(report["max_rss_bytes"])
    third = max(runs // 3, 1)
    first, last = statistics.median(rss[:third]), statistics.median(rss[-third:])
    mib = [round(r / 2**20, 1) for r in rss]
    record(
        label,
        runs=runs,
        run_seconds_median=round(statistics.median(seconds), 1),
        run_seconds_max=round(max(seconds), 1),
        launcher_rss_mib=mib,
        rss_first_third_median_mib=round(first / 2**20, 1),
        rss_last_third_median_mib=round(last / 2**20, 1),
    )
    # Each launch is a fresh process; its peak must not creep up with the number of runs.
    assert last <= first * 1.10 + 2 * 2**20, mib


def test_three_runs_in_a_row_leave_nothing_behind(cluster):
    # Every other test here also checks that its run left nothing (`_fault_free`); the long
    # repetition, where growth would show, is the soak below (-m soak, 30 runs by default).
    _soak(cluster, 3, "short-soak")


@pytest.mark.soak
def test_soak_runs_leave_nothing_behind_and_do_not_grow(cluster):
    _soak(cluster, int(os.environ.get("MLXNODE_SOAK_RUNS", "30")), "soak")
