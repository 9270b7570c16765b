"""Is every host ready to run? The one rule, for the launcher's pre-flight and health.yml.

A host is ready when it answers, its interpreter imports MLX and mlxnode, its ring ports
are free, its Python, MLX, mlx-lm and mlxnode are those of the other hosts, and, where
they were checked (health.yml), its cache is complete for its rank and its free memory
and disk cover that rank's files. `mlxnode launch` judges what its SSH probe found
(mlxnode/preflight.py); `mlxnode health` judges that or what health.yml gathered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import formatting
from .errors import PreflightError
from .formatting import format_bytes

VERSIONS = ("python", "mlx", "mlx_lm", "mlxnode")

# The launcher's table: what its pre-flight probed (tests/test_reliability.py reads it).
PREFLIGHT_COLUMNS = (
    "rank", "host", "reachable", "python", "mlx", "mlx-lm", "mlxnode", "ports busy",
)  # fmt: skip
# health.yml's table: one row per host, with why it is not ready.
HEALTH_COLUMNS = (
    "host", "rank", "ready", "python", "mlx", "mlx-lm", "mlxnode", "cache",
    "rank_files", "mem_free", "disk_free", "problem",
)  # fmt: skip


@dataclass
class HostReport:
    """What was found on one host. Fields left None were not checked."""

    rank: int
    host: str
    reachable: bool = False
    error: str | None = None
    python: str | None = None
    mlx: str | None = None
    mlx_lm: str | None = None
    mlxnode: str | None = None
    ports_busy: list[int] = field(default_factory=list)
    seconds: float = 0.0
    # Checked by health.yml only: `mlxnode cache verify` for the host's rank ...
    cache_ok: bool | None = None
    cache_missing: list[str] = field(default_factory=list)
    cache_corrupt: list[str] = field(default_factory=list)
    cache_error: str | None = None  # why the cache could not be verified
    # ... and the bytes of the rank's files, those still missing, and what is free.
    rank_bytes: int | None = None
    missing_bytes: int = 0
    mem_free: int | None = None
    disk_free: int | None = None


@dataclass(frozen=True)
class Limits:
    """How much room a host needs beyond its rank's files.

    Attributes:
        memory_factor: Free memory must be at least the rank's files times this.
        disk_margin: Free disk must exceed the bytes still to download by this.
    """

    memory_factor: float = 1.0
    disk_margin: int = 0


def host_problems(report: HostReport, limits: Limits = Limits()) -> list[str]:
    """What stops this one host, each a short phrase (empty when it is ready on its own)."""
    if not report.reachable:
        return [report.error or "unreachable"]
    found = []
    if not _imports(report):
        python = f" with {report.python}" if report.python else ""
        why = f" ({report.error})" if report.error else ""
        found.append(f"mlx/mlxnode not importable{python}{why}; run playbooks/provision.yml")
    if report.ports_busy:
        found.append(
            f"port {', '.join(map(str, report.ports_busy))} already in use "
            "(another run, or pick another --starting-port)"
        )
    if report.cache_ok is False:
        detail = [f"missing {', '.join(report.cache_missing)}"] if report.cache_missing else []
        detail += [f"corrupt {', '.join(report.cache_corrupt)}"] if report.cache_corrupt else []
        found.append("cache " + ("; ".join(detail) or "incomplete"))
    elif report.cache_error and _imports(report):
        found.append(f"cache not verifiable: {report.cache_error}")
    needed_memory = (report.rank_bytes or 0) * limits.memory_factor
    if report.mem_free is not None and needed_memory and report.mem_free < needed_memory:
        found.append(f"free memory {format_bytes(report.mem_free)} < {format_bytes(needed_memory)}")
    needed_disk = report.missing_bytes + limits.disk_margin
    if report.disk_free is not None and report.disk_free < needed_disk:
        found.append(f"free disk {format_bytes(report.disk_free)} < {format_bytes(needed_disk)}")
    return found


def version_problems(reports: Sequence[HostReport]) -> tuple[list[str], dict[str, list[str]]]:
    """Versions that differ between the hosts that answered.

    Returns:
        One sentence per version that differs (naming every host), and for each host
        that holds a minority value, a phrase for its own row.
    """
    sentences: list[str] = []
    odd: dict[str, list[str]] = {}
    for attribute in VERSIONS:
        hosts_by_value: dict[str, list[str]] = {}
        for r in reports:
            if _imports(r):
                hosts_by_value.setdefault(str(getattr(r, attribute)), []).append(r.host)
        if len(hosts_by_value) < 2:
            continue
        # Most hosts first, so the odd one out comes last.
        ranked = sorted(hosts_by_value.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        sentences.append(
            f"{attribute} differs between hosts: "
            + " vs ".join(f"{value} on {', '.join(hosts)}" for value, hosts in ranked)
            + "; run playbooks/provision.yml so every host has the same"
        )
        usual, usual_hosts = ranked[0]
        for value, hosts in ranked[1:]:
            for host in hosts:
                odd.setdefault(host, []).append(
                    f"versions differ from the others: {attribute} {value} "
                    f"({usual} on {', '.join(usual_hosts)})"
                )
    return sentences, odd


def problems(reports: Sequence[HostReport], limits: Limits = Limits()) -> list[str]:
    """One sentence per thing that stops a run, naming the host."""
    found = [
        f"rank {r.rank} on {r.host}: {phrase}"
        for r in reports
        for phrase in host_problems(r, limits)
    ]
    return found + version_problems(reports)[0]


def format_table(
    reports: Sequence[HostReport],
    limits: Limits = Limits(),
    *,
    columns: Sequence[str] = PREFLIGHT_COLUMNS,
) -> str:
    """Every host's findings, one row per host (`PREFLIGHT_COLUMNS` or `HEALTH_COLUMNS`)."""
    return "\n".join(formatting.format_table(_rows(reports, limits), columns))


def summary(reports: Sequence[HostReport], limits: Limits = Limits()) -> dict[str, Any]:
    """Everything `mlxnode health --json` prints: the verdict, the problems, the table."""
    rows = _rows(reports, limits)
    found = problems(reports, limits)
    return {
        "ready": not found,
        "not_ready": [row["host"] for row in rows if row["ready"] != "yes"],
        "problems": found,
        "rows": rows,
        "hosts": [dataclasses.asdict(r) for r in reports],
        "lines": formatting.format_table(rows, HEALTH_COLUMNS),
    }


def ensure_ready(
    reports: Sequence[HostReport],
    limits: Limits = Limits(),
    *,
    headline: str = "pre-flight failed",
    columns: Sequence[str] = PREFLIGHT_COLUMNS,
) -> None:
    """Raise PreflightError (carrying the table) unless every host is ready."""
    found = problems(reports, limits)
    if found:
        first = next((r for r in reports if not r.reachable), None)
        raise PreflightError(
            f"{headline}: " + "; ".join(found),
            rank=first.rank if first else None,
            host=first.host if first else None,
            table=format_table(reports, limits, columns=columns),
        )


def reports_from_findings(findings: Mapping[str, Mapping[str, Any] | None]) -> list[HostReport]:
    """HostReports from what health.yml recorded per host (host name -> its record).

    A record holds ``reachable``, ``venv_ok``/``venv_error``, ``versions`` (the output of
    `mlxnode health --local --json`), ``need`` (`cache prewarm --dry-run --json`),
    ``verify``/``verify_error`` (`cache verify --json`), ``mem_free_mb`` and
    ``disk_free_kb``; a host that never answered has an empty one. Free memory is the
    smaller of the facts' and the probe's (``versions.mem_free``, which counts cgroups).
    """
    return [
        _report_from_record(host, index, dict(record or {}))
        for index, (host, record) in enumerate(findings.items())
    ]


def _report_from_record(host: str, index: int, rec: dict[str, Any]) -> HostReport:
    report = HostReport(rank=_int(rec.get("rank"), index), host=str(rec.get("host") or host))
    report.reachable = _true(rec.get("reachable"))
    if not report.reachable:
        return report
    versions = rec.get("versions") or {}
    for name in VERSIONS:
        setattr(report, name, versions.get(name))
    if not _true(rec.get("venv_ok")):
        report.mlx = report.mlxnode = None
        report.error = rec.get("venv_error") or "mlx/mlxnode do not import"
    verify = rec.get("verify") or {}
    if verify:
        report.cache_ok = bool(verify.get("ok"))
        report.cache_missing = list(verify.get("missing") or [])
        report.cache_corrupt = list(verify.get("corrupt") or {})
    else:
        report.cache_error = rec.get("verify_error") or "no answer"
    need = rec.get("need") or {}
    if need:
        report.rank_bytes = sum(_int(f.get("size"), 0) for f in need.get("needed") or [])
        report.missing_bytes = _int(need.get("missing_bytes"), 0)
    # The facts' free memory knows no cgroup; the host's own probe (`health --local`) does.
    free = [_int(rec.get("mem_free_mb"), -1) * 2**20, _int(versions.get("mem_free"), -1)]
    disk_free_kb = _int(rec.get("disk_free_kb"), -1)
    report.mem_free = min((f for f in free if f >= 0), default=None)
    report.disk_free = disk_free_kb * 1024 if disk_free_kb >= 0 else None
    return report


def _rows(reports: Sequence[HostReport], limits: Limits) -> list[dict[str, Any]]:
    odd = version_problems(reports)[1]
    rows = []
    for r in reports:
        found = host_problems(r, limits) + odd.get(r.host, [])
        rows.append(
            {
                "rank": r.rank,
                "host": r.host,
                "reachable": "yes" if r.reachable else f"NO ({r.error})",
                "ready": "NO" if found else "yes",
                "python": r.python or "-",
                "mlx": r.mlx or "-",
                "mlx-lm": r.mlx_lm or "-",
                "mlxnode": r.mlxnode or "-",
                "ports busy": ",".join(map(str, r.ports_busy)) or "-",
                "cache": _cache_state(r),
                "rank_files": format_bytes(r.rank_bytes) if r.rank_bytes is not None else "-",
                "mem_free": format_bytes(r.mem_free) if r.mem_free is not None else "-",
                "disk_free": format_bytes(r.disk_free) if r.disk_free is not None else "-",
                "problem": "; ".join(found),
            }
        )
    return rows


def _imports(report: HostReport) -> bool:
    """The host answered and its interpreter imports MLX and mlxnode."""
    return report.reachable and report.mlx is not None and report.mlxnode is not None


def _cache_state(report: HostReport) -> str:
    if report.cache_ok is None:
        return "unknown"
    return "complete" if report.cache_ok else "incomplete"


def _true(value: Any) -> bool:
    """Ansible hands booleans over as True or as the text "True"."""
    return str(value).lower() == "true"


def _int(value: Any, default: int) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default
