"""Rank-aware logging: one format, one file per rank, secrets redacted.

Every line reads ``[YYYY-MM-DD HH:MM:SS] [Rank X/Y] LEVEL logger: message``. The
rank comes from ``MLX_RANK`` (set by ``mlx.launch``) until the distributed group
exists, then from the group itself (`set_rank`). A process that is no rank of a run
(the launcher, a prewarm) names itself instead: ``[launcher]``, ``[prewarm]``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

LOG_FORMAT = "[%(asctime)s] [%(label)s] %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# `extra` of an error the CLI also prints as its one `mlxnode: error:` line (which names the
# rank and host): a log file keeps the record, the console shows the CLI's line only.
CLI_REPORTS = {"cli_reports": True}

_rank: int | None = None
_world_size: int | None = None
_label: str | None = None
# Terminal control sequences (colours, cursor moves): CSI and two-byte ESC sequences.
_ANSI = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")
# An escape sequence cut at the end of a chunk: held back until the rest arrives.
_ANSI_TAIL = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*)?$")

# Hub tokens, bearer headers and token=... assignments; the replacement keeps the kind visible.
_SECRET_PATTERNS = [
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(bearer\s+)?[^\s,'\"}]+"), r"\1\2***"),
    (re.compile(r"\bhf_[A-Za-z0-9]{6,}"), "hf_***"),
    (
        re.compile(
            r"(?i)\b(hf_token|hugging_face_hub_token|token)(['\"]?\s*[=:]\s*['\"]?)[^\s,'\"}]+"
        ),
        r"\1\2***",
    ),
]


def env_rank() -> tuple[int, int]:
    """Rank and world size as `mlx.launch` announces them in the environment."""
    rank = int(os.environ.get("MLX_RANK", "0") or 0)
    size = os.environ.get("MLX_WORLD_SIZE")
    if size:
        return rank, int(size)
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile:
        try:
            hosts = json.loads(Path(hostfile).read_text() or "[]")
            return rank, max(len(hosts), 1)
        except (OSError, ValueError):
            pass
    return rank, 1


def current_rank() -> tuple[int, int]:
    if _rank is not None and _world_size is not None:
        return _rank, _world_size
    return env_rank()


def set_rank(rank: int, world_size: int) -> None:
    """Record the rank once the distributed group exists; later lines carry it."""
    global _rank, _world_size
    _rank, _world_size = rank, world_size


def set_label(label: str | None) -> None:
    """Name this process in its log lines (``launcher``) instead of a rank; None: the rank."""
    global _label
    _label = label


def redact(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RankFilter(logging.Filter):
    """Stamps the rank on every record and scrubs secrets from the rendered message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank, record.world_size = current_rank()
        record.label = _label or f"Rank {record.rank}/{record.world_size}"
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class _RedactingFormatter(logging.Formatter):
    # Tracebacks are rendered by the formatter, after the filter ran, so scrub them here too.
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def rank_log_path(log_file: str | os.PathLike, rank: int) -> Path:
    """``logs/inference.log`` -> ``logs/inference.rank1.log`` (suffix kept, rank inserted)."""
    path = Path(log_file).expanduser()
    suffix = path.suffix or ".log"
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(f"{stem}.rank{rank}{suffix}")


class _NotReportedByCli(logging.Filter):
    """Drops the errors the CLI prints as its own line, so the console shows each once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "cli_reports", False)


def setup_logging(
    level: str = "INFO",
    log_file: str | os.PathLike | None = None,
    *,
    label: str | None = None,
) -> Path | None:
    """Configure the root logger once, for the CLI. Returns this rank's log file, if any.

    Rank 0 logs to stderr; other ranks log to their file only, unless the level is
    DEBUG, so the terminal shows rank 0's answer cleanly (without a file, stderr is
    every rank's only record, so every rank logs there). An error the CLI prints as its one
    line (`CLI_REPORTS`) is written to the file only, never to the console, so the console
    shows each error once.

    Args:
        label: Name this process in its lines instead of a rank (see `set_label`).
    """
    set_label(label)
    rank, _ = current_rank()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG if level == "DEBUG" else logging.INFO)
    formatter = _RedactingFormatter(LOG_FORMAT, DATE_FORMAT)
    rank_filter = RankFilter()

    if rank == 0 or level == "DEBUG" or log_file is None:
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(level)
        console.addFilter(rank_filter)
        console.addFilter(_NotReportedByCli())
        console.setFormatter(formatter)
        root.addHandler(console)

    path = None
    if log_file is not None:
        path = rank_log_path(log_file, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The file keeps INFO even when the console is quieter: it is the record of the run.
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setLevel(logging.DEBUG if level == "DEBUG" else logging.INFO)
        file_handler.addFilter(rank_filter)
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
        os.chmod(path, 0o640)
    # Third-party chatter (HTTP clients) stays at WARNING unless debugging.
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2", "urllib3", "filelock", "paramiko"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    return path


def strip_ansi(data: bytes) -> bytes:
    """`data` without terminal control sequences: plain text for a file or a pipe."""
    return _ANSI.sub(b"", data)


class AnsiStripper:
    """Strips control sequences from a stream read in chunks that may cut one in two."""

    def __init__(self) -> None:
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk
        tail = _ANSI_TAIL.search(data)
        cut = tail.start() if tail else len(data)
        self._held = data[cut:]
        return strip_ansi(data[:cut])

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held
