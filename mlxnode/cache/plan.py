"""Which files of a model a set of ranks needs: metadata first, then only their weights.

The layer arithmetic is `mlxnode.sharding`'s, the same the engine loads with, so a
rank never needs a file the cache did not fetch for it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from .. import sharding
from ..errors import CacheError, ModelLoadError, UsageError

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# What mlx-lm's `sharded_load` fetches before any weights: config, tokenizer, chat template.
METADATA_PATTERNS = (
    "*.json",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
)
# mlx-lm's `load_model` reads every file matching this in the model directory.
WEIGHT_PATTERN = "model*.safetensors"
# A replica holds the whole model, as a tensor rank reads from every file.
CACHE_STRATEGIES = ("pipeline", "tensor", "auto", "replicas")
# Keys of config.json that hold the number of transformer blocks, in the order mlx-lm's models use.
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class RankSpec:
    """The ranks one host serves and how the model is split over all ranks.

    Args:
        ranks: The ranks this host runs (their files are unioned).
        world_size: Number of ranks in total.
        strategy: ``pipeline``, ``tensor``, ``replicas`` or ``auto`` (the engine decides later).
        split: Layers per rank, in rank order (pipeline).
        weights: Relative memory per rank; layers are split in proportion.
        all_files: Every file of the repo, not only what the ranks need.

    Raises:
        UsageError: a value is out of range (named in the message).
    """

    ranks: Sequence[int] = (0,)
    world_size: int = 1
    strategy: str = "tensor"
    split: Sequence[int] | None = None
    weights: Sequence[float] | None = None
    all_files: bool = False

    def __post_init__(self) -> None:
        ranks = tuple(sorted({int(r) for r in self.ranks}))
        if self.world_size < 1:
            raise UsageError(f"world size must be >= 1, got {self.world_size}")
        if not ranks:
            raise UsageError("give at least one rank (--rank R or --ranks 0,2)")
        bad = [r for r in ranks if not 0 <= r < self.world_size]
        if bad:
            raise UsageError(
                f"rank {bad[0]} is outside 0..{self.world_size - 1} "
                f"for world size {self.world_size}"
            )
        if self.strategy not in CACHE_STRATEGIES:
            raise UsageError(
                f"strategy {self.strategy!r} is not one of {', '.join(CACHE_STRATEGIES)}"
            )
        if self.split is not None and self.weights is not None:
            raise UsageError("give either --split or --weights, not both")
        # Frozen: normalise the sequences to tuples so specs compare and hash by value.
        object.__setattr__(self, "ranks", ranks)
        if self.split is not None:
            object.__setattr__(self, "split", tuple(int(s) for s in self.split))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    @property
    def per_layer(self) -> bool:
        """Only a pipeline over several ranks lets a rank skip weight files."""
        return self.strategy == "pipeline" and self.world_size > 1 and not self.all_files


@dataclass(frozen=True)
class FilePlan:
    """The files a `RankSpec` needs, metadata first; layer ranges for the record."""

    metadata: tuple[str, ...]
    weights: tuple[str, ...]
    num_layers: int | None
    split: tuple[int, ...] | None
    layer_ranges: dict[int, tuple[int, int]]

    @property
    def files(self) -> list[str]:
        return [*self.metadata, *self.weights]


def metadata_files(repo_files: Iterable[str]) -> list[str]:
    """Top-level config, tokenizer and template files (no weights), sorted."""
    return sorted(
        name
        for name in repo_files
        if "/" not in name and any(fnmatchcase(name, p) for p in METADATA_PATTERNS)
    )


def weight_files(repo_files: Iterable[str], index: Mapping | None) -> list[str]:
    """Every weight file mlx-lm would load: the index's files, or ``model*.safetensors``."""
    names = set(repo_files)
    found = {n for n in names if "/" not in n and fnmatchcase(n, WEIGHT_PATTERN)}
    if index is not None:
        found |= set(_weight_map(index).values())
    return sorted(found)


def num_layers(config: Mapping, index: Mapping | None) -> int | None:
    """Transformer blocks as the model builds them: config.json first, else the index.

    Multimodal configs keep the language model's count in ``text_config``.
    """
    for source in (config, config.get("text_config") or {}):
        for key in _LAYER_KEYS:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    if index is not None:
        layers = sharding.checkpoint_layers(_weight_map(index))
        if layers:
            return max(layers) + 1
    return None


def plan_files(
    spec: RankSpec,
    *,
    repo_files: Iterable[str],
    config: Mapping,
    index: Mapping | None,
    repo_id: str,
) -> FilePlan:
    """The files `spec`'s ranks need, given the model's config.json and weight index.

    Raises:
        UsageError: the split does not fit the model.
        ModelLoadError: a pipeline is asked of a checkpoint that lacks some layers.
        CacheError: the index names a file the repo does not have.
    """
    repo_files = sorted(set(repo_files))
    meta = metadata_files(repo_files)
    all_weights = weight_files(repo_files, index)
    missing = sorted(set(all_weights) - set(repo_files))
    if missing:
        raise CacheError(
            f"{repo_id}: {INDEX_FILE} names {', '.join(missing)}, which the repo does not have; "
            "the checkpoint is broken upstream"
        )
    layers = num_layers(config, index)
    if spec.all_files:
        rest = sorted(set(repo_files) - set(meta))
        return FilePlan(tuple(meta), tuple(rest), layers, None, {})
    if not spec.per_layer or index is None:
        # Tensor parallelism shards every weight; a single-file checkpoint has nothing to skip.
        return FilePlan(tuple(meta), tuple(all_weights), layers, None, {})
    if layers is None:
        raise ModelLoadError(
            f"{repo_id}: cannot tell the number of layers (no num_hidden_layers in {CONFIG_FILE}, "
            f"no layer keys in {INDEX_FILE}); use --strategy tensor or --all"
        )
    weight_map = _weight_map(index)
    sharding.check_layer_coverage(weight_map, layers, what=repo_id)
    split = sharding.resolve_split(layers, spec.world_size, split=spec.split, weights=spec.weights)
    needed: set[str] = set()
    ranges: dict[int, tuple[int, int]] = {}
    for rank in spec.ranks:
        start, end = sharding.layer_range(layers, rank, spec.world_size, split=split)
        ranges[rank] = (start, end)
        needed |= sharding.files_for_layers(weight_map, start, end, head=end == layers)
    return FilePlan(tuple(meta), tuple(sorted(needed)), layers, tuple(split), ranges)


def read_json(path: Path, *, what: str) -> dict | None:
    """A JSON object from the snapshot, None if absent; CacheError if unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CacheError(
            f"cached {what} {path} cannot be read ({e}); "
            "run `mlxnode cache prewarm ... --force-download`",
            path=str(path),
        ) from e
    if not isinstance(data, dict):
        raise CacheError(f"cached {what} {path} is not a JSON object", path=str(path))
    return data


def _weight_map(index: Mapping) -> dict[str, str]:
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CacheError(f"{INDEX_FILE} has no weight_map object")
    return {str(k): str(v) for k, v in weight_map.items()}
