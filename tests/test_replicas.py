"""Replicas: every rank a whole copy, the batch dealt out, the completions back in order.

The launches start real `mlx.launch --backend ring` ranks on 127.0.0.1 and compare with
single-process mlx-lm greedy output and with a single-process `mlxnode run`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxnode.cache import ModelCacheManager, RankSpec
from mlxnode.errors import ModelLoadError, UsageError
from mlxnode.generation import EncodedPrompt
from mlxnode.loading import check_fits, parameter_bytes
from mlxnode.memory import _cgroup_limits, host_memory_bytes
from mlxnode.prompts import Prompt
from mlxnode.replicas import assign
from mlxnode.strategy import REPLICA_MEMORY_FACTOR, ShardPlan, apply_plan, plan_shards
from tests.conftest import TINY_LLAMA
from tests.test_engine import BATCH, MAX_TOKENS, _lazy, mlxnode_run, models, reference

__all__ = ["models"]  # the session fixture of tiny models, shared with test_engine

MiB = 2**20


def _item(n_ids: int, max_tokens: int = 8) -> EncodedPrompt:
    return EncodedPrompt(Prompt(n_ids, "x"), list(range(n_ids)), max_tokens)


# -- dealing out the batch


def test_assign_balances_by_cost_and_keeps_input_order():
    batch = [_item(n) for n in (40, 2, 30, 2, 10, 2)]  # costs 48, 10, 38, 10, 18, 10
    shares = assign(batch, 2)
    assert sorted(i for share in shares for i in share) == list(range(6))
    assert all(share == sorted(share) for share in shares)
    loads = [sum(len(batch[i].ids) + batch[i].max_tokens for i in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= 10 and shares[0][0] == 0  # the longest on rank 0


def test_assign_gives_a_single_prompt_to_rank_zero_and_leaves_others_idle():
    assert assign([_item(5)], 3) == [[0], [], []]


# -- planning


def test_replicas_asked_for_hold_the_whole_model(models):
    model, config = _lazy(models["llama"])
    plan = plan_shards(model, config, rank=1, world_size=2, strategy="replicas")
    assert (plan.strategy, plan.layers, plan.split) == ("replicas", None, None)
    with pytest.raises(UsageError, match="replicas hold every layer"):
        plan_shards(model, config, rank=0, world_size=2, strategy="replicas", split=[4, 4])


def test_auto_picks_replicas_wherever_a_copy_fits_every_host(models):
    model, config = _lazy(models["llama"])
    size = 10 * MiB
    roomy = [int(size * REPLICA_MEMORY_FACTOR) + 1, 64 * MiB]

    def auto(**kwargs):
        return plan_shards(model, config, rank=0, world_size=2, backend="ring", **kwargs)

    plan = auto(batch_size=4, model_bytes=size, memory=roomy)
    assert plan.strategy == "replicas"
    assert "4 prompt(s)" in plan.reason and "holds the model (10.0 MiB)" in plan.reason
    # One prompt too: it runs on one whole copy, never slower than one device.
    one = auto(batch_size=1, model_bytes=size, memory=roomy)
    assert one.strategy == "replicas" and "one device's speed" in one.reason
    assert auto(batch_size=4, model_bytes=size, memory=[64 * MiB, 12 * MiB]).strategy == (
        "pipeline"
    )
    assert auto(batch_size=4, model_bytes=None, memory=roomy).strategy == "pipeline"
    assert auto(batch_size=4, model_bytes=size, memory=roomy, split=[4, 4]).strategy == ("pipeline")


def test_a_share_larger_than_the_host_is_refused_before_loading():
    whole = ShardPlan("local", "whole model", "one rank")
    huge = host_memory_bytes() * 2
    with pytest.raises(ModelLoadError, match=r"rank 0 on .*: its share of the model \(local\)"):
        check_fits(whole, huge, rank=0)
    half = ShardPlan("pipeline", "generic", "two ranks", split=[4, 4], layers=(4, 8))
    check_fits(half, 1 * MiB, rank=0)  # fits: no error


class _Group:
    """Rank and size, all that planning and pruning read of a group (no collective runs)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@pytest.mark.parametrize("rank", [0, 1])
def test_a_ranks_need_is_the_parameters_it_keeps(models, rank):
    """The fit check counts what the pruned model holds: its layers, the embedding it
    embeds with or projects through, and on rank 0 only the final norm and the head."""
    model, config = _lazy(models["llama"])  # 8 layers
    whole = parameter_bytes(model)
    layer = parameter_bytes(model.model.layers[0])
    embedding = parameter_bytes(model.model.embed_tokens)
    head = whole - 8 * layer - embedding  # the final norm and an untied lm_head, if any
    plan = plan_shards(model, config, rank=rank, world_size=2, strategy="pipeline", split=[2, 6])
    apply_plan(model, plan, _Group(rank, 2))
    layers = {0: 2, 1: 6}[rank]
    assert parameter_bytes(model) == layers * layer + embedding + (head if rank == 0 else 0)
    assert parameter_bytes(model) < whole


def test_memory_figure_reads_the_cgroup_limit_of_the_process_and_its_parents(tmp_path):
    import mlxnode.memory as memory

    root = tmp_path / "cgroup"
    (root / "memory" / "bench" / "h1").mkdir(parents=True)
    (root / "memory" / "bench" / "h1" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (root / "memory" / "bench" / "memory.limit_in_bytes").write_text(f"{600 * MiB}\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("4:memory:/bench/h1\n3:cpuset:/bench/h1\n")
    saved = memory._CGROUP_ROOT
    memory._CGROUP_ROOT = root
    try:
        assert _cgroup_limits(proc) == [600 * MiB]
    finally:
        memory._CGROUP_ROOT = saved


# -- the prewarm


def test_a_replica_rank_fetches_every_weight_file(hub, tmp_path):
    manager = ModelCacheManager(tmp_path / "cache", endpoint=hub.endpoint, progress=False)
    model = manager.ensure_model(TINY_LLAMA, RankSpec(ranks=[1], world_size=2, strategy="replicas"))
    published = {p.name for p in (hub.root / TINY_LLAMA).glob("model*.safetensors")}
    assert {f for f in model.files if f.endswith(".safetensors")} == published


# -- real ranks


def _prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(BATCH))
    )
    return path


def _without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "timings"} for r in records]


@pytest.mark.slow
def test_auto_picks_replicas_that_equal_one_process_in_order(models, tmp_path):
    prompts = _prompts_file(tmp_path)
    common = ["--model-path", models["llama"], "--no-chat-template", "--max-tokens", MAX_TOKENS]
    common += ["--prompts-file", prompts]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    single = mlxnode_run(1, *common, "--output", one, cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    job = mlxnode_run(2, *common, "--output", two, cwd=tmp_path)
    assert job.returncode == 0 and not job.rank_codes, job.stderr
    assert "strategy replicas (whole model per rank): auto: 8 prompt(s) and every rank's" in (
        job.stderr
    )
    records = job.records(two)
    assert [r["id"] for r in records] == [f"p{i}" for i in range(len(BATCH))]
    assert [r["token_ids"] for r in records] == [reference(models["llama"], p) for p in BATCH]
    assert _without_timings(records) == _without_timings(single.records(one))
    assert "replica 0 runs 4 of 8 prompt(s)" in job.stderr
    assert "replica 1 runs 4 of 8 prompt(s)" in job.stderr
