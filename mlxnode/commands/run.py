"""`mlxnode run`: generate with a model split over the ranks `mlx.launch` started."""

from __future__ import annotations

import argparse

from ..errors import ModelLoadError
from .common import add_config_flags, configure


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="Run (distributed) inference on one or more prompts.",
        description="Run inference; under mlx.launch every rank loads only its shard.",
    )
    parser.add_argument("prompt", nargs="*", help="Prompt text; '-' reads prompts from stdin.")
    parser.add_argument("--list-cached", action="store_true", help="List cached models and exit.")
    parser.add_argument(
        "--clear-cache", action="store_true", help="Delete the model from the cache and exit."
    )
    add_config_flags(parser)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    configure(args)
    try:
        from .. import engine
    except ImportError as e:
        raise ModelLoadError(
            "the inference engine is not installed in this build of mlxnode; "
            "update mlxnode (pip install -U mlxnode)"
        ) from e
    return engine.main(args)
