"""Benchmark mlxnode on one Linux host with NVIDIA GPUs (MLX for CUDA, the nccl backend).

A random-weight llama of a realistic shape in bf16 (16 layers, hidden 2048, MLP 8192, 32
heads, 8 KV heads, vocabulary 32000: about 1.1 B parameters). The table has one cell per
prompt length (``--prompt-lengths``, default 128 and 8,000 tokens) and batch size
(``--batches``, default 1, 8 and 64: that many distinct prompts of that length in one run):

1. One GPU: ``mlxnode run`` against bare mlx-lm in one process per run (``load``, then
   ``stream_generate`` for one prompt, ``batch_generate`` for several, on the same prompt
   ids): decode tok/s (aggregate over the batch), prefill tok/s, time to first token,
   ratio mlxnode / mlx-lm (target >= 0.97); the greedy ids must be equal.
2. Every GPU of the host over NCCL (``mlx.launch --backend nccl``, one rank per GPU):
   ``--strategy pipeline`` (hidden states relayed with all-sums, as MLX 0.32's NCCL has no
   send/recv; one stage at a time: ``--overlap`` needs a hop stream, which nccl does not
   get), ``tensor`` and ``replicas``, each against the same cell's one-GPU mlxnode run.
   The pipeline's greedy ids must equal one GPU's; tensor parallelism's differ after a few
   tokens (bf16 all-reduce order), and replicas run smaller batches, whose bf16 matmuls may
   round differently. On a host with one GPU these rows are listed as not run, with why.

Each cell first runs mlxnode once unmeasured (MLX compiles CUDA kernels at first use and
keeps them in its PTX cache), then ``--repeats`` rounds of [mlx-lm, mlxnode] alternating,
then each multi-GPU strategy once unmeasured and ``--repeats`` times. Medians are reported.
mlx-lm's ``BatchGenerator`` (under both tools) decodes at most 32 sequences at once and
prefills 8 at a time, so a batch of 64 decodes in two waves of 32. Cells run cheapest first
(prompt tokens times batch); runs stop being started once ``--budget`` seconds have passed,
and what did not run is listed. Writes the GPU, driver,
library versions, commands and every sample to ``benchmarks/results/cuda.json`` (``--out``),
after every cell.

    python3 benchmarks/bench_cuda.py [--repeats 3] [--max-tokens 128] [--budget 1080]

Where `mlx.launch` has no entry point (wheels installed with ``pip --target``), it is started
as ``python3 -c 'from mlx._distributed_utils.launch import main; main()'``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import RESULTS, machine, now, versions, write_results

TARGET = 0.97
SHAPE = {
    "arch": "llama",
    "num_layers": 16,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_heads": 32,
    "num_kv_heads": 8,
    "vocab_size": 32000,
    "num_shards": 4,
    "dtype": "bfloat16",
    # Room for the 8,000-token prompt and its completion.
    "max_position_embeddings": 16384,
}
# For a smoke test of this script on CPU (--small --backend ring --gpus 2).
SMALL = {**SHAPE, "num_layers": 4, "hidden_size": 128, "intermediate_size": 256,
         "num_heads": 4, "num_kv_heads": 2, "vocab_size": 512}  # fmt: skip
MULTI_GPU_STRATEGIES = ("pipeline", "tensor", "replicas")
# Multi-GPU strategies whose greedy ids must equal one GPU's (the all-sum relay is exact).
EXACT_STRATEGIES = ("pipeline",)
LAUNCH = [
    sys.executable,
    "-c",
    "import sys; from mlx._distributed_utils.launch import main; "
    "sys.argv[0] = 'mlx.launch'; main()",
]
# NVLink multicast stays off on shared hosts (it can take the host's GPUs out of service).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0"}
RUN_TIMEOUT = 300
WORDS = [
    "the", "morning", "train", "left", "station", "while", "gardens", "waited", "for", "rain",
    "and", "a", "quiet", "library", "kept", "its", "numbers", "in", "order", "across", "long",
    "summer", "of", "river", "town",
]  # fmt: skip

# Bare mlx-lm, as a user of its Python API would run it: one prompt streams, several go
# through batch_generate. Prints one JSON line.
MLX_LM_SCRIPT = """
import json, sys, time
import mlx.core as mx
from mlx_lm import batch_generate, load, stream_generate
model_dir, prompts_file, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = json.loads(open(prompts_file).read())
model, tokenizer = load(model_dir)
if len(prompts) == 1:
    started, first, tokens, last = time.perf_counter(), None, [], None
    for r in stream_generate(model, tokenizer, mx.array(prompts[0]), max_tokens=max_tokens):
        first = first or time.perf_counter()
        last = r
        if r.finish_reason != "stop":
            tokens.append(r.token)
    out = {"generation_tps": last.generation_tps, "prompt_tps": last.prompt_tps,
           "ttft_seconds": first - started, "generation_tokens": last.generation_tokens,
           "peak_memory_gb": last.peak_memory, "token_ids": [tokens]}
else:
    r = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True)
    s = r.stats
    out = {"generation_tps": s.generation_tps, "prompt_tps": s.prompt_tps, "ttft_seconds": None,
           "generation_tokens": s.generation_tokens, "peak_memory_gb": s.peak_memory,
           "token_ids": r.token_ids}
print(json.dumps(out))
"""
# What a sample keeps from mlxnode's --metrics-json.
METRIC_KEYS = (
    "generation_tps", "prompt_tps", "ttft_seconds", "prompt_tokens", "generation_tokens",
    "strategy", "implementation", "generate_seconds", "wall_seconds", "ranks",
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    """One row of the table: who runs, on how many GPUs, with what plan, on which cell."""

    tool: str  # "mlx-lm" or "mlxnode"
    ranks: int
    strategy: str  # "local" on one GPU
    prompt_tokens: int
    batch: int

    @property
    def name(self) -> str:
        gpus = f"{self.ranks} GPU{'s' if self.ranks > 1 else ''}"
        return f"{self.tool} {gpus} {self.strategy} prompt {self.prompt_tokens} batch {self.batch}"


def make_prompts(tokenizer: Any, length: int, count: int) -> list[tuple[str, list[int]]]:
    """`count` distinct prompts of about `length` tokens: (text, the ids mlxnode encodes).

    Each prompt is a seeded random walk over WORDS, cut at `length` ids and decoded back to
    text; the ids are then those of that text, as `mlxnode run --no-chat-template` encodes
    it (BOS added), so both tools read the same ids.
    """
    out = []
    for n in range(count):
        pick = random.Random(n)
        text = " ".join(pick.choice(WORDS) for _ in range(2 * length))
        ids = tokenizer.encode(text)
        text = tokenizer.decode(ids[:length], skip_special_tokens=True)
        out.append((text, list(tokenizer.encode(text))))
    return out


def run_process(argv: list[str], *, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """Run `argv` with NVLink multicast off: exit code, stdout, the end of stderr, seconds."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **NCCL_ENV}
        )
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = 124, _text(e.stdout), _text(e.stderr)
    return {
        "rc": rc,
        "stdout": stdout,
        "stderr_tail": stderr[-3000:],
        "seconds": time.perf_counter() - started,
    }


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def mlxnode_argv(
    config: Config, model: Path, prompts_file: Path, out: Path, metrics: Path, args: Any
) -> list[str]:
    """`mlxnode run` of `config`'s batch, under mlx.launch when it has several ranks."""
    run = [
        sys.executable, "-m", "mlxnode", "run", "--model-path", str(model),
        "--no-chat-template", "--max-tokens", str(args.max_tokens),
        "--prompts-file", str(prompts_file), "--output", str(out),
        "--metrics-json", str(metrics),
    ]  # fmt: skip
    if config.ranks == 1:
        return run
    run += ["--backend", args.backend, "--strategy", config.strategy]
    env = [a for k, v in NCCL_ENV.items() for a in ("--env", f"{k}={v}")]
    return [*LAUNCH, "--backend", args.backend, "-n", str(config.ranks), *env, "--", *run]


def measure_once(config: Config, model: Path, work: Path, args: Any) -> tuple[dict, str]:
    """One run of `config`: (its sample with greedy ids, or an error record; the command)."""
    cell = f"p{config.prompt_tokens}b{config.batch}"
    if config.tool == "mlx-lm":
        ids_file = work / f"ids-{cell}.json"
        argv = [
            sys.executable,
            "-c",
            MLX_LM_SCRIPT,
            str(model),
            str(ids_file),
            str(args.max_tokens),
        ]
        command = " ".join([*argv[:2], '"$MLX_LM_SCRIPT"', *argv[3:]])
        res = run_process(argv)
        if res["rc"] != 0:
            return _error(res), command
        sample = json.loads(res["stdout"].strip().splitlines()[-1])
        return {**sample, "process_seconds": res["seconds"]}, command
    out, metrics = work / "out.jsonl", work / "metrics.json"
    out.unlink(missing_ok=True)
    metrics.unlink(missing_ok=True)
    argv = mlxnode_argv(config, model, work / f"prompts-{cell}.jsonl", out, metrics, args)
    res = run_process(argv)
    if res["rc"] == 0 and not metrics.exists():
        res["rc"] = -1  # mlx.launch exits 0 even when its ranks failed
    if res["rc"] != 0:
        return _error(res), " ".join(argv)
    reported = json.loads(metrics.read_text())
    sample = {k: reported.get(k) for k in METRIC_KEYS}
    sample["token_ids"] = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
    return {**sample, "process_seconds": res["seconds"]}, " ".join(argv)


def _error(res: dict) -> dict:
    return {"error": {"rc": res["rc"], "stderr_tail": res["stderr_tail"]}}


class Table:
    """The rows measured so far, written to the results file after every run."""

    def __init__(self, report: dict, out: Path, started: float, budget: float) -> None:
        self.report, self.out = report, out
        self.started, self.budget = started, budget
        self.rows: dict[str, dict] = {}

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.started > self.budget

    def skip(self, config: Config, why: str) -> None:
        self.report["skipped"].append({"name": config.name, "why": why})

    def row(self, config: Config) -> dict:
        if config.name not in self.rows:
            row = {"name": config.name, **vars(config), "command": None, "errors": [],
                   "samples": [], "token_ids": None}  # fmt: skip
            self.rows[config.name] = row
            self.report["results"].append(row)
        return self.rows[config.name]

    def add(self, config: Config, sample: dict, command: str, *, measured: bool) -> bool:
        """Record one run; False when it failed (the row keeps its error)."""
        row = self.row(config)
        row["command"] = command
        if "error" in sample:
            row["errors"].append(sample["error"])
            print(f"{config.name}: rc {sample['error']['rc']}\n{sample['error']['stderr_tail']}")
            return False
        ids = sample.pop("token_ids")
        row["token_ids"] = row["token_ids"] or ids
        if measured:
            row["samples"].append(sample)
        tag = "" if measured else " (warm-up)"
        print(f"{config.name}{tag}: {sample['generation_tps']:.1f} tok/s", flush=True)
        return True

    def save(self) -> None:
        for row in self.rows.values():
            _medians(row)
        self.report["summary"] = summarise(list(self.rows.values()))
        self.report["total_seconds"] = time.perf_counter() - self.started
        write_results(self.out, self.report)


def _medians(row: dict) -> None:
    for key in ("generation_tps", "prompt_tps", "ttft_seconds"):
        values = [s[key] for s in row["samples"] if s.get(key) is not None]
        row[f"{key}_median"] = statistics.median(values) if values else None


def run_cell(table: Table, prompt_tokens: int, batch: int, gpus: int, model: Path, work: Path,
             args: Any) -> None:  # fmt: skip
    """Warm up, then alternate mlx-lm and mlxnode on one GPU, then each multi-GPU strategy."""
    bare = Config("mlx-lm", 1, "local", prompt_tokens, batch)
    ours = Config("mlxnode", 1, "local", prompt_tokens, batch)
    multi = [Config("mlxnode", gpus, s, prompt_tokens, batch) for s in MULTI_GPU_STRATEGIES]
    if gpus < 2:
        for config in multi:
            table.skip(config, f"needs 2 or more GPUs; this host has {gpus}")
        multi = []
    groups = [[bare, ours]] + [[config] for config in multi]
    for group in groups:
        if table.out_of_time():
            for config in group:
                table.skip(config, "out of the time budget")
            continue
        # The warm-up runs mlxnode; when only mlxnode fails, mlx-lm's row is still measured.
        warm, command = measure_once(group[-1], model, work, args)
        if not table.add(group[-1], warm, command, measured=False) and len(group) == 1:
            continue
        failed: set[str] = set()
        for _ in range(args.repeats):
            if table.out_of_time():
                break
            for config in group:
                if config.name in failed:
                    continue
                sample, command = measure_once(config, model, work, args)
                if not table.add(config, sample, command, measured=True):
                    failed.add(config.name)
            table.save()
            if len(failed) == len(group):
                break
    table.save()


def summarise(rows: list[dict]) -> dict:
    """Per cell: each row's medians, its ratio to one GPU's mlxnode, and whether ids match."""
    by_key = {
        (r["tool"], r["ranks"], r["strategy"], r["prompt_tokens"], r["batch"]): r for r in rows
    }
    summary: dict = {}
    for (tool, ranks, strategy, prompt_tokens, batch), row in by_key.items():
        if row["generation_tps_median"] is None:
            summary[row["name"]] = "failed" if row["errors"] else "no samples"
            continue
        entry: dict[str, Any] = {
            "generation_tps": round(row["generation_tps_median"], 1),
            "prompt_tps": round(row["prompt_tps_median"] or 0, 1),
            "ttft_seconds": _round(row["ttft_seconds_median"], 3),
            "samples": len(row["samples"]),
        }
        one = by_key.get(("mlxnode", 1, "local", prompt_tokens, batch))
        bare = by_key.get(("mlx-lm", 1, "local", prompt_tokens, batch))
        if tool == "mlxnode" and ranks == 1 and bare and bare["generation_tps_median"]:
            ratio = row["generation_tps_median"] / bare["generation_tps_median"]
            entry["vs_mlx_lm"] = round(ratio, 3)
            entry["target_met"] = ratio >= TARGET
            entry["ids_equal_mlx_lm"] = row["token_ids"] == bare["token_ids"]
        elif ranks > 1 and one and one["generation_tps_median"]:
            entry["vs_one_gpu"] = round(
                row["generation_tps_median"] / one["generation_tps_median"], 3
            )
            entry["ids_equal_one_gpu"] = row["token_ids"] == one["token_ids"]
            entry["ids_must_match"] = strategy in EXACT_STRATEGIES
        summary[row["name"]] = entry
    return summary


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _tokens(cell: tuple[int, int]) -> int:
    return cell[0] * cell[1]


def gpu_count(override: int | None) -> int:
    """The GPUs nvidia-smi lists (or `override`, for a CPU smoke test of the multi-rank rows)."""
    if override is not None:
        return override
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def write_prompts(model: Path, work: Path, lengths: list[int], batches: list[int]) -> dict:
    """Each cell's prompts file (mlxnode) and ids file (mlx-lm); the ids' lengths per cell."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model)
    lengths_seen = {}
    for length in lengths:
        prompts = make_prompts(tokenizer, length, max(batches))
        for batch in batches:
            cell = f"p{length}b{batch}"
            chosen = prompts[:batch]
            (work / f"prompts-{cell}.jsonl").write_text(
                "".join(
                    json.dumps({"id": str(i), "prompt": t}) + "\n"
                    for i, (t, _) in enumerate(chosen)
                )
            )
            (work / f"ids-{cell}.json").write_text(json.dumps([ids for _, ids in chosen]))
            lengths_seen[cell] = sorted({len(ids) for _, ids in chosen})
    return lengths_seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--budget", type=float, default=1080, help="seconds to start runs in")
    parser.add_argument("--prompt-lengths", default="128,8000")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "cuda.json")
    parser.add_argument("--backend", default="nccl")
    parser.add_argument("--gpus", type=int, default=None, help="ranks for the multi-GPU rows")
    parser.add_argument("--small", action="store_true", help="a tiny model, for a CPU smoke test")
    parser.add_argument("--table", type=Path, help="only print the table of this results file")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    started = time.perf_counter()

    from tests.support.tiny_model import make_tiny_model

    shape = SMALL if args.small else SHAPE
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-cuda-"))
    model = work / "llama-1b-bf16"
    if not (model / "config.json").exists():
        import mlx.core as mx

        make_tiny_model(model, **shape, overwrite=True)
        mx.clear_cache()  # this process holds no GPU memory while the runs measure
        print(f"made the model in {time.perf_counter() - started:.1f}s", flush=True)
    lengths = [int(n) for n in args.prompt_lengths.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    gpus = gpu_count(args.gpus)
    report: dict = {
        "date": now(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "versions": versions("mlx", "mlx-cuda-13", "mlx-lm", "transformers"),
        "gpus_used": gpus,
        "backend": args.backend,
        "model": {**shape, "weights": "random (tiny_model)"},
        "prompt_lengths": lengths,
        "batches": batches,
        "prompt_ids_per_cell": write_prompts(model, work, lengths, batches),
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "nccl_env": NCCL_ENV,
        "mlx_lm_script": MLX_LM_SCRIPT,
        "results": [],
        "skipped": [],
    }
    table = Table(report, args.out, started, args.budget)
    # Cheapest cells first, so a budget that runs out leaves the costliest unmeasured.
    for length, batch in sorted(((n, b) for n in lengths for b in batches), key=_tokens):
        run_cell(table, length, batch, gpus, model, work, args)
    table.save()
    print(markdown(report), flush=True)


def markdown(report: dict) -> str:
    """The README's table of a results file: one line per row measured, then what did not run."""
    rows = {r["name"]: r for r in report["results"]}
    summary = report["summary"]
    lines = [
        "| prompt | batch | run | decode tok/s | prefill tok/s | time to first token | "
        "vs mlx-lm / 1 GPU | greedy ids |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary.items():
        row = rows[name]
        run = f"{row['tool']}, {row['ranks']} GPU{'s' if row['ranks'] > 1 else ''}"
        run += f", {row['strategy']}" if row["ranks"] > 1 else ""
        head = f"| {row['prompt_tokens']} | {row['batch']} | {run} |"
        if isinstance(entry, str):
            error = row["errors"][0]["stderr_tail"].strip().splitlines() if row["errors"] else []
            lines.append(f"{head} {entry}: {error[-1] if error else ''} | | | | |")
            continue
        ratio = entry.get("vs_mlx_lm", entry.get("vs_one_gpu"))
        ttft = entry["ttft_seconds"]
        ids = entry.get("ids_equal_mlx_lm", entry.get("ids_equal_one_gpu"))
        lines.append(
            f"{head} {entry['generation_tps']} | {entry['prompt_tps']} | "
            f"{'' if ttft is None else f'{ttft:.3f} s'} | {'' if ratio is None else ratio} | "
            f"{'' if ids is None else ('equal' if ids else 'differ')} |"
        )
    for skipped in report["skipped"]:
        lines.append(f"| | | {skipped['name']}: not run ({skipped['why']}) | | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
