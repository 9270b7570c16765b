"""Which layers, and so which weight files, each rank holds.

The one place that maps ranks to layers. The cache (what to download) and the
engine (what to load) both call it, so a rank never needs a file it lacks. The
convention is mlx-lm's `PipelineMixin`: rank 0 holds the LAST layers, the highest
rank the first ones; an even split gives the extra layers to the low ranks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .errors import ModelLoadError, UsageError

# Checkpoint keys name their layer as "...layers.<n>." (mlx-lm matches the same way).
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# The head's weights under mlx-lm's names: the final norm and the projection to the vocabulary
# (absent where the embeddings are tied). Only the rank holding the last layers uses them
# (`pipeline.drop_head`); the embeddings every rank keeps.
_HEAD_KEY = re.compile(r"^(?:lm_head|model\.norm)\.")


def even_split(num_layers: int, world_size: int) -> list[int]:
    """Layers per rank for an even split; the low ranks get the extra layers."""
    base, extra = divmod(num_layers, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def split_from_weights(num_layers: int, weights: Sequence[float]) -> list[int]:
    """Layers per rank proportional to `weights` (e.g. each host's memory), each rank >= 1.

    Uses largest remainders so the counts sum exactly to `num_layers`.
    """
    if not weights or any(w <= 0 for w in weights):
        raise UsageError(f"weights {list(weights)} must be positive numbers, one per rank")
    if len(weights) > num_layers:
        raise UsageError(
            f"{len(weights)} ranks but the model has only {num_layers} layers; use fewer hosts"
        )
    total = float(sum(weights))
    # Every rank gets one layer first; the rest is shared out by weight.
    spare = num_layers - len(weights)
    shares = [spare * w / total for w in weights]
    counts = [1 + int(s) for s in shares]
    leftover = num_layers - sum(counts)
    by_remainder = sorted(range(len(weights)), key=lambda r: (-(shares[r] - int(shares[r])), r))
    for r in by_remainder[:leftover]:
        counts[r] += 1
    return counts


def resolve_split(
    num_layers: int,
    world_size: int,
    *,
    split: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
) -> list[int]:
    """Layers per rank, in rank order, from an explicit split, weights, or evenly.

    Raises:
        UsageError: the split has the wrong length, a rank with no layers, or does
            not add up to the model's layer count.
    """
    if split is not None and weights is not None:
        raise UsageError("give either --split or --weights, not both")
    if split is not None:
        split = list(split)
        if len(split) != world_size:
            raise UsageError(
                f"split {','.join(map(str, split))} has {len(split)} entries "
                f"for {world_size} ranks; give one layer count per rank"
            )
        if any(s <= 0 for s in split):
            raise UsageError(
                f"split {','.join(map(str, split))} gives a rank no layers; every rank needs >= 1"
            )
        if sum(split) != num_layers:
            raise UsageError(
                f"split {','.join(map(str, split))} sums to {sum(split)} "
                f"but the model has {num_layers} layers"
            )
        return split
    if weights is not None:
        if len(weights) != world_size:
            raise UsageError(
                f"weights have {len(weights)} entries for {world_size} ranks; give one per rank"
            )
        return split_from_weights(num_layers, weights)
    if world_size > num_layers:
        raise UsageError(f"{world_size} ranks but the model has only {num_layers} layers")
    return even_split(num_layers, world_size)


def layer_range(
    num_layers: int,
    rank: int,
    world_size: int,
    *,
    split: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
) -> tuple[int, int]:
    """The half-open range [start, end) of layers that `rank` holds in a pipeline."""
    if not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is outside 0..{world_size - 1}")
    counts = resolve_split(num_layers, world_size, split=split, weights=weights)
    start = sum(counts[rank + 1 :])
    return start, start + counts[rank]


def layer_of_key(key: str) -> int | None:
    """The layer number a checkpoint key belongs to, or None for non-layer weights."""
    match = _LAYER_KEY.search(key)
    return int(match.group(1)) if match else None


def files_for_layers(
    weight_map: Mapping[str, str], start: int, end: int, *, head: bool = True
) -> set[str]:
    """Files holding layers [start, end) and the non-layer weights (embeddings...), the
    head's (final norm, lm_head) only with `head`: a pipeline gives it to the rank that holds
    the last layer (`head=end == num_layers`)."""
    files: set[str] = set()
    for key, filename in weight_map.items():
        layer = layer_of_key(key)
        wanted = (head or not is_head_key(key)) if layer is None else start <= layer < end
        if wanted:
            files.add(filename)
    return files


def is_head_key(key: str) -> bool:
    """Whether a checkpoint key is one of the head's weights (final norm, lm_head)."""
    return _HEAD_KEY.match(key) is not None


def checkpoint_layers(weight_map: Mapping[str, str]) -> set[int]:
    return {n for n in (layer_of_key(k) for k in weight_map) if n is not None}


def check_layer_coverage(weight_map: Mapping[str, str], layer_count: int, *, what: str) -> None:
    """Fail unless the checkpoint has weights for every one of the model's layers.

    A pipeline rank picks its files by layer, so a layer without weights would load
    as random values instead of failing.

    Args:
        weight_map: The checkpoint index's key -> file mapping.
        layer_count: How many layers the model builds.
        what: The model, as the error names it (a repo id or a directory).

    Raises:
        ModelLoadError: some layers have no weights.
    """
    absent = sorted(set(range(layer_count)) - checkpoint_layers(weight_map))
    if absent:
        raise ModelLoadError(
            f"{what}: the checkpoint has no weights for layers {absent} of {layer_count}; "
            "convert it with mlx_lm.convert first"
        )
