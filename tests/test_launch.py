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
from mlxnode.errors import ClusterBusyError, DistributedSetupError, PreflightError
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
        preflight.HostReport(2, "c", True, python="/v/bin/python", mlx="0.32.4", mlxnode="0.1.0"),
    ]
    with pytest.raises(PreflightError) as info:
        preflight.ensure_ready(reports)
    assert "mlx differs between hosts: 0.32.4 on a, c vs 0.31.0 on b;" in str(info.value)
    assert "\n" not in str(info.value)  # one line; the table travels beside it
    assert "0.31.0" in info.value.table and info.value.table == preflight.format_table(reports)


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
    ],
)
def test_rank_pattern_matches_only_this_runs_ranks(cmdline, matches):
    import re

    from mlxnode.launcher import rank_pattern

    assert bool(re.search(rank_pattern("r1"), cmdline)) is matches


@pytest.mark.parametrize("run_id", ["", "-x", "a b", "a;b", "a/b", "x" * 129])
def test_run_ids_that_cannot_be_a_directory_or_pattern_are_refused(run_id):
    from mlxnode.errors import UsageError
    from mlxnode.launcher import check_run_id

    with pytest.raises(UsageError, match="run id"):
        check_run_id(run_id)


def _judged(failed, *, errors=(), unreachable=None, returncode=0, timed_out=False):
    from mlxnode.launcher import _judge, _Supervised

    hosts = [preflight.HostSpec(r, f"10.0.0.{r + 1}", name=f"h{r + 1}") for r in range(3)]
    result = _Supervised(returncode, dict(failed), timed_out, 1.0, 30.0, list(errors))
    try:
        _judge(result, hosts, "r1", unreachable or {})
    except Exception as e:  # noqa: BLE001 - the tests look at what was raised
        return e
    return None


def test_a_rank_killed_mid_run_is_named_not_the_peers_that_lost_it():
    error = _judged(
        {1: 255, 0: 6, 2: -15},
        errors=["rank 0 on h1 lost a peer while generating: [ring] lost; see the other logs"],
    )
    assert isinstance(error, DistributedSetupError) and error.exit_code == 6
    assert str(error) == (
        "run r1: rank 1 on h2 was killed (its process ended without an exit status); "
        "also stopped: rank 0 on h1 (code 6), rank 2 on h3"
    )
    assert (error.rank, error.host) == (1, "h2")


def test_a_partitioned_host_is_named_with_the_watchdog_line():
    error = _judged(
        {0: 6},
        errors=["rank 0 on h1: no progress for 5s while generating; a peer died or hung"],
        unreachable={"h3": "unreachable over SSH (timed out)"},
    )
    assert str(error) == (
        "lost contact with h3 (rank 2): unreachable over SSH (timed out); run r1: rank 0 on "
        "h1 exited with code 6: no progress for 5s while generating"
    )


def test_a_rank_that_refused_its_cache_passes_its_exit_code_through():
    error = _judged(
        {1: 3, 0: 6, 2: -15},
        errors=["cached file /c/m.safetensors is 10 bytes, expected 20; run prewarm", "rank 0 x"],
    )
    assert error.exit_code == 3
    assert str(error).startswith(
        "run r1: rank 1 on h2 exited with code 3: cached file /c/m.safetensors is 10 bytes"
    )


def test_every_rank_refusing_the_same_input_is_that_error():
    error = _judged({0: 2, 1: 2, 2: 2}, errors=["no prompt: give it as text"])
    assert error.exit_code == 2
    assert str(error) == "run r1: every rank exited with code 2: no prompt: give it as text"


def test_a_timeout_and_a_clean_run_are_told_apart():
    error = _judged({}, timed_out=True, unreachable={"h2": "unreachable over SSH"})
    assert "passed its timeout of 30s" in str(error) and "lost contact with h2" in str(error)
    assert _judged({}) is None
    assert "mlx.launch exited with code 2" in str(_judged({}, returncode=2))


FAKE_LAUNCH = r"""
import sys, time
sys.stdout.write("partial answer"); sys.stdout.flush()
sys.stdout.write("\r\nmlxnode: error: rank 1 on h2 lost a peer while generating: x; y\r\n")
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
    assert result.failed == {1: 6} and not result.timed_out
    assert result.errors == ["rank 1 on h2 lost a peer while generating: x; y"]
    out, err = capfd.readouterr()
    assert out.startswith("partial answer") and "Node with rank 1" in err


def test_supervise_enforces_the_timeout():
    from mlxnode.launcher import _supervise

    started = time.monotonic()
    result = _supervise([sys.executable, "-c", "import time; time.sleep(600)"], timeout=1)
    assert result.timed_out and time.monotonic() - started < 10


def test_a_rank_mlx_launch_lost_is_judged_by_its_own_error_line():
    # The rank that refused its cache ended while mlx.launch stopped the others, so only
    # the peers' crashes were reported; the rank's own line carries its exit code.
    error = _judged(
        {0: 1, 2: 1},
        errors=[
            "rank 1 on h2 (exit 3): cached file /c/m.safetensors is 1000 bytes, expected 9",
            "RuntimeError: [ring] connection to a peer was lost",
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
