"""Load one rank's shard of a model, as mlx-lm's `sharded_load` does.

The model is built lazily, pruned or sharded per `strategy.plan_shards` before any weight
is read, only this rank's weights are materialised, and loading ends with a barrier so no
rank starts generating (and waits on a peer's collective) while another still reads.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import distributed
from .config import Config
from .formatting import format_bytes
from .model_files import (
    ModelMetadata,
    build_model,
    cache_manager,
    check_weight_files,
    context_length,
    read_metadata,
)
from .strategy import (
    PIPELINE,
    TENSOR,
    ShardPlan,
    apply_plan,
    connect_plan,
    num_layers,
    plan_shards,
)

logger = logging.getLogger(__name__)

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
) -> ShardedModel:
    """Load this rank's shard of the model of `config`: plan, prune or shard, materialise.

    Every rank of `group` must call this; it returns once all of them have loaded.

    Args:
        config: The resolved configuration (``model``, ``distributed``, ``cache``).
        group: The ranks to split the model over; None: this process holds all of it.
        metadata: The model's metadata if already read (`model_files.read_metadata`).
        wait: Wraps the final wait for the other ranks (a watchdog's guard).

    Returns:
        The loaded shard.

    Raises:
        UsageError: a bad split or weights.
        ModelLoadError: the model cannot be loaded or split the way asked.
        DistributedSetupError: a peer went away while loading.
    """
    if metadata is None:
        metadata = read_metadata(config)
    rank, world_size = (group.rank(), group.size()) if group is not None else (0, 1)
    started = time.perf_counter()
    mx.reset_peak_memory()
    dist = config.distributed
    model = build_model(metadata.path, metadata.name)
    plan = plan_shards(
        model,
        metadata.config,
        rank=rank,
        world_size=world_size,
        strategy=dist.strategy,
        backend=dist.backend,
        split=dist.split,
        weights=dist.weights,
    )
    if rank == 0:
        logger.info("strategy %s (%s): %s", plan.strategy, plan.implementation, plan.reason)
    weights_dir = metadata.path
    if metadata.cached:
        weights_dir = _fetch_weights(config, metadata.name, plan, rank, world_size)
        # Planning needed the model's structure before its weights were here; mlx-lm
        # decides which layers to quantise from the weight files, so build it again.
        model = build_model(weights_dir, metadata.name)
    check_weight_files(weights_dir, plan.layers, num_layers(model, metadata.config), rank)
    seconds = _materialise(model, plan, group, started=started, wait=wait)
    return ShardedModel(
        model=model,
        tokenizer=metadata.tokenizer,
        name=metadata.name,
        model_config=metadata.config,
        plan=plan,
        group=group,
        load_seconds=seconds,
    )


def _materialise(
    model: nn.Module,
    plan: ShardPlan,
    group: mx.distributed.Group | None,
    *,
    started: float,
    wait: Guard,
) -> float:
    """Shard or prune `model` per `plan`, read this rank's weights, wait for the others.

    Returns the seconds this rank took to load, from `started`.
    """
    rank, world_size = (group.rank(), group.size()) if group is not None else (0, 1)
    with distributed.peer_errors(rank, "loading the model"):
        if group is not None:
            apply_plan(model, plan, group)
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
        strategy=TENSOR if plan.strategy != PIPELINE else PIPELINE,
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
