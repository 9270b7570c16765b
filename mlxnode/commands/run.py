"""`mlxnode run`: generate with a model split over the ranks `mlx.launch` started.

One prompt (the positional words) streams its answer to stdout on rank 0. Several
prompts (``--prompts-file FILE``, or ``-`` for stdin; see `mlxnode.prompts` for the
format) run as one batch and give JSONL records, to ``--output`` or stdout.
Other ranks never write to stdout.
"""

from __future__ import annotations

import argparse
import sys

from .. import outcome
from ..config import ResolvedConfig
from ..errors import MlxnodeError, UsageError
from ..logs import current_rank
from ..prompts import STDIN, Prompt, prompts_from_args, read_prompts_file
from .common import RUN_SECTIONS, HelpFormatter, add_config_flags, configure, examples

DESCRIPTION = """\
Generate with a model: one process, or one rank of several under `mlx.launch` (or
`mlxnode launch`), where every rank loads only its share of the model. One prompt
streams its answer to stdout; a batch (--prompts-file) writes JSONL records."""

EXAMPLES = examples(
    'mlxnode run --model-path ./model "Why is the sky blue?"',
    'mlxnode run -m mlx-community/SmolLM2-135M-Instruct-4bit -n 64 -t 0.7 "Tell me a joke"',
    "mlxnode run -m org/name -f prompts.jsonl -o results.jsonl --metrics-json metrics.json",
    'echo "Hi" | mlxnode run -m org/name -',
    'mlx.launch --backend ring -n 2 python -m mlxnode run -m org/name --strategy pipeline "Hi"',
)

# Deprecated spellings of `mlxnode cache list` / `cache clear`, kept for one release.
_DEPRECATED = {
    "list_cached": ("--list-cached", "mlxnode cache list"),
    "clear_cache": ("--clear-cache", "mlxnode cache clear MODEL --yes"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="Run (distributed) inference on one or more prompts.",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(handler=main)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every argument of `mlxnode run` (`mlxnode launch` parses the ranks' arguments too)."""
    parser.add_argument("prompt", nargs="*", help="Prompt text; '-' reads prompts from stdin.")
    parser.add_argument(
        "-f",
        "--prompts-file",
        metavar="FILE",
        help='Prompts to run as one batch: one per line, or JSONL {"id": ..., "prompt": ...} '
        "('-': stdin). A malformed line refuses the whole file.",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="Write results as JSONL (id, prompt, completion, token counts, token_ids, "
        "timings), atomically; a batch without it prints them to stdout.",
    )
    parser.add_argument(
        "--metrics-json",
        metavar="FILE",
        help="Write the run's metrics (throughput, time to first token, per-rank memory "
        "and load time) as JSON.",
    )
    parser.add_argument(
        "--run-id", metavar="ID", help="Name of this run in the logs and metrics (set by launch)."
    )
    parser.add_argument(
        "--status-dir",
        metavar="DIR",
        help="Write this rank's status record there when it ends, and on rank 0 the record "
        "of every rank that completed (set by launch, which judges the run by them).",
    )
    add_config_flags(parser, sections=RUN_SECTIONS)
    old = parser.add_argument_group("deprecated (removed in the next release)")
    old.add_argument("--list-cached", action="store_true", help="Use `mlxnode cache list` instead.")
    old.add_argument(
        "--clear-cache", action="store_true", help="Use `mlxnode cache clear MODEL` instead."
    )
    old.add_argument("--yes", action="store_true", help="With --clear-cache: do not ask.")


def main(args: argparse.Namespace) -> int:
    outcome.start(args.status_dir, args.run_id)
    try:
        resolved = configure(args)
        if args.list_cached or args.clear_cache:
            return _cache_action(args, resolved)
        result = _run(args, resolved)
    except Exception as e:
        outcome.record_exit(e)
        raise
    outcome.record_exit(None)
    if current_rank()[0] == 0:
        # The metrics were all-gathered after generation: every rank listed got to the end.
        outcome.record_completion(result.metrics.world_size, result.metrics.ranks)
    return 0


def _run(args: argparse.Namespace, resolved: ResolvedConfig):
    try:
        from .. import engine
    except ImportError as e:
        raise MlxnodeError(
            f"the inference engine cannot be imported ({e}); reinstall mlxnode with its "
            "MLX extra (pip install 'mlxnode[cpu]' off macOS)"
        ) from e
    return engine.run(
        resolved.config,
        _prompt_reader(args),
        output=args.output,
        metrics_json=args.metrics_json,
        run_id=args.run_id,
        stdout=sys.stdout,
    )


def _prompt_reader(args: argparse.Namespace):
    """A function that reads the prompts; the engine calls it on rank 0 only."""
    words: list[str] = args.prompt
    if args.prompts_file is not None and words:
        raise UsageError("give the prompt as text or --prompts-file, not both")
    if args.prompts_file is None and not words:
        raise UsageError("no prompt: give it as text, '-' to read stdin, or --prompts-file FILE")

    def read() -> list[Prompt]:
        if args.prompts_file is not None:
            return read_prompts_file(args.prompts_file)
        if words == [STDIN]:
            return read_prompts_file(STDIN)
        return prompts_from_args(words)

    return read


def _cache_action(args: argparse.Namespace, resolved: ResolvedConfig) -> int:
    from .cache import clear_models, list_models

    flag, instead = _DEPRECATED["list_cached" if args.list_cached else "clear_cache"]
    print(
        f"mlxnode: warning: `mlxnode run {flag}` is deprecated and goes in the next release; "
        f"use `{instead}`",
        file=sys.stderr,
    )
    if args.list_cached:
        return list_models(resolved)
    return clear_models(resolved, resolved.config.model.name, yes=args.yes)
