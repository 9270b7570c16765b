"""The watchdog ends a stuck process with exit code 6, naming its rank and host."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time

from mlxnode.errors import DistributedSetupError

STUCK = textwrap.dedent(
    """
    import time
    from mlxnode.logs import setup_logging
    from mlxnode.watchdog import Watchdog

    setup_logging("INFO")
    with Watchdog(rank=3, timeout=1.0) as dog, dog.guard("testing a stuck step"):
        for _ in range(int({beats})):
            time.sleep(0.3)
            dog.beat()
        time.sleep({stuck})
    print("finished", flush=True)
    """
)


def _run(beats: int, stuck: float) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", STUCK.format(beats=beats, stuck=stuck)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, time.monotonic() - started


def test_a_stuck_phase_exits_6_naming_rank_and_host():
    result, seconds = _run(beats=0, stuck=30)
    assert result.returncode == DistributedSetupError.exit_code == 6
    assert result.stdout == ""
    assert seconds < 10
    host = socket.gethostname()
    line = f"rank 3 on {host}: no progress for 1s while testing a stuck step"
    # One line on the console: the CLI's; the log record goes to a log file only.
    assert result.stderr.count(line) == 1, result.stderr
    assert f"mlxnode: error: {line}" in result.stderr


def test_beats_keep_a_slow_but_moving_phase_alive():
    result, _ = _run(beats=6, stuck=0)  # 1.8 s in all, never 1 s without a beat
    assert result.returncode == 0, result.stderr
    assert result.stdout == "finished\n"


def test_sigterm_ends_a_guarded_phase_at_once_with_its_name_and_exit_143():
    script = textwrap.dedent(
        """
        import time
        from mlxnode.logs import setup_logging
        from mlxnode.watchdog import Watchdog

        setup_logging("INFO")
        with Watchdog(rank=1, timeout=0, exit_on_signals=True) as dog, dog.guard("decoding"):
            print("ready", flush=True)
            time.sleep(60)
        print("finished", flush=True)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "ready\n"
    process.terminate()
    started = time.monotonic()
    stdout, stderr = process.communicate(timeout=30)
    assert time.monotonic() - started < 5
    assert process.returncode == 128 + 15, stderr
    assert stdout == ""  # the rest of the phase never ran
    host = socket.gethostname()
    line = f"rank 1 on {host}: stopped by SIGTERM while decoding"
    assert stderr.count(line) == 1, stderr
    assert f"mlxnode: {line}" in stderr
