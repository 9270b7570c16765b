"""`mlxnode launch`: start a run on every host, safely.

`launch` is what the `mlxnode_run` Ansible role calls on the launcher host:
cluster lock, pre-flight, `mlx.launch`, a timeout, and an exit code that names
the rank and host that failed. Its backend and log level come from the same
configuration as every other command (flag > MLXNODE_* env > config file > default).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import time
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path

from .. import launcher, preflight, supervisor
from ..errors import MlxnodeError, PreflightError, Stopped, UsageError
from ..logs import redact
from ..prompts import STDIN, Prompt, prompts_from_args, read_prompts_file
from ..watchdog import STOP_SIGNALS
from . import run as run_command
from .common import HelpFormatter, add_config_flags, configure, examples

# Settings the launcher itself uses; the ranks get theirs from the arguments after --.
_LAUNCH_KEYS = ("logging.level", "distributed.backend")
# What the launcher calls itself in its log lines.
LAUNCHER_LABEL = "launcher"
# The one line a launch without `--` before the ranks' arguments gets.
MISSING_SEPARATOR = (
    "put `--` before the `mlxnode run` arguments: mlxnode launch --hostfile FILE "
    "[launch options] -- [run options] PROMPT"
)

HOSTFILE_FORMAT = """\
The hostfile is mlx.launch's JSON: one host per rank, in rank order; rank 0 is this host.
  [{"ssh": "mac1.local", "ips": ["10.0.0.1"]},
   {"ssh": "mac2.local", "ips": ["10.0.0.2"], "name": "studio"}]
"ssh" is how to reach the host, "ips" its addresses for the ring backend (one port each,
counted up from --starting-port over the hosts in order), "name" (optional) names it in
messages. playbooks/site.yml writes this file on every host.
"""

LAUNCH_DESCRIPTION = f"""\
Start `mlxnode run` on every host of the hostfile with mlx.launch: take the cluster lock,
pre-flight every host, run, stop the run at --timeout, name the rank and host that failed.
Everything after `--` is passed to `mlxnode run` on every rank; a prompt given as words
(last) or '-' (stdin) reaches rank 0 as a private file instead of a command line.
`-- serve ARGS` starts `mlxnode serve ARGS` on every rank instead, with no timeout unless
--timeout is given; it runs until the launch is stopped.

{HOSTFILE_FORMAT}"""

LAUNCH_EXAMPLES = examples(
    'mlxnode launch --hostfile hosts.json -- -m org/name -n 64 "Why is the sky blue?"',
    "mlxnode launch --hostfile hosts.json --timeout 600 -- -c config.yaml -f prompts.jsonl "
    "-o results.jsonl",
    "mlxnode launch --hostfile hosts.json --starting-port 40000 --log-dir runs/one -- -m "
    'org/name "Hi"',
    "mlxnode launch --hostfile hosts.json -- serve -m org/name --port 8080",
)


def add_host_flags(
    parser: argparse.ArgumentParser, keys: tuple[str, ...], *, hostfile_required: bool = True
) -> None:
    """The hostfile and how to reach its hosts; `mlxnode health` takes them too."""
    parser.add_argument(
        "--hostfile",
        required=hostfile_required,
        metavar="PATH",
        help="mlx.launch hostfile (JSON, one host per rank; its format: `mlxnode launch --help`).",
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
        help="First ring port; rank r listens on PORT + r (default: %(default)s).",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=preflight.DEFAULT_CONNECT_TIMEOUT,
        metavar="S",
        help="Seconds to wait for each host's SSH before calling it unreachable "
        "(default: %(default)g).",
    )
    add_config_flags(parser, keys=keys)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "launch",
        help="Start `mlxnode run` (or `serve`) on every host with mlx.launch (lock, "
        "pre-flight, timeout).",
        description=LAUNCH_DESCRIPTION,
        epilog=LAUNCH_EXAMPLES,
        formatter_class=HelpFormatter,
        usage="%(prog)s --hostfile PATH [launch options] -- [serve] [mlxnode run arguments] "
        "[PROMPT ...]",
    )
    add_host_flags(run, _LAUNCH_KEYS)
    run.add_argument("--run-id", metavar="ID", help="Name of this run (default: UTC time and pid).")
    run.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"Stop the whole run after this many seconds (default: "
        f"{launcher.DEFAULT_TIMEOUT:g} for run, none for serve).",
    )
    run.add_argument(
        "--lock-file",
        default=launcher.DEFAULT_LOCK_FILE,
        metavar="PATH",
        help="Cluster lock; a second launch while it is held fails with exit code 8 "
        "(default: %(default)s).",
    )
    run.add_argument(
        "--no-preflight", action="store_true", help="Skip the pre-flight check of every host."
    )
    run.add_argument(
        "--log-dir",
        metavar="DIR",
        help=f"The run directory (same path on every host): also write the output, as it "
        f"comes, to DIR/{launcher.STDOUT_LOG} (rank 0's answer, the ranks' console lines) and "
        f"DIR/{launcher.STDERR_LOG}; the ranks' status records go there too "
        f"(default: {launcher.DEFAULT_RUNS_DIR}/RUN_ID, without the output files).",
    )
    run.add_argument(
        "--report-json",
        metavar="PATH",
        help="Write what the launch did (pre-flight, failed ranks, lost hosts, the error, "
        "its own peak memory) as JSON, also when it fails.",
    )
    run.add_argument(
        supervisor.SUPERVISE_FLAG,
        action="store_true",
        help="Start the whole launch again when it fails (a rank died or hung), with a "
        "back-off; for `-- serve` where no launchd or systemd keeps it running.",
    )
    run.add_argument(
        "run_args",
        nargs=argparse.REMAINDER,
        metavar="-- RUN_ARGS",
        help="`--`, then `mlxnode run` arguments (see `mlxnode run --help`), the prompt last; "
        "or `-- serve` and `mlxnode serve` arguments.",
    )
    run.set_defaults(handler=launch_main)


def launch_main(args: argparse.Namespace) -> int:
    resolved = configure(args, label=LAUNCHER_LABEL)
    if args.supervise:
        return supervisor.supervise(supervisor.rerun_argv())
    run_id = launcher.check_run_id(args.run_id or launcher.new_run_id())
    verb, run_args = split_verb(args.run_args)
    prompts = None
    if verb == "run":
        run_args, prompts = split_prompts(run_args)
    timeout = args.timeout
    if timeout is None:
        timeout = launcher.DEFAULT_TIMEOUT if verb == "run" else math.inf
    report = launcher.LaunchReport(run_id)
    started = time.monotonic()
    code, error = 1, None
    try:
        with stop_on_signals():
            result = launcher.launch(
                args.hostfile,
                run_args,
                run_id=run_id,
                prompts=prompts,
                backend=resolved.config.distributed.backend,
                python=args.python,
                starting_port=args.starting_port,
                timeout=timeout,
                verb=verb,
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
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        code, error = 128 + signum, f"stopped by {signal.Signals(signum).name}"
        raise
    finally:
        if error is not None and args.log_dir:
            # The file should end like the terminal: with the CLI's one line.
            log = Path(args.log_dir) / launcher.STDERR_LOG
            with contextlib.suppress(OSError), open(log, "a", encoding="utf-8") as f:
                f.write(redact(f"mlxnode: error: {error}") + "\n")
        if args.report_json:
            report.finish(exit_code=code, error=error, seconds=time.monotonic() - started)
            report.write(args.report_json)


def split_verb(run_args: Sequence[str]) -> tuple[str, list[str]]:
    """("serve", its arguments) for `-- serve ARGS`; else ("run", `run_args` as given)."""
    args = list(run_args[1:] if run_args[:1] == ["--"] else run_args)
    if args[:1] == ["serve"]:
        return "serve", args[1:]
    return "run", list(run_args)


def split_prompts(run_args: Sequence[str]) -> tuple[list[str], list[Prompt] | None]:
    """`mlxnode run` arguments without the prompt words, and those words as prompts.

    The prompt must not travel in a command line: mlx.launch quotes the whole remote
    command into one argument (128 KiB at most on Linux), and every host's `ps` shows it.
    Words given last (or '-', read from stdin here) become rank 0's prompts file.

    Raises:
        UsageError: the words are not last, or come with --prompts-file.
    """
    args = list(run_args[1:] if run_args[:1] == ["--"] else run_args)
    parsed = _RunArgumentParser(prog="mlxnode launch -- (mlxnode run arguments)")
    run_command.add_arguments(parsed)
    namespace = parsed.parse_args(args)
    words: list[str] = namespace.prompt
    if not words:
        return args, None
    if namespace.prompts_file is not None:
        raise UsageError("give the prompt as text or --prompts-file, not both")
    if args[-len(words) :] != words:
        raise UsageError(
            "put the prompt last, after the other `mlxnode run` arguments, or pass "
            "--prompts-file FILE"
        )
    rest = args[: -len(words)]
    if rest[-1:] == ["--"]:
        rest = rest[:-1]
    return rest, read_prompts_file(STDIN) if words == [STDIN] else prompts_from_args(words)


class _RunArgumentParser(argparse.ArgumentParser):
    """Parses the ranks' arguments here, so a bad one is one line, before any host is touched."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(
            f"after `--` (the `mlxnode run` arguments): {message}; `mlxnode launch` options "
            "go before `--`"
        )


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into `Stopped`, once, so they unwind like Ctrl-C.

    The launcher then stops mlx.launch (in a session of its own, so no signal reaches it)
    and kills the run's ranks on every host before it exits and the kernel frees the lock.
    A second signal while that cleanup runs is ignored.
    """
    stopping = False

    def handler(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
