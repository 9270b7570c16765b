"""The rank -> layer -> file mapping, checked against mlx-lm's own pipeline on a real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from mlxnode import sharding
from mlxnode.errors import UsageError
from mlxnode.pipeline import drop_head

NUM_LAYERS = 8
# The tiny qwen2's four files: file k holds layers 2k-2 and 2k-1; the embeddings sit in the
# first, the final norm and lm_head in the last. Every rank needs the embeddings; only rank 0,
# which holds the last layers, needs the head (logits once: `pipeline.drop_head`).
F1, F2, F3, F4 = (f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5))
# (world size, split, per rank: its layers [start, end) and the files that hold exactly
# them plus the embeddings, and the head on rank 0). Written out by hand; None is mlx-lm's
# even split.
SPLITS = [
    (2, None, [((4, 8), {F1, F3, F4}), ((0, 4), {F1, F2})]),
    (3, None, [((5, 8), {F1, F3, F4}), ((2, 5), {F1, F2, F3}), ((0, 2), {F1})]),
    (4, None, [((6, 8), {F1, F4}), ((4, 6), {F1, F3}), ((2, 4), {F1, F2}), ((0, 2), {F1})]),
    (2, [5, 3], [((3, 8), {F1, F2, F3, F4}), ((0, 3), {F1, F2})]),
    (2, [1, 7], [((7, 8), {F1, F4}), ((0, 7), {F1, F2, F3, F4})]),
    (3, [3, 3, 2], [((5, 8), {F1, F3, F4}), ((2, 5), {F1, F2, F3}), ((0, 2), {F1})]),
    (3, [1, 6, 1], [((7, 8), {F1, F4}), ((1, 7), {F1, F2, F3, F4}), ((0, 1), {F1})]),
    (4, [2, 1, 4, 1], [((6, 8), {F1, F4}), ((5, 6), {F1, F3}), ((1, 5), {F1, F2, F3}),
                       ((0, 1), {F1})]),
    (4, [1, 1, 1, 5], [((7, 8), {F1, F4}), ((6, 7), {F1, F4}), ((5, 6), {F1, F3}),
                       ((0, 5), {F1, F2, F3})]),
]  # fmt: skip


class FakeGroup:
    """What `PipelineMixin.pipeline` reads from an `mx.distributed.Group`."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_model import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("sharding") / "tiny-qwen2", arch="qwen2", num_layers=NUM_LAYERS
    )


@pytest.fixture(scope="module")
def weight_map(qwen2_dir: Path) -> dict[str, str]:
    return json.loads((qwen2_dir / "model.safetensors.index.json").read_text())["weight_map"]


def _pipelined(model_dir: Path, rank: int, size: int, split: list[int] | None):
    model, _ = load_model(model_dir, lazy=True, strict=False)
    model.model.pipeline(FakeGroup(rank, size), split)
    drop_head(model, rank)
    return model


@pytest.mark.parametrize(("size", "split", "ranks"), SPLITS)
def test_layer_range_matches_mlx_lm_pipeline(
    qwen2_dir: Path, size: int, split: list[int] | None, ranks: list
):
    for rank, (layers, _files) in enumerate(ranks):
        model = _pipelined(qwen2_dir, rank, size, split)
        assert (model.model.start_idx, model.model.end_idx) == layers
        assert sharding.layer_range(NUM_LAYERS, rank, size, split=split) == layers


@pytest.mark.parametrize(("size", "split", "ranks"), SPLITS)
def test_rank_files_are_exactly_what_mlx_lm_keeps(
    qwen2_dir: Path, weight_map: dict[str, str], size: int, split: list[int] | None, ranks: list
):
    assert set(weight_map.values()) == {F1, F2, F3, F4}, "the layout these cases assume"
    for rank, ((start, end), expected) in enumerate(ranks):
        files = sharding.files_for_layers(weight_map, start, end, head=end == NUM_LAYERS)
        assert files == expected, (rank, sorted(files))
        model = _pipelined(qwen2_dir, rank, size, split)
        kept = {key for key, _ in tree_flatten(model.parameters())}
        assert kept <= set(weight_map), "tiny qwen2 keeps checkpoint names unchanged"
        # The files hold every weight mlx-lm keeps for the rank, and each of them is needed.
        assert {weight_map[k] for k in kept} == expected
        layers = {sharding.layer_of_key(k) for k in kept} - {None}
        assert layers == set(range(start, end))


def test_rank_zero_holds_the_last_layers():
    assert sharding.layer_range(8, 0, 2) == (4, 8)
    assert sharding.layer_range(8, 1, 2) == (0, 4)
    assert sharding.resolve_split(10, 3) == [4, 3, 3]


def test_weights_split_in_proportion():
    assert sharding.resolve_split(8, 2, weights=[192, 64]) == [6, 2]
    assert sharding.resolve_split(8, 2, weights=[1, 1]) == [4, 4]
    assert sharding.resolve_split(10, 3, weights=[1000, 1, 1]) == [8, 1, 1]


@given(
    num_layers=st.integers(1, 200),
    weights=st.lists(st.floats(0.01, 1000.0), min_size=1, max_size=16),
)
def test_weights_give_every_rank_a_layer_and_sum_right(num_layers: int, weights: list[float]):
    if len(weights) > num_layers:
        with pytest.raises(UsageError):
            sharding.split_from_weights(num_layers, weights)
        return
    counts = sharding.split_from_weights(num_layers, weights)
    assert sum(counts) == num_layers
    assert all(c >= 1 for c in counts)
    # Proportional up to rounding: no rank is more than one layer off its exact share
    # of the layers left after everyone's first one.
    spare, total = num_layers - len(weights), sum(weights)
    for count, weight in zip(counts, weights, strict=True):
        assert abs((count - 1) - spare * weight / total) < 1 + 1e-9


@given(num_layers=st.integers(1, 120), world_size=st.integers(1, 12), data=st.data())
def test_layer_ranges_tile_the_model(num_layers: int, world_size: int, data: st.DataObject):
    if world_size > num_layers:
        with pytest.raises(UsageError):
            sharding.resolve_split(num_layers, world_size)
        return
    cuts: list[int] = []
    if num_layers > 1:
        cuts = sorted(data.draw(st.sets(st.integers(1, num_layers - 1), max_size=world_size - 1)))
    split = None
    if len(cuts) == world_size - 1:
        bounds = [0, *cuts, num_layers]
        split = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    ranges = [
        sharding.layer_range(num_layers, r, world_size, split=split) for r in range(world_size)
    ]
    covered = sorted(layer for start, end in ranges for layer in range(start, end))
    assert covered == list(range(num_layers))
    # Rank r sits right after rank r+1: the highest rank starts at layer 0.
    assert ranges[-1][0] == 0 and ranges[0][1] == num_layers


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": [4, 3]}, "sums to 7"),
        ({"split": [8, 0]}, "no layers"),
        ({"split": [4, 2, 2]}, "3 entries for 2 ranks"),
        ({"split": [4, 4], "weights": [1, 1]}, "not both"),
        ({"weights": [1, 2, 3]}, "3 entries for 2 ranks"),
        ({"weights": [1, -1]}, "positive"),
    ],
)
def test_bad_splits_raise_usage_error(kwargs: dict, message: str):
    with pytest.raises(UsageError, match=message):
        sharding.resolve_split(8, 2, **kwargs)


def test_impossible_layouts_raise_usage_error():
    with pytest.raises(UsageError, match="only 8 layers"):
        sharding.resolve_split(8, 9)
    with pytest.raises(UsageError, match="outside 0..1"):
        sharding.layer_range(8, 2, 2)


def test_files_for_layers_keeps_non_layer_weights_and_the_head_only_when_asked():
    weight_map = {
        "model.embed_tokens.weight": "a",
        "model.layers.0.mlp.weight": "a",
        "model.layers.1.mlp.weight": "b",
        "model.layers.2.mlp.weight": "c",
        "model.norm.weight": "c",
        "lm_head.weight": "d",
    }
    assert sharding.files_for_layers(weight_map, 1, 2) == {"a", "b", "c", "d"}
    # A rank without the last layer: the embeddings, but not the final norm or lm_head.
    assert sharding.files_for_layers(weight_map, 1, 2, head=False) == {"a", "b"}
    assert sharding.files_for_layers(weight_map, 2, 3, head=True) == {"a", "c", "d"}
    assert sharding.checkpoint_layers(weight_map) == {0, 1, 2}
