"""Writing files so that a reader never sees half of one: the one atomic write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], text: str, *, mode: int = 0o644) -> Path:
    """Write `text` to `path` through a temporary file and a rename, so readers never see half.

    The temporary file sits beside `path` (a rename is atomic only within one file
    system) and is fsynced first, so a crash leaves the old file or the new one.

    Returns:
        The path written, with ``~`` expanded.

    Raises:
        OSError: the directory cannot be created or written; nothing is left behind.
    """
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
