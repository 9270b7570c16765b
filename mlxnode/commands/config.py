"""`mlxnode config show`: the resolved configuration and where each value came from."""

from __future__ import annotations

import argparse
import json

from ..config import is_secret, iter_fields
from ..formatting import format_table
from .common import HelpFormatter, add_config_flags, examples, resolve_config

SHOW_TEXT = "Print every setting, its value and where it came from."
SHOW_EXAMPLES = examples(
    "mlxnode config show",
    "mlxnode config show -c cluster.yaml --json",
    "MLXNODE_GENERATION_MAX_TOKENS=64 mlxnode config show -t 0.7",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config",
        help="Inspect the resolved configuration.",
        description="Inspect the resolved configuration.",
        epilog=SHOW_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    verbs = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = verbs.add_parser(
        "show",
        help=SHOW_TEXT,
        description=SHOW_TEXT + " Every flag below is accepted, to see what it would change.",
        epilog=SHOW_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    show.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    add_config_flags(show)
    show.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    resolved = resolve_config(args)
    rows = []
    for key, _field, _type in iter_fields():
        section, name = key.split(".")
        value = getattr(getattr(resolved.config, section), name)
        if value is not None and is_secret(key):
            value = "***"  # that it is set, and where from, but never the secret itself
        rows.append((key, value, resolved.sources[key]))
    if args.json:
        print(json.dumps({k: {"value": v, "source": s} for k, v, s in rows}, indent=2))
        return 0
    if resolved.file is not None:
        print(f"# config file: {resolved.file}")
    shown = [(key, "null" if value is None else json.dumps(value), s) for key, value, s in rows]
    print("\n".join(format_table(shown, ("KEY", "VALUE", "SOURCE"))))
    return 0
