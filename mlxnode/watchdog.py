"""Turn a silent distributed hang into an error that names the rank, then a hard exit.

A rank blocked in a collective (a peer died, hung, or the network is cut) cannot be
unwound: the waiting happens inside MLX, in a thread Python cannot interrupt. So a
helper thread watches for progress, and when a guarded phase makes none for its
timeout it logs a `DistributedSetupError`, writes the CLI's one stderr line, flushes,
and ends the process with `os._exit`. This is the one place outside `mlxnode.cli`
that turns an error into an exit code, because the CLI never gets control back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

from . import outcome
from .errors import DistributedSetupError
from .logs import redact

logger = logging.getLogger(__name__)

# How often the helper thread looks at the clock, at most.
_POLL_SECONDS = 0.5


def hard_exit(error: DistributedSetupError) -> None:
    """Log `error`, flush every handler and stream, and end the process now."""
    logger.error("%s", error)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        outcome.record_exit(error)
    with contextlib.suppress(Exception):
        sys.stderr.write(redact(f"mlxnode: error: {error}") + "\n")
        sys.stderr.flush()
    os._exit(error.exit_code)


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
    """

    def __init__(
        self,
        *,
        rank: int,
        timeout: float,
        host: str | None = None,
        on_expire: Callable[[DistributedSetupError], None] = hard_exit,
    ):
        self.rank = rank
        self.timeout = timeout
        self.host = host or socket.gethostname()
        self._on_expire = on_expire
        self._lock = threading.Lock()
        self._phase: str | None = None
        self._phase_timeout = timeout
        self._deadline: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout > 0

    def __enter__(self) -> Watchdog:
        if self.enabled:
            self._thread = threading.Thread(
                target=self._watch, name="mlxnode-watchdog", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

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
        while not self._stop.wait(min(_POLL_SECONDS, self.timeout / 4)):
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
