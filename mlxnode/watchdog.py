"""Turn a silent distributed hang into an error that names the rank, then a hard exit.

A rank blocked in a collective (a peer died, hung, or the network is cut) cannot be
unwound: the waiting happens inside MLX, in a thread Python cannot interrupt. So a
helper thread watches for progress, and when a guarded phase makes none for its
timeout it logs a `DistributedSetupError`, writes the CLI's one stderr line, flushes,
and ends the process with `os._exit`. This is the one place outside `mlxnode.cli`
that turns an error into an exit code, because the CLI never gets control back.

For the same reason the helper thread also ends the process on SIGTERM and SIGHUP
(mlx.launch and the launcher stop the other ranks with them when one fails): a
Python signal handler would wait for the blocked collective to return, and the
default action would end the rank without a word in its log or a status record.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

from . import outcome
from .errors import DistributedSetupError, Stopped
from .logs import CLI_REPORTS, redact

logger = logging.getLogger(__name__)

# How often the helper thread looks at the clock, at most.
_POLL_SECONDS = 0.5
# The signals that stop a rank; their numbers reach the helper thread through a pipe.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# Written to the same pipe to end the helper thread (no signal has number 0).
_QUIT = b"\0"


def hard_exit(error: DistributedSetupError | Stopped, message: str | None = None) -> None:
    """Log `error` (or `message`), flush every handler and stream, and end the process now."""
    logger.error("%s", message or error, extra=CLI_REPORTS)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        outcome.record_exit(error)
    with contextlib.suppress(Exception):
        # The CLI's one line for this error (the console drops the log record above); a
        # stopped rank's message says so itself: "rank R on H: stopped by SIGTERM while ...".
        prefix = "mlxnode: " if isinstance(error, Stopped) else "mlxnode: error: "
        line = prefix + str(message or error)
        sys.stderr.write(redact(line) + "\n")
        sys.stderr.flush()
    os._exit(outcome.exit_code(error))


class Watchdog:
    """Fails the process when a guarded phase shows no progress for its timeout.

    Use as a context manager around the distributed work; wrap each phase that waits
    on peers in `guard`, and call `beat` whenever a step completes.

    Args:
        rank: This process's rank, named in the error.
        timeout: Default seconds without progress; 0 disables the watchdog.
        host: Named in the error; default: this machine's hostname.
        on_expire: What to do with the error; default `hard_exit`. Tests and
            embedders may pass something gentler.
        exit_on_signals: End the process at once on SIGTERM or SIGHUP, with a log line
            that names the phase, a status record and exit code 128 + the signal. Only
            in the main thread, the one place signals can be routed from.
    """

    def __init__(
        self,
        *,
        rank: int,
        timeout: float,
        host: str | None = None,
        on_expire: Callable[[DistributedSetupError], None] = hard_exit,
        exit_on_signals: bool = False,
    ):
        self.rank = rank
        self.timeout = timeout
        self.host = host or socket.gethostname()
        self._on_expire = on_expire
        self._lock = threading.Lock()
        self._phase: str | None = None
        self._phase_timeout = timeout
        self._deadline: float | None = None
        self._signals = exit_on_signals and threading.current_thread() is threading.main_thread()
        self._previous: dict[int, object] = {}
        self._wakeup_before = -1
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout > 0

    def __enter__(self) -> Watchdog:
        if not (self.enabled or self._signals):
            return self
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._pipe = (read, write)
        if self._signals:
            # The C-level handler writes the signal's number to the pipe even while the
            # main thread waits inside MLX; the Python-level handler has nothing to do.
            self._wakeup_before = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            self._previous = {s: signal.signal(s, lambda *_: None) for s in STOP_SIGNALS}
        self._thread = threading.Thread(target=self._watch, name="mlxnode-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pipe is None:
            return
        read, write = self._pipe
        if self._signals:
            for s, previous in self._previous.items():
                signal.signal(s, previous)
            signal.set_wakeup_fd(self._wakeup_before)
        os.write(write, _QUIT)
        assert self._thread is not None
        self._thread.join()
        os.close(read)
        os.close(write)
        self._pipe = None

    @contextlib.contextmanager
    def guard(self, phase: str, *, timeout: float | None = None) -> Iterator[None]:
        """Watch `phase`: with no `beat` for `timeout` seconds (default: the watchdog's), fail."""
        with self._lock:
            outer = (self._phase, self._phase_timeout, self._deadline)
            self._phase = phase
            self._phase_timeout = self.timeout if timeout is None else timeout
            self._deadline = time.monotonic() + self._phase_timeout
        try:
            yield
        finally:
            with self._lock:
                self._phase, self._phase_timeout, self._deadline = outer
                if self._deadline is not None:
                    self._deadline = time.monotonic() + self._phase_timeout

    def beat(self) -> None:
        """Record progress: the current phase gets a fresh timeout."""
        with self._lock:
            if self._deadline is not None:
                self._deadline = time.monotonic() + self._phase_timeout

    def _watch(self) -> None:
        assert self._pipe is not None
        read = self._pipe[0]
        poll = min(_POLL_SECONDS, self.timeout / 4) if self.enabled else None
        while True:
            if select.select([read], [], [], poll)[0]:
                got = os.read(read, 64)
                if _QUIT in got:
                    return
                self._stopped(signal.Signals(got[0]))
                return
            with self._lock:
                expired = self._deadline is not None and time.monotonic() > self._deadline
                phase, waited = self._phase, self._phase_timeout
            if expired:
                self._on_expire(
                    DistributedSetupError(
                        f"rank {self.rank} on {self.host}: no progress for {waited:g}s while "
                        f"{phase}; a peer died or hung, or the network between the hosts is "
                        "cut. Check the other ranks' logs; raise distributed.step_timeout "
                        "(--step-timeout) if a step is just slow",
                        rank=self.rank,
                        host=self.host,
                    )
                )
                return

    def _stopped(self, signum: signal.Signals) -> None:
        with self._lock:
            phase = self._phase or "running"
        hard_exit(
            Stopped(signum),
            f"rank {self.rank} on {self.host}: stopped by {signum.name} while {phase} "
            "(the launcher stops every rank when one fails or the run is interrupted)",
        )
