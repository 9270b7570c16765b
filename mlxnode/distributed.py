"""The distributed group: joining it, and the few small collectives the engine needs.

Everything here runs on the CPU stream, because it moves a handful of bytes
(prompts from rank 0, per-rank statistics) and must not queue behind model work.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import DistributedSetupError
from .logs import env_rank, set_rank

logger = logging.getLogger(__name__)

# Backends whose ranks can all talk to each other directly; tensor parallelism all-reduces
# twice per layer, which a ring pays for with size - 1 hops each time.
FULL_MESH_BACKENDS = ("jaccl", "mpi", "nccl")

# Environment variables a launcher sets when it starts more than one rank.
_LAUNCHER_ENV = ("MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES")
_SIZE_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_WORLD_SIZE")


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
    strict = launched()
    try:
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
    return group


def barrier(group: mx.distributed.Group) -> None:
    """Wait until every rank gets here."""
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def broadcast_bytes(group: mx.distributed.Group, data: bytes | None) -> bytes:
    """Rank 0's `data` on every rank (other ranks pass None)."""
    if group.size() == 1:
        return data or b""
    mine = data if group.rank() == 0 and data is not None else b""
    length = mx.distributed.all_sum(
        mx.array([len(mine)], dtype=mx.int32), group=group, stream=mx.cpu
    )
    n = int(length.item())
    if n == 0:
        return b""
    payload = mx.array(np.frombuffer(mine, dtype=np.uint8)) if mine else mx.zeros((n,), mx.uint8)
    total = mx.distributed.all_sum(payload, group=group, stream=mx.cpu)
    return bytes(np.asarray(total))


def broadcast_json(group: mx.distributed.Group, value: Any) -> Any:
    """Rank 0's JSON-serialisable `value` on every rank."""
    data = json.dumps(value).encode("utf-8") if group.rank() == 0 else None
    return json.loads(broadcast_bytes(group, data).decode("utf-8"))


def all_gather_json(group: mx.distributed.Group, value: Any) -> list[Any]:
    """Every rank's JSON-serialisable `value`, in rank order, on every rank."""
    data = json.dumps(value).encode("utf-8")
    if group.size() == 1:
        return [value]
    longest = int(
        mx.distributed.all_max(
            mx.array([len(data)], dtype=mx.int32), group=group, stream=mx.cpu
        ).item()
    )
    padded = np.zeros((longest,), dtype=np.uint8)
    padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    gathered = np.array(mx.distributed.all_gather(mx.array(padded), group=group, stream=mx.cpu))
    rows = gathered.reshape(group.size(), longest)
    return [json.loads(bytes(row).rstrip(b"\0").decode("utf-8")) for row in rows]
