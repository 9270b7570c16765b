"""The code paths NCCL (Linux CUDA hosts) takes, run on CPU ranks.

NCCL serves collectives only on a GPU stream and, in MLX 0.32, has no send/recv. So on
nccl the control plane runs on the default stream and the pipeline relays hidden states
with all-sums. `MLXNODE_PIPELINE_HOPS=collective` forces that relay on the ring backend:
real `mlx.launch --backend ring` ranks must then give the same greedy ids as one
single-process mlx-lm run, for the generic wrapper and for mlx-lm's own pipeline() models
(which go through the generic wrapper where send/recv are off).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.utils import load_model
from test_engine import MAX_TOKENS, PROMPT, mlxnode_run, reference

from mlxnode import distributed
from mlxnode.errors import UsageError
from mlxnode.strategy import GENERIC_PIPELINE, OWN_PIPELINE, plan_shards
from tests.support.tiny_model import make_tiny_model

COLLECTIVE = {distributed.HOPS_ENV: "collective"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cuda-path-models")
    shape = {"hidden_size": 96, "num_heads": 6, "num_kv_heads": 6}
    return {
        "llama": make_tiny_model(root / "llama", arch="llama", **shape),
        # Mixed precision: bf16 weights, float32 norms, so the relayed dtype changes by rank.
        "qwen2-bf16": make_tiny_model(root / "qwen2-bf16", arch="qwen2", dtype="bfloat16"),
    }


# -- choosing the transport from the backend


@pytest.mark.parametrize(
    ("backend", "env", "stream", "p2p"),
    [
        ("ring", {}, mx.cpu, True),
        ("jaccl", {}, mx.cpu, True),
        ("mpi", {}, mx.cpu, True),
        ("nccl", {}, None, False),
        ("any", {}, mx.cpu, True),
        ("any", {"NCCL_HOST_IP": "127.0.0.1"}, None, False),
        ("ring", COLLECTIVE, mx.cpu, False),
        ("nccl", {distributed.HOPS_ENV: "send"}, None, True),
    ],
)
def test_the_backend_picks_the_control_stream_and_the_hops(monkeypatch, backend, env, stream, p2p):
    monkeypatch.delenv("NCCL_HOST_IP", raising=False)
    monkeypatch.delenv(distributed.HOPS_ENV, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    transport = distributed.transport_for(backend)
    assert transport.stream == stream and transport.point_to_point is p2p


def test_a_bad_hops_value_is_refused(monkeypatch):
    monkeypatch.setenv(distributed.HOPS_ENV, "carrier-pigeon")
    with pytest.raises(UsageError, match="send, collective"):
        distributed.transport_for("ring")


def test_join_group_remembers_the_stream_for_the_control_plane(monkeypatch):
    monkeypatch.delenv(distributed.HOPS_ENV, raising=False)
    group = distributed.join_group("ring")  # a group of one: not launched
    assert group.size() == 1
    assert distributed.control_stream() == mx.cpu and distributed.point_to_point()
    distributed.barrier(group)


def test_mlx_lm_pipeline_models_use_the_generic_wrapper_without_send(models, monkeypatch):
    monkeypatch.delenv(distributed.HOPS_ENV, raising=False)
    model, config = load_model(models["qwen2-bf16"], lazy=True, strict=False)
    plan = {
        backend: plan_shards(
            model, config, rank=0, world_size=2, strategy="pipeline", backend=backend
        ).implementation
        for backend in ("ring", "nccl")
    }
    assert plan == {"ring": OWN_PIPELINE, "nccl": GENERIC_PIPELINE}


# -- real ranks, hidden states relayed with all-sums


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "ranks", "split"),
    [("llama", 2, None), ("llama", 3, "2,4,2"), ("qwen2-bf16", 3, "3,3,2")],
)
def test_collective_hops_give_single_process_greedy_ids(models, tmp_path, model, ranks, split):
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    args = [
        "--model-path", models[model], "--strategy", "pipeline", "--no-chat-template",
        "--max-tokens", MAX_TOKENS, "--output", out, "--metrics-json", metrics,
    ]  # fmt: skip
    if split:
        args += ["--split", split]
    job = mlxnode_run(ranks, *args, PROMPT, cwd=tmp_path, env=COLLECTIVE)
    assert job.returncode == 0 and not job.rank_codes, job.stderr
    assert job.records(out)[0]["token_ids"] == reference(models[model], PROMPT)
    assert json.loads(metrics.read_text())["implementation"] == GENERIC_PIPELINE
    assert "pipeline hops: all-sums" in job.stderr


@pytest.mark.slow
def test_collective_hops_batch_equals_single_runs(models, tmp_path):
    """The batched path prefills by evaluating only the caches: every hop must still run."""
    prompts = ["The morning train", "Hello there, how are you doing today my friend?", "Soup"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out.jsonl"
    job = mlxnode_run(
        2,
        "--model-path", models["llama"], "--split", "3,5", "--no-chat-template",
        "--max-tokens", MAX_TOKENS, "--prompts-file", tmp_path / "prompts.txt", "--output", out,
        cwd=tmp_path,
        env=COLLECTIVE,
    )  # fmt: skip
    assert job.returncode == 0 and not job.rank_codes, job.stderr
    got = [r["token_ids"] for r in job.records(out)]
    assert got == [reference(models["llama"], p) for p in prompts]
    assert "pipeline hops: all-sums" in job.stderr
