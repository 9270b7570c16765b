"""Splits the engine tests left out: mixture-of-experts, grouped-query attention split over
tensor ranks, and `--weights` end to end.

Like tests/test_engine.py, real `mlx.launch --backend ring` ranks on 127.0.0.1 must give the
greedy token ids of single-process mlx-lm.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlx_lm.utils import load_model
from test_engine import MAX_TOKENS, PROMPT, mlxnode_run, reference

from mlxnode.errors import ModelLoadError
from mlxnode.strategy import plan_shards
from tests.support.tiny_model import make_tiny_model

# Four experts, two per token; heads, KV heads and every MLP width divide by 2 ranks.
MOE = {"arch": "qwen3_moe", "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2}
# Grouped-query attention: four query heads share each KV head, and each of 2 tensor ranks
# gets one KV head.
GQA = {"arch": "llama", "hidden_size": 64, "num_heads": 8, "num_kv_heads": 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coverage-models")
    return {
        "moe": make_tiny_model(root / "moe", **MOE),
        # Mixed precision: 16-bit experts, float32 norms and routers.
        "moe-f16": make_tiny_model(root / "moe-f16", dtype="float16", **MOE),
        "gqa": make_tiny_model(root / "gqa", **GQA),
    }


def _run(model: Path, tmp_path: Path, *args: str | int) -> tuple[list[int], dict]:
    """Greedy ids and the metrics report of a 2-rank `mlxnode run` that must succeed."""
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    job = mlxnode_run(
        2,
        "--model-path", model, "--no-chat-template", "--max-tokens", MAX_TOKENS,
        "--output", out, "--metrics-json", metrics, *args, PROMPT,
        cwd=tmp_path,
    )  # fmt: skip
    assert job.returncode == 0 and not job.rank_codes, job.stderr
    (record,) = job.records(out)
    return record["token_ids"], json.loads(metrics.read_text())


# -- planning, in-process


def test_tensor_plans_refuse_what_shard_cannot_split(tmp_path):
    """KV heads and expert widths must divide too, or shard() fails half-way through loading."""
    gqa = make_tiny_model(tmp_path / "gqa", **GQA)
    model, config = load_model(gqa, lazy=True, strict=False)
    with pytest.raises(ModelLoadError, match="num_key_value_heads 2 is not divisible by 4"):
        plan_shards(model, config, rank=0, world_size=4, strategy="tensor")
    moe = make_tiny_model(tmp_path / "moe", moe_intermediate_size=9, **MOE)
    model, config = load_model(moe, lazy=True, strict=False)
    with pytest.raises(ModelLoadError, match="moe_intermediate_size 9 is not divisible by 2"):
        plan_shards(model, config, rank=0, world_size=2, strategy="tensor")
    plan = plan_shards(model, config, rank=0, world_size=2, backend="mpi")
    assert plan.strategy == "pipeline" and "moe_intermediate_size 9" in plan.reason


# -- real ranks


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "strategy", "flags", "implementation"),
    [
        # qwen3_moe has mlx-lm's own pipeline(): overlapped, mlxnode's wrapper splits it.
        ("moe", "pipeline", [], "mlxnode generic pipeline"),
        ("moe", "tensor", [], "mlx-lm shard()"),
        ("moe-f16", "pipeline", ["--no-overlap"], "mlx-lm pipeline()"),
        ("gqa", "tensor", [], "mlx-lm shard()"),
    ],
)
def test_split_over_two_ranks_equals_single_process(
    models, tmp_path, model, strategy, flags, implementation
):
    tokens, report = _run(models[model], tmp_path, "--strategy", strategy, *flags)
    assert tokens == reference(models[model], PROMPT)
    assert (report["strategy"], report["implementation"]) == (strategy, implementation)


@pytest.mark.slow
def test_weights_split_layers_by_memory_end_to_end(models, tmp_path):
    """8 layers by weights 3:1: one layer each, the other 6 shared 4.5:1.5, and the tied
    remainder goes to the lower rank (README: largest remainders after one layer each)."""
    tokens, report = _run(models["gqa"], tmp_path, "--weights", "3,1")
    assert tokens == reference(models["gqa"], PROMPT)
    assert report["strategy"] == "pipeline" and report["split"] == [6, 2]
    # Rank 0 holds the last layers.
    assert [r["layers"] for r in report["ranks"]] == [[2, 8], [0, 2]]
