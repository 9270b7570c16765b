"""How much memory this host gives a rank: physical memory, or less where a cgroup caps it.

One figure for every decision that asks "does it fit here?": the engine's refusal of a
shard too big for its host, `auto`'s choice of replicas, and health.yml's readiness table.
"""

from __future__ import annotations

import os
from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as a huge page-aligned number; anything above this is none.
_NO_LIMIT = 1 << 60


def host_memory_bytes() -> int:
    """Physical memory, capped by the memory cgroup (v1 or v2) of this process and its parents."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limits = [physical, *_cgroup_limits(Path("/proc/self/cgroup"))]
    return min(limits)


def process_bytes() -> int:
    """This process's resident memory now (on Linux; 0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cgroup_limits(proc_cgroup: Path) -> list[int]:
    """The memory limits of this process's cgroup and every cgroup above it."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []  # macOS: no cgroups
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base, name = _CGROUP_ROOT / "memory", "memory.limit_in_bytes"
        elif controllers == "":
            base, name = _CGROUP_ROOT, "memory.max"
        else:
            continue
        here = base / path.lstrip("/")
        for directory in (here, *here.parents):
            if not directory.is_relative_to(base):
                break
            limit = _read_limit(directory / name)
            if limit is not None:
                found.append(limit)
    return found


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or int(text) >= _NO_LIMIT:
        return None  # "max" (v2) or the v1 "unlimited" value
    return int(text)
