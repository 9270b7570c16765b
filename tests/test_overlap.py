"""The overlapped pipeline gives exactly the tokens of the plain one, and its parts are in place.

`--overlap` (the default) reads prompts in chunks of `OVERLAP_PREFILL_STEP` tokens and runs a
batch as one micro-batch per stage, with the hops on their own stream; `--no-overlap` is the
one-stage-at-a-time pipeline (mlx-lm's own `pipeline()` for the models that have one). Greedy
ids must not change, for the generic wrapper and for a model that has its own pipeline().
Whether the stages really work at once is a matter of speed, measured by
`benchmarks/bench_throughput.py` (phase "overlap"), not asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_engine import MLX_LAUNCH, _free_ports, mlxnode_run

from mlxnode.generation import OVERLAP_PREFILL_STEP
from tests.support.tiny_model import make_tiny_model

# Different lengths, so the micro-batches differ and their rows are padded differently.
BATCH = [
    "The morning train left the station",
    "Rain",
    "A list of the rivers of Europe, from the longest to the shortest, with their sources",
    "Bread, butter and",
    "Once upon a time in a small village by the sea there lived",
]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("overlap-models")
    return {arch: make_tiny_model(root / arch, arch=arch) for arch in ("llama", "qwen2")}


def _run(model: Path, tmp_path: Path, ranks: int, flag: str, *inputs: str) -> tuple[list, dict]:
    out, metrics = tmp_path / f"out{flag}.jsonl", tmp_path / f"metrics{flag}.json"
    args = ["--model-path", model, "--strategy", "pipeline", "--no-chat-template", flag]
    args += ["--max-tokens", str(MAX_TOKENS), "--output", out, "--metrics-json", metrics]
    job = mlxnode_run(ranks, *args, *inputs, cwd=tmp_path)
    assert job.returncode == 0 and not job.rank_codes, job.stderr
    return job.records(out), json.loads(metrics.read_text()) | {"stderr": job.stderr}


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "ranks"), [("llama", 2), ("qwen2", 2), ("llama", 3)])
def test_a_batch_in_micro_batches_gives_the_plain_pipelines_tokens(models, tmp_path, arch, ranks):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(BATCH))
    )
    plain, plain_metrics = _run(
        models[arch], tmp_path, ranks, "--no-overlap", "--prompts-file", prompts
    )
    overlapped, metrics = _run(
        models[arch], tmp_path, ranks, "--overlap", "--prompts-file", prompts
    )

    assert [r["token_ids"] for r in overlapped] == [r["token_ids"] for r in plain]
    assert [r["id"] for r in overlapped] == list(range(len(BATCH)))
    assert (metrics["overlap"], plain_metrics["overlap"]) == (True, False)
    assert f"batch of {len(BATCH)} in {ranks} micro-batches" in metrics["stderr"]
    assert "micro-batches" not in plain_metrics["stderr"]
    # qwen2 has mlx-lm's own pipeline(), which all-gathers every step: overlapped, the
    # generic wrapper splits it instead.
    assert metrics["implementation"] == "mlxnode generic pipeline"
    assert plain_metrics["implementation"] == (
        "mlx-lm pipeline()" if arch == "qwen2" else "mlxnode generic pipeline"
    )


@pytest.mark.slow
def test_a_prompt_read_in_chunks_gives_the_plain_pipelines_tokens(models, tmp_path):
    # Long enough for three chunks and not a multiple of the chunk (about 3.5 tokens a word),
    # within the tiny model's 512 tokens of context.
    words = " ".join(f"w{i}" for i in range(OVERLAP_PREFILL_STEP * 3 // 4))
    plain, _ = _run(models["llama"], tmp_path, 2, "--no-overlap", words)
    overlapped, metrics = _run(models["llama"], tmp_path, 2, "--overlap", words)
    assert metrics["prompt_tokens"] > 2 * OVERLAP_PREFILL_STEP
    assert metrics["prompt_tokens"] % OVERLAP_PREFILL_STEP
    assert overlapped[0]["token_ids"] == plain[0]["token_ids"]


NICE_PROBE = """
import os
from mlxnode.distributed import join_group
before = {int(t) for t in os.listdir("/proc/self/task")}
group = join_group("ring")
nice = {int(t): int(open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()[16])
        for t in os.listdir("/proc/self/task")}
print(group.rank(), sum(v == 19 for v in nice.values()), nice[os.getpid()], flush=True)
"""


def test_the_ring_socket_threads_yield_to_the_layers(tmp_path):
    """MLX's ring backend polls its sockets; those threads must not take a core from compute."""
    argv = [*MLX_LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(_free_ports(2))]
    job = subprocess.run(
        [*argv, sys.executable, "-c", NICE_PROBE], capture_output=True, text=True, timeout=60
    )
    assert job.returncode == 0, job.stderr
    rows = sorted(tuple(int(x) for x in line.split()) for line in job.stdout.splitlines())
    assert [rank for rank, _, _ in rows] == [0, 1], job.stdout
    for _rank, lowered, main_thread in rows:
        assert lowered >= 1 and main_thread == 0, job.stdout
