"""`mlxnode serve`: keep the model loaded over the ranks and answer an OpenAI-compatible API.

Start it on every rank, as `mlxnode run` (``mlx.launch ... -m mlxnode serve ...``, or plain
``mlxnode serve`` for one process). Rank 0 serves HTTP on ``--host``/``--port``; every rank
takes part in every generation. It runs until stopped (SIGTERM or Ctrl-C on the launcher).
"""

from __future__ import annotations

import argparse

from .. import outcome, supervisor
from ..errors import MlxnodeError
from .common import HelpFormatter, add_config_flags, configure, examples

DESCRIPTION = """\
Keep the model loaded over every rank mlx.launch started and serve it on rank 0:
POST /v1/chat/completions, POST /v1/completions (OpenAI-compatible, streaming or not),
GET /v1/models, GET /health (alive), GET /ready (loaded on every rank and a probe
generation across all ranks finished in time, recently), GET /metrics (Prometheus).
The API key (serve.api_key, MLXNODE_SERVE_API_KEY) is read from the config file or the
environment only, never from a flag, so it stays out of process listings.
"""

EXAMPLES = examples(
    "mlxnode serve --model-path ./model --port 8080",
    "mlxnode launch --hostfile hosts.json -- serve -m org/name --port 8080",
    'curl -s localhost:8080/v1/chat/completions -d \'{"messages": [{"role": "user", '
    '"content": "Hi"}]}\'',
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="Serve the model over HTTP (OpenAI-compatible) with every rank taking part.",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--run-id", metavar="ID", help="Name of this server's run in the logs (set by launch)."
    )
    parser.add_argument(
        "--status-dir",
        metavar="DIR",
        help="Write this rank's status record there when it ends (set by launch, which "
        "judges the ranks by them).",
    )
    parser.add_argument(
        supervisor.SUPERVISE_FLAG,
        action="store_true",
        help="Start the server again when it fails, with a back-off. This restarts one "
        "process; a group of ranks is restarted by the launch's own flag of this name.",
    )
    add_config_flags(parser)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    if args.supervise:
        configure(args)
        return supervisor.supervise(supervisor.rerun_argv())
    outcome.start(args.status_dir, args.run_id)
    try:
        resolved = configure(args)
        try:
            from .. import server
        except ImportError as e:
            raise MlxnodeError(
                f"the server cannot be imported ({e}); reinstall mlxnode with its MLX extra "
                "(pip install 'mlxnode[cpu]' off macOS)"
            ) from e
        server.serve(resolved.config, run_id=args.run_id)
    except Exception as e:
        outcome.record_exit(e)
        raise
    outcome.record_exit(None)
    return 0
