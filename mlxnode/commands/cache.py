"""`mlxnode cache ...`: inspect, fill and clean the model cache."""

from __future__ import annotations

import argparse

from ..errors import MlxnodeError
from .common import add_config_flags

ACTIONS = {
    "list": "List cached models and which ranks each is complete for.",
    "size": "Print the bytes a model (or the whole cache) uses on disk.",
    "clear": "Delete one cached model, or all of them.",
    "prewarm": "Download exactly the files given ranks need.",
    "verify": "Re-hash cached files and report missing or corrupt ones.",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cache", help="Inspect, fill and clean the model cache.")
    verbs = parser.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    for name, text in ACTIONS.items():
        verb = verbs.add_parser(name, help=text)
        add_config_flags(verb)
        verb.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    raise MlxnodeError(f"'mlxnode cache {args.cache_command}' is not implemented yet")
