"""The `mlxnode` command: dispatch to a verb, and turn errors into exit codes.

This is the only place that converts an `MlxnodeError` into one stderr line and
an exit code; library code only raises.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Sequence

from . import __version__
from .commands import cache, config, health, launch, run, serve
from .commands.common import HelpFormatter, examples
from .errors import MlxnodeError, UsageError
from .logs import env_rank, redact

logger = logging.getLogger("mlxnode")

COMMANDS = (run, serve, launch, health, cache, config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxnode",
        description="Sharded LLM inference with MLX across a cluster of hosts.",
        epilog=examples(
            'mlxnode run --model-path ./model "Why is the sky blue?"',
            'mlxnode launch --hostfile hosts.json -- -m org/name -n 64 "Hi"',
            "mlxnode cache prewarm org/name --rank 1 --world-size 2 --strategy pipeline",
            "mlxnode config show",
        )
        + "\n`mlxnode COMMAND --help` shows each command's options and examples.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mlxnode {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command == "launch":
        # `mlxnode launch --hostfile h --max-tokens 8 "Hi"`: the ranks' flags need `--`.
        _say(
            f"mlxnode launch: error: unrecognized arguments: {' '.join(unknown)}; "
            f"{launch.MISSING_SEPARATOR}"
        )
        return UsageError.exit_code
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args)
    except MlxnodeError as e:
        _traceback(args)
        _say(f"mlxnode: error: {_one_line(e)}")
        return e.exit_code
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if signum == signal.SIGINT:
            _say("mlxnode: interrupted")
        else:
            _say(f"mlxnode: stopped by {signal.Signals(signum).name}")
        return 128 + signum
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `| head`); nothing more to say.
        return 0
    except Exception as e:  # noqa: BLE001 - the boundary: any bug becomes one line + exit 1
        _traceback(args)
        _say(
            f"mlxnode: internal error: {type(e).__name__}: {e} "
            "(rerun with --log-level DEBUG for the traceback)"
        )
        return 1


def _say(line: str) -> None:
    """One line on stderr, with secrets redacted as in the logs (messages may quote input)."""
    print(redact(line), file=sys.stderr)


def _traceback(args: argparse.Namespace) -> None:
    if _debug(args):
        sys.stderr.write(redact(traceback.format_exc()))


def _one_line(error: MlxnodeError) -> str:
    """The error as one line; one rank of several also says which, and its exit code.

    mlx.launch does not always report every rank's exit code (it loses a rank that ends
    while it stops the others), so `mlxnode launch` reads them from these lines.
    """
    text = " ".join(str(error).split())
    rank, world_size = env_rank()
    if world_size > 1 and "MLX_RANK" in os.environ and not text.startswith(f"rank {rank} on "):
        text = f"rank {rank} on {socket.gethostname()} (exit {error.exit_code}): {text}"
    return text


def _debug(args: argparse.Namespace) -> bool:
    """Tracebacks are shown only at DEBUG, however the level was given."""
    level = (
        getattr(args, "log_level", None)
        or getattr(args, "cfg__logging__level", None)
        or os.environ.get("MLXNODE_LOGGING_LEVEL", "")
    )
    return str(level).upper() == "DEBUG"


if __name__ == "__main__":
    sys.exit(main())
