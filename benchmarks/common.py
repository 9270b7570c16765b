"""What every benchmark records beside its numbers: the machine, the versions, the date.

Importing it also puts the checkout first on ``sys.path``, so the stand-ins in
`tests.support` (Hub server, testbed, models) import from the source tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mlxnode.files import write_atomic  # noqa: E402


def machine() -> dict[str, Any]:
    """The host the numbers come from: platform, CPU, memory, GPUs, MLX device, load.

    Other work on the machine skews wall times, so the load average is recorded too.
    """
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpus": _gpus(),
        "mlx_device": _mlx_device(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def versions(*names: str) -> dict[str, str | None]:
    """The installed version of each distribution (None if absent), and mlxnode's commit."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    found["mlxnode_commit"] = os.environ.get("MLXNODE_COMMIT") or _git_commit()
    return found


def now() -> str:
    """The date of a run, as every result file writes it."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def machine_line(host: dict[str, Any], found: dict[str, str | None]) -> str:
    """One line for a results table: where it ran and with what."""
    libraries = ", ".join(f"{name} {v}" for name, v in found.items() if name != "mlxnode_commit")
    return (
        f"Machine: {host['cpu'] or host['machine']}, {host['cpu_count']} CPUs, "
        f"{host['platform']}, Python {host['python']}, MLX device {host['mlx_device']}; "
        f"{libraries}; load average {host['load_average'][0]:.1f}"
    )


def write_results(path: Path, report: dict[str, Any]) -> None:
    """The results file, written whole or not at all (an interrupted run keeps the last)."""
    write_atomic(path, json.dumps(report, indent=2) + "\n")


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, StopIteration, ValueError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
        return round(kib / 2**20, 1)
    return None


def _gpus() -> list[str]:
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return out.strip().splitlines()


def _mlx_device() -> str | None:
    try:
        import mlx.core as mx
    except ImportError:
        return None
    return str(mx.default_device())


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout.strip()
    return None
