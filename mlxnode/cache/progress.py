"""Download progress: tqdm bars on a terminal, periodic log lines everywhere else.

huggingface_hub reports each file's bytes to the ``tqdm_class`` it is given;
`Progress.file_bar` returns such a class that also feeds one overall counter.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from typing import Any, TextIO

from ..formatting import format_byte_pair, format_bytes

logger = logging.getLogger(__name__)

# Seconds between two plain progress lines when stderr is not a terminal.
LOG_EVERY = 10.0


class Progress:
    """Overall bytes, rate and ETA of one batch of downloads.

    Args:
        total_bytes: Bytes the batch will download (the sum of its files' sizes).
        label: What is downloaded, for the bars and log lines.
        enabled: False shows nothing at all (``--quiet``).
        stream: Where bars go; bars only when it is a terminal.
        log_every: Seconds between plain log lines (default `LOG_EVERY`).
    """

    def __init__(
        self,
        total_bytes: int,
        *,
        label: str,
        enabled: bool = True,
        stream: TextIO | None = None,
        log_every: float | None = None,
    ) -> None:
        self.total = max(int(total_bytes), 0)
        self.label = label
        self.enabled = enabled
        self._stream = stream or sys.stderr
        self._log_every = LOG_EVERY if log_every is None else log_every
        self._lock = threading.Lock()
        self._per_file: dict[str, int] = {}
        self._done = 0
        self._started = time.monotonic()
        self._last_log = self._started
        self._bar: Any = None
        if enabled and _isatty(self._stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                desc=label,
                # Binary units (KiB, MiB), like every other size mlxnode shows.
                unit="iB",
                unit_scale=True,
                unit_divisor=1024,
                file=self._stream,
                position=0,
                dynamic_ncols=True,
            )

    @property
    def done(self) -> int:
        with self._lock:
            return self._done

    def file_bar(self, name: str) -> Any:
        """A ``tqdm_class`` for huggingface_hub's download of `name`."""
        return functools.partial(_FileBar, self, name)

    def restart(self, name: str) -> None:
        """Forget the bytes counted for `name`; its download starts over."""
        with self._lock:
            lost = self._per_file.pop(name, 0)
            self._done -= lost
        if self._bar is not None and lost:
            self._bar.update(-lost)

    def add(self, name: str, n: int) -> None:
        line = None
        with self._lock:
            self._per_file[name] = self._per_file.get(name, 0) + n
            self._done += n
            now = time.monotonic()
            if self._bar is None and self.enabled and now - self._last_log >= self._log_every:
                self._last_log = now
                line = self._line(now)
        if self._bar is not None:
            self._bar.update(n)
        if line is not None:
            logger.info("%s", line)

    def close(self, *, ok: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.enabled and ok:
            elapsed = max(time.monotonic() - self._started, 1e-9)
            logger.info(
                "%s: downloaded %s in %.1fs (%s/s)",
                self.label,
                format_bytes(self.done),
                elapsed,
                format_bytes(self.done / elapsed),
            )

    def _line(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-9)
        rate = self._done / elapsed
        percent = 100.0 * self._done / self.total if self.total else 100.0
        eta = (self.total - self._done) / rate if rate > 0 else None
        eta_text = f", ETA {_duration(eta)}" if eta is not None else ""
        return (
            f"{self.label}: downloaded {format_byte_pair(self._done, self.total)} "
            f"({percent:.0f}%, {format_bytes(rate)}/s{eta_text})"
        )


class _FileBar:
    """What huggingface_hub's `http_get` drives: update(n), context manager, close()."""

    def __init__(self, progress: Progress, name: str, *args: Any, **kwargs: Any) -> None:
        self._progress = progress
        self._name = name
        self._bar: Any = None
        if progress._bar is not None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=kwargs.get("total"),
                initial=kwargs.get("initial", 0),
                desc=name,
                # Binary units (KiB, MiB), like every other size mlxnode shows.
                unit="iB",
                unit_scale=True,
                unit_divisor=1024,
                file=progress._stream,
                leave=False,
                dynamic_ncols=True,
            )
        initial = kwargs.get("initial") or 0
        if initial:
            progress.add(name, int(initial))

    def __enter__(self) -> _FileBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def update(self, n: float | None = 1) -> None:
        n = int(n or 0)
        self._progress.add(self._name, n)
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __getattr__(self, name: str) -> Any:
        # set_postfix_str, refresh, ...: nothing to do for a bar that may not be shown.
        return lambda *args, **kwargs: None


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
