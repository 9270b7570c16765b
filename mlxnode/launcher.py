"""Start a distributed run with `mlx.launch` safely: one run at a time, checked, attributed.

`mlx.launch` exits 0 even when a rank fails (or never started), and its ring backend
waits for an unreachable host for minutes. This wrapper, run on the launcher host
(rank 0's), adds: a cluster lock, a pre-flight of every host, a wall-clock timeout,
prompts passed as a private file instead of in anyone's command line, a verdict
from every rank's status record (`mlxnode.outcome`), an exit code and one line that
say which rank on which host failed and why, and cleanup of leftover ranks on every
host, also when the launcher itself is stopped (Ctrl-C, SIGTERM, SIGHUP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from . import outcome, preflight, readiness
from .errors import (
    USER_ERROR_CODES,
    ClusterBusyError,
    DistributedSetupError,
    MlxnodeError,
    UsageError,
)
from .files import write_atomic
from .logs import DATE_FORMAT, LOG_FORMAT, AnsiStripper, RankFilter
from .prompts import Prompt, prompts_to_jsonl
from .watchdog import STOP_SIGNALS

logger = logging.getLogger(__name__)

# The one cluster lock of this user on this launcher: `mlxnode launch` and run.yml both use it.
DEFAULT_LOCK_FILE = "~/.mlxnode/cluster.lock"
# Without --log-dir, a run's records and prompts go to <this>/<run-id>/ (run.yml's default too).
DEFAULT_RUNS_DIR = "~/.mlxnode/runs"
# The prompts given as words, written for rank 0 (mode 0600): never in a command line.
PROMPTS_FILE = "prompts.launch.jsonl"
DEFAULT_TIMEOUT = 1800.0
# Once a rank has failed, mlx.launch stops the others itself; give it this long before
# stopping it (it waits minutes on an ssh to a host that dropped off the network).
STOP_GRACE_SECONDS = 5.0
# mlx.launch reports each rank's end on stderr with these lines.
_RANK_EXIT = re.compile(r"Node with rank (\d+) exited with code (-?\d+)")
_RANK_KILLED = re.compile(r"Node with rank (\d+) was killed")
# A rank's message may start by naming it ("rank 1 on h2 (exit 3): ..."); the verdict does.
_RANK_PREFIX = re.compile(r"^rank \d+ on \S+?(?: \(exit -?\d+\))?:? ")
# Kill this run's ranks that belong to the SSH user only (as root, never another user's).
_CLEANUP = 'exec pkill -KILL -u "$(id -u)" -f "$1"'
# ssh's own exit code: the session ended without the rank's exit status (the process was
# killed, or the connection dropped).
_SSH_LOST = 255
# mlx.launch stopped the rank itself after another one failed.
_STOPPED = -int(signal.SIGTERM)
# With --log-dir: what mlx.launch prints, as it prints it (stdout: rank 0's answer and the
# ranks' console lines; stderr: this launcher's log, mlx.launch's warnings, the error).
STDOUT_LOG = "launcher.stdout.log"
STDERR_LOG = "launcher.stderr.log"
# Run ids become directory names and part of a pkill pattern.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class LaunchResult:
    run_id: str
    returncode: int
    failed_ranks: dict[int, int]  # rank -> exit code (negative: killed by signal)
    seconds: float


@dataclass
class LaunchReport:
    """What one launch did, written as JSON next to the run's logs (``--report-json``).

    Filled in as the launch goes, so a failed launch still says how far it got.
    """

    run_id: str
    hosts: list[str] = field(default_factory=list)
    started: str = ""
    seconds: float = 0.0
    preflight_seconds: float | None = None
    preflight: list[dict[str, Any]] = field(default_factory=list)
    preflight_table: str = ""
    failed_ranks: dict[int, int] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)
    timed_out: bool = False
    exit_code: int | None = None
    error: str | None = None
    max_rss_bytes: int = 0
    children_max_rss_bytes: int = 0

    def finish(self, *, exit_code: int, error: str | None, seconds: float) -> None:
        self.exit_code, self.error, self.seconds = exit_code, error, seconds
        self.max_rss_bytes = _max_rss(resource.RUSAGE_SELF)
        self.children_max_rss_bytes = _max_rss(resource.RUSAGE_CHILDREN)

    def write(self, path: str | os.PathLike[str]) -> Path:
        return write_atomic(path, json.dumps(dataclasses.asdict(self), indent=2) + "\n")


@contextlib.contextmanager
def cluster_lock(path: str | Path, run_id: str) -> Iterator[Path]:
    """Hold the launcher's cluster lock for the duration of a run.

    The lock is an flock on `path`, so the kernel releases it on every exit path,
    even SIGKILL; a file left behind by a dead run is stale and is taken over.

    Raises:
        ClusterBusyError: "cluster busy: run <id> started <time>" when held.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            raise ClusterBusyError(
                f"cluster busy: run {holder.get('run_id', '?')} started "
                f"{holder.get('started', '?')} (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}); wait for it or stop it"
            ) from None
        stale = _read_holder(fd)
        if stale:
            logger.warning("taking over a stale cluster lock left by run %s", stale.get("run_id"))
        holder = {
            "run_id": run_id,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield path
        finally:
            # Emptied, never unlinked: a run already waiting on this file would otherwise
            # hold a lock on a name-less file while the next run locks a new one.
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"


def check_run_id(run_id: str) -> str:
    """`run_id`, if it is usable as a directory name and in a process pattern.

    Raises:
        UsageError: it has other characters than letters, digits, '.', '_' and '-'.
    """
    if not _RUN_ID.fullmatch(run_id):  # fullmatch: "$" would let a trailing newline in
        raise UsageError(
            f"run id {run_id!r}: use letters, digits, '.', '_' and '-' (at most 128), "
            "starting with a letter or digit"
        )
    return run_id


def rank_pattern(run_id: str, verb: str = "run") -> str:
    """The `pkill -f` pattern of this run's ranks, which run `mlxnode VERB` (the brackets
    keep pkill's shell out)."""
    return f"[m]lxnode {re.escape(verb)} --run-id {re.escape(run_id)}( |$)"


def launch(
    hostfile: str | Path,
    run_args: Sequence[str],
    *,
    run_id: str,
    prompts: Sequence[Prompt] | None = None,
    backend: str = "ring",
    python: str | None = None,
    starting_port: int = preflight.DEFAULT_STARTING_PORT,
    timeout: float = DEFAULT_TIMEOUT,
    lock_file: str | Path = DEFAULT_LOCK_FILE,
    check: bool = True,
    connect_timeout: float = preflight.DEFAULT_CONNECT_TIMEOUT,
    report: LaunchReport | None = None,
    log_dir: str | Path | None = None,
    verb: str = "run",
) -> LaunchResult:
    """Run `mlxnode run --run-id RUN_ID --status-dir DIR <run_args>` on every host of `hostfile`.

    Args:
        hostfile: An `mlx.launch` hostfile; rank order is file order, rank 0 is this host.
        run_args: Arguments of `mlxnode run` (flags; prompts only as --prompts-file).
        run_id: Identifies this run in the lock and in the ranks' command lines.
        prompts: Prompts for rank 0, written to a 0600 file in the run directory and
            passed as --prompts-file, so they appear in no command line.
        python: The interpreter on every host (same path everywhere); default: this one.
        check: Pre-flight every host first.
        connect_timeout: Seconds for each SSH connection of the pre-flight and cleanup.
        report: Filled in with what happened (pre-flight, failed ranks, lost hosts).
        log_dir: The run directory (same absolute path on every host): STDOUT_LOG and
            STDERR_LOG, the ranks' status records; default DEFAULT_RUNS_DIR/RUN_ID.
        verb: The command every rank runs: "run", or "serve" (whose ranks run until
            stopped; pass `timeout=math.inf` for no limit).

    Raises:
        ClusterBusyError: another run holds the lock.
        PreflightError: a host is unreachable, busy or runs other versions.
        DistributedSetupError: a rank died, lost its peers or never reported completing,
            or the timeout passed.
        MlxnodeError: a rank refused its input, cache or model (its exit code, 2-7).
    """
    check_run_id(run_id)
    report = report if report is not None else LaunchReport(run_id)
    python = python or sys.executable
    hosts = preflight.load_hostfile(hostfile)
    report.hosts = [h.name for h in hosts]
    report.started = datetime.now(UTC).isoformat(timespec="seconds")
    run_dir = Path(log_dir or Path(DEFAULT_RUNS_DIR) / run_id).expanduser().absolute()
    with contextlib.ExitStack() as stack:
        tee = _open_logs(run_dir, stack) if log_dir is not None else None
        stack.enter_context(cluster_lock(lock_file, run_id))
        run_dir.mkdir(parents=True, exist_ok=True)
        outcome.clear(run_dir, len(hosts))
        if prompts is not None:
            path = write_atomic(run_dir / PROMPTS_FILE, prompts_to_jsonl(prompts), mode=0o600)
            run_args = [*run_args, "--prompts-file", str(path)]
        if check:
            started = time.monotonic()
            reports = preflight.check_hosts(
                hosts, python=python, starting_port=starting_port, timeout=connect_timeout
            )
            report.preflight_seconds = time.monotonic() - started
            report.preflight = [dataclasses.asdict(r) for r in reports]
            report.preflight_table = readiness.format_table(reports)
            report.unreachable = {r.host: str(r.error) for r in reports if not r.reachable}
            readiness.ensure_ready(reports)
            logger.info("pre-flight passed for %d hosts", len(hosts))
        argv = [
            # mlx.launch itself, minus its busy wait (see mlxnode/mlx_launch.py), in this
            # process's interpreter, which has mlx: the ranks' `python` may be another's.
            sys.executable, "-m", "mlxnode.mlx_launch",
            "--hostfile", str(hostfile),
            "--backend", backend,
            "--starting-port", str(starting_port),
            "--env", f"MLXNODE_RUN_ID={run_id}",
            # "--": mlx.launch would otherwise read the ranks' flags as its own abbreviated
            # (`serve --host` as its --hosts).
            "--", python, "-m", "mlxnode", verb, "--run-id", run_id,
            "--status-dir", str(run_dir), *run_args,
        ]  # fmt: skip
        logger.debug("running %s", shlex.join(argv))
        try:
            result = _supervise(argv, timeout=timeout, tee=tee)
        finally:
            report.unreachable = _cleanup(hosts, run_id, verb, timeout=connect_timeout)
        completion = _read_record(hosts[0], run_dir / outcome.COMPLETION_FILE, connect_timeout)
        verdict = outcome.parse_completion(completion) if completion else None
        records: dict[int, outcome.RankStatus] = {}
        if not _succeeded(result, verdict, run_id, len(hosts)):
            records = _read_statuses(hosts, run_dir, report.unreachable, connect_timeout)
        report.failed_ranks = _exit_codes(result, records)
        report.timed_out = result.timed_out
    return _judge(result, hosts, run_id, report.unreachable, verdict, records)


def _open_logs(log_dir: str | Path, stack: contextlib.ExitStack) -> tuple[BinaryIO, BinaryIO]:
    """Open STDOUT_LOG and STDERR_LOG in `log_dir`; this module's log lines go to the latter."""
    directory = Path(log_dir).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    out = stack.enter_context(open(directory / STDOUT_LOG, "ab", buffering=0))  # noqa: SIM115
    err = stack.enter_context(open(directory / STDERR_LOG, "ab", buffering=0))  # noqa: SIM115
    for path in (directory / STDOUT_LOG, directory / STDERR_LOG):
        os.chmod(path, 0o644)
    handler = logging.StreamHandler(_LineWriter(err))
    handler.addFilter(RankFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    logger.addHandler(handler)
    stack.callback(logger.removeHandler, handler)
    return out, err


class _LineWriter:
    """A text stream over a binary file, for a logging handler."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw

    def write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._raw.write(text.encode())

    def flush(self) -> None:
        pass


@dataclass
class _Supervised:
    returncode: int
    failed: dict[int, int]
    timed_out: bool
    seconds: float
    timeout: float
    last_stderr: str = ""


def _supervise(
    argv: list[str],
    *,
    timeout: float,
    grace: float = STOP_GRACE_SECONDS,
    tee: tuple[BinaryIO, BinaryIO] | None = None,
) -> _Supervised:
    """Run mlx.launch, pass its output through (and to `tee`), note which ranks ended badly."""
    started = time.monotonic()
    state = _Supervised(0, {}, False, 0.0, timeout)
    first_failure: list[float] = []
    lock = threading.Lock()
    # A pipe nobody writes to: mlx.launch polls its stdin, and /dev/null is always readable.
    stdin_read, stdin_write = os.pipe()
    process = subprocess.Popen(
        argv,
        stdin=stdin_read,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    os.close(stdin_read)

    def on_line(line: str, from_stderr: bool) -> None:
        # Only mlx.launch's own reports, on its stderr: rank 0's answer streams on stdout
        # (and remote ranks' stderr arrives there too, through ssh -tt), so nothing the
        # model writes can pose as a rank's end. Why a rank failed comes from its record.
        if not from_stderr:
            return
        with lock:
            if m := _RANK_EXIT.search(line):
                state.failed[int(m.group(1))] = int(m.group(2))
            elif m := _RANK_KILLED.search(line):
                state.failed.setdefault(int(m.group(1)), _STOPPED)
            if line.strip():
                state.last_stderr = line.strip()
            if state.failed and not first_failure:
                first_failure.append(time.monotonic())

    assert process.stdout is not None and process.stderr is not None
    out_tee, err_tee = tee if tee is not None else (None, None)
    pumps = [
        threading.Thread(
            target=_pump,
            args=(process.stdout, _sink(sys.stdout, out_tee), on_line, False),
            daemon=True,
        ),
        threading.Thread(
            target=_pump,
            args=(process.stderr, _sink(sys.stderr, err_tee, colours=False), on_line, True),
            daemon=True,
        ),
    ]
    for pump in pumps:
        pump.start()
    try:
        while True:
            try:
                process.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now - started > timeout:
                state.timed_out = True
                _kill_group(process)
                break
            if first_failure and now - first_failure[0] > grace:
                logger.warning(
                    "mlx.launch did not stop the other ranks within %.0fs of the first "
                    "failure; stopping it",
                    grace,
                )
                _kill_group(process)
                break
    except BaseException:
        _kill_group(process)
        raise
    finally:
        os.close(stdin_write)
    for pump in pumps:
        pump.join(timeout=5)
    state.returncode = process.returncode
    state.seconds = time.monotonic() - started
    return state


def _sink(stream: Any, tee: BinaryIO | None, *, colours: bool = True) -> Callable[[bytes], None]:
    """Write to `stream` and `tee` as data comes.

    Without `colours` (mlx.launch's stderr: its `[WARN]` lines are coloured), the
    terminal control sequences are kept for a terminal only: `tee` and a `stream`
    that is a file or a pipe get plain text. Stdout (rank 0's answer) is never touched.
    """
    buffer: BinaryIO | None = getattr(stream, "buffer", None)
    stripper = None if colours else AnsiStripper()
    to_terminal = _isatty(stream)

    def write(data: bytes) -> None:
        if stripper is not None:
            plain = stripper.feed(data)
            data, tee_data = (data if to_terminal else plain), plain
        else:
            tee_data = data
        with contextlib.suppress(OSError, ValueError):
            if buffer is not None:
                buffer.write(data)
                buffer.flush()
            else:
                stream.write(data.decode(errors="replace"))
                stream.flush()
        if tee is not None:
            with contextlib.suppress(OSError, ValueError):
                tee.write(tee_data)

    return write


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def _pump(
    source: BinaryIO,
    sink: Callable[[bytes], None],
    on_line: Callable[[str, bool], None],
    from_stderr: bool,
) -> None:
    """Copy `source` to `sink` as it comes (rank 0 streams tokens), and scan it by line."""
    pending = b""
    fd = source.fileno()
    while chunk := os.read(fd, 65536):
        sink(chunk)
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            on_line(line.decode(errors="replace").rstrip("\r"), from_stderr)
    if pending:
        on_line(pending.decode(errors="replace").rstrip("\r"), from_stderr)


def _kill_group(process: subprocess.Popen) -> None:
    # mlx.launch's own kill path sends SIGTERM to its ssh children; give it a moment.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=3)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _cleanup(
    hosts: Sequence[preflight.HostSpec], run_id: str, verb: str, *, timeout: float
) -> dict:
    """Kill any rank of this run still alive on any host; return the hosts SSH cannot reach."""
    # The run id is on every rank's command line, right after the verb (`launch` puts it
    # there): `run`, or `serve`, whose ranks a pattern for `run` would leave running.
    unreachable = preflight.run_everywhere(
        hosts, ["sh", "-c", _CLEANUP, "sh", rank_pattern(run_id, verb)], timeout=timeout
    )
    for name, why in unreachable.items():
        logger.warning("cannot reach %s to stop what is left of run %s: %s", name, run_id, why)
    return unreachable


def _read_record(host: preflight.HostSpec, path: Path, timeout: float) -> str | None:
    """A record a rank wrote on `host`: read here when this is its host, else over SSH."""
    with contextlib.suppress(OSError):
        return path.read_text(encoding="utf-8")
    if host.is_local:
        return None
    try:
        return preflight.run_on_host(host, ["cat", str(path)], timeout=timeout)
    except preflight.HostCommandError as e:
        logger.debug("no %s on %s: %s", path.name, host.name, e)
        return None


def _read_statuses(
    hosts: Sequence[preflight.HostSpec],
    run_dir: Path,
    unreachable: dict[str, str],
    timeout: float,
) -> dict[int, outcome.RankStatus]:
    """Every reachable rank's status record (rank -> record), read in parallel."""

    def one(host: preflight.HostSpec) -> outcome.RankStatus | None:
        if host.name in unreachable:
            return None
        text = _read_record(host, run_dir / outcome.status_file(host.rank), timeout)
        status = outcome.parse_status(text) if text else None
        return status if status is not None and status.rank == host.rank else None

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        found = pool.map(one, hosts)
    return {s.rank: s for s in found if s is not None}


def _succeeded(
    result: _Supervised, verdict: outcome.Completion | None, run_id: str, world_size: int
) -> bool:
    """Positive proof only: rank 0's record lists every rank, and nothing says otherwise."""
    return (
        verdict is not None
        and not verdict.missing(run_id, world_size)
        and not result.failed
        and not result.timed_out
        and result.returncode == 0
    )


def _exit_codes(result: _Supervised, records: dict[int, outcome.RankStatus]) -> dict[int, int]:
    """Each failed rank's exit code: mlx.launch's report, overridden by the rank's own record."""
    codes = dict(result.failed)
    for rank, status in records.items():
        if status.exit_code != 0:
            codes[rank] = status.exit_code
    # A rank stopped by SIGTERM or SIGHUP logs why and exits 128 + the signal (see
    # `mlxnode.watchdog`): a casualty of another rank's failure, like one killed by it.
    stopped = {128 + s for s in STOP_SIGNALS}
    return {rank: _STOPPED if code in stopped else code for rank, code in codes.items()}


def _priority(code: int) -> int:
    """How likely a rank's exit is the cause, not a consequence, of a failed run."""
    if code in USER_ERROR_CODES:
        return 0  # refused its input, cache or model: the others only lost it
    if code == _SSH_LOST or (code < 0 and code != _STOPPED):
        return 1  # died without an exit status
    if code == _STOPPED:
        return 4  # mlx.launch stopped it because another rank failed
    if code == DistributedSetupError.exit_code:
        return 3  # lost a peer or timed out waiting for one
    return 2  # crashed (1) or something else


def _how(code: int, host: str, unreachable: dict[str, str]) -> str:
    if code == _SSH_LOST:
        if host in unreachable:
            return "lost its SSH connection"
        return "was killed (its process ended without an exit status)"
    if code == _STOPPED:
        return "was stopped"
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _rank_error(records: dict[int, outcome.RankStatus], rank: int, code: int) -> str | None:
    """The rank's own error message from its status record (without a "rank R on H:" prefix)."""
    status = records.get(rank)
    if status is None or not status.message:
        if code not in USER_ERROR_CODES:
            return None
        # Another rank that refused the same input, cache or model says why.
        status = next((s for s in records.values() if s.exit_code == code and s.message), None)
        if status is None:
            return None
    text = _RANK_PREFIX.sub("", status.message).strip()
    # Peer-loss and watchdog messages end in advice; keep what happened.
    return text if code in USER_ERROR_CODES else text.split("; ")[0]


def _judge(
    result: _Supervised,
    hosts: Sequence[preflight.HostSpec],
    run_id: str,
    unreachable: dict[str, str],
    verdict: outcome.Completion | None,
    records: dict[int, outcome.RankStatus],
) -> LaunchResult:
    name = {h.rank: h.name for h in hosts}
    rank_of = {h.name: h.rank for h in hosts}
    lost = "; ".join(
        f"lost contact with {host} (rank {rank_of.get(host, '?')}): {why}"
        for host, why in sorted(unreachable.items())
    )
    if result.timed_out:
        raise DistributedSetupError(
            f"run {run_id} passed its timeout of {result.timeout:g}s and was stopped"
            + (f"; {lost}" if lost else "")
            + "; see the rank logs for the last step each rank reached"
        )
    if _succeeded(result, verdict, run_id, len(hosts)):
        return LaunchResult(run_id, 0, {}, result.seconds)
    # A rank's own record beats mlx.launch's report: mlx.launch loses ranks that end while
    # it stops the others, and reports ssh's 255 or its own SIGTERM for them.
    failed = _exit_codes(result, records)
    if not failed:
        missing = verdict.missing(run_id, len(hosts)) if verdict else list(name)
        where = ", ".join(f"rank {r} on {name.get(r, '?')}" for r in missing)
        raise DistributedSetupError(
            f"run {run_id}: no proof that every rank finished: {where} never reported "
            "completing"
            + (f" (mlx.launch exited with code {result.returncode})" if result.returncode else "")
            + (f": {result.last_stderr}" if result.last_stderr else "")
            + (f"; {lost}" if lost else "")
            + f"; see {STDERR_LOG} and the rank logs"
        )

    root = min(failed, key=lambda r: (_priority(failed[r]), r))
    code = failed[root]
    detail = _rank_error(records, root, code)
    every = (
        code in USER_ERROR_CODES and len(failed) == len(hosts) and set(failed.values()) == {code}
    )
    if every:
        head, others = f"run {run_id}: every rank exited with code {code}", ""
    else:
        how = _how(code, name.get(root, ""), unreachable)
        head = f"run {run_id}: rank {root} on {name.get(root, '?')} {how}"
        others = ", ".join(
            f"rank {r} on {name.get(r, '?')}" + ("" if c == _STOPPED else f" (code {c})")
            for r, c in sorted(failed.items())
            if r != root
        )
    message = (
        (f"{lost}; " if lost else "")
        + head
        + (f": {detail}" if detail else "")
        + (f"; also stopped: {others}" if others else "")
    )
    if code in USER_ERROR_CODES:
        error = MlxnodeError(message)
        error.exit_code = code
        raise error
    raise DistributedSetupError(message, rank=root, host=name.get(root))


def _max_rss(who: int) -> int:
    """Peak resident memory in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    value = resource.getrusage(who).ru_maxrss
    return int(value if sys.platform == "darwin" else value * 1024)
