"""Download progress: huggingface_hub's bars on a terminal, plain log lines elsewhere.

`snapshot_download` draws its bars with the ``tqdm_class`` it is given (its public
contract: a class that behaves like ``tqdm.auto.tqdm``); `Progress.attempt` gives it
one that also counts the bytes, for the log lines and the closing summary.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, TextIO

from tqdm.auto import tqdm

from ..formatting import format_byte_pair, format_bytes

logger = logging.getLogger(__name__)

# Seconds between two plain progress lines when stderr is not a terminal.
LOG_EVERY = 10.0


class Progress:
    """Overall bytes, rate and ETA of one batch of downloads.

    Args:
        total_bytes: Bytes the batch will download (the sum of its files' sizes).
        label: What is downloaded, for the log lines.
        enabled: False shows nothing at all (``--quiet``).
        stream: Bars only when it is a terminal (default stderr).
    """

    def __init__(
        self, total_bytes: int, *, label: str, enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.total = max(int(total_bytes), 0)
        self.label = label
        self.enabled = enabled
        self._stream = stream or sys.stderr
        self._terminal = _isatty(self._stream)
        self._lock = threading.Lock()
        self._base = 0
        self._bars: dict[int, int] = {}
        self._started = self._last_log = time.monotonic()

    @property
    def done(self) -> int:
        # huggingface_hub feeds the same bytes to two bars (received, written): count them once.
        with self._lock:
            return self._base + max(self._bars.values(), default=0)

    def attempt(self, base_bytes: int) -> type[tqdm]:
        """The ``tqdm_class`` for one `snapshot_download` call; `base_bytes` are already done.

        Its bars draw on a terminal and stay silent elsewhere; either way they count bytes.
        """
        with self._lock:
            self._base, self._bars = base_bytes, {}
        progress = self

        class _Bar(tqdm):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self._counts = kwargs.get("unit") == "B"
                if self._counts:
                    # Binary units (KiB, MiB), like every other size mlxnode shows; tqdm's
                    # own layout, as huggingface_hub's writes a decimal "B" after the number.
                    kwargs.update(unit="iB", unit_divisor=1024, bar_format=None)
                draw = progress.enabled and progress._terminal
                super().__init__(*args, **{**kwargs, "disable": not draw, "file": progress._stream})

            def update(self, n: float | None = 1) -> bool | None:
                if self._counts:
                    progress._add(id(self), int(n or 0))
                return super().update(n)

        return _Bar

    def close(self) -> None:
        """Log the batch's total and rate (a download that failed raises instead)."""
        if self.enabled:
            elapsed = max(time.monotonic() - self._started, 1e-9)
            logger.info(
                "%s: downloaded %s in %.1fs (%s/s)",
                self.label,
                format_bytes(self.done),
                elapsed,
                format_bytes(self.done / elapsed),
            )

    def _add(self, bar: int, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._bars[bar] = self._bars.get(bar, 0) + n
            due = self.enabled and not self._terminal and now - self._last_log >= LOG_EVERY
            if due:
                self._last_log = now
        if due:
            logger.info("%s", self._line(now))

    def _line(self, now: float) -> str:
        done = self.done
        elapsed = max(now - self._started, 1e-9)
        rate = done / elapsed
        percent = 100.0 * done / self.total if self.total else 100.0
        eta = f", ETA {(self.total - done) / rate:.0f}s" if rate > 0 and done < self.total else ""
        return (
            f"{self.label}: downloaded {format_byte_pair(done, self.total)} "
            f"({percent:.0f}%, {format_bytes(rate)}/s{eta})"
        )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
