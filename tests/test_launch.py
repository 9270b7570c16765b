"""The launcher's cluster lock and the paramiko pre-flight, with real processes and sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mlxnode import preflight
from mlxnode.errors import ClusterBusyError, DistributedSetupError
from mlxnode.launcher import cluster_lock


def test_second_holder_is_told_who_is_running(tmp_path):
    lock = tmp_path / "cluster.lock"
    busy = pytest.raises(ClusterBusyError, match=r"cluster busy: run run-one started \d{4}-")
    with cluster_lock(lock, "run-one"), busy, cluster_lock(lock, "run-two"):
        pass
    with cluster_lock(lock, "run-three"):
        assert json.loads(lock.read_text())["run_id"] == "run-three"
    assert not lock.exists()


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
    preflight.ensure_ready(reports)


def test_preflight_names_a_busy_port(tmp_path):
    hosts = preflight.load_hostfile(write_hostfile(tmp_path / "h.json", ["127.0.0.1"] * 2))
    port = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port + 1))  # rank 1's ring port
        squatter.listen()
        reports = preflight.check_hosts(hosts, python=sys.executable, starting_port=port)
    with pytest.raises(DistributedSetupError, match=rf"rank 1 on 127.0.0.1: port {port + 1}"):
        preflight.ensure_ready(reports)


def test_preflight_fails_fast_naming_an_unreachable_host(tmp_path):
    # Nothing listens for SSH on 127.0.0.2: refused at once, like a powered-off Mac's IP.
    hosts = preflight.load_hostfile(write_hostfile(tmp_path / "h.json", ["127.0.0.1", "127.0.0.2"]))
    started = time.monotonic()
    reports = preflight.check_hosts(hosts, python=sys.executable, timeout=3)
    assert time.monotonic() - started < 20
    with pytest.raises(DistributedSetupError, match="rank 1 on 127.0.0.2: unreachable over SSH"):
        preflight.ensure_ready(reports)


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
        preflight.HostReport(0, "a", True, python="/v/bin/python", mlx="0.32.4", mlxnode="0.1.0"),
        preflight.HostReport(1, "b", True, python="/v/bin/python", mlx="0.31.0", mlxnode="0.1.0"),
    ]
    with pytest.raises(DistributedSetupError) as info:
        preflight.ensure_ready(reports)
    assert "mlx differs between hosts: 0.31.0, 0.32.4" in str(info.value)
    assert "0.31.0" in preflight.format_table(reports)


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
