"""Distributed runs of a real checkpoint equal single-process mlx-lm, token for token.

SmolLM2-135M-Instruct (llama, 30 layers, 9 attention / 3 KV heads, tied embeddings), converted
from its GGUF by `tests.support.real_model`: 4-bit as shipped (8-bit embeddings), and
dequantized to float16 and bfloat16. All three keep llama.cpp's float32 norms, the mixed
precision that broke the pipeline when the project was proven only on float32 models.

The matrix: {q4, float16, bfloat16} x {pipeline on 2 ranks, pipeline on 3 ranks with an uneven
split, tensor on 3 ranks, auto on 2 ranks} x {one prompt, a batch of 4 prompts of different
lengths}, chat template on, real ranks under `mlx.launch --backend ring`. Pipeline runs do one
process's arithmetic and must match exactly. Tensor runs sum partial products across ranks in
another order; there the texts may part, but only where the model was torn between two tokens:
see `assert_close_to_reference`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator, stream_generate
from mlx_lm.utils import load as mlx_lm_load
from test_engine import mlxnode_run

from tests.support.real_model import VARIANTS, real_model

PROMPT = "What is the capital of France?"
# Different lengths, and answers of different lengths: the short ones end with <|im_end|>
# inside the token budget while the others run to it, so a batch's rows stop at different steps.
BATCH = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Hi",
    "Explain in two sentences why the sky is blue, as if to a child who keeps asking why.",
]
# Enough for the France answer (8 tokens and <|im_end|>); 16-bit matmuls are slow on MLX's CPU
# backend, and this matrix runs 24 jobs.
SINGLE_TOKENS = 12
BATCH_TOKENS = 12
STRATEGIES = [
    ("pipeline", 2, None),
    ("pipeline", 3, "14,10,6"),
    ("tensor", 3, None),
    ("auto", 2, None),
    ("replicas", 2, None),
]
# Tensor parallelism only: the largest difference allowed between the distributed and the
# reference log-probability of a chosen token (nats), and the tokens that must agree first.
# Each all-reduce adds float32 partial sums in another order (the activations are float32
# here: the float32 norms promote them), a relative change of about 1e-6 per sum that 30
# layers and 4-bit/16-bit weights amplify to at most a few 1e-3 nats in measurements; 0.05 is
# ten times the largest seen, and still far below the gap between two clearly different
# choices. A text may part only at a near tie: the two runs' chosen tokens must then be
# within the same tolerance of each other.
LOGPROB_TOLERANCE = 0.05
MUST_AGREE = 8


# Quantized and 16-bit matmuls are slow on MLX's CPU backend (a batch's prefill most of all:
# the reference alone costs 19 s of CPU), so the default suite runs one cell of each kind on
# the 4-bit checkpoint (its norms are float32 too: the mixed-precision case): one prompt on
# the 2-rank pipeline, on auto and on tensor, and a batch on the uneven 3-rank pipeline (it
# holds the single prompt, rows that stop at different steps, and prefills of different
# lengths; tensor parallel batches are covered on random models in tests/test_engine.py);
# float16 and bfloat16 each on one prompt. `-m matrix` adds the rest (duplicates in kind).
DEFAULT_CELLS = {
    ("single", "q4"): {"pipeline-2", "auto-2", "tensor-3"},
    ("batch", "q4"): {"pipeline-3"},
    ("single", "float16"): {"pipeline-2"},
    ("batch", "float16"): set(),
    ("single", "bfloat16"): {"pipeline-3"},
    ("batch", "bfloat16"): set(),
}


def _cells(kind: str) -> list:
    cells = []
    for variant in VARIANTS:
        for strategy, ranks, split in STRATEGIES:
            name = f"{variant}-{strategy}-{ranks}"
            opt_in = f"{strategy}-{ranks}" not in DEFAULT_CELLS[kind, variant]
            marks = [pytest.mark.matrix] if opt_in else []
            cells.append(pytest.param(variant, strategy, ranks, split, marks=marks, id=name))
    return cells


@pytest.fixture(scope="module")
def checkpoints() -> dict[str, Path]:
    return {variant: real_model(variant) for variant in VARIANTS}


@functools.cache
def _load(model_dir: Path):
    return mlx_lm_load(str(model_dir))


def _chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )


@functools.cache
def reference_single(model_dir: Path, text: str, max_tokens: int) -> tuple[list, list]:
    """Greedy token ids and their log-probabilities from single-process mlx-lm."""
    model, tokenizer = _load(model_dir)
    ids, logprobs = [], []
    for r in stream_generate(model, tokenizer, _chat_ids(tokenizer, text), max_tokens=max_tokens):
        if r.finish_reason != "stop":
            ids.append(r.token)
            logprobs.append(r.logprobs[r.token].item())
    return ids, logprobs


@functools.cache
def reference_batch(model_dir: Path, texts: tuple[str, ...], max_tokens: int) -> list[tuple]:
    """The same from single-process mlx-lm's batched generation of all `texts` at once."""
    model, tokenizer = _load(model_dir)
    generator = BatchGenerator(
        model, max_tokens=max_tokens, stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)]
    )
    try:
        uids = generator.insert([_chat_ids(tokenizer, t) for t in texts])
        got = {uid: ([], []) for uid in uids}
        while True:
            prompt_responses, responses = generator.next()
            if not prompt_responses and not responses:
                break
            for r in responses:
                if r.finish_reason != "stop":
                    got[r.uid][0].append(r.token)
                    got[r.uid][1].append(r.logprobs[r.token].item())
    finally:
        generator.close()
    mx.clear_cache()
    return [got[uid] for uid in uids]


def assert_close_to_reference(got: dict, want: tuple[list, list]) -> None:
    """Tensor parallelism: agree for MUST_AGREE tokens, then part only at a near tie."""
    ids, logprobs = want
    agree = 0
    while agree < min(len(ids), len(got["token_ids"])) and got["token_ids"][agree] == ids[agree]:
        agree += 1
    assert agree >= min(MUST_AGREE, len(ids)), (got["token_ids"], ids)
    compared = min(agree + 1, len(ids), len(got["logprobs"]))  # up to and including a parting
    for step in range(compared):
        assert abs(got["logprobs"][step] - logprobs[step]) <= LOGPROB_TOLERANCE, (step, got)


def _run(model_dir: Path, tmp_path: Path, strategy: str, ranks: int, split, *inputs: str):
    out = tmp_path / "out.jsonl"
    # A batch's prefill is one step; on 2 shared cores it can outlast the default step timeout,
    # which is there to catch dead peers, not slow ones.
    args = ["--model-path", model_dir, "--strategy", strategy, "--output", out, *inputs]
    args += ["--step-timeout", "600"]
    if split:
        args += ["--split", split]
    job = mlxnode_run(ranks, *args, cwd=tmp_path, timeout=240)
    assert job.returncode == 0 and not job.rank_codes, job.stderr
    return job.records(out)


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "strategy", "ranks", "split"), _cells("single"))
def test_one_prompt_equals_single_process(checkpoints, tmp_path, variant, strategy, ranks, split):
    model_dir = checkpoints[variant]
    inputs = ["--max-tokens", str(SINGLE_TOKENS), PROMPT]
    (record,) = _run(model_dir, tmp_path, strategy, ranks, split, *inputs)
    want = reference_single(model_dir, PROMPT, SINGLE_TOKENS)
    if strategy == "tensor":
        assert_close_to_reference(record, want)
    else:
        assert record["token_ids"] == want[0]
        assert "Paris" in record["completion"]
        assert record["finish_reason"] == "stop"  # <|im_end|> ends the streamed answer


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "strategy", "ranks", "split"), _cells("batch"))
def test_batch_of_four_equals_single_process(
    checkpoints, tmp_path, variant, strategy, ranks, split
):
    model_dir = checkpoints[variant]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(BATCH))
    )
    inputs = ["--max-tokens", str(BATCH_TOKENS), "--prompts-file", str(prompts)]
    records = _run(model_dir, tmp_path, strategy, ranks, split, *inputs)
    assert [r["id"] for r in records] == list(range(len(BATCH)))
    wants = reference_batch(model_dir, tuple(BATCH), BATCH_TOKENS)
    # The rows stop at different steps: some at <|im_end|>, some at the token budget.
    assert {r["finish_reason"] for r in records} == {"stop", "length"}
    for record, want in zip(records, wants, strict=True):
        if strategy == "tensor":
            assert_close_to_reference(record, want)
        else:
            assert record["token_ids"] == want[0]


@pytest.mark.slow
def test_tensor_on_two_ranks_names_the_head_counts(checkpoints, tmp_path):
    job = mlxnode_run(
        2, "--model-path", checkpoints["q4"], "--strategy", "tensor", PROMPT, cwd=tmp_path
    )
    assert job.returncode != 0 or job.rank_codes
    assert "num_attention_heads 9 is not divisible by 2 ranks" in job.stderr
    assert "Traceback" not in job.stderr
