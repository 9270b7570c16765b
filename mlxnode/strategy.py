"""How a model is split over the ranks: pipeline, tensor, whole copies, or not at all, and why.

`plan_shards` decides from what the model supports (mlx-lm's own `pipeline()`,
mlxnode's generic pipeline, mlx-lm's `shard()`), the backend's topology, each host's memory
and the batch, and the requested strategy and split; `apply_plan` then prunes or shards the
lazily loaded model in place, before any weight is read. Replicas keep the whole model on
every rank and split the batch instead (`mlxnode.replicas`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .distributed import FULL_MESH_BACKENDS, LinkProbe, transport_for
from .errors import ModelLoadError, UsageError
from .formatting import format_bytes
from .pipeline import agree_on_wire, apply_pipeline, drop_head, generic_pipeline_problem
from .sharding import layer_range, resolve_split

logger = logging.getLogger(__name__)

LOCAL, PIPELINE, TENSOR, REPLICAS = "local", "pipeline", "tensor", "replicas"
OWN_PIPELINE, GENERIC_PIPELINE = "mlx-lm pipeline()", "mlxnode generic pipeline"
WHOLE_COPIES = "whole model per rank"

# auto picks replicas only where every host's memory holds the weights this many times over:
# the rest is the runtime, the KV cache and the activations of a batch.
REPLICA_MEMORY_FACTOR = 1.5

# How fast auto assumes one device reads its weights when it weighs tensor parallelism's
# all-reduces against the compute they split: the fastest Apple silicon (M3 Ultra, 819 GB/s)
# and, on NCCL, an H200 (4.8 TB/s). A slower device only makes tensor parallelism pay more.
DEVICE_BYTES_PER_S = {"nccl": 4.8e12}
DEFAULT_DEVICE_BYTES_PER_S = 8.0e11
# auto picks tensor only where a token's all-reduces cost at most this share of the time
# that splitting the weights saves.
TENSOR_LINK_SHARE = 0.5

# Architectures the generic pipeline wrapper is tested with (tests/test_engine.py). Others
# pass if they have its shape (a `model.layers` list of blocks that take a KV cache).
GENERIC_PIPELINE_TESTED = ("llama", "mistral", "qwen3", "gemma", "gemma3_text", "phi3")


@dataclass(frozen=True)
class ShardPlan:
    """How this rank holds the model."""

    strategy: str  # LOCAL, PIPELINE, TENSOR or REPLICAS
    implementation: str  # which code does it, for the log and the metrics
    reason: str
    split: list[int] | None = None  # layers per rank, in rank order (pipeline)
    layers: tuple[int, int] | None = None  # this rank's [start, end) (pipeline)


def plan_shards(
    model: nn.Module,
    model_config: dict[str, Any],
    *,
    rank: int,
    world_size: int,
    strategy: str = "auto",
    backend: str = "ring",
    split: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    batch_size: int = 1,
    model_bytes: int | None = None,
    memory: Sequence[int] | None = None,
    overlap: bool = False,
    link: LinkProbe | None = None,
) -> ShardPlan:
    """Decide how this rank holds `model` (a lazily loaded instance), and say why.

    auto never picks a plan slower than one device where one device can hold the model:
    pipeline when a split is given; replicas when every rank's `memory` holds `model_bytes`
    (times REPLICA_MEMORY_FACTOR), for any batch (one prompt then runs on one whole copy,
    at one device's speed); tensor when the backend is a full mesh, the model can be
    tensor-sharded over `world_size` and the `link` probe says a token's 2 all-reduces per
    layer cost at most TENSOR_LINK_SHARE of the time splitting the weights saves (see
    `_tensor_pays`); else pipeline when possible, else tensor.

    Args:
        batch_size: Prompts in the batch (named in auto's reason).
        model_bytes: The size of the model's weight files, if known.
        memory: Each rank's memory figure in bytes (`mlxnode.memory.host_memory`), in rank
            order; None: unknown, and auto does not pick replicas.
        overlap: The pipeline is to keep every stage busy. mlx-lm's pipeline() all-gathers
            the hidden state at the end of every forward pass, which holds every stage to
            the last one's pace, so the generic wrapper then splits every model it can,
            and mlx-lm's pipeline() only the others.

    Raises:
        UsageError: a split for a tensor run, or a bad split (`sharding.resolve_split`).
        ModelLoadError: the model cannot be split the way asked (or at all).
    """
    model_type = str(model_config.get("model_type", type(model).__module__))
    if world_size == 1:
        if split is not None or weights is not None:
            logger.warning("ignoring --split/--weights: a single rank holds the whole model")
        return ShardPlan(LOCAL, "whole model", "a single rank holds the whole model")
    # mlx-lm's pipeline() passes hidden states with send/recv; where the backend has none
    # (nccl), the generic wrapper, which can relay them with collectives, splits it instead.
    has_own_pipeline = hasattr(model, "model") and hasattr(model.model, "pipeline")
    generic_problem = generic_pipeline_problem(model)
    use_own = has_own_pipeline and transport_for(backend).point_to_point
    if overlap and generic_problem is None:
        use_own = False
    pipeline_problem = None if use_own else generic_problem
    if pipeline_problem is not None and has_own_pipeline:
        pipeline_problem = (
            f"mlx-lm's pipeline() needs send/recv, which are off on the {backend} backend, and "
            f"mlxnode's generic pipeline cannot split it: {pipeline_problem}"
        )
    tensor_problem = _tensor_problem(model, model_config, world_size)
    wants_split = split is not None or weights is not None

    if strategy in (REPLICAS, TENSOR, PIPELINE):
        chosen, reason = _asked_choice(
            strategy,
            model_type,
            wants_split=wants_split,
            pipeline_problem=pipeline_problem,
            tensor_problem=tensor_problem,
        )
    else:
        chosen, reason = _auto_choice(
            model_type,
            backend,
            wants_split=wants_split,
            batch_size=batch_size,
            copies_fit=_copies_fit(model_bytes, memory),
            tensor_pays=_tensor_pays(
                link, model_bytes, num_layers(model, model_config), world_size, backend
            ),
            pipeline_problem=pipeline_problem,
            tensor_problem=tensor_problem,
        )
    if chosen == REPLICAS:
        return ShardPlan(REPLICAS, WHOLE_COPIES, reason)
    if chosen == TENSOR:
        return ShardPlan(TENSOR, "mlx-lm shard()", reason)
    counts = resolve_split(
        num_layers(model, model_config), world_size, split=split, weights=weights
    )
    start, end = layer_range(sum(counts), rank, world_size, split=counts)
    implementation = OWN_PIPELINE if use_own else GENERIC_PIPELINE
    return ShardPlan(PIPELINE, implementation, reason, split=counts, layers=(start, end))


def _asked_choice(
    strategy: str,
    model_type: str,
    *,
    wants_split: bool,
    pipeline_problem: str | None,
    tensor_problem: str | None,
) -> tuple[str, str]:
    """(strategy, reason) for a strategy the user named; refuses what cannot be done."""
    if strategy == REPLICAS:
        if wants_split:
            raise UsageError(
                "--split and --weights set layers per rank, but replicas hold every layer; "
                "drop them or use --strategy pipeline"
            )
        return REPLICAS, "asked for with --strategy replicas"
    if strategy == TENSOR:
        if wants_split:
            raise UsageError(
                "--split and --weights set layers per rank, which only a pipeline has; "
                "drop them or use --strategy pipeline"
            )
        if tensor_problem is not None:
            hint = "; use --strategy pipeline" if pipeline_problem is None else ""
            raise ModelLoadError(f"cannot tensor-shard {model_type}: {tensor_problem}{hint}")
        return TENSOR, "asked for with --strategy tensor"
    if pipeline_problem is not None:
        raise ModelLoadError(_unsupported(model_type, pipeline_problem, tensor_problem))
    return PIPELINE, "asked for with --strategy pipeline"


def _auto_choice(
    model_type: str,
    backend: str,
    *,
    wants_split: bool,
    batch_size: int,
    copies_fit: str | None,
    tensor_pays: tuple[bool, str],
    pipeline_problem: str | None,
    tensor_problem: str | None,
) -> tuple[str, str]:
    """(strategy, reason) that auto picks, by the rule in `plan_shards`'s docstring."""
    mesh = backend in FULL_MESH_BACKENDS
    pays, link_reason = tensor_pays
    if wants_split and pipeline_problem is None:
        return PIPELINE, "auto: --split/--weights give the layers per rank"
    if not wants_split and copies_fit is not None:
        return REPLICAS, (
            f"auto: {batch_size} prompt(s) and {copies_fit}; one prompt runs on one copy, at "
            "one device's speed"
        )
    if mesh and tensor_problem is None and pays:
        return TENSOR, f"auto: the {backend} backend is a full mesh and {link_reason}"
    if pipeline_problem is None:
        if not mesh:
            why = (
                f"the {backend} backend is not a full mesh, and tensor parallelism "
                "all-reduces twice per layer"
            )
        elif tensor_problem is not None:
            why = f"{model_type} cannot be tensor-sharded ({tensor_problem})"
        else:
            why = link_reason
        return PIPELINE, f"auto: {why}"
    if tensor_problem is None:
        if wants_split:
            raise UsageError(
                f"--split/--weights need a pipeline, which {model_type} cannot do "
                f"({pipeline_problem}); drop them to use tensor parallelism"
            )
        return TENSOR, f"auto: {model_type} cannot be pipelined ({pipeline_problem})"
    raise ModelLoadError(_unsupported(model_type, pipeline_problem, tensor_problem))


def apply_plan(model: nn.Module, plan: ShardPlan, group: mx.distributed.Group) -> None:
    """Shard or prune `model` in place per `plan`, before its weights are evaluated.

    Runs no collective (a peer may still be downloading): `connect_plan` does, later.
    """
    if plan.strategy == TENSOR:
        model.shard(group)
    elif plan.strategy == PIPELINE:
        assert plan.layers is not None
        assert plan.split is not None
        if plan.implementation == OWN_PIPELINE:
            model.model.pipeline(group, split=plan.split)
            got = (model.model.start_idx, model.model.end_idx)
            if got != plan.layers:
                raise ModelLoadError(
                    f"mlx-lm's pipeline() gave rank {group.rank()} layers {got}, but "
                    f"mlxnode.sharding says {plan.layers}; the two disagree on the convention"
                )
        else:
            apply_pipeline(model, group, plan.split)
        drop_head(model, group.rank())


def connect_plan(model: nn.Module, plan: ShardPlan, group: mx.distributed.Group) -> None:
    """The collectives a plan needs once every rank has its shard (see `agree_on_wire`)."""
    if plan.strategy == PIPELINE:
        agree_on_wire(model, group)


def _tensor_pays(
    link: LinkProbe | None,
    model_bytes: int | None,
    layers: int,
    world_size: int,
    backend: str,
) -> tuple[bool, str]:
    """Whether a token's all-reduces cost at most TENSOR_LINK_SHARE of what splitting saves.

    One device needs at least model_bytes / DEVICE_BYTES_PER_S per token; tensor
    parallelism saves at most (1 - 1/N) of it and pays 2 all-reduces per layer, each at
    least the probe's latency. Measured on 2 x H200 over NCCL: an 8B model at 0.44x of one
    GPU, about 7 ms of all-reduces per token (README, Linux CUDA hosts).
    """
    if link is None or not model_bytes:
        return False, "no link probe or model size: tensor parallelism is not weighed"
    speed = DEVICE_BYTES_PER_S.get(backend, DEFAULT_DEVICE_BYTES_PER_S)
    saved = model_bytes / speed * (1 - 1 / world_size)
    cost = 2 * layers * link.latency_s
    figures = (
        f"{2 * layers} all-reduces per token cost {cost * 1e3:.2f} ms ({link.describe()}), "
        f"splitting {format_bytes(model_bytes)} saves at most {saved * 1e3:.2f} ms"
    )
    if cost <= TENSOR_LINK_SHARE * saved:
        return True, f"tensor parallelism pays: {figures}"
    return False, f"tensor parallelism would not pay: {figures}"


def _copies_fit(model_bytes: int | None, memory: Sequence[int] | None) -> str | None:
    """Why every rank can hold a whole copy (the rule's inputs, for the log), else None."""
    if not model_bytes or not memory or min(memory) <= 0:
        return None
    need = model_bytes * REPLICA_MEMORY_FACTOR
    if min(memory) < need:
        return None
    return (
        f"every rank's memory (least {format_bytes(min(memory))}) holds the model "
        f"({format_bytes(model_bytes)}) x {REPLICA_MEMORY_FACTOR}"
    )


def _tensor_problem(model: nn.Module, model_config: dict[str, Any], world_size: int) -> str | None:
    if not hasattr(model, "shard"):
        return "mlx-lm has no shard() for it"
    sizes = {**model_config.get("text_config", {}), **model_config}
    # shard() splits heads and MLP widths evenly; for MoE models that includes every expert's
    # width, or it fails half-way through loading.
    for key in (
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "moe_intermediate_size",
    ):
        value = sizes.get(key)
        if isinstance(value, int) and value % world_size:
            return f"{key} {value} is not divisible by {world_size} ranks"
    return None


def _unsupported(model_type: str, pipeline_problem: str | None, tensor_problem: str | None) -> str:
    own, shardable = _mlx_lm_capabilities()
    return (
        f"model type {model_type!r} cannot be split over ranks: no pipeline "
        f"({pipeline_problem}) and no tensor parallelism ({tensor_problem}). Supported: "
        f"mlx-lm's own pipeline ({', '.join(own)}); mlxnode's generic pipeline for "
        "decoder-only models whose layers take a KV cache (tested: "
        f"{', '.join(GENERIC_PIPELINE_TESTED)}); tensor parallelism ({', '.join(shardable)}). "
        "Run it on one host instead"
    )


def _mlx_lm_capabilities() -> tuple[list[str], list[str]]:
    """mlx-lm model types with their own pipeline() and with shard(), read from its sources."""
    import mlx_lm.models

    own, shardable = [], []
    for path in sorted(Path(mlx_lm.models.__file__).parent.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if "(PipelineMixin" in text:
            own.append(path.stem)
        if "def shard(" in text:
            shardable.append(path.stem)
    return own, shardable


def num_layers(model: nn.Module, model_config: dict[str, Any]) -> int:
    """How many decoder layers `model` has (its layer list, else its config)."""
    layers = getattr(model, "layers", None)
    if isinstance(layers, list) and layers:
        return len(layers)
    sizes = {**model_config.get("text_config", {}), **model_config}
    return int(sizes.get("num_hidden_layers", 0))
