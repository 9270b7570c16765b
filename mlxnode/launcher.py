"""Start a distributed run with `mlx.launch` safely: one run at a time, checked, attributed.

`mlx.launch` exits 0 even when a rank fails, and its ring backend waits for an
unreachable host for minutes. This wrapper, run on the launcher host, adds: a
cluster lock, a pre-flight of every host, a wall-clock timeout, an exit code
that says which rank on which host failed, and cleanup of leftover ranks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import preflight
from .errors import ClusterBusyError, DistributedSetupError, MlxnodeError

logger = logging.getLogger(__name__)

DEFAULT_LOCK_FILE = "~/.mlxnode/cluster.lock"
DEFAULT_TIMEOUT = 3600.0
# mlx.launch reports each rank's end on stderr with these lines.
_RANK_EXIT = re.compile(r"Node with rank (\d+) exited with code (-?\d+)")
_RANK_KILLED = re.compile(r"Node with rank (\d+) was killed")
# Exit codes a rank uses for errors the user caused; passed through unchanged.
_USER_ERROR_CODES = {2, 3, 4, 5, 7}


@dataclass
class LaunchResult:
    run_id: str
    returncode: int
    failed_ranks: dict[int, int]  # rank -> exit code (negative: killed by signal)
    seconds: float


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
            os.ftruncate(fd, 0)
            with contextlib.suppress(OSError):
                path.unlink()
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


def launch(
    hostfile: str | Path,
    command: Sequence[str],
    *,
    run_id: str,
    backend: str = "ring",
    python: str | None = None,
    starting_port: int = preflight.DEFAULT_STARTING_PORT,
    timeout: float = DEFAULT_TIMEOUT,
    lock_file: str | Path = DEFAULT_LOCK_FILE,
    check: bool = True,
    connect_timeout: float = preflight.DEFAULT_CONNECT_TIMEOUT,
) -> LaunchResult:
    """Run `command` (argv after the interpreter) on every host of `hostfile`.

    Args:
        hostfile: An `mlx.launch` hostfile; rank order is file order.
        command: Arguments for the interpreter, e.g. ``["-m", "mlxnode", "run", ...]``.
        run_id: Identifies this run in the lock and in the ranks' command lines.
        python: The interpreter on every host (same path everywhere); default: this one.
        check: Pre-flight every host first.

    Raises:
        ClusterBusyError: another run holds the lock.
        DistributedSetupError: a host is not ready, a rank died, or the timeout passed.
        MlxnodeError: every rank failed with the same user-error code (bad prompt...).
    """
    python = python or sys.executable
    hosts = preflight.load_hostfile(hostfile)
    with cluster_lock(lock_file, run_id):
        if check:
            reports = preflight.check_hosts(
                hosts, python=python, starting_port=starting_port, timeout=connect_timeout
            )
            preflight.ensure_ready(reports)
            logger.info("pre-flight passed for %d hosts", len(hosts))
        argv = [
            str(Path(python).parent / "mlx.launch"),
            "--hostfile", str(hostfile),
            "--backend", backend,
            "--starting-port", str(starting_port),
            "--env", f"MLXNODE_RUN_ID={run_id}",
            python, *command, "--run-id", run_id,
        ]  # fmt: skip
        logger.debug("running %s", shlex.join(argv))
        try:
            result = _supervise(argv, timeout=timeout)
        finally:
            _cleanup(hosts, run_id)
    return _judge(result, hosts, run_id)


@dataclass
class _Supervised:
    returncode: int
    failed: dict[int, int]
    timed_out: bool
    seconds: float


def _supervise(argv: list[str], *, timeout: float) -> _Supervised:
    """Run mlx.launch, pass its output through, and note which ranks ended badly."""
    started = time.monotonic()
    failed: dict[int, int] = {}
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=None,  # rank 0's answer streams straight to our stdout
        stderr=subprocess.PIPE,
        start_new_session=True,
    )

    def pump() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode(errors="replace")
            if m := _RANK_EXIT.search(line):
                failed[int(m.group(1))] = int(m.group(2))
            elif m := _RANK_KILLED.search(line):
                failed.setdefault(int(m.group(1)), -signal.SIGTERM)
            sys.stderr.write(line)
            sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(process)
    except BaseException:
        _kill_group(process)
        raise
    reader.join(timeout=5)
    return _Supervised(process.returncode, failed, timed_out, time.monotonic() - started)


def _kill_group(process: subprocess.Popen) -> None:
    # mlx.launch's own kill path sends SIGTERM to its ssh children; give it a moment.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _cleanup(hosts: Sequence[preflight.HostSpec], run_id: str) -> None:
    """Kill any rank of this run still alive on any host (a rank stuck in a collective)."""
    # The run id is on every rank's command line (`launch` appends --run-id).
    pattern = f"mlxnode run .*--run-id {re.escape(run_id)}"
    preflight.run_everywhere(hosts, ["pkill", "-KILL", "-f", pattern], timeout=5)


def _judge(result: _Supervised, hosts: Sequence[preflight.HostSpec], run_id: str) -> LaunchResult:
    by_rank = {h.rank: h.ssh for h in hosts}
    if result.timed_out:
        raise DistributedSetupError(
            f"run {run_id} passed its timeout after {result.seconds:.0f}s and was stopped; "
            "see the rank logs for the last step each rank reached"
        )
    if result.failed:
        codes = set(result.failed.values())
        # Every rank refused the same bad input: report it as that error, not as a crash.
        if len(result.failed) == len(hosts) and len(codes) == 1 and codes <= _USER_ERROR_CODES:
            error = MlxnodeError(
                f"every rank exited with code {codes.pop()}; see the message above"
            )
            error.exit_code = next(iter(result.failed.values()))
            raise error
        first = min(result.failed, key=lambda r: (result.failed[r] in (0, -signal.SIGTERM), r))
        code = result.failed[first]
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        others = ", ".join(
            f"rank {r} on {by_rank.get(r, '?')} ({c})"
            for r, c in sorted(result.failed.items())
            if r != first
        )
        raise DistributedSetupError(
            f"run {run_id}: rank {first} on {by_rank.get(first, '?')} {how}"
            + (f"; also stopped: {others}" if others else ""),
            rank=first,
            host=by_rank.get(first),
        )
    return LaunchResult(run_id, result.returncode, {}, result.seconds)
