"""Load one rank's shard of a model, as mlx-lm's `sharded_load` does.

The model is built lazily, pruned or sharded per `strategy.plan_shards` before any weight
is read, only this rank's weights are materialised, and loading ends with a barrier so no
rank starts generating (and waits on a peer's collective) while another still reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import distributed
from .config import Config
from .errors import ModelLoadError
from .formatting import format_bytes
from .memory import host_memory_bytes, process_bytes
from .model_files import (
    ModelMetadata,
    build_model,
    cache_manager,
    check_weight_files,
    context_length,
    read_metadata,
)
from .pipeline import head_weight
from .strategy import (
    GENERIC_PIPELINE,
    LOCAL,
    PIPELINE,
    REPLICAS,
    TENSOR,
    ShardPlan,
    apply_plan,
    connect_plan,
    num_layers,
    plan_shards,
)

logger = logging.getLogger(__name__)

# What a rank holds beyond its weights while it generates a short prompt (activations, MLX's
# buffers), which `check_fits` adds. Measured on SmolLM2-135M bfloat16, 2 pipeline ranks:
# the rank without the head peaked 8 MiB below its resident memory at the check plus its
# weights; the long context's KV cache is not counted.
RUNTIME_BYTES = 64 * 2**20

# Wraps a phase that waits on the slowest peer: `guard("waiting for ...")` is a context
# manager. A rank's watchdog passes one that ends a silent wait; the default waits forever.
Guard = Callable[[str], AbstractContextManager[None]]


def unguarded(phase: str) -> AbstractContextManager[None]:
    """The `Guard` that bounds nothing."""
    return contextlib.nullcontext()


@dataclass(frozen=True)
class ShardedModel:
    """This rank's part of a model, ready to generate, and how it got there.

    `group` is None for a process that holds the whole model alone.
    """

    model: nn.Module
    tokenizer: Any  # mlx-lm's TokenizerWrapper
    name: str
    model_config: dict[str, Any]
    plan: ShardPlan
    group: mx.distributed.Group | None
    load_seconds: float
    # A pipeline whose stages work at once: prompts read in chunks, a batch split into one
    # micro-batch per stage (`generation`). Needs the generic wrapper and a hop stream.
    overlap: bool = False

    @property
    def rank(self) -> int:
        return self.group.rank() if self.group is not None else 0

    @property
    def world_size(self) -> int:
        return self.group.size() if self.group is not None else 1

    @property
    def context_length(self) -> int | None:
        return context_length(self.model_config)


def load_sharded(
    config: Config,
    group: mx.distributed.Group | None = None,
    metadata: ModelMetadata | None = None,
    *,
    wait: Guard = unguarded,
    batch_size: int = 1,
    replicas: bool = True,
) -> ShardedModel:
    """Load this rank's shard of the model of `config`: plan, prune or shard, materialise.

    Every rank of `group` must call this; it returns once all of them have loaded.

    Args:
        config: The resolved configuration (``model``, ``distributed``, ``cache``).
        group: The ranks to split the model over; None: this process holds all of it.
        metadata: The model's metadata if already read (`model_files.read_metadata`).
        wait: Wraps the waits for the other ranks (a watchdog's guard).
        batch_size: Prompts the model is loaded for (`strategy.plan_shards`).
        replicas: Whether `auto` may give every rank a whole copy (the server runs every
            request on every rank, so it may not).

    Returns:
        The loaded shard.

    Raises:
        UsageError: a bad split or weights.
        ModelLoadError: the model cannot be loaded or split the way asked, or this rank's
            share does not fit its host's memory.
        DistributedSetupError: a peer went away while loading.
    """
    if metadata is None:
        metadata = read_metadata(config)
    rank, world_size = (group.rank(), group.size()) if group is not None else (0, 1)
    started = time.perf_counter()
    mx.reset_peak_memory()
    dist = config.distributed
    model = build_model(metadata.path, metadata.name)
    model_bytes = weight_bytes(metadata.path)
    memory, link = None, None
    if group is not None and world_size > 1 and dist.strategy == "auto":
        # auto's inputs: whether a whole copy fits every host, and what the link costs.
        with (
            distributed.peer_errors(rank, "sharing each host's memory"),
            wait("waiting for every rank's memory figure"),
        ):
            if replicas:
                memory = distributed.all_gather_json(
                    group, host_memory_bytes(), what="sharing each host's memory"
                )
            link = distributed.probe_link(group)
    plan = plan_shards(
        model,
        metadata.config,
        rank=rank,
        world_size=world_size,
        strategy=dist.strategy,
        backend=dist.backend,
        split=dist.split,
        weights=dist.weights,
        batch_size=batch_size,
        model_bytes=model_bytes,
        memory=memory,
        overlap=dist.overlap,
        link=link,
    )
    if rank == 0:
        logger.info("strategy %s (%s): %s", plan.strategy, plan.implementation, plan.reason)
    weights_dir = metadata.path
    if metadata.cached:
        weights_dir = _fetch_weights(config, metadata.name, plan, rank, world_size)
        # Planning needed the model's structure before its weights were here; mlx-lm
        # decides which layers to quantise from the weight files, so build it again.
        model = build_model(weights_dir, metadata.name)
    total_layers = num_layers(model, metadata.config)
    check_weight_files(weights_dir, plan.layers, total_layers, rank)
    if group is not None:
        apply_plan(model, plan, group)
    check_fits(plan, parameter_bytes(model) + logits_upcast_bytes(model), rank=rank)
    seconds = _materialise(model, plan, group, started=started, wait=wait)
    return ShardedModel(
        model=model,
        tokenizer=metadata.tokenizer,
        name=metadata.name,
        model_config=metadata.config,
        plan=plan,
        group=group,
        load_seconds=seconds,
        overlap=dist.overlap
        and plan.implementation == GENERIC_PIPELINE
        and distributed.hop_stream() is not None,
    )


def weight_bytes(model_dir: Path) -> int | None:
    """The size of a model's weights: its index's total, else its weight files here; None:
    unknown (a cached model whose only weight file is not fetched yet)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        except (OSError, ValueError):
            total = None
        if isinstance(total, int) and total > 0:
            return total
    sizes = [p.stat().st_size for p in model_dir.glob("model*.safetensors")]
    return sum(sizes) or None


def parameter_bytes(model: nn.Module) -> int:
    """The bytes of `model`'s parameters, read from their shapes (lazy ones are not loaded).

    After `apply_plan` this is exactly what the rank will hold: its layers, and the
    embedding or head it keeps.
    """
    return sum(value.nbytes for _, value in tree_flatten(model.parameters()))


def logits_upcast_bytes(model: nn.Module) -> int:
    """A float32 copy of the head, which computing logits makes where it is 16-bit and the
    hidden state float32 (float32 norms, as real checkpoints often keep: a 16-bit matrix
    times a float32 one is computed in float32). Measured: 126 MiB for SmolLM2-135M
    bfloat16's 49152 x 576 head, the rank's peak above its weights."""
    weight = head_weight(model)
    norm = getattr(getattr(getattr(model, "model", None), "norm", None), "weight", None)
    if weight is None or norm is None or norm.dtype != mx.float32:
        return 0
    if weight.dtype not in (mx.float16, mx.bfloat16):
        return 0  # float32 already, or quantized (multiplied without a copy)
    return weight.size * 4


def check_fits(plan: ShardPlan, share_bytes: int, *, rank: int) -> None:
    """Refuse, before reading a weight, a share of the model that this host cannot hold.

    The need is `share_bytes` (the rank's own parameters, `parameter_bytes`, and the
    head's float32 copy, `logits_upcast_bytes`) plus RUNTIME_BYTES; the room is the host's
    memory (`memory.host_memory_bytes`: a cgroup's limit where one applies) less what this
    process already holds (Python, MLX, the tokenizer).

    Raises:
        ModelLoadError: the rank's share does not fit the room left.
    """
    if not share_bytes:
        return
    need = share_bytes + RUNTIME_BYTES
    limit = host_memory_bytes()
    held = process_bytes()
    room = limit - held
    logger.debug(
        "rank %d: weights and head copy %s, need %s, process holds %s, limit %s",
        rank,
        format_bytes(share_bytes),
        format_bytes(need),
        format_bytes(held),
        format_bytes(limit),
    )
    if need <= room:
        return
    host = socket.gethostname()
    hint = (
        "run it over more hosts (--strategy pipeline, with --weights by memory where hosts differ)"
        if plan.strategy in (LOCAL, REPLICAS)
        else "add hosts, or give this host fewer layers with --split/--weights"
    )
    raise ModelLoadError(
        f"rank {rank} on {host}: its share of the model ({plan.strategy}) needs "
        f"{format_bytes(need)} to load and generate, but the host has {format_bytes(limit)}, "
        f"{format_bytes(max(room, 0))} of it free; {hint}"
    )


def _materialise(
    model: nn.Module,
    plan: ShardPlan,
    group: mx.distributed.Group | None,
    *,
    started: float,
    wait: Guard,
) -> float:
    """Read this rank's weights (`model` already pruned per `plan`), wait for the others.

    Returns the seconds this rank took to load, from `started`.
    """
    rank, world_size = (group.rank(), group.size()) if group is not None else (0, 1)
    with distributed.peer_errors(rank, "loading the model"):
        mx.eval(model.parameters())
        seconds = time.perf_counter() - started
        layers = f"layers {plan.layers[0]}-{plan.layers[1] - 1}" if plan.layers else "all"
        logger.info(
            "loaded %s (%s) in %.2fs, peak memory %s%s",
            layers,
            plan.strategy,
            seconds,
            format_bytes(mx.get_peak_memory()),
            "; waiting for the other ranks" if world_size > 1 else "",
        )
        # Bounded also when the weights came through the cache: a link cut while a peer
        # loads must not hang until the launcher's --timeout (prewarm big models first).
        # The plan's own collectives wait for the slowest peer too, so they go inside.
        with wait("waiting for every rank to finish loading"):
            if group is not None:
                connect_plan(model, plan, group)
                distributed.barrier(group)
    return seconds


def _fetch_weights(config: Config, name: str, plan: ShardPlan, rank: int, world_size: int) -> Path:
    """Fetch (or find cached) the weight files this rank's part of `plan` needs."""
    from .cache import RankSpec

    spec = RankSpec(
        ranks=(rank,),
        world_size=world_size,
        strategy=PIPELINE if plan.strategy == PIPELINE else TENSOR,
        split=plan.split,
    )
    local = cache_manager(config).ensure_model(
        name, spec, revision=config.model.revision, force=config.cache.force_download
    )
    logger.info(
        "model files ready in %s (%d fetched, %s, %.1fs)",
        local.path,
        len(local.fetched_files),
        format_bytes(local.fetched_bytes),
        local.seconds,
    )
    return Path(local.path)
