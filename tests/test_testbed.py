"""End-to-end tests of the testbed: real namespaces, real sshd, real SSH clients, no mocks."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
import yaml
from conftest import requires, session_testbed

from tests.support import testbed as tb_mod

# Names and subnets of this session's own: a developer's `mlxnode` testbed, or another
# session's, is never touched.
NAME, SUBNET = session_testbed("t")
DOWN_NAME, DOWN_SUBNET = session_testbed("d")
NET = SUBNET.rsplit(".", 1)[0]  # e.g. "10.216.42"
PREFIX = NAME[:4]  # interfaces are named after it
HOSTS = 3

# Missing root, iproute2 or sshd skips these tests, or fails them under CI.
pytestmark = [pytest.mark.e2e, requires("root", "iproute2", "sshd")]


@pytest.fixture(scope="session")
def testbed() -> Iterator[tb_mod.Testbed]:
    bed = tb_mod.Testbed(NAME, hosts=HOSTS, subnet=SUBNET)
    bed.down()  # whatever an interrupted earlier run left behind
    try:
        started = time.monotonic()
        bed.up()
        print(f"\ntestbed up with {HOSTS} hosts in {time.monotonic() - started:.2f} s")
        yield bed
    finally:
        bed.down()


def ssh(bed: tb_mod.Testbed, host: str, command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        bed.ssh_command(host, command, **kwargs), capture_output=True, text=True, timeout=30
    )


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_every_host_answers_over_ssh_with_its_own_address_and_name(testbed):
    assert [h.name for h in testbed.hosts] == ["h1", "h2", "h3"]
    assert testbed.controller_ip == f"{NET}.1"
    for host in testbed.hosts:
        out = ssh(testbed, host.name, "hostname; hostname -I; ip -4 -o addr show dev eth0")
        assert out.returncode == 0, out.stderr
        name, addresses, eth0 = out.stdout.splitlines()
        assert name == host.name
        assert addresses.split() == [host.ip]
        assert f"inet {host.ip}/24" in eth0


def test_host_key_checking_is_on(testbed, tmp_path):
    argv = testbed.ssh_command("h1", "true")
    assert "StrictHostKeyChecking=yes" in argv
    assert not any("StrictHostKeyChecking=no" in a for a in argv)
    # The same command against an empty known_hosts must be refused.
    empty = tmp_path / "known_hosts"
    empty.touch()
    argv = [a.replace(str(testbed.known_hosts_path), str(empty)) for a in argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode == 255
    assert "Host key verification failed" in out.stderr


def test_each_host_has_its_own_processes(testbed):
    start_sleep = "nohup sleep 311 >/dev/null 2>&1 & until pgrep -x sleep >/dev/null; do :; done"
    out = ssh(testbed, "h2", f"{start_sleep}; ps -eo pid=,comm=")
    processes = [line.split() for line in out.stdout.splitlines()]
    assert ["1", "sshd"] in processes  # sshd is the host's init
    assert [c for _, c in processes if c == "sleep"] == ["sleep"]
    # pkill on one host must not reach another: h1 sees no sleep of h2's.
    assert ssh(testbed, "h1", "pgrep -x sleep").returncode == 1
    assert ssh(testbed, "h2", "pkill -x sleep").returncode == 0


def test_each_host_has_a_private_root_and_tmp(testbed):
    marker = f"testbed-marker-{uuid.uuid4().hex}"
    try:
        out = ssh(testbed, "h1", f"touch /root/{marker} /tmp/{marker}")
        assert out.returncode == 0, out.stderr
        assert (
            ssh(testbed, "h1", f"test -e /root/{marker} && test -e /tmp/{marker}").returncode == 0
        )
        assert (
            ssh(testbed, "h2", f"test -e /root/{marker} || test -e /tmp/{marker}").returncode == 1
        )
        assert not Path("/root", marker).exists()
        assert not Path("/tmp", marker).exists()
        # The controller's state (its private key, the other hosts' dirs) is hidden too.
        out = ssh(testbed, "h1", f"ls -A {testbed.state_root}")
        assert (out.returncode, out.stdout) == (0, "")
    finally:
        ssh(testbed, "h1", f"rm -f /root/{marker} /tmp/{marker}")


def test_host_to_host_ssh_works_once_a_key_is_placed(testbed):
    # Test-only: a role will install the launcher's own key; here h1 borrows the controller's.
    key, known_hosts = "/root/.ssh/testbed_peer_key", "/root/.ssh/testbed_known_hosts"
    try:
        for source, target in ((testbed.key_path, key), (testbed.known_hosts_path, known_hosts)):
            out = subprocess.run(
                testbed.ssh_command("h1", f"umask 077 && cat > {target}"),
                input=source.read_text(),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.returncode == 0, out.stderr
        h2 = testbed.host("h2")
        out = ssh(
            testbed,
            "h1",
            f"ssh -i {key} -o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes "
            f"-o BatchMode=yes root@{h2.ip} 'hostname; hostname -I'",
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["h2", h2.ip]
        # The names resolve on the hosts too, through each host's private /etc/hosts.
        out = ssh(testbed, "h1", "getent hosts h3")
        assert out.stdout.split() == [testbed.host("h3").ip, "h3"]
    finally:
        ssh(testbed, "h1", f"rm -f {key} {known_hosts}")


def test_paramiko_connects_with_known_hosts_and_reject_policy(testbed):
    for host in testbed.hosts:
        client = paramiko.SSHClient()
        client.load_host_keys(str(testbed.known_hosts_path))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                host.ip,
                username="root",
                key_filename=str(testbed.key_path),
                look_for_keys=False,
                allow_agent=False,
                timeout=10,
            )
            _, stdout, _ = client.exec_command("hostname")
            assert stdout.read().decode().strip() == host.name
        finally:
            client.close()
    stranger = paramiko.SSHClient()
    stranger.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        stranger.connect(
            testbed.hosts[0].ip,
            username="root",
            key_filename=str(testbed.key_path),
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
        )
    stranger.close()


def test_ansible_pings_every_host_through_the_written_inventory(testbed, tmp_path):
    inventory = testbed.write_inventory(
        tmp_path / "hosts.yml",
        extra_host_vars={"h1": {"mlxnode_rank": 0}},
        group_vars={"mlxnode_backend": "ring"},
    )
    parsed = yaml.safe_load(inventory.read_text())["all"]["children"]["mlx_cluster"]
    assert parsed["hosts"]["h1"] == {
        "ansible_host": f"{NET}.11",
        "mlxnode_mlx_ip": f"{NET}.11",
        "mlxnode_rank": 0,
    }
    assert parsed["vars"]["ansible_python_interpreter"] == "/usr/bin/python3"
    assert parsed["vars"]["mlxnode_backend"] == "ring"
    config = tmp_path / "ansible.cfg"
    # No ControlPersist: its background ssh masters would outlive the test.
    config.write_text("[defaults]\nhost_key_checking = True\n[ssh_connection]\nssh_args =\n")
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(config),
        "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
    }
    ansible = Path(sys.executable).parent / "ansible"
    out = subprocess.run(
        [str(ansible), "-i", str(inventory), "mlx_cluster", "-m", "ansible.builtin.ping"],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for host in testbed.hosts:
        assert f"{host.name} | SUCCESS" in out.stdout


def test_set_link_partitions_one_host_and_heals_it(testbed):
    def reachable(host: str) -> bool:
        return ssh(testbed, host, "true", connect_timeout=1).returncode == 0

    try:
        testbed.set_link("h2", False)
        assert wait_for(lambda: not reachable("h2"), timeout=3)
        assert reachable("h1") and reachable("h3")
        assert [s.link_up for s in testbed.status()] == [True, False, True]
    finally:
        testbed.set_link("h2", True)
    assert wait_for(lambda: reachable("h2"), timeout=5)


def test_kill_host_processes_spares_sshd(testbed):
    out = ssh(testbed, "h3", "nohup sleep 300 >/dev/null 2>&1 & echo started")
    assert out.stdout.strip() == "started"
    killed: list[int] = []

    def kill_sleep() -> bool:  # the job may not have exec'd `sleep` yet when ssh returns
        killed.extend(testbed.kill_host_processes("h3", r"^sleep 300$"))
        return bool(killed)

    assert wait_for(kill_sleep, timeout=3)
    assert len(killed) == 1
    assert wait_for(lambda: not any(tb_mod._is_running(pid) for pid in killed), timeout=3)
    assert testbed.kill_host_processes("h3", "sshd") == []
    assert ssh(testbed, "h3", "true").returncode == 0


def test_up_again_is_a_noop(testbed):
    key = testbed.key_path.read_bytes()
    pids = [s.sshd_pid for s in testbed.status()]
    assert testbed.up() == []
    assert tb_mod.Testbed(NAME).up() == []  # size and subnet come from the running testbed
    assert [s.sshd_pid for s in testbed.status()] == pids
    assert testbed.key_path.read_bytes() == key


def test_up_restarts_a_dead_sshd(testbed):
    dead = testbed.status()[0].sshd_pid
    os.kill(dead, signal.SIGKILL)
    assert wait_for(lambda: not testbed.status()[0].reachable, timeout=3)
    actions = testbed.up()
    assert len(actions) == 1 and actions[0].startswith("started sshd on h1")
    assert testbed.status()[0].reachable
    assert testbed.status()[0].sshd_pid != dead


def test_up_with_another_size_is_refused_and_changes_nothing(testbed, capsys):
    with pytest.raises(tb_mod.TestbedUsageError, match="is up with 3 hosts"):
        tb_mod.Testbed(NAME, hosts=4, subnet=SUBNET).up()
    assert tb_mod.main(["up", "--name", NAME, "--hosts", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run `down` first" in err
    assert len(testbed.status()) == HOSTS


def test_a_subnet_in_use_elsewhere_is_refused_before_anything_is_created():
    bed = tb_mod.Testbed("mlxsubnet", hosts=1, subnet="127.0.0.0/24")
    with pytest.raises(tb_mod.TestbedUsageError, match="overlaps 127.0.0.1/8 on interface lo"):
        bed.up()
    assert not bed.state_dir.exists()
    assert not Path("/run/netns/mlxsubnet-h1").exists()


def test_another_testbed_cannot_take_this_ones_subnet_or_interfaces(testbed):
    with pytest.raises(
        tb_mod.TestbedUsageError, match=f"overlaps {NET}.1/24 on interface {PREFIX}br0"
    ):
        tb_mod.Testbed("other", hosts=1, subnet=SUBNET).up()
    # Interfaces are named after the first four letters of the testbed's name.
    clash = f"{PREFIX}x"
    with pytest.raises(tb_mod.TestbedUsageError, match=f"interface {PREFIX}br0 exists but testbed"):
        tb_mod.Testbed(clash, hosts=1, subnet=DOWN_SUBNET).up()
    assert not (testbed.state_root / "other").exists()
    assert not (testbed.state_root / clash).exists()


def test_cli_status_prints_json_and_a_table(testbed, capsys):
    assert tb_mod.main(["status", "--name", NAME, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["healthy"] is True
    assert [h["ip"] for h in report["hosts"]] == [h.ip for h in testbed.hosts]
    assert report["known_hosts"] == str(testbed.known_hosts_path)
    assert tb_mod.main(["status", "--name", NAME]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["HOST", "IP", "NETNS", "SSHD", "LINK", "SSH", "CPUS", "MEMORY"]
    assert table[2].split()[:3] == ["h1", f"{NET}.11", f"{NAME}-h1"]
    assert table[2].split()[-3:] == ["all", "no", "limit"]  # not pinned


def test_cli_refuses_to_run_without_root():
    # Map root to uid 1000 in a user namespace: not root, yet the venv under /root is readable.
    out = subprocess.run(
        ["unshare", "--map-user=1000", "--map-group=1000"]
        + [sys.executable, "-m", "tests.support.testbed", "status", "--name", NAME],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "error: the testbed must run as root (it creates namespaces)"
    ]


def test_down_removes_exactly_what_up_created_and_twice_is_harmless():
    bed = tb_mod.Testbed(DOWN_NAME, hosts=2, subnet=DOWN_SUBNET)
    bed.down()
    try:
        started = time.monotonic()
        bed.up()
        up_seconds = time.monotonic() - started
        pids = [s.sshd_pid for s in bed.status()]
        assert all(pids)
        # A session still running on a host must not keep anything alive.
        ssh(bed, "h1", "nohup sleep 317 >/dev/null 2>&1 &")
        started = time.monotonic()
        removed = bed.down()
        down_seconds = time.monotonic() - started
        print(f"\n{DOWN_NAME}: up {up_seconds:.2f} s, down {down_seconds:.2f} s")
    finally:
        bed.down()
    prefix = DOWN_NAME[:4]
    assert f"deleted bridge {prefix}br0" in removed
    assert not any(Path("/run/netns", f"{DOWN_NAME}-h{i}").exists() for i in (1, 2))
    links = (f"{prefix}br0", f"{prefix}-h1", f"{prefix}-h2")
    assert not any(Path("/sys/class/net", n).exists() for n in links)
    assert not bed.state_dir.exists()
    assert not any(tb_mod._is_running(pid) for pid in pids)
    stray = [
        pid
        for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
        if tb_mod._is_running(pid)
        and (tb_mod._cmdline(pid) == "sleep 317" or str(bed.state_dir) in tb_mod._cmdline(pid))
    ]
    assert stray == []
    assert bed.down() == []
    assert bed.status() == []


def test_pinned_hosts_get_their_own_cpus_and_memory_limit_and_down_removes_them():
    cpus = {"h1": "0", "h2": str((os.cpu_count() or 1) - 1)}
    bed = tb_mod.Testbed(DOWN_NAME, hosts=2, subnet=DOWN_SUBNET, cpus=cpus, memory={"h1": "600M"})
    bed.down()
    try:
        bed.up()
        statuses = {s.name: s for s in bed.status()}
        assert (statuses["h1"].cpus, statuses["h1"].memory_bytes) == ("0", 600 * 2**20)
        assert (statuses["h2"].cpus, statuses["h2"].memory_bytes) == (cpus["h2"], None)
        # Every session inherits the host's cgroups from its sshd.
        out = ssh(bed, "h1", "grep -E ':(cpuset|memory):' /proc/self/cgroup; nproc")
        assert out.returncode == 0, out.stderr
        cgroup = f"/mlxnode-testbed/{DOWN_NAME}/h1"
        *groups, cores = out.stdout.split()
        assert sorted(g.split(":", 1)[1] for g in groups) == [
            f"cpuset:{cgroup}",
            f"memory:{cgroup}",
        ]
        assert cores == "1"
        limit = ssh(bed, "h1", f"cat /sys/fs/cgroup/memory{cgroup}/memory.limit_in_bytes")
        assert limit.stdout.strip() == str(600 * 2**20)
        table = subprocess.run(
            [sys.executable, "-m", "tests.support.testbed", "status", "--name", DOWN_NAME],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert "CPUS  MEMORY" in table.stdout and "600 MiB" in table.stdout, table.stdout
    finally:
        removed = bed.down()
    assert "removed memory cgroup of h1" in removed
    assert not Path(f"/sys/fs/cgroup/cpuset/mlxnode-testbed/{DOWN_NAME}").exists()
    assert not Path(f"/sys/fs/cgroup/memory/mlxnode-testbed/{DOWN_NAME}").exists()


def test_bad_limits_are_named():
    with pytest.raises(tb_mod.TestbedUsageError, match="memory limit '6 GB'"):
        tb_mod.Testbed(DOWN_NAME, memory={"h1": "6 GB"})
    with pytest.raises(tb_mod.TestbedUsageError, match="CPUs 'first' for h1"):
        tb_mod.Testbed(DOWN_NAME, cpus={"h1": "first"})
