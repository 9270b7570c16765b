"""`python -m mlxnode.mlx_launch` is mlx.launch without its busy wait.

Real ring ranks on this machine, started the way `mlxnode launch` starts them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from test_engine import MLX_LAUNCH, _free_ports

TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` itself (all its threads, none of its children)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: PTH123, SIM115
    return (int(fields[11]) + int(fields[12])) / TICKS


def _ring(*command: str, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen(
        [*MLX_LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(_free_ports(2)),
         "--", sys.executable, "-c", *command],
        stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_it_waits_instead_of_spinning_while_the_ranks_work():
    # Plain mlx.launch used 3.1 s of CPU in these 5 s (a thread per rank spinning on the
    # rank's always-writable stdin pipe); waiting, it needs a few hundredths.
    launcher = _ring("import time; time.sleep(6)")
    try:
        time.sleep(1)  # past its start-up (imports, starting the ranks)
        before = _cpu_seconds(launcher.pid)
        time.sleep(4)
        used = _cpu_seconds(launcher.pid) - before
    finally:
        out, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 0, err
    assert used < 0.4, f"the launcher used {used:.2f} s of CPU in 4 s"


def test_input_still_reaches_every_rank_and_exit_codes_pass_through():
    launcher = _ring(
        "import os, sys; print('rank', os.environ['MLX_RANK'], 'read', input()); sys.exit(3)",
        stdin=subprocess.PIPE,
    )
    out, err = launcher.communicate("hello\n", timeout=60)
    assert sorted(out.splitlines()) == ["rank 0 read hello", "rank 1 read hello"], err
    assert "exited with code 3" in err
