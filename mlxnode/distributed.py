"""The distributed group: joining it, and the few small collectives the engine needs.

These collectives move a handful of bytes (prompts from rank 0, per-rank statistics). On
ring, jaccl and mpi they run on the CPU stream, so they never queue behind model work; NCCL
serves only GPU streams, so there they run on the default (GPU) stream. `join_group`
remembers which (`control_stream`). Each such collective first checks that every rank is at
the same step (see `_agree`).

NCCL in MLX 0.32 also has no point-to-point send/recv (`Send has no CUDA implementation`);
`point_to_point` says whether the joined backend has them, so the pipeline can build its hops
from collectives instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import DistributedSetupError, UsageError
from .logs import env_rank, set_rank

logger = logging.getLogger(__name__)

# Backends whose ranks can all talk to each other directly; tensor parallelism all-reduces
# twice per layer, which a ring pays for with size - 1 hops each time.
FULL_MESH_BACKENDS = ("jaccl", "mpi", "nccl")

# Environment variables a launcher sets when it starts more than one rank.
_LAUNCHER_ENV = ("MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES")
_SIZE_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_WORLD_SIZE")
# A collective that fails because a peer went away raises RuntimeError("[ring] ...") etc.
_PEER_ERROR = re.compile(r"\[(ring|jaccl|mpi|nccl)\]")

# Backends whose collectives run only on a GPU stream (and which have no send/recv in MLX 0.32).
GPU_STREAM_BACKENDS = ("nccl",)

# Test and debugging knob: "collective" makes the pipeline pass hidden states with collectives
# also on backends that have send/recv (so that path runs on CPU-only ring ranks); "send"
# forces send/recv. Unset: whatever the backend supports.
HOPS_ENV = "MLXNODE_PIPELINE_HOPS"
HOPS = ("send", "collective")


@dataclass(frozen=True)
class _Transport:
    """How the joined backend moves data: the control plane's stream, point-to-point or not."""

    backend: str
    stream: Any  # mx.cpu, or None for the default stream
    point_to_point: bool


_transport = _Transport(backend="ring", stream=mx.cpu, point_to_point=True)


def transport_for(backend: str) -> _Transport:
    """The stream and point-to-point support of `backend` (as named to `join_group`).

    Raises:
        UsageError: MLXNODE_PIPELINE_HOPS has a value other than "send" or "collective".
    """
    if backend == "any" and os.environ.get("NCCL_HOST_IP"):
        backend = "nccl"  # mlx.launch --backend nccl sets it; MLX's nccl init needs it
    gpu = backend in GPU_STREAM_BACKENDS
    hops = os.environ.get(HOPS_ENV, "")
    if hops and hops not in HOPS:
        raise UsageError(f"{HOPS_ENV}={hops!r}: use one of {', '.join(HOPS)}, or unset it")
    p2p = hops == "send" if hops else not gpu
    return _Transport(backend=backend, stream=None if gpu else mx.cpu, point_to_point=p2p)


def control_stream() -> Any:
    """The stream for small collectives on the joined backend (None: the default stream)."""
    return _transport.stream


_hops: Any = None  # the stream `hop_stream` made, once


def hop_stream() -> Any:
    """The stream for a pipeline's hops and shared tokens (None: the default stream).

    On backends with send/recv, a CPU stream of their own: a rank waiting there for its
    neighbour (a receive, the step's token all-sum) does not hold up the layers it can
    already compute for another micro-batch or prompt chunk, which run on mlx-lm's
    generation stream. Every rank queues its hops in the same order on this one stream, so
    their bytes never interleave. GPU-stream backends (nccl) keep the default stream.
    """
    global _hops
    if _transport.stream is None or not _transport.point_to_point:
        return None
    if _hops is None:
        _hops = mx.new_stream(mx.cpu)
    return _hops


def settle(*streams: Any) -> None:
    """Wait for `streams` and the hop stream: what they queued may hold collectives, and a
    control-plane collective that overtook them would read their bytes."""
    for stream in (*streams, hop_stream()):
        if stream is not None:
            mx.synchronize(stream)


def point_to_point() -> bool:
    """Whether the pipeline passes hidden states with send/recv (else with collectives)."""
    return _transport.point_to_point


def launched() -> bool:
    """True when a launcher (mlx.launch, mpirun) started this process as one of several ranks."""
    if env_rank()[1] > 1 or any(os.environ.get(name) for name in _LAUNCHER_ENV):
        return True
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in _SIZE_ENV)


def join_group(backend: str) -> mx.distributed.Group:
    """The group of all ranks (a group of one when not launched), with logging told the rank.

    Raises:
        DistributedSetupError: launched as one of several ranks but the group cannot form.
    """
    global _transport
    transport = transport_for(backend)
    strict = launched()
    try:
        threads_before = _thread_ids()
        group = mx.distributed.init(strict=strict, backend=backend)
    except RuntimeError as e:
        rank = env_rank()[0]
        host = socket.gethostname()
        raise DistributedSetupError(
            f"rank {rank} on {host} cannot join the {backend} group: {e}. Check that every "
            "host runs the same backend, the hostfile's addresses and that its ports are free",
            rank=rank,
            host=host,
        ) from e
    if strict and group.size() == 1:
        raise DistributedSetupError(
            f"started by a launcher but the {backend} backend formed a group of one; "
            "check --backend matches the launcher's",
            rank=env_rank()[0],
            host=socket.gethostname(),
        )
    set_rank(group.rank(), group.size())
    _transport = transport
    if group.size() > 1 and backend in ("ring", "any"):
        _yield_to_compute(_thread_ids() - threads_before)
    return group


def _thread_ids() -> set[int]:
    """This process's thread ids (Linux; empty elsewhere)."""
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def _yield_to_compute(threads: set[int]) -> None:
    """Give the ring backend's socket threads the lowest CPU priority (Linux).

    MLX's ring backend polls its sockets: a thread waiting for a peer spins a core. A
    pipeline that overlaps its stages computes while its hops wait, and on a host with one
    core (a pinned testbed host) the spinning took a quarter of the layers' time. At nice
    19 they run when the layers leave the core idle, which is also when their bytes are
    needed; where cores are plenty this changes nothing.
    """
    for tid in threads:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, 19)
    if threads:
        logger.debug("ring socket threads %s at nice 19", sorted(threads))


@dataclass(frozen=True)
class LinkProbe:
    """What one all-reduce costs over the joined group, measured at start-up."""

    latency_s: float  # median of small all-sums (one float): the per-collective cost
    bandwidth_bytes_s: float  # bytes per second of one PROBE_BYTES all-sum

    def describe(self) -> str:
        return (
            f"all-reduce {self.latency_s * 1e6:.0f} us, "
            f"{self.bandwidth_bytes_s / 1e9:.2f} GB/s over {PROBE_BYTES // 2**20} MiB"
        )


PROBE_ROUNDS = 9
PROBE_BYTES = 4 * 2**20


def probe_link(group: mx.distributed.Group) -> LinkProbe:
    """Time small all-sums and one large one; every rank must call this at the same point."""
    stream = control_stream()
    small, large = mx.zeros((1,)), mx.zeros((PROBE_BYTES // 4,))
    mx.eval(small, large)
    mx.eval(mx.distributed.all_sum(small, group=group, stream=stream))  # warm the path
    times = []
    for _ in range(PROBE_ROUNDS):
        started = time.perf_counter()
        mx.eval(mx.distributed.all_sum(small, group=group, stream=stream))
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    mx.eval(mx.distributed.all_sum(large, group=group, stream=stream))
    seconds = max(time.perf_counter() - started, 1e-9)
    return LinkProbe(
        latency_s=sorted(times)[len(times) // 2], bandwidth_bytes_s=PROBE_BYTES / seconds
    )


def barrier(group: mx.distributed.Group) -> None:
    """Wait until every rank gets here (mlx-lm's barrier, on the backend's stream)."""
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=control_stream()))


# Every control-plane collective starts with a header gathered from all ranks: this magic
# number, a checksum of what the rank is doing, and its payload length. When ranks fall out of
# step (one still generating, one gathering metrics), the header shows it, instead of one
# collective reading another's bytes as JSON.
_MAGIC = 0x6D6C786E  # "mlxn"


def broadcast_bytes(group: mx.distributed.Group, data: bytes | None, *, what: str) -> bytes:
    """Rank 0's `data` on every rank (other ranks pass None); `what` names the step in errors.

    Raises:
        DistributedSetupError: the ranks are not all at this step.
    """
    if group.size() == 1:
        return data or b""
    mine = data if group.rank() == 0 and data is not None else b""
    n = _agree(group, what, len(mine))[0]
    if n == 0:
        return b""
    payload = mx.array(np.frombuffer(mine, dtype=np.uint8)) if mine else mx.zeros((n,), mx.uint8)
    total = mx.distributed.all_sum(payload, group=group, stream=control_stream())
    return bytes(np.asarray(total))


def broadcast_json(group: mx.distributed.Group, value: Any, *, what: str) -> Any:
    """Rank 0's JSON-serialisable `value` on every rank."""
    data = json.dumps(value).encode("utf-8") if group.rank() == 0 else None
    return _decode(broadcast_bytes(group, data, what=what), group, what)


def all_gather_json(group: mx.distributed.Group, value: Any, *, what: str) -> list[Any]:
    """Every rank's JSON-serialisable `value`, in rank order, on every rank."""
    data = json.dumps(value).encode("utf-8")
    if group.size() == 1:
        return [value]
    longest = max(_agree(group, what, len(data)))
    padded = np.zeros((longest,), dtype=np.uint8)
    padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    gathered = np.array(
        mx.distributed.all_gather(mx.array(padded), group=group, stream=control_stream())
    )
    rows = gathered.reshape(group.size(), longest)
    return [_decode(bytes(row).rstrip(b"\0"), group, what) for row in rows]


def _agree(group: mx.distributed.Group, what: str, length: int) -> list[int]:
    """Check that every rank is at step `what`; return each rank's payload length."""
    header = mx.array([_MAGIC, zlib.crc32(what.encode()) & 0x7FFFFFFF, length], dtype=mx.int32)
    rows = np.array(
        mx.distributed.all_gather(header, group=group, stream=control_stream())
    ).reshape(-1, 3)
    mine = rows[group.rank()]
    strays = [r for r, row in enumerate(rows) if row[0] != _MAGIC or row[1] != mine[1]]
    if strays:
        others = ", ".join(f"rank {r}" for r in strays)
        raise out_of_step(
            group, f"{what}: {others} {'is' if len(strays) == 1 else 'are'} at another step"
        )
    return [int(row[2]) for row in rows]


def _decode(data: bytes, group: mx.distributed.Group, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise out_of_step(group, f"{what}: a rank's data did not decode ({e})") from e


def out_of_step(group: mx.distributed.Group, detail: str) -> DistributedSetupError:
    """The error for ranks that are no longer in the same collective."""
    rank, host = group.rank(), socket.gethostname()
    return DistributedSetupError(
        f"ranks out of step while {detail}; rank {rank} on {host} stops. Check that every host "
        "runs the same mlxnode and model files, and see the other ranks' logs",
        rank=rank,
        host=host,
    )


@contextlib.contextmanager
def peer_errors(rank: int, phase: str) -> Iterator[None]:
    """Turn a collective's "[ring] connection to a peer was lost" into a DistributedSetupError.

    Args:
        rank: This rank, named in the error.
        phase: What the rank was doing ("generating"), named in the error.

    Raises:
        DistributedSetupError: a collective inside the block lost a peer.
    """
    try:
        yield
    except RuntimeError as e:
        if not _PEER_ERROR.search(str(e)):
            raise
        host = socket.gethostname()
        raise DistributedSetupError(
            f"rank {rank} on {host} lost a peer while {phase}: {e}; see the other ranks' logs",
            rank=rank,
            host=host,
        ) from e
