"""How much memory this host gives a rank: physical memory, or less where a cgroup caps it.

One figure for every decision that asks "does it fit here?": the engine's refusal of a
shard too big for its host and `auto`'s choice of replicas (`host_memory_bytes`), and what is
free now for health.yml's readiness table (`available_memory_bytes`): the kernel's
MemAvailable knows nothing of cgroups, so a host capped below its RAM would look roomy.
"""

from __future__ import annotations

import os
from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as a huge page-aligned number; anything above this is none.
_NO_LIMIT = 1 << 60
# A memory cgroup's limit and usage files, in cgroup v1 and v2.
_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes")
_V2_FILES = ("memory.max", "memory.current")


def host_memory_bytes() -> int:
    """Physical memory, capped by the memory cgroup (v1 or v2) of this process and its parents."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limits = [physical, *_cgroup_limits(Path("/proc/self/cgroup"))]
    return min(limits)


def available_memory_bytes() -> int | None:
    """Memory free for a new process now: MemAvailable, capped by each memory cgroup's room
    (its limit less its usage) above this process; None where /proc/meminfo is missing."""
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None  # macOS
    kib = next((int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:")), None)
    if kib is None:
        return None
    return min([kib * 1024, *_cgroup_room(Path("/proc/self/cgroup"))])


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
    return [limit for limit, _ in _limited_cgroups(proc_cgroup)]


def _cgroup_room(proc_cgroup: Path) -> list[int]:
    """What each limited memory cgroup above this process has left: limit less usage."""
    return [max(limit - usage, 0) for limit, usage in _limited_cgroups(proc_cgroup)]


def _limited_cgroups(proc_cgroup: Path) -> list[tuple[int, int]]:
    """(limit, usage) of each memory cgroup with a limit, this process's and those above."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []  # macOS: no cgroups
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base, limit_name, usage_name = _CGROUP_ROOT / "memory", *_V1_FILES
        elif controllers == "":
            base, limit_name, usage_name = _CGROUP_ROOT, *_V2_FILES
        else:
            continue
        here = base / path.lstrip("/")
        for directory in (here, *here.parents):
            if not directory.is_relative_to(base):
                break
            limit = _read_limit(directory / limit_name)
            if limit is not None:
                found.append((limit, _read_limit(directory / usage_name) or 0))
    return found


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or int(text) >= _NO_LIMIT:
        return None  # "max" (v2) or the v1 "unlimited" value
    return int(text)
