"""The inference engine, with real tiny models and real `mlx.launch --backend ring` ranks.

Greedy token ids from every split (2 and 3 ranks, pipeline and tensor, even and
uneven) must equal single-process mlx-lm generation of the same model and prompt;
the slow tests start real ranks on 127.0.0.1 and read `--output` JSONL.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlx_lm.generate import stream_generate
from mlx_lm.utils import load as mlx_lm_load
from mlx_lm.utils import load_model

from mlxnode.config import Config
from mlxnode.distributed import LinkProbe
from mlxnode.errors import InferenceError, ModelLoadError, UsageError
from mlxnode.generation import EncodedPrompt, encode
from mlxnode.model_files import read_metadata
from mlxnode.pipeline import generic_pipeline_problem
from mlxnode.prompts import Prompt
from mlxnode.strategy import plan_shards
from tests.support.tiny_model import make_tiny_model

# mlx.launch, minus its busy wait (mlxnode/mlx_launch.py), as `mlxnode launch` runs it.
MLX_LAUNCH = [sys.executable, "-m", "mlxnode.mlx_launch"]
MAX_TOKENS = 8
PROMPT = "The morning train left the station"
BATCH = [
    "The morning train",
    "Hello there, how are you doing today my friend?",
    "Soup",
    "Numbers are everywhere: 1, 2, 3",
    "A",
    "Gardens need patience and a lot of water in the summer",
    "Why is the sea salty?",
    "The library was quiet",
]
LOG_LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \[Rank (\d)/(\d)\] (DEBUG|INFO|WARNING|ERROR) [\w.]+: "
)
RANK_EXIT = re.compile(r"Node with rank (\d+) exited with code (-?\d+)")


# -- fixtures


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models; heads and MLP width divide by 2 and 3 so tensor runs work on both."""
    root = tmp_path_factory.mktemp("engine-models")
    shape = {"hidden_size": 96, "num_heads": 6, "num_kv_heads": 6}
    made = {arch: make_tiny_model(root / arch, arch=arch, **shape) for arch in ("llama", "qwen2")}
    for arch in ("mistral", "qwen3", "gemma", "gemma3_text", "phi3"):
        made[arch] = make_tiny_model(root / arch, arch=arch)
    # Mixed precision as in real checkpoints: 16-bit weights, float32 norms.
    made["llama-f16"] = make_tiny_model(root / "llama-f16", arch="llama", dtype="float16")
    made["qwen2-bf16"] = make_tiny_model(root / "qwen2-bf16", arch="qwen2", dtype="bfloat16")
    # Weights dominate memory: 8 float32 layers of 4 MiB, a 0.5 MiB embedding.
    made["big"] = make_tiny_model(
        root / "big",
        arch="llama",
        hidden_size=256,
        intermediate_size=1024,
        max_position_embeddings=8192,
    )
    made["mamba"] = _make_mamba_dir(root / "mamba", tokenizer_from=made["llama"])
    return made


def _make_mamba_dir(path: Path, *, tokenizer_from: Path) -> Path:
    """A config mlx-lm loads but cannot pipeline or shard (weights are not needed to fail)."""
    path.mkdir()
    config = {
        "model_type": "mamba",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "state_size": 8,
        "num_hidden_layers": 4,
        "conv_kernel": 4,
        "use_bias": False,
        "use_conv_bias": True,
        "time_step_rank": 4,
        "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(config))
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (path / f.name).write_bytes(f.read_bytes())
    return path


@functools.cache
def _mlx_lm(model_dir: Path):
    return mlx_lm_load(str(model_dir))


def reference(model_dir: Path, prompt: str, max_tokens: int = MAX_TOKENS) -> list[int]:
    """Greedy token ids from plain single-process mlx-lm (no end-of-sequence token)."""
    model, tokenizer = _mlx_lm(model_dir)
    return [
        r.token
        for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)
        if r.finish_reason != "stop"
    ]


# -- running the CLI


@dataclass
class Job:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    rank_codes: dict[int, int]

    def records(self, path: Path) -> list[dict]:
        assert path.exists(), self.stderr
        return [json.loads(line) for line in path.read_text().splitlines()]


def _free_ports(n: int) -> int:
    """A base port with n free ports after it (other runs may use mlx.launch's default)."""
    for _ in range(100):
        base = random.randrange(20000, 60000)
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports")


def _launch_argv(ranks: int, args: list[str]) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "mlxnode", "run", *args]
    return [
        *MLX_LAUNCH,
        "--backend", "ring",
        "-n", str(ranks),
        "--starting-port", str(_free_ports(ranks)),
        sys.executable, "-m", "mlxnode", "run", *args,
    ]  # fmt: skip


def mlxnode_run(
    ranks: int,
    *args: str | Path,
    cwd: Path,
    timeout: float = 120,
    env: dict | None = None,
    stdin: str = "",
) -> Job:
    """`mlxnode run ARGS` on `ranks` ranks (1: no launcher); waits for the whole job."""
    started = time.monotonic()
    result = subprocess.run(
        _launch_argv(ranks, [str(a) for a in args]),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        env={**os.environ, **(env or {})},
    )
    codes = {int(r): int(c) for r, c in RANK_EXIT.findall(result.stderr)}
    return Job(result.returncode, result.stdout, result.stderr, time.monotonic() - started, codes)


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """Rank -> pid of the rank processes mlx.launch started (its direct children)."""
    pids = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid != launcher.pid:
            continue
        for entry in environ:
            if entry.startswith(b"MLX_RANK="):
                pids[int(entry.split(b"=", 1)[1])] = int(proc.name)
    return pids


# -- planning: which strategy, in-process on lazily loaded models


def _lazy(path: Path):
    model, config = load_model(path, lazy=True, strict=False)
    return model, config


def test_auto_picks_pipeline_on_a_ring_and_tensor_on_a_full_mesh_only_where_it_pays(models):
    model, config = _lazy(models["llama"])  # 8 layers
    ring = plan_shards(model, config, rank=0, world_size=2, backend="ring")
    assert (ring.strategy, ring.implementation) == ("pipeline", "mlxnode generic pipeline")
    assert "ring backend is not a full mesh" in ring.reason
    assert ring.split == [4, 4] and ring.layers == (4, 8)  # rank 0 holds the last layers

    def mesh(latency_s: float, model_bytes: int = 40 * 2**30, backend: str = "jaccl"):
        link = LinkProbe(latency_s=latency_s, bandwidth_bytes_s=5e9)
        return plan_shards(model, config, rank=0, world_size=2, backend=backend,
                           model_bytes=model_bytes, link=link)  # fmt: skip

    # 40 GiB at 800 GB/s: one device needs >= 53.7 ms a token, 2 ranks save <= 26.8 ms;
    # 16 all-reduces at 50 us cost 0.8 ms, at 2 ms 32 ms.
    fast = mesh(50e-6)
    assert fast.strategy == "tensor" and "tensor parallelism pays" in fast.reason
    assert "16 all-reduces per token cost 0.80 ms" in fast.reason
    slow = mesh(2e-3)
    assert slow.strategy == "pipeline" and "would not pay" in slow.reason
    # An H200 reads 16 GB in 3.3 ms: over NCCL at 100 us per all-reduce tensor loses, as
    # measured (0.44x of one GPU for an 8B model).
    assert mesh(100e-6, model_bytes=16 * 10**9, backend="nccl").strategy == "pipeline"
    unprobed = plan_shards(model, config, rank=0, world_size=2, backend="jaccl")
    assert unprobed.strategy == "pipeline" and "no link probe" in unprobed.reason
    split = plan_shards(model, config, rank=1, world_size=2, backend="mpi", split=[6, 2])
    assert (split.strategy, split.layers) == ("pipeline", (0, 2))


def test_auto_falls_back_to_pipeline_when_heads_do_not_divide(models):
    model, config = _lazy(models["llama"])
    plan = plan_shards(model, config, rank=0, world_size=4, backend="mpi")
    assert plan.strategy == "pipeline"
    assert "num_attention_heads 6 is not divisible by 4 ranks" in plan.reason
    with pytest.raises(ModelLoadError, match="not divisible by 4 ranks; use --strategy pipeline"):
        plan_shards(model, config, rank=0, world_size=4, strategy="tensor")


def test_qwen2_uses_mlx_lm_pipeline_and_splits_are_checked(models):
    model, config = _lazy(models["qwen2"])
    plan = plan_shards(model, config, rank=2, world_size=3, strategy="pipeline", split=[2, 4, 2])
    assert (plan.implementation, plan.layers) == ("mlx-lm pipeline()", (0, 2))
    with pytest.raises(UsageError, match="sums to 9 but the model has 8 layers"):
        plan_shards(model, config, rank=0, world_size=2, strategy="pipeline", split=[5, 4])
    with pytest.raises(UsageError, match="only a pipeline has"):
        plan_shards(model, config, rank=0, world_size=2, strategy="tensor", split=[4, 4])


def test_generic_pipeline_accepts_the_common_decoder_architectures(models):
    for arch in ("llama", "mistral", "qwen3", "gemma", "gemma3_text", "phi3"):
        model, _ = _lazy(models[arch])
        assert generic_pipeline_problem(model) is None, arch


def test_unsupported_architecture_names_itself_and_the_supported_ones(models):
    model, config = _lazy(models["mamba"])
    with pytest.raises(ModelLoadError) as e:
        plan_shards(model, config, rank=0, world_size=2)
    message = str(e.value)
    assert "model type 'mamba' cannot be split over ranks" in message
    assert "no `model.layers` list" in message and "no shard()" in message
    assert "qwen2" in message and "llama, mistral, qwen3, gemma" in message
    # One rank needs no split at all.
    assert plan_shards(model, config, rank=0, world_size=1).strategy == "local"


# -- prompts: checked before any compute


def _config(model_dir: Path, **generation) -> Config:
    config = Config()
    config.model.path = str(model_dir)
    for key, value in generation.items():
        setattr(config.generation, key, value)
    return config


def _encode(model_dir: Path, prompts: list[Prompt], **generation) -> list[EncodedPrompt]:
    """`prompts` checked and encoded as every rank does before loading any weight."""
    config = _config(model_dir, **generation)
    metadata = read_metadata(config)
    assert not hasattr(metadata, "model")  # the tokenizer and config only, no weights
    return encode(
        metadata.tokenizer,
        prompts,
        max_tokens=config.generation.max_tokens,
        chat_template=config.generation.use_chat_template,
        context_length=metadata.context_length,
        model_name=metadata.name,
    )


def test_chat_template_is_applied_overridden_or_disabled(models, tmp_path):
    prompt = [Prompt(1, "hi")]
    templated = _encode(models["llama"], prompt)[0]
    tokenizer = read_metadata(_config(models["llama"])).tokenizer
    rendered = tokenizer.decode(templated.ids)
    assert rendered.startswith("<s><|user|>\nhi</s>") and rendered.endswith("<|assistant|>\n")
    plain = _encode(models["llama"], prompt, use_chat_template=False)[0]
    assert plain.ids == tokenizer.encode("hi")
    template = tmp_path / "t.jinja"
    template.write_text("Q: {{ messages[0]['content'] }} A:")
    for value in (str(template), template.read_text()):
        custom = _encode(models["llama"], prompt, chat_template=value)[0]
        assert tokenizer.decode(custom.ids) == "Q: hi A:"


def test_too_long_and_empty_prompts_fail_before_loading(models):
    settings = {"use_chat_template": False, "max_tokens": 100}
    with pytest.raises(InferenceError, match=r"prompt 'long' is \d+ tokens but .* at most 512"):
        _encode(models["llama"], [Prompt("ok", "fine"), Prompt("long", "word " * 600)], **settings)
    with pytest.raises(UsageError, match="prompt 2 is empty"):
        _encode(models["llama"], [Prompt(1, "fine"), Prompt(2, " ")], **settings)
    near = _encode(models["llama"], [Prompt(1, "word " * 150)], **settings)[0]
    assert 412 < len(near.ids) < 512  # so 100 more tokens would not fit...
    assert len(near.ids) + near.max_tokens == 512  # ...and max_tokens is capped


def test_cli_prompt_errors_exit_with_their_codes(models, tmp_path):
    long = mlxnode_run(
        1, "--model-path", models["llama"], "--no-chat-template", "word " * 600, cwd=tmp_path
    )
    assert long.returncode == 7 and long.stdout == ""
    assert "mlxnode: error: prompt 1 is" in long.stderr and "at most 512" in long.stderr
    assert "loaded" not in long.stderr
    empty = mlxnode_run(1, "--model-path", models["llama"], "", cwd=tmp_path)
    assert empty.returncode == 2 and "the prompt is empty" in empty.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "b"}\n{"id": 3, prompt}\n')
    refused = mlxnode_run(1, "--model-path", models["llama"], "--prompts-file", bad, cwd=tmp_path)
    assert refused.returncode == 2
    assert f"{bad} line 3: invalid JSON" in refused.stderr and "loaded" not in refused.stderr


def test_one_rank_without_launcher_equals_mlx_lm(models, tmp_path):
    out = tmp_path / "out.jsonl"
    job = mlxnode_run(
        1,
        "--model-path", models["llama"], "--no-chat-template", "--max-tokens", MAX_TOKENS,
        "--output", out, PROMPT,
        cwd=tmp_path,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    (record,) = job.records(out)
    assert record["token_ids"] == reference(models["llama"], PROMPT)
    assert job.stdout == record["completion"] + "\n"
    assert "strategy local" in job.stderr


def test_prompts_from_stdin_give_jsonl_on_stdout(models, tmp_path):
    job = mlxnode_run(
        1,
        "--model-path", models["llama"], "--no-chat-template", "--max-tokens", MAX_TOKENS, "-",
        cwd=tmp_path, stdin=f"{BATCH[0]}\n\n{BATCH[2]}\n",
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    records = [json.loads(line) for line in job.stdout.splitlines()]
    assert [(r["id"], r["prompt"]) for r in records] == [(1, BATCH[0]), (3, BATCH[2])]
    assert [r["token_ids"] for r in records] == [
        reference(models["llama"], BATCH[0]),
        reference(models["llama"], BATCH[2]),
    ]


def test_python_api_runs_a_batch_in_process(models, tmp_path, monkeypatch):
    from mlxnode import engine, logs

    # run() tells logging its rank; undo that for the tests that follow.
    monkeypatch.setattr(logs, "_rank", None)
    monkeypatch.setattr(logs, "_world_size", None)
    config = Config()
    config.model.path = str(models["llama"])
    config.generation.use_chat_template = False
    config.generation.max_tokens = MAX_TOKENS
    prompts = [Prompt("a", BATCH[0]), Prompt("b", BATCH[1])]
    out = tmp_path / "out.jsonl"
    result = engine.run(config, lambda: prompts, output=out, metrics_json=tmp_path / "m.json")
    assert [c.token_ids for c in result.completions] == [
        reference(models["llama"], p.text) for p in prompts
    ]
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]
    assert result.metrics.batched and result.metrics.prompts == 2
    assert result.metrics.generation_tokens == 2 * MAX_TOKENS
    assert json.loads((tmp_path / "m.json").read_text())["ranks"][0]["peak_memory_bytes"] > 0


# -- real ranks: equal tokens for every split


# The 2-rank pipeline overlaps its stages (the default: mlxnode's wrapper for every model);
# the 3-rank one runs with --no-overlap, where qwen2 keeps mlx-lm's own pipeline().
SPLITS = [
    ("pipeline", 2, "5,3"),
    ("pipeline", 3, "2,4,2"),
    ("tensor", 2, None),
    ("tensor", 3, None),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(("strategy", "ranks", "split"), SPLITS)
def test_distributed_greedy_tokens_equal_single_process(
    models, tmp_path, arch, strategy, ranks, split
):
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    args = [
        "--model-path", models[arch], "--strategy", strategy, "--no-chat-template",
        "--max-tokens", MAX_TOKENS, "--output", out, "--metrics-json", metrics,
    ]  # fmt: skip
    if split:
        args += ["--split", split]
    overlap = strategy == "pipeline" and ranks == 2
    if strategy == "pipeline" and not overlap:
        args += ["--no-overlap"]
    job = mlxnode_run(ranks, *args, PROMPT, cwd=tmp_path)
    assert job.returncode == 0 and not job.rank_codes, job.stderr
    (record,) = job.records(out)
    assert record["token_ids"] == reference(models[arch], PROMPT)
    # Only rank 0 writes to stdout: the launcher's merged stdout is exactly its answer.
    assert job.stdout == record["completion"] + "\n"
    report = json.loads(metrics.read_text())
    assert report["strategy"] == strategy and report["world_size"] == ranks
    assert report["overlap"] == overlap
    assert report["implementation"] == {
        ("pipeline", "llama"): "mlxnode generic pipeline",
        ("pipeline", "qwen2"): "mlxnode generic pipeline" if overlap else "mlx-lm pipeline()",
    }.get((strategy, arch), "mlx-lm shard()")
    assert [r["rank"] for r in report["ranks"]] == list(range(ranks))
    if split:
        counts = [int(c) for c in split.split(",")]
        assert report["split"] == counts
        assert [r["layers"][1] - r["layers"][0] for r in report["ranks"]] == counts
    assert report["generation_tokens"] == MAX_TOKENS and report["ttft_seconds"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "ranks", "split"),
    [("llama-f16", 2, "5,3"), ("llama-f16", 3, "2,4,2"), ("qwen2-bf16", 3, "3,3,2")],
)
def test_mixed_precision_pipeline_equals_single_process(models, tmp_path, model, ranks, split):
    """A float32 norm makes a layer's output float32 while its input was 16-bit: each receiving
    rank must expect what its sender sends, in the generic wrapper and mlx-lm's pipeline()."""
    out = tmp_path / "out.jsonl"
    job = mlxnode_run(
        ranks,
        "--model-path", models[model], "--strategy", "pipeline", "--split", split,
        "--no-chat-template", "--max-tokens", MAX_TOKENS, "--output", out, PROMPT,
        cwd=tmp_path,
    )  # fmt: skip
    assert job.returncode == 0 and not job.rank_codes, job.stderr
    assert job.records(out)[0]["token_ids"] == reference(models[model], PROMPT)


def sampled_ids(model: Path, ranks: int, tmp_path: Path, *args: str, env=None) -> list[int]:
    """The 24 token ids `mlxnode run` samples for PROMPT on `ranks` ranks (temperature 1.5,
    top-p 0.95, seed 7)."""
    out = tmp_path / f"out{ranks}.jsonl"
    job = mlxnode_run(
        ranks,
        "--model-path", model, "--no-chat-template", "--max-tokens", "24",
        "--temperature", "1.5", "--top-p", "0.95", "--seed", "7", *args, "--output", out, PROMPT,
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert job.returncode == 0 and not job.rank_codes, job.stderr
    return job.records(out)[0]["token_ids"]


@pytest.mark.slow
def test_sampling_with_a_seed_is_the_same_on_every_rank(models, tmp_path):
    """If rank 1 drew a different token than rank 0, rank 0's next steps would diverge."""
    one = sampled_ids(models["llama"], 1, tmp_path)
    assert sampled_ids(models["llama"], 2, tmp_path) == one
    assert one != reference(models["llama"], PROMPT, 24)  # it did sample


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mistral", "qwen3", "gemma", "gemma3_text", "phi3"])
def test_generic_pipeline_batches_other_architectures(models, tmp_path, arch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(BATCH[:3]) + "\n")
    out = tmp_path / "out.jsonl"
    # gemma3_text's sliding window is 32 tokens: go past it so its rotating caches wrap.
    tokens = 48 if arch == "gemma3_text" else MAX_TOKENS
    job = mlxnode_run(
        2,
        "--model-path", models[arch], "--split", "3,5", "--no-chat-template",
        "--max-tokens", tokens, "--prompts-file", prompts, "--output", out,
        cwd=tmp_path,
    )  # fmt: skip
    assert job.returncode == 0 and not job.rank_codes, job.stderr
    got = [r["token_ids"] for r in job.records(out)]
    assert got == [reference(models[arch], p, tokens) for p in BATCH[:3]]
    assert job.stdout == ""  # results went to --output


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "strategy"), [("llama", "pipeline"), ("qwen2", "tensor")])
def test_batch_of_eight_equals_eight_single_runs(models, tmp_path, arch, strategy):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(BATCH))
    )
    job = mlxnode_run(
        2,
        "--model-path", models[arch], "--strategy", strategy, "--no-chat-template",
        "--max-tokens", MAX_TOKENS, "--prompts-file", prompts,
        cwd=tmp_path,
    )  # fmt: skip
    assert job.returncode == 0 and not job.rank_codes, job.stderr
    records = [json.loads(line) for line in job.stdout.splitlines()]  # no --output: stdout
    assert [r["id"] for r in records] == [f"p{i}" for i in range(8)]
    assert [r["token_ids"] for r in records] == [reference(models[arch], p) for p in BATCH]
    for r in records:
        assert r["generation_tokens"] == MAX_TOKENS and r["prompt_tokens"] > 0
        assert 0 < r["timings"]["ttft_s"] <= r["timings"]["total_s"]


@pytest.mark.slow
def test_two_way_pipeline_halves_peak_memory_and_logs_per_rank(models, tmp_path):
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    common = ["--model-path", models["big"], "--no-chat-template", "--max-tokens", MAX_TOKENS]
    one = mlxnode_run(1, *common, "--metrics-json", single, PROMPT, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    logs = tmp_path / "logs" / "run.log"
    two = mlxnode_run(
        2,
        *common,
        "--strategy",
        "pipeline",
        "--metrics-json",
        double,
        "--log-file",
        logs,
        PROMPT,
        cwd=tmp_path,
    )
    assert two.returncode == 0 and not two.rank_codes, two.stderr
    whole = json.loads(single.read_text())["ranks"][0]["peak_memory_bytes"]
    ranks = json.loads(double.read_text())["ranks"]
    for r in ranks:
        assert r["peak_memory_bytes"] <= 0.6 * whole, (r, whole)
        assert r["load_seconds"] > 0 and r["host"] == socket.gethostname()

    for rank in (0, 1):
        lines = (tmp_path / "logs" / f"run.rank{rank}.log").read_text().splitlines()
        assert lines and all(LOG_LINE.match(line) for line in lines), lines
        assert {LOG_LINE.match(line).groups()[:2] for line in lines} == {(str(rank), "2")}
        assert any("loaded layers" in line and "peak memory" in line for line in lines)
    rank0 = (tmp_path / "logs" / "run.rank0.log").read_text()
    assert "strategy pipeline" in rank0 and "generation:" in rank0 and "tok/s" in rank0


@pytest.mark.slow
def test_model_from_the_cache_runs_and_is_listed(hub, tmp_path):
    repo = "mlxnode-test/tiny-llama"  # published by conftest's hub fixture
    env = {"HF_ENDPOINT": hub.endpoint, "MLXNODE_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "out.jsonl"
    job = mlxnode_run(
        2,
        "--model", repo, "--split", "6,2", "--no-chat-template", "--max-tokens", MAX_TOKENS,
        "--output", out, PROMPT,
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert job.returncode == 0 and not job.rank_codes, job.stderr
    (record,) = job.records(out)
    assert record["token_ids"] == reference(hub.root / repo, PROMPT)
    assert job.stderr.count("model files ready in") == 2  # each rank asked for its files
    listed = mlxnode_run(1, "--list-cached", cwd=tmp_path, env=env)
    assert listed.returncode == 0 and repo in listed.stdout, listed.stderr
    cleared = mlxnode_run(1, "--clear-cache", "--model", repo, "--yes", cwd=tmp_path, env=env)
    assert cleared.returncode == 0 and f"removed {repo}" in cleared.stdout, cleared.stderr


# -- failures end the whole job


@pytest.mark.slow
def test_a_bad_split_fails_every_rank_quickly(models, tmp_path):
    job = mlxnode_run(
        2, "--model-path", models["llama"], "--split", "5,4", PROMPT, cwd=tmp_path, timeout=60
    )
    # Every rank refuses the split; whichever exits first, mlx.launch SIGTERMs the rest.
    assert set(job.rank_codes) == {0, 1} and 2 in job.rank_codes.values(), job.stderr
    # A rank stopped before its engine started dies of the signal; after, it exits 128 + 15.
    assert set(job.rank_codes.values()) <= {2, -signal.SIGTERM, 128 + signal.SIGTERM}
    assert job.stdout == ""
    # Each rank that refused says so once, in the CLI's line naming it (no log-format twin).
    refusals = re.findall(
        r"^mlxnode: error: rank (\d) on \S+ \(exit 2\): split 5,4 sums to 9 but the model has 8"
        r" layers",
        job.stderr,
        re.M,
    )
    assert refusals and len(refusals) == len(set(refusals)), job.stderr
    assert job.stderr.count("split 5,4 sums to 9") == len(refusals), job.stderr
    assert job.seconds < 30


@pytest.mark.slow
def test_unsupported_architecture_fails_with_exit_5(models, tmp_path):
    job = mlxnode_run(2, "--model-path", models["mamba"], PROMPT, cwd=tmp_path, timeout=60)
    stopped = {-signal.SIGTERM, 128 + signal.SIGTERM}
    assert set(job.rank_codes.values()) <= {5, *stopped} and 5 in job.rank_codes.values()
    assert "model type 'mamba' cannot be split over ranks" in job.stderr


def _start_long_run(models: dict[str, Path], tmp_path: Path, *extra: str) -> subprocess.Popen:
    args = [
        "--model-path", models["big"], "--strategy", "pipeline", "--no-chat-template",
        "--max-tokens", "6000",
        "--log-file", tmp_path / "logs" / "run.log", *extra, PROMPT,
    ]  # fmt: skip
    launcher = subprocess.Popen(
        _launch_argv(2, [str(a) for a in args]),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    rank0_log = tmp_path / "logs" / "run.rank0.log"
    while time.monotonic() < deadline:  # wait for generation to be under way
        if rank0_log.exists() and "loaded layers" in rank0_log.read_text():
            break
        time.sleep(0.2)
    time.sleep(1.0)
    assert launcher.poll() is None, "the run ended before the test could interfere"
    return launcher


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_within_seconds(models, tmp_path):
    launcher = _start_long_run(models, tmp_path)
    try:
        pids = _rank_pids(launcher)
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = launcher.communicate(timeout=30)
        assert time.monotonic() - killed < 15
    finally:
        launcher.kill()
    codes = {int(r): int(c) for r, c in RANK_EXIT.findall(stderr)}
    assert codes[1] == -signal.SIGKILL
    assert codes[0] != 0 or "Node with rank 0 was killed" in stderr


@pytest.mark.slow
def test_watchdog_turns_a_silent_peer_into_exit_6(models, tmp_path):
    launcher = _start_long_run(models, tmp_path, "--step-timeout", "2")
    pids = _rank_pids(launcher)
    os.kill(pids[1], signal.SIGSTOP)  # hung, not dead: its socket stays open
    stopped = time.monotonic()
    try:
        rank0_log = tmp_path / "logs" / "run.rank0.log"
        while time.monotonic() - stopped < 20 and "no progress" not in rank0_log.read_text():
            time.sleep(0.2)
        waited = time.monotonic() - stopped
    finally:
        # mlx.launch's SIGTERM cannot reach a stopped process; end it for the launcher.
        os.kill(pids[1], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=30)
    assert waited < 10
    host = socket.gethostname()
    assert f"rank 0 on {host}: no progress for 2s while generating" in rank0_log.read_text()
    assert "Node with rank 0 exited with code 6" in stderr


@pytest.mark.slow
def test_a_rank_stopped_while_waiting_inside_mlx_logs_why_and_exits_128_plus_signal(
    models, tmp_path
):
    # Rank 1 hangs, so rank 0 waits inside an MLX collective, where a Python signal
    # handler never runs; the SIGHUP that ssh delivers when mlx.launch stops the ranks
    # must still end it at once, with the phase in its log, not silently.
    launcher = _start_long_run(models, tmp_path, "--step-timeout", "120")
    pids = _rank_pids(launcher)
    os.kill(pids[1], signal.SIGSTOP)
    time.sleep(1.0)  # rank 0 is now blocked on rank 1
    rank0_log = tmp_path / "logs" / "run.rank0.log"
    os.kill(pids[0], signal.SIGHUP)
    sent = time.monotonic()
    try:
        while time.monotonic() - sent < 20 and "stopped by" not in rank0_log.read_text():
            time.sleep(0.1)
        waited = time.monotonic() - sent
    finally:
        os.kill(pids[1], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=30)
    assert waited < 5, rank0_log.read_text()[-1000:]
    host = socket.gethostname()
    assert re.search(
        rf"ERROR mlxnode.watchdog: rank 0 on {host}: stopped by SIGHUP while generating",
        rank0_log.read_text(),
    ), rank0_log.read_text()[-1000:]
    assert "Node with rank 0 exited with code 129" in stderr  # 128 + SIGHUP, as documented
