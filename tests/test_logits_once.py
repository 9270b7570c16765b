"""Logits once: only the rank holding the last layers projects to the vocabulary and samples.

In-process on tiny models: what `pipeline.drop_head` leaves a rank. With real ring ranks: a
rank without the last layers holds no head in memory, and the tokens every rank feeds into
its next step are rank 0's, greedy and sampled, over send/recv and over collective hops.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model
from test_engine import MAX_TOKENS, PROMPT, mlxnode_run, reference, sampled_ids

from mlxnode.pipeline import SAMPLING_RANK, drop_head
from tests.support.tiny_model import make_tiny_model

# A vocabulary large enough that the head outweighs a rank's layers.
VOCAB = 8192


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("logits") / "untied",
        arch="llama",
        num_layers=4,
        num_shards=4,
        vocab_size=VOCAB,
        tie_embeddings=False,
    )


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("logits") / "tied", arch="llama", tie_embeddings=True
    )


def _names(model) -> set[str]:
    return {name for name, _ in tree_flatten(model.parameters())}


def test_a_rank_without_the_last_layers_keeps_no_head_and_gives_zero_logits(untied):
    model, _ = load_model(untied, lazy=True, strict=False)
    drop_head(model, 1)
    names = _names(model)
    assert "model.embed_tokens.weight" in names
    assert not {n for n in names if n.startswith(("lm_head.", "model.norm."))}
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, VOCAB) and not mx.any(logits).item()


def test_the_sampling_rank_keeps_its_head(untied):
    model, _ = load_model(untied, lazy=True, strict=False)
    before = _names(model)
    drop_head(model, SAMPLING_RANK)
    assert _names(model) == before and "lm_head.weight" in before


def test_a_tied_embedding_still_embeds_but_projects_nothing(tied):
    model, _ = load_model(tied, lazy=True, strict=False)
    ids = mx.array([[1, 2, 3]])
    embedded = model.model.embed_tokens(ids)
    drop_head(model, 2)
    assert mx.array_equal(model.model.embed_tokens(ids), embedded).item()
    logits = model(ids)
    assert logits.shape[-1] == model.model.embed_tokens.weight.shape[0]
    assert not mx.any(logits).item()


@pytest.mark.slow
def test_only_the_last_layers_rank_holds_the_head_in_memory(untied, tmp_path):
    """Rank 1 holds as many layers as rank 0 but not the head: its peak is lower by about
    the head's size (before, both ranks loaded it)."""
    metrics, out = tmp_path / "metrics.json", tmp_path / "out.jsonl"
    job = mlxnode_run(
        2,
        "--model-path", untied, "--strategy", "pipeline", "--no-chat-template",
        "--max-tokens", MAX_TOKENS, "--metrics-json", metrics, "--output", out, PROMPT,
        cwd=tmp_path,
    )  # fmt: skip
    assert job.returncode == 0 and not job.rank_codes, job.stderr
    assert job.records(out)[0]["token_ids"] == reference(untied, PROMPT)
    peaks = {r["rank"]: r["peak_memory_bytes"] for r in json.loads(metrics.read_text())["ranks"]}
    model, _ = load_model(untied, lazy=True, strict=False)
    head = sum(v.nbytes for _, v in tree_flatten(model.lm_head.parameters()))
    assert peaks[1] <= peaks[0] - 0.9 * head, (peaks, head)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "hops"),
    # mlx-lm's own pipeline() over send/recv; the generic wrapper over all-sum hops (the
    # path NCCL takes). test_engine samples with the generic wrapper over send/recv.
    [("qwen2", "send"), ("llama", "collective")],
)
def test_sampled_tokens_are_rank_zeros_on_every_rank(tmp_path, arch, hops):
    """With temperature > 0 only rank 0 draws; were another rank to feed its own draw into
    its next step, the ranks would part and the text would differ from one process's."""
    model = make_tiny_model(tmp_path / arch, arch=arch, num_layers=6)
    env = {"MLXNODE_PIPELINE_HOPS": hops}
    one = sampled_ids(model, 1, tmp_path, "--strategy", "auto", env=env)
    assert sampled_ids(model, 3, tmp_path, "--strategy", "pipeline", env=env) == one
