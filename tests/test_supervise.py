"""`--supervise`: a rank killed mid-stream fails the request and the server fast, and the
supervisor brings the whole group back without a manual step.

Two local ranks under `mlxnode launch --supervise -- serve` (real mlx.launch, ring backend);
the back-off itself is tested on a command that fails.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import sys
import threading
import time

import pytest
from test_engine import _free_ports
from test_serve import _rank_pid, serving

from mlxnode import supervisor

pytestmark = pytest.mark.slow

RECOVERY_TIMEOUT = 120.0


def _ready_status(url: str) -> int | None:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/ready")
        return conn.getresponse().status
    except OSError:
        return None  # between two groups nothing listens
    finally:
        conn.close()


def test_a_killed_rank_errors_the_stream_and_the_group_comes_back(local_cluster, tmp_path):
    run_id = f"supervised-{os.getpid()}"
    launch = [
        str(local_cluster.venv_bin / "mlxnode"), "launch", "--supervise",
        "--hostfile", str(local_cluster.hostfile), "--starting-port", str(_free_ports(2)),
        "--run-id", run_id, "--",
    ]  # fmt: skip
    args = ["--ready-window", "3", "--ready-deadline", "2", "--step-timeout", "10"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX")}
    env["HOME"] = str(tmp_path / "home")
    with serving(local_cluster.model, *args, launch=launch, env=env, cwd=tmp_path) as server:
        first_rank0 = _rank_pid(run_id, 0)
        streaming = threading.Event()
        outcome: dict[str, object] = {}

        def ask() -> None:
            try:
                stream = server.client().completions.create(
                    model="m", prompt="Once upon a time", max_tokens=4000, stream=True
                )
                for _ in stream:
                    streaming.set()
                outcome["finished"] = True
            except Exception as e:  # noqa: BLE001 - an API error, or the connection's
                outcome["error"] = e

        client = threading.Thread(target=ask)
        client.start()
        assert streaming.wait(60), "no token came"
        os.kill(_rank_pid(run_id, 1), signal.SIGKILL)
        killed = time.monotonic()
        client.join(60)
        assert not client.is_alive(), "the request hangs after its rank died"
        assert "error" in outcome, outcome
        print(f"\nclient error {time.monotonic() - killed:.1f} s after the kill: {outcome}")

        # Down (503 or nothing listening), then ready again on a new group, untouched.
        seen_down = False
        while time.monotonic() - killed < RECOVERY_TIMEOUT:
            status = _ready_status(server.url)
            seen_down = seen_down or status != 200
            with contextlib.suppress(AssertionError):
                if seen_down and status == 200 and _rank_pid(run_id, 0) != first_rank0:
                    break
            time.sleep(0.3)
        else:
            pytest.fail(f"not ready again in {RECOVERY_TIMEOUT}s:\n{server.log.read_text()}")
        print(f"ready again {time.monotonic() - killed:.1f} s after the kill")
        answer = server.client().completions.create(model="m", prompt="Hi", max_tokens=4)
        assert answer.usage.completion_tokens > 0
        assert "restarting the whole group" in server.log.read_text()


def test_the_supervisor_backs_off_and_stops_on_a_permanent_failure(tmp_path):
    marker = tmp_path / "runs"
    # Fails with 6 (a rank died) twice, then with 2 (a bad flag), which a restart cannot fix.
    script = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); n = len(p.read_text()) "
        "if p.exists() else 0; p.write_text('x' * (n + 1)); sys.exit(6 if n < 2 else 2)"
    )
    started = time.monotonic()
    code = supervisor.supervise(
        [sys.executable, "-c", script, str(marker)], backoff=0.2, healthy_after=60
    )
    assert code == 2
    assert marker.read_text() == "xxx"
    assert time.monotonic() - started >= 0.2 + 0.4  # 0.2 s, then 0.4 s


def test_without_flag_keeps_the_ranks_arguments():
    argv = ["launch", "--supervise", "--hostfile", "h.json", "--", "serve", "--supervise"]
    assert supervisor.without_flag(argv) == [
        "launch",
        "--hostfile",
        "h.json",
        "--",
        "serve",
        "--supervise",
    ]
