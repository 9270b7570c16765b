"""Keep a server running where no launchd or systemd does: `--supervise`.

`supervise` runs a command (the same `mlxnode` command line without `--supervise`) as a
child and starts it again when it fails, after a back-off that doubles with each failure in
a row (1, 2, 4 ... `max_backoff` seconds) and resets once the child has run for
`healthy_after` seconds. With `mlxnode launch --supervise -- serve ...` the child is the
whole launch, so a restart is a new lock, pre-flight and group of ranks: a rank that died
or hung (the ranks exit with code 6, the watchdog's) brings the whole group back.

It does not restart a child that stopped cleanly (exit 0), one stopped by a signal the
supervisor passed on, or one that failed for a reason a restart cannot fix: a bad flag or
setting (2), a model that is not there or not supported (3, 4, 5). A busy cluster (8) and
failed ranks (6) are retried.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from .watchdog import STOP_SIGNALS

logger = logging.getLogger(__name__)

DEFAULT_BACKOFF = 1.0
DEFAULT_MAX_BACKOFF = 60.0
DEFAULT_HEALTHY_AFTER = 60.0
# Exit codes a restart cannot fix (errors.py): usage, model not found, unsupported, cache.
PERMANENT_EXIT_CODES = frozenset({2, 3, 4, 5})
SUPERVISE_FLAG = "--supervise"


def without_flag(argv: Sequence[str], flag: str = SUPERVISE_FLAG) -> list[str]:
    """`argv` without `flag` where it is one of this command's own options (before `--`)."""
    if "--" in argv:
        cut = list(argv).index("--")
        return [a for a in argv[:cut] if a != flag] + list(argv[cut:])
    return [a for a in argv if a != flag]


def rerun_argv() -> list[str]:
    """This process's own `mlxnode` command line, without `--supervise`."""
    return [sys.executable, "-m", "mlxnode", *without_flag(sys.argv[1:])]


def supervise(
    argv: Sequence[str],
    *,
    backoff: float = DEFAULT_BACKOFF,
    max_backoff: float = DEFAULT_MAX_BACKOFF,
    healthy_after: float = DEFAULT_HEALTHY_AFTER,
) -> int:
    """Run `argv` until it ends cleanly or for good, restarting it after failures.

    SIGTERM, SIGHUP and SIGINT are passed on to the child, which then stops as it does
    without a supervisor, and end the supervision.

    Returns:
        The exit code of the child's last run (0 after a clean stop).
    """
    stop = threading.Event()
    child: subprocess.Popen | None = None
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, handler) for s in (*STOP_SIGNALS, signal.SIGINT)}
    failures = 0
    try:
        while True:
            started = time.monotonic()
            # A session of its own: a terminal's Ctrl-C reaches only the supervisor, which
            # passes it on once.
            child = subprocess.Popen(list(argv), start_new_session=True)
            code = child.wait()
            ran = time.monotonic() - started
            if stop.is_set():
                logger.info("stopped by %s", signal.Signals(received[0]).name)
                return code
            if code == 0:
                return 0
            if code in PERMANENT_EXIT_CODES:
                logger.error("the server exited %d, which a restart cannot fix; giving up", code)
                return code
            failures = 1 if ran >= healthy_after else failures + 1
            delay = min(max_backoff, backoff * 2 ** (failures - 1))
            logger.warning(
                "the server exited %d after %.0f s; restarting the whole group in %.0f s "
                "(failure %d in a row)",
                code,
                ran,
                delay,
                failures,
            )
            if stop.wait(delay):
                return code
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
