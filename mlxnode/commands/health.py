"""`mlxnode health` (alias `preflight`): is every host ready to run? One rule, three sources.

- ``--hostfile FILE``: probe every host of an mlx.launch hostfile over SSH at once, as
  `mlxnode launch` does before it starts anything (its pre-flight).
- ``--local``: probe this host only (what playbooks/health.yml runs on each host).
- ``--reports FILE``: judge what health.yml gathered on every host (``-``: stdin).

Each prints a table (or ``--json``) and exits 0 when every host is ready, 6 when one
is not; mlxnode/readiness.py holds the rule.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from .. import preflight, readiness
from ..errors import UsageError
from .common import HelpFormatter, configure, examples
from .launch import add_host_flags

EPILOG = (
    examples(
        "mlxnode health --hostfile ~/.mlxnode/hosts.json     # every host, over SSH",
        "mlxnode health --local --json                       # this host's versions",
        "mlxnode health --reports findings.json --json       # what health.yml gathered",
    )
    + "\n\nexit codes: 0 every host is ready; 6 a host is not (the table says why);\n"
    "2 a bad flag, hostfile or reports file."
)
# What this command calls itself in its log lines: it is no rank of a run.
HEALTH_LABEL = "health"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "health",
        aliases=["preflight"],
        help="Check every host is ready: reachable, in step, free ports, cache, memory, disk.",
        description="Probe every host of a hostfile over SSH (--hostfile, what `mlxnode launch` "
        "checks first), this host (--local), or judge what playbooks/health.yml gathered "
        "(--reports); one rule for all three.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    add_host_flags(parser, ("logging.level",), hostfile_required=False)
    parser.add_argument("--local", action="store_true", help="Probe this host only.")
    parser.add_argument(
        "--reports",
        metavar="FILE",
        help="Judge the findings health.yml gathered (JSON: host name -> record; '-': stdin).",
    )
    parser.add_argument(
        "--memory-factor",
        type=float,
        default=readiness.Limits.memory_factor,
        metavar="X",
        help="With --reports: free memory must be the rank's files times X (default: %(default)s).",
    )
    parser.add_argument(
        "--disk-margin",
        type=int,
        default=readiness.Limits.disk_margin,
        metavar="BYTES",
        help="With --reports: free disk must exceed what is still to fetch by BYTES "
        "(default: %(default)s).",
    )
    parser.add_argument("--json", action="store_true", help="Print the verdict as JSON.")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    configure(args, label=HEALTH_LABEL)
    limits = readiness.Limits(memory_factor=args.memory_factor, disk_margin=args.disk_margin)
    modes = [m for m in ("hostfile", "local", "reports") if getattr(args, m)]
    if len(modes) != 1:
        raise UsageError(
            "give one of --hostfile FILE (every host, over SSH), --local (this host) or "
            "--reports FILE (what playbooks/health.yml gathered)"
        )
    if args.reports is not None:
        reports = readiness.reports_from_findings(_read_findings(args.reports))
    else:
        hosts = (
            preflight.load_hostfile(args.hostfile)
            if args.hostfile
            else [preflight.HostSpec(0, preflight.LOCAL_HOSTS[0], name=socket.gethostname())]
        )
        reports = preflight.check_hosts(
            hosts,
            python=args.python or sys.executable,
            starting_port=args.starting_port,
            timeout=args.connect_timeout,
        )
    # health.yml's table adds the cache, memory and disk the probes over SSH do not check.
    columns = readiness.HEALTH_COLUMNS if args.reports else readiness.PREFLIGHT_COLUMNS
    if args.json:
        print(json.dumps(readiness.summary(reports, limits), indent=2))
    else:
        print(readiness.format_table(reports, limits, columns=columns))
    headline = "pre-flight failed" if args.hostfile else "not ready"
    readiness.ensure_ready(reports, limits, headline=headline, columns=columns)
    return 0


def _read_findings(source: str) -> dict[str, Any]:
    """The host name -> record mapping health.yml hands over, checked to be one."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        findings = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"--reports {source}: cannot read JSON ({e})") from e
    if not isinstance(findings, dict) or not all(
        isinstance(r, dict | None) for r in findings.values()
    ):
        raise UsageError(
            f"--reports {source}: expected an object of host name -> record, as health.yml writes"
        )
    return findings
