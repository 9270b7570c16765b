"""The launcher's cluster lock and the paramiko pre-flight, with real processes and sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlxnode import preflight, readiness
from mlxnode.errors import ClusterBusyError, DistributedSetupError, PreflightError
from mlxnode.launcher import cluster_lock


def test_second_holder_is_told_who_is_running(tmp_path):
    lock = tmp_path / "cluster.lock"
    busy = pytest.raises(ClusterBusyError, match=r"cluster busy: run run-one started \d{4}-")
    with cluster_lock(lock, "run-one"), busy, cluster_lock(lock, "run-two"):
        pass
    with cluster_lock(lock, "run-three"):
        assert json.loads(lock.read_text())["run_id"] == "run-three"
    assert lock.read_text() == ""  # released: emptied, but never unlinked


def test_the_lock_file_is_never_unlinked_so_a_waiting_run_locks_the_same_file(tmp_path):
    # Unlinking before unlocking let a run that had already opened the file lock the
    # orphaned inode while the next run created and locked a new file: two holders.
    lock = tmp_path / "cluster.lock"
    with cluster_lock(lock, "first"):
        inode = lock.stat().st_ino
        waiting = os.open(lock, os.O_RDWR)  # a second run, opened before the first ends
    try:
        assert lock.stat().st_ino == inode
        with cluster_lock(lock, "next"):
            assert os.fstat(waiting).st_ino == lock.stat().st_ino
    finally:
        os.close(waiting)


def test_lock_is_released_when_the_holder_raises(tmp_path):
    lock = tmp_path / "cluster.lock"
    with pytest.raises(RuntimeError), cluster_lock(lock, "a"):
        raise RuntimeError("run failed")
    with cluster_lock(lock, "b"):
        pass


def test_lock_of_a_killed_holder_is_stale_and_taken_over(tmp_path, caplog):
    lock = tmp_path / "cluster.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from mlxnode.launcher import cluster_lock\n"
            "with cluster_lock(sys.argv[1], 'doomed'):\n"
            "    print('held', flush=True); time.sleep(600)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ClusterBusyError, match="run doomed"), cluster_lock(lock, "x"):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert "doomed" in lock.read_text()  # the dead run's file is still there...
    with cluster_lock(lock, "next"):  # ...but its flock died with it
        pass
    assert "stale cluster lock left by run doomed" in caplog.text


def write_hostfile(path, hosts):
    path.write_text(json.dumps([{"ssh": h, "ips": ["127.0.0.1"]} for h in hosts]))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_preflight_of_local_ranks_reports_versions(tmp_path):
    hosts = preflight.load_hostfile(write_hostfile(tmp_path / "h.json", ["127.0.0.1"] * 2))
    port = free_port()
    reports = preflight.check_hosts(hosts, python=sys.executable, starting_port=port)
    assert [r.rank for r in reports] == [0, 1]
    assert all(r.reachable and r.mlxnode and r.mlx for r in reports)
    assert reports[0].python == sys.executable
    readiness.ensure_ready(reports)


def test_preflight_names_a_busy_port(tmp_path):
    hosts = preflight.load_hostfile(write_hostfile(tmp_path / "h.json", ["127.0.0.1"] * 2))
    port = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port + 1))  # rank 1's ring port
        squatter.listen()
        reports = preflight.check_hosts(hosts, python=sys.executable, starting_port=port)
    with pytest.raises(DistributedSetupError, match=rf"rank 1 on 127.0.0.1: port {port + 1}"):
        readiness.ensure_ready(reports)


def test_preflight_fails_fast_naming_an_unreachable_host(tmp_path):
    # Nothing listens for SSH on 127.0.0.2: refused at once, like a powered-off Mac's IP.
    hosts = preflight.load_hostfile(write_hostfile(tmp_path / "h.json", ["127.0.0.1", "127.0.0.2"]))
    started = time.monotonic()
    reports = preflight.check_hosts(hosts, python=sys.executable, timeout=3)
    assert time.monotonic() - started < 20
    with pytest.raises(DistributedSetupError, match="rank 1 on 127.0.0.2: unreachable over SSH"):
        readiness.ensure_ready(reports)


def test_preflight_cli_prints_table_and_exits_6(tmp_path):
    hostfile = write_hostfile(tmp_path / "h.json", ["127.0.0.1", "127.0.0.2"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX")}
    result = subprocess.run(
        [sys.executable, "-m", "mlxnode", "preflight", "--hostfile", str(hostfile),
         "--connect-timeout", "3"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 6, result.stderr
    assert "127.0.0.2" in result.stdout and "NO (" in result.stdout
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("mlxnode: error: pre-flight failed: rank 1 on 127.0.0.2")


def test_version_skew_is_a_problem_with_a_table():
    reports = [
        readiness.HostReport(0, "a", True, python="/v/bin/python", mlx="0.32.4", mlxnode="0.1.0"),
        readiness.HostReport(1, "b", True, python="/v/bin/python", mlx="0.31.0", mlxnode="0.1.0"),
        readiness.HostReport(2, "c", True, python="/v/bin/python", mlx="0.32.4", mlxnode="0.1.0"),
    ]
    with pytest.raises(PreflightError) as info:
        readiness.ensure_ready(reports)
    assert "mlx differs between hosts: 0.32.4 on a, c vs 0.31.0 on b;" in str(info.value)
    assert "\n" not in str(info.value)  # one line; the table travels beside it
    assert "0.31.0" in info.value.table and info.value.table == readiness.format_table(reports)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not valid JSON"),
        ("[]", "non-empty list"),
        ('[{"ips": ["1.2.3.4"]}]', "host 0 needs an 'ssh' name"),
        ('{"hosts": [{"ssh": "a", "ips": "1.2.3.4"}]}', "must be a list of strings"),
    ],
)
def test_bad_hostfiles_are_named(tmp_path, content, message):
    path = tmp_path / "hosts.json"
    path.write_text(content)
    with pytest.raises(Exception, match=message):
        preflight.load_hostfile(path)


def test_hostfile_names_hosts_by_inventory_name(tmp_path):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([{"ssh": "10.0.0.1", "ips": ["10.0.0.1"], "name": "studio"}]))
    (host,) = preflight.load_hostfile(path)
    assert (host.name, host.ssh) == ("studio", "10.0.0.1")
    path.write_text(json.dumps([{"ssh": "10.0.0.1"}]))
    assert preflight.load_hostfile(path)[0].name == "10.0.0.1"


@pytest.mark.parametrize(
    ("cmdline", "matches"),
    [
        ("/v/bin/python -m mlxnode run --run-id r1 --config c.yaml -- hi", True),
        ("/v/bin/python -m mlxnode run --run-id r1", True),
        ("/v/bin/python -m mlxnode run --run-id r10 --config c.yaml", False),
        ("/v/bin/python -m mlxnode run --run-id xr1 --config c.yaml", False),
        ("/v/bin/mlxnode launch --run-id r1 -- --config c.yaml", False),
        ("sh -c pkill -KILL -f '[m]lxnode run --run-id r1( |$)'", False),
        ("/v/bin/python -m mlxnode serve --run-id r1 --config c.yaml", False),
    ],
)
def test_rank_pattern_matches_only_this_runs_ranks(cmdline, matches):
    import re

    from mlxnode.launcher import rank_pattern

    assert bool(re.search(rank_pattern("r1"), cmdline)) is matches


@pytest.mark.parametrize(
    ("cmdline", "matches"),
    [
        ("/v/bin/python -m mlxnode serve --run-id serve --status-dir /r/serve --port 80", True),
        ("/v/bin/python -m mlxnode run --run-id serve --status-dir /r/serve", False),
        ("/v/bin/mlxnode launch --supervise --run-id serve -- serve --port 80", False),
    ],
)
def test_rank_pattern_of_a_server_matches_its_serve_ranks(cmdline, matches):
    import re

    from mlxnode.launcher import rank_pattern

    assert bool(re.search(rank_pattern("serve", "serve"), cmdline)) is matches


@pytest.mark.parametrize("run_id", ["", "-x", "a b", "a;b", "a/b", "x" * 129, "abc\n"])
def test_run_ids_that_cannot_be_a_directory_or_pattern_are_refused(run_id):
    from mlxnode.errors import UsageError
    from mlxnode.launcher import check_run_id

    with pytest.raises(UsageError, match="run id"):
        check_run_id(run_id)


def _judged(failed, *, records=(), unreachable=None, returncode=0, timed_out=False, complete=None):
    """What the launcher concludes from mlx.launch's report and the ranks' status records.

    `records`: (rank, exit code, error class, message); `complete`: the ranks rank 0's
    completion record lists (default: all three when nothing failed, else none).
    """
    from mlxnode.launcher import _judge, _Supervised
    from mlxnode.outcome import Completion, RankStatus

    hosts = [preflight.HostSpec(r, f"10.0.0.{r + 1}", name=f"h{r + 1}") for r in range(3)]
    result = _Supervised(returncode, dict(failed), timed_out, 1.0, 30.0)
    statuses = {r: RankStatus("r1", r, f"h{r + 1}", c, k, m) for r, c, k, m in records}
    if complete is None:
        complete = [] if failed or any(c for _, c, _, _ in records) else [0, 1, 2]
    verdict = Completion("r1", 3, [{"rank": r, "host": f"h{r + 1}"} for r in complete])
    try:
        _judge(result, hosts, "r1", unreachable or {}, verdict, statuses)
    except Exception as e:  # noqa: BLE001 - the tests look at what was raised
        return e
    return None


def test_a_rank_killed_mid_run_is_named_not_the_peers_that_lost_it():
    error = _judged(
        {1: 255, 0: 6, 2: -15},
        records=[
            (0, 6, "DistributedSetupError", "rank 0 on h1 lost a peer while generating: [ring] "
             "lost; see the other logs"),
        ],
    )  # fmt: skip
    assert isinstance(error, DistributedSetupError) and error.exit_code == 6
    assert str(error) == (
        "run r1: rank 1 on h2 was killed (its process ended without an exit status); "
        "also stopped: rank 0 on h1 (code 6), rank 2 on h3"
    )
    assert (error.rank, error.host) == (1, "h2")


def test_a_partitioned_host_is_named_with_the_watchdog_line():
    error = _judged(
        {0: 6},
        records=[
            (0, 6, "DistributedSetupError",
             "rank 0 on h1: no progress for 5s while generating; a peer died or hung"),
        ],
        unreachable={"h3": "unreachable over SSH (timed out)"},
    )  # fmt: skip
    assert str(error) == (
        "lost contact with h3 (rank 2): unreachable over SSH (timed out); run r1: rank 0 on "
        "h1 exited with code 6: no progress for 5s while generating"
    )


def test_a_rank_that_refused_its_cache_passes_its_exit_code_through():
    error = _judged(
        {1: 3, 0: 6, 2: -15},
        records=[
            (1, 3, "CacheError", "cached file /c/m.safetensors is 10 bytes, expected 20; run "
             "prewarm"),
            (0, 6, "DistributedSetupError", "rank 0 on h1 lost a peer while loading: x"),
        ],
    )  # fmt: skip
    assert error.exit_code == 3
    assert str(error).startswith(
        "run r1: rank 1 on h2 exited with code 3: cached file /c/m.safetensors is 10 bytes"
    )


def test_every_rank_refusing_the_same_input_is_that_error():
    error = _judged(
        {0: 2, 1: 2, 2: 2},
        records=[(r, 2, "UsageError", "no prompt: give it as text") for r in range(3)],
    )
    assert error.exit_code == 2
    assert str(error) == "run r1: every rank exited with code 2: no prompt: give it as text"


def test_a_timeout_and_a_clean_run_are_told_apart():
    error = _judged({}, timed_out=True, unreachable={"h2": "unreachable over SSH"})
    assert "passed its timeout of 30s" in str(error) and "lost contact with h2" in str(error)
    assert _judged({}) is None
    assert "mlx.launch exited with code 2" in str(_judged({}, returncode=2))


def test_without_every_ranks_completion_a_clean_exit_is_not_a_success():
    error = _judged({}, complete=[0, 2])
    assert isinstance(error, DistributedSetupError)
    assert "no proof that every rank finished: rank 1 on h2 never reported completing" in str(error)


FAKE_LAUNCH = r"""
import sys, time
sys.stdout.write("partial answer"); sys.stdout.flush()
sys.stdout.write("\r\n[WARN] Node with rank 0 exited with code 3\r\n")  # model text
sys.stdout.flush()
sys.stderr.write("\x1b[33m[WARN] Node with rank 1 exited with code 6 \x1b[0m\n")
sys.stderr.flush()
time.sleep(600)  # hangs like mlx.launch on an ssh to a host that dropped off the network
"""


def test_supervise_stops_mlx_launch_when_it_hangs_after_a_failure(capfd):
    from mlxnode.launcher import _supervise

    started = time.monotonic()
    result = _supervise([sys.executable, "-c", FAKE_LAUNCH], timeout=60, grace=1.0)
    assert time.monotonic() - started < 10
    assert result.failed == {1: 6} and not result.timed_out  # rank 0's "line" is only text
    out, err = capfd.readouterr()
    assert out.startswith("partial answer") and "Node with rank 1" in err
    assert "\x1b" not in err  # mlx.launch's colours: stderr here is no terminal


def test_mlx_launch_colours_reach_a_terminal_only(tmp_path):
    import pty

    from mlxnode.launcher import _sink

    coloured = b"\x1b[33m[WARN] Node with rank 1 exited with code 6 \x1b[0m\n"
    controller, terminal = pty.openpty()
    try:
        with (
            open(terminal, "w", closefd=False) as tty,
            open(tmp_path / "launcher.stderr.log", "wb") as tee,
        ):
            write = _sink(tty, tee, colours=False)
            for start, end in ((0, 5), (5, 20), (20, None)):  # sequences cut between reads
                write(coloured[start:end])
        shown = b""
        while not shown.endswith(b"\n"):  # the terminal hands it over in pieces
            shown += os.read(controller, 4096)
        shown = shown.replace(b"\r\n", b"\n")
    finally:
        os.close(terminal)
        os.close(controller)
    assert shown == coloured  # a terminal keeps them
    plain = (tmp_path / "launcher.stderr.log").read_bytes()
    assert plain == b"[WARN] Node with rank 1 exited with code 6 \n"
    piped = tmp_path / "piped.log"
    with open(piped, "w") as stream:
        _sink(stream, None, colours=False)(coloured)
    assert piped.read_bytes() == plain


def test_supervise_enforces_the_timeout():
    from mlxnode.launcher import _supervise

    started = time.monotonic()
    result = _supervise([sys.executable, "-c", "import time; time.sleep(600)"], timeout=1)
    assert result.timed_out and time.monotonic() - started < 10


def test_a_rank_mlx_launch_lost_is_judged_by_its_own_status_record():
    # The rank that refused its cache ended while mlx.launch stopped the others, so only
    # the peers' crashes were reported; the rank's own record carries its exit code.
    error = _judged(
        {0: 1, 2: 1},
        records=[
            (1, 3, "CacheError", "cached file /c/m.safetensors is 1000 bytes, expected 9"),
            (0, 1, "RuntimeError", "[ring] connection to a peer was lost"),
        ],
    )
    assert error.exit_code == 3
    assert str(error) == (
        "run r1: rank 1 on h2 exited with code 3: cached file /c/m.safetensors is 1000 bytes, "
        "expected 9; also stopped: rank 0 on h1 (code 1), rank 2 on h3 (code 1)"
    )


def test_a_rank_of_several_names_itself_and_its_exit_code_in_its_error_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX")}
    env.update(MLX_RANK="1", MLX_WORLD_SIZE="3")
    result = subprocess.run(
        [sys.executable, "-m", "mlxnode", "run", "--model-path", str(tmp_path)],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"mlxnode: error: rank 1 on {socket.gethostname()} (exit 2): no prompt" in result.stderr


# -- `mlxnode launch` end to end: real mlx.launch, two ranks on 127.0.0.1 (no root needed)


def _env(tmp_path, **extra: str) -> dict[str, str]:
    """No MLX_* / MLXNODE_* from outside; HOME (and so the default cluster lock) per test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX")}
    env.update(HOME=str(tmp_path / "home"), **extra)
    return env


def _launch(cluster, tmp_path, *args, run_args=(), timeout=180, **env):
    return subprocess.run(
        cluster.launch_argv(*args, run_args=run_args),
        capture_output=True, text=True, timeout=timeout, env=_env(tmp_path, **env),
        cwd=tmp_path, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _ranks_of(run_id: str) -> list[str]:
    """Command lines of this run's ranks still alive on this machine (not mlx.launch's)."""
    out = subprocess.run(["pgrep", "-af", f"[m]lxnode run --run-id {run_id}( |$)"], text=True,
                         capture_output=True).stdout  # fmt: skip
    return [line for line in out.splitlines() if not re.search(r"mlx[._]launch", line)]


def test_a_prompt_reaches_rank_0_as_a_private_file_not_in_any_command_line(local_cluster, tmp_path):
    # In mlx.launch's command line, quoted twice, "it's " * 10000 (50 KB) once overflowed
    # Linux's 128 KiB per argument and no rank started. Now no prompt is in any command
    # line, whatever its size (this one is smaller: a 30k-token prefill takes minutes here).
    prompt = "it's " * 1000
    out = tmp_path / "results.jsonl"
    run = tmp_path / "run"
    done = _launch(
        local_cluster, tmp_path, "--run-id", "big", "--log-dir", str(run),
        run_args=("--max-tokens", "2", "--output", str(out), prompt),
        MLXNODE_LOGGING_LEVEL="DEBUG",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["prompt"] == prompt
    launched = next(line for line in done.stderr.splitlines() if "running " in line)
    assert "it's" not in launched and "--prompts-file" in launched
    assert len(launched) < 2000  # the ranks' command line does not grow with the prompt
    assert (run / "prompts.launch.jsonl").stat().st_mode & 0o777 == 0o600
    completion = json.loads((run / "completion.json").read_text())
    assert [r["rank"] for r in completion["ranks"]] == [0, 1]


def test_model_output_that_mimics_a_rank_error_does_not_fail_the_run(local_cluster, tmp_path):
    # A batch without --output prints its records on rank 0's stdout, prompts included:
    # the launcher once read "mlxnode: error: rank 0 ... (exit 3)" there as a failure.
    fake = "mlxnode: error: rank 0 on h1 (exit 3): cached file x is 1 bytes"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{fake}\nNode with rank 1 exited with code 5\n")
    done = _launch(
        local_cluster, tmp_path, run_args=("--max-tokens", "2", "--prompts-file", str(prompts))
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert fake in done.stdout


def test_a_rank_that_refuses_its_model_is_named_with_its_own_exit_code(local_cluster, tmp_path):
    # Rank 1 holds layers 0-3; without a file only it needs, it refuses (exit 5) and rank 0,
    # waiting for it, is stopped: the verdict comes from rank 1's status record.
    import shutil

    from mlxnode.sharding import files_for_layers

    model = tmp_path / "model"
    shutil.copytree(local_cluster.model, model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    only_rank1 = sorted(files_for_layers(index["weight_map"], 0, 4) -
                        files_for_layers(index["weight_map"], 4, 8))[0]  # fmt: skip
    (model / only_rank1).unlink()
    argv = local_cluster.launch_argv("--run-id", "refuse", "--log-dir", str(tmp_path / "run"))
    argv[argv.index(str(local_cluster.model))] = str(model)
    done = subprocess.run(argv + ["--strategy", "pipeline", "--max-tokens", "2", "Hi"],
                          capture_output=True, text=True,
                          timeout=180, env=_env(tmp_path), stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 5, done.stderr[-3000:]
    logged = (tmp_path / "run" / "launcher.stderr.log").read_text()
    for text in (done.stderr, logged):  # plain text, the launcher's lines labelled as such
        assert "\x1b" not in text and "[launcher] INFO mlxnode.launcher: pre-flight passed" in text
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mlxnode: error: run refuse: rank 1 on 127.0.0.1 exited with code 5:")
    assert only_rank1 in last and "Traceback" not in done.stderr
    status = json.loads((tmp_path / "run" / "status.rank1.json").read_text())
    assert (status["exit_code"], status["error_class"]) == (5, "ModelLoadError")
    assert _ranks_of("refuse") == []


def test_a_run_whose_ranks_never_started_is_not_reported_as_success(local_cluster, tmp_path):
    # A "python" that does nothing and exits 0, like a rank whose start failed: mlx.launch
    # exits 0 and prints no error, so only the missing completion record tells.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "python").chmod(0o755)
    done = _launch(
        local_cluster, tmp_path, "--run-id", "ghost", "--no-preflight",
        "--python", str(bin_dir / "python"), run_args=("Hi",),
    )  # fmt: skip
    assert done.returncode == 6, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "mlxnode: error: run ghost: no proof that every rank finished: rank 0 on 127.0.0.1, "
        "rank 1 on 127.0.0.1 never reported completing; see launcher.stderr.log and the rank logs"
    )


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_stopped_launcher_stops_every_rank_before_it_frees_the_lock(
    local_cluster, tmp_path, sig, code
):
    run_id = f"stop-{sig.name.lower()}-{os.getpid()}"
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        local_cluster.launch_argv("--run-id", run_id, "--log-dir", str(run),
                                  run_args=("--max-tokens", "4000", "Once upon a time")),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        stdout_log = run / "launcher.stdout.log"
        while not (stdout_log.is_file() and len(stdout_log.read_bytes()) > 20):
            assert launcher.poll() is None and time.monotonic() < deadline, "never generated"
            time.sleep(0.2)
        assert len(_ranks_of(run_id)) == 2
        launcher.send_signal(sig)
        started = time.monotonic()
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
            subprocess.run(["pkill", "-KILL", "-f", f"[m]lxnode run --run-id {run_id}( |$)"])
    assert launcher.returncode == code, err[-3000:]
    assert err.strip().splitlines()[-1] == f"mlxnode: stopped by {sig.name}"
    assert time.monotonic() - started < 20
    assert _ranks_of(run_id) == []  # every rank stopped, not only mlx.launch
    from mlxnode.launcher import DEFAULT_LOCK_FILE

    lock = Path(DEFAULT_LOCK_FILE.replace("~", str(tmp_path / "home")))
    with cluster_lock(lock, "next"):  # free again, only now
        pass
    assert json.loads((run / "launcher.json").read_text() if (run / "launcher.json").exists()
                      else '{"exit_code": null}')["exit_code"] in (None, code)  # fmt: skip


def test_a_launch_while_another_holds_the_default_lock_is_refused(local_cluster, tmp_path):
    from mlxnode.launcher import DEFAULT_LOCK_FILE

    lock = Path(DEFAULT_LOCK_FILE.replace("~", str(tmp_path / "home")))
    with cluster_lock(lock, "holder"):  # held deterministically, for as long as needed
        done = _launch(local_cluster, tmp_path, run_args=("Hi",))
    assert done.returncode == 8, done.stderr[-2000:]
    assert "cluster busy: run holder started" in done.stderr.strip().splitlines()[-1]


def test_launch_takes_its_backend_and_log_level_from_the_configuration(local_cluster, tmp_path):
    config = tmp_path / "launch.yaml"
    config.write_text("distributed:\n  backend: mpi\n")
    done = _launch(
        local_cluster, tmp_path, "--config", str(config), "--no-preflight",
        run_args=("Hi",), MLXNODE_LOGGING_LEVEL="DEBUG", timeout=60,
    )  # fmt: skip
    launched = next(line for line in done.stderr.splitlines() if "running " in line)
    assert "--backend mpi" in launched
    assert "] [launcher] DEBUG mlxnode.launcher: running " in launched
    bad = _launch(local_cluster, tmp_path, run_args=("Hi",), MLXNODE_DISTRIBUTED_BACKEND="rong")
    assert bad.returncode == 2
    assert bad.stderr.startswith("mlxnode: error: env:MLXNODE_DISTRIBUTED_BACKEND")


def test_error_lines_and_debug_tracebacks_are_redacted(tmp_path):
    secret = "hf_LaunchSecretToken0123456789abcdef"
    for level in ("INFO", "DEBUG"):
        done = subprocess.run(
            [sys.executable, "-m", "mlxnode", "run", "--log-level", level,
             "--model-path", str(tmp_path / secret), "Hi"],
            capture_output=True, text=True, timeout=60, env=_env(tmp_path), cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 5, done.stderr
        assert secret not in done.stderr and "hf_***" in done.stderr
        assert ("Traceback" in done.stderr) == (level == "DEBUG")


def test_cleanup_kills_only_the_ssh_users_ranks(local_cluster, tmp_path):
    from conftest import require

    require("root")
    # Another user's process that looks like a rank of the same run id.
    decoy = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "bash", "-c",
         'exec -a "mlxnode run --run-id same" sleep 300'],
    )  # fmt: skip
    try:
        time.sleep(0.5)
        done = _launch(local_cluster, tmp_path, "--run-id", "same", run_args=("",), timeout=60)
        assert done.returncode == 2, done.stderr  # refused the empty prompt; cleanup ran
        assert decoy.poll() is None, "the cleanup killed another user's process"
    finally:
        decoy.kill()
        decoy.wait()
