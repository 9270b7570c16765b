"""`mlx.launch` without its busy waits: `python -m mlxnode.mlx_launch ARGS` is `mlx.launch ARGS`.

mlx.launch (MLX 0.32) spins in two places for as long as its ranks run:
- every rank has a thread that `select`s the rank's stdout and stderr for reading and the
  rank's stdin pipe for writing, with a one-second timeout; a pipe with room in it is always
  writable, so the select returns at once;
- its main thread `select`s its own stdin for 0.1 s and reads it; once that stdin has ended
  (/dev/null, a closed pipe: a script, cron, CI) it is always readable, with nothing in it.
Measured here: mlx.launch used 3.1 s of CPU in 5 s while its two ranks slept, a core taken
from the ranks on a 2-core host (and from rank 0 on any host that launches).

This runs mlx.launch's own `main` with only its `select` (and, to see stdin end, its `os`)
replaced. A rank's thread first waits for output (at most `_STDIN_POLL_SECONDS`) and then asks,
without waiting, whether the rank's stdin can take bytes: output still arrives at once, and
input given to mlx.launch still reaches every rank, within `_STDIN_POLL_SECONDS`. Once its
own stdin has ended, the main thread sleeps its 0.1 s instead of selecting it.
"""

from __future__ import annotations

import os
import select
import sys
import time
from types import SimpleNamespace

from mlx._distributed_utils import launch

_STDIN_POLL_SECONDS = 0.05
_STDIN = 0
_stdin_ended = False


def _select_without_spinning(rlist, wlist, xlist, timeout=None):
    if _stdin_ended and rlist == [_STDIN] and not wlist and timeout:
        time.sleep(timeout)
        return [], [], []
    if not wlist or not timeout:
        return select.select(rlist, wlist, xlist, timeout)
    readable, _, exceptional = select.select(rlist, [], xlist, min(timeout, _STDIN_POLL_SECONDS))
    _, writable, _ = select.select([], wlist, [], 0)
    return readable, writable, exceptional


def _read_noting_stdin_end(fd: int, size: int) -> bytes:
    global _stdin_ended
    data = os.read(fd, size)
    if fd == _STDIN and not data:
        _stdin_ended = True
    return data


def main() -> None:
    launch.select = _select_without_spinning
    launch.os = SimpleNamespace(**{**vars(os), "read": _read_noting_stdin_end})
    sys.argv[0] = "mlx.launch"
    launch.main()


if __name__ == "__main__":
    main()
