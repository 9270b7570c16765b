"""What each rank of a run ended with: small JSON records, never lines of text to parse.

Under `mlxnode launch`, every rank of ``mlxnode run --status-dir DIR`` writes
``DIR/status.rankR.json`` when it ends (``{run_id, rank, host, exit_code, error_class,
message}``), on its own host, even when its watchdog ends it. When a run succeeds,
rank 0 also writes ``DIR/completion.json``: the engine all-gathers every rank's final
figures once generation is done, so a rank is listed there only if it got to the end.
The launcher declares success only when that record lists every rank; model output,
which streams on the same channel as the ranks' console lines, cannot forge either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MlxnodeError, Stopped
from .files import write_atomic
from .logs import current_rank, redact

logger = logging.getLogger(__name__)

COMPLETION_FILE = "completion.json"
_STATUS_FILE = "status.rank{rank}.json"

# Where this process writes its record (set by `start`), and whether it already has.
_directory: Path | None = None
_run_id: str | None = None
_written = False


def status_file(rank: int) -> str:
    """The name of rank `rank`'s status record in the run directory."""
    return _STATUS_FILE.format(rank=rank)


@dataclass(frozen=True)
class RankStatus:
    """How one rank ended: exit code 0, or the class and message of its error."""

    run_id: str | None
    rank: int
    host: str
    exit_code: int
    error_class: str | None = None
    message: str = ""


@dataclass(frozen=True)
class Completion:
    """Rank 0's record of a finished run: every rank that reached the end."""

    run_id: str | None
    world_size: int
    ranks: list[dict[str, Any]] = field(default_factory=list)  # {"rank", "host"}

    def missing(self, run_id: str, world_size: int) -> list[int]:
        """The ranks of a `world_size` run `run_id` that this record does not list."""
        if self.run_id != run_id or self.world_size != world_size:
            return list(range(world_size))
        listed = {r.get("rank") for r in self.ranks if isinstance(r, dict)}
        return [r for r in range(world_size) if r not in listed]


def start(directory: str | os.PathLike[str] | None, run_id: str | None) -> None:
    """Make this process write its status record into `directory` when it ends (None: never)."""
    global _directory, _run_id, _written
    _directory = Path(directory).expanduser() if directory else None
    _run_id, _written = run_id, False


def record_exit(error: BaseException | None) -> None:
    """Write this rank's status record once: exit 0 for None, else the error's code and class.

    Safe to call from the watchdog's last moments; a failure to write is only logged.
    """
    global _written
    if _directory is None or _written:
        return
    _written = True
    if error is None:
        code, name, message = 0, None, ""
    else:
        code = exit_code(error)
        name, message = type(error).__name__, redact(" ".join(str(error).split()))
    rank = current_rank()[0]
    status = RankStatus(_run_id, rank, socket.gethostname(), code, name, message)
    _write(_directory / status_file(rank), dataclasses.asdict(status))


def exit_code(error: BaseException) -> int:
    """The process's exit code for `error`: its own, 128 + a stopping signal, else 1."""
    if isinstance(error, MlxnodeError):
        return error.exit_code
    if isinstance(error, Stopped):
        return 128 + error.signum
    return 1


def record_completion(world_size: int, ranks: Sequence[Any]) -> None:
    """On rank 0 of a finished run: list every rank the final all-gather heard from."""
    if _directory is None:
        return
    listed = [{"rank": r.rank, "host": r.host} for r in ranks]
    _write(
        _directory / COMPLETION_FILE, dataclasses.asdict(Completion(_run_id, world_size, listed))
    )


def clear(directory: str | os.PathLike[str], world_size: int) -> None:
    """Remove the records an earlier launch of the same run id left in `directory`."""
    base = Path(directory)
    for name in [COMPLETION_FILE, *(status_file(r) for r in range(world_size))]:
        (base / name).unlink(missing_ok=True)


def parse_status(text: str) -> RankStatus | None:
    """A status record, or None when `text` is not one."""
    data = _parse(text)
    try:
        return RankStatus(
            run_id=data.get("run_id"),
            rank=int(data["rank"]),
            host=str(data.get("host", "")),
            exit_code=int(data["exit_code"]),
            error_class=data.get("error_class"),
            message=str(data.get("message") or ""),
        )
    except (KeyError, TypeError, ValueError):
        return None


def parse_completion(text: str) -> Completion | None:
    """A completion record, or None when `text` is not one."""
    data = _parse(text)
    ranks = data.get("ranks")
    if not isinstance(ranks, list) or not isinstance(data.get("world_size"), int):
        return None
    return Completion(data.get("run_id"), data["world_size"], ranks)


def _parse(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, Any]) -> None:
    try:
        write_atomic(path, json.dumps(data) + "\n")
    except OSError as e:
        logger.warning("cannot write %s: %s", path, e)
