"""`mlxnode launch` and `mlxnode preflight`: start a run on every host, safely.

`launch` is what the `mlxnode_run` Ansible role calls on the launcher host:
cluster lock, pre-flight, `mlx.launch`, a timeout, and an exit code that names
the rank and host that failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from .. import launcher, preflight
from ..errors import MlxnodeError, PreflightError
from ..logs import setup_logging


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hostfile", required=True, metavar="PATH", help="mlx.launch hostfile (JSON)."
    )
    parser.add_argument(
        "--python",
        metavar="PATH",
        help="Interpreter to run on every host (same path everywhere; default: this one).",
    )
    parser.add_argument(
        "--starting-port",
        type=int,
        default=preflight.DEFAULT_STARTING_PORT,
        metavar="PORT",
        help="First ring port; rank r listens on PORT + r.",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=preflight.DEFAULT_CONNECT_TIMEOUT,
        metavar="S",
        help="Seconds to wait for each host's SSH before calling it unreachable.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="Log level; DEBUG also shows tracebacks.",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    check = subparsers.add_parser(
        "preflight", help="Check every host of a hostfile is reachable, free and in step."
    )
    _add_common(check)
    check.add_argument("--json", action="store_true", help="Print the reports as JSON.")
    check.set_defaults(handler=preflight_main)

    run = subparsers.add_parser(
        "launch",
        help="Start `mlxnode run` on every host with mlx.launch (lock, pre-flight, timeout).",
        description="Arguments after -- are passed to `mlxnode run` on every rank.",
    )
    _add_common(run)
    run.add_argument("--backend", default="ring", help="mx.distributed backend for mlx.launch.")
    run.add_argument("--run-id", help="Name of this run (default: time and pid).")
    run.add_argument(
        "--timeout",
        type=float,
        default=launcher.DEFAULT_TIMEOUT,
        metavar="S",
        help="Stop the whole run after this many seconds.",
    )
    run.add_argument(
        "--lock-file",
        default=launcher.DEFAULT_LOCK_FILE,
        metavar="PATH",
        help="Cluster lock; a second launch while it is held fails with exit code 8.",
    )
    run.add_argument(
        "--no-preflight", action="store_true", help="Skip the pre-flight check of every host."
    )
    run.add_argument(
        "--log-dir",
        metavar="DIR",
        help=f"Also write the output, as it comes, to DIR/{launcher.STDOUT_LOG} (rank 0's "
        f"answer, the ranks' console lines) and DIR/{launcher.STDERR_LOG}.",
    )
    run.add_argument(
        "--report-json",
        metavar="PATH",
        help="Write what the launch did (pre-flight, failed ranks, lost hosts, the error, "
        "its own peak memory) as JSON, also when it fails.",
    )
    run.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then `mlxnode run` arguments.")
    run.set_defaults(handler=launch_main)


def preflight_main(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    hosts = preflight.load_hostfile(args.hostfile)
    reports = preflight.check_hosts(
        hosts,
        python=args.python or sys.executable,
        starting_port=args.starting_port,
        timeout=args.connect_timeout,
    )
    if args.json:
        print(json.dumps([vars(r) for r in reports], indent=2))
    else:
        print(preflight.format_table(reports))
    preflight.ensure_ready(reports)
    return 0


def launch_main(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
    run_id = launcher.check_run_id(args.run_id or launcher.new_run_id())
    report = launcher.LaunchReport(run_id)
    started = time.monotonic()
    code, error = 1, None
    try:
        result = launcher.launch(
            args.hostfile,
            run_args,
            run_id=run_id,
            backend=args.backend,
            python=args.python,
            starting_port=args.starting_port,
            timeout=args.timeout,
            lock_file=args.lock_file,
            check=not args.no_preflight,
            connect_timeout=args.connect_timeout,
            report=report,
            log_dir=args.log_dir,
        )
        code = result.returncode
        return code
    except PreflightError as e:
        # The table goes to stderr above the CLI's one-line error.
        print(e.table, file=sys.stderr)
        code, error = e.exit_code, " ".join(str(e).split())
        raise
    except MlxnodeError as e:
        code, error = e.exit_code, " ".join(str(e).split())
        raise
    finally:
        if error is not None and args.log_dir:
            # The file should end like the terminal: with the CLI's one line.
            log = Path(args.log_dir) / launcher.STDERR_LOG
            with contextlib.suppress(OSError), open(log, "a", encoding="utf-8") as f:
                f.write(f"mlxnode: error: {error}\n")
        if args.report_json:
            report.finish(exit_code=code, error=error, seconds=time.monotonic() - started)
            report.write(args.report_json)
