"""Benchmark the inference engine: its overhead over bare mlx-lm, and what batching buys.

By default on the real SmolLM2-135M-Instruct (4-bit, llama; `tests.support.real_model`);
`--model tiny` uses a synthetic qwen2 instead, the one model here that bare mlx-lm can also
pipeline (mlx-lm has no pipeline() for llama).

1. Toolkit overhead: generation tok/s of ``mlxnode run`` against a bare mlx-lm run
   (``load``/``sharded_load`` + ``stream_generate``, a small script launched the same
   way) of the same model, same ranks, same backend, same prompt and token count; runs
   interleaved, median of several repetitions, and the ratio (target >= 0.97). Real
   model: one rank, and tensor parallelism on 3 ranks (its 9 heads need a divisor of 9);
   its 2-rank pipeline is compared with one bare process, which shows what the split
   costs rather than overhead. Tiny model: pipeline and tensor on 2 ranks.
2. Batching: 8 prompts in one batched run against the same 8 prompts as 8 sequential
   runs; aggregate tok/s = generated tokens / generation seconds (prefill + decode,
   without process start and loading), ratio (target >= 3x). End-to-end wall time
   of the two is reported too.

Prints Markdown tables and writes everything, with the machine, backend, model shape
and library versions, to ``benchmarks/results/engine.json``.

    .venv/bin/python benchmarks/bench_engine.py [--repeats 5] [--ranks 2] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine, machine_line, now, versions, write_results

from tests.support.real_model import real_model
from tests.support.tiny_model import make_tiny_model

# mlx.launch, minus its busy wait (mlxnode/mlx_launch.py), as `mlxnode launch` runs it.
MLX_LAUNCH = [sys.executable, "-m", "mlxnode.mlx_launch"]
BACKEND = "ring"
OVERHEAD_TARGET = 0.97
BATCH_TARGET = 3.0
# A decode step is real work on one CPU core (MLX's CPU backend is slow: ~1 GFLOP/s per core
# for a float32 matvec here), yet a run with a few hundred tokens takes seconds, not minutes.
TINY_SHAPE = {
    "arch": "qwen2",
    "num_layers": 8,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_heads": 8,
    "num_kv_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
}
PROMPT = "The morning train left the station at seven, and the fields outside were"
BATCH = [
    "The morning train left the station",
    "A program is a list of instructions",
    "To make a simple soup, cut two onions",
    "The weather changed quickly in the mountains",
    "Numbers are everywhere",
    "Why is the sea salty?",
    "The library was quiet except for",
    "Gardens need patience",
]

BARE_SCRIPT = """
import json, sys
import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.utils import sharded_load

from mlx_lm.utils import load

path, strategy, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
group = mx.distributed.init(backend="ring")
if strategy == "none":
    model, tokenizer = load(path)
elif strategy == "pipeline":
    model, tokenizer = sharded_load(path, pipeline_group=group)
else:
    model, tokenizer = sharded_load(path, tensor_group=group)
# Stream rank 0's text like mlx_lm.generate (and mlxnode run) do.
for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
    if group.rank() == 0:
        print(response.text, end="", flush=True)
if group.rank() == 0:
    print()
    print(json.dumps({
        "generation_tps": response.generation_tps,
        "generation_tokens": response.generation_tokens,
        "prompt_tps": response.prompt_tps,
    }))
"""


# (name, ranks, mlxnode's --strategy, the bare script's strategy) per model.
OVERHEAD_RUNS = {
    "real": [
        ("one rank", 1, "auto", "none"),
        ("tensor, 3 ranks", 3, "tensor", "tensor"),
        ("pipeline, 2 ranks vs one bare process", 2, "pipeline", "none"),
    ],
    "tiny": [
        ("pipeline, 2 ranks", 2, "pipeline", "pipeline"),
        ("tensor, 2 ranks", 2, "tensor", "tensor"),
    ],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(OVERHEAD_RUNS), default="real")
    parser.add_argument("--repeats", type=int, default=5, help="Runs per overhead measurement.")
    parser.add_argument(
        "--batch-repeats", type=int, default=3, help="Batched-vs-sequential rounds (9 runs each)."
    )
    parser.add_argument("--ranks", type=int, default=2, help="Ranks of the batching runs.")
    parser.add_argument("--max-tokens", type=int, default=64, help="Tokens per generation.")
    parser.add_argument("--output", type=Path, default=None, help="Where to write the JSON.")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench_engine."))
    if args.model == "real":
        model = real_model("q4")
        described = {"name": "SmolLM2-135M-Instruct", "arch": "llama", "num_layers": 30,
                     "dtype": "4-bit (8-bit embeddings), float32 norms",
                     "parameters": 134_515_008}  # fmt: skip
    else:
        model = make_tiny_model(scratch / "model", **TINY_SHAPE)
        described = {**TINY_SHAPE, "dtype": "float32", "parameters": _parameters(TINY_SHAPE)}
    bare = scratch / "bare_mlx_lm.py"
    bare.write_text(BARE_SCRIPT)

    load_before = os.getloadavg()
    overhead = {
        name: _overhead(model, bare, ranks, strategy, bare_strategy, args, scratch)
        for name, ranks, strategy, bare_strategy in OVERHEAD_RUNS[args.model]
    }
    batching = _batching(model, args, scratch)
    batching["mlx_lm_in_process"] = _batching_ceiling(model, args)
    report = {
        "date": now(),
        # Other work on the machine skews both sides; the interleaving only evens it out.
        "machine": {**machine(), "load_average_before": load_before},
        "versions": versions("mlx", "mlx-lm"),
        "backend": BACKEND,
        "ranks": args.ranks,
        "model": described,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "batch_repeats": args.batch_repeats,
        "overhead": overhead,
        "batching": batching,
    }
    output = args.output or RESULTS / (
        "engine.json" if args.model == "real" else "engine-tiny.json"
    )
    write_results(output, report)
    print(_markdown(report))
    print(f"\nwrote {output}")
    return 0


def _overhead(
    model: Path, bare: Path, ranks: int, strategy: str, bare_strategy: str, args, scratch: Path
) -> dict:
    """Interleaved runs of mlxnode and bare mlx-lm; median generation tok/s of each."""
    ours, theirs = [], []
    bare_ranks = ranks if bare_strategy != "none" else 1
    for i in range(args.repeats):
        metrics = scratch / f"overhead-{strategy}-{ranks}-{i}.json"
        _launch(
            ranks,
            ["-m", "mlxnode", "run", "--model-path", str(model), "--strategy", strategy,
             "--no-chat-template", "--max-tokens", str(args.max_tokens),
             "--metrics-json", str(metrics), "--log-level", "WARNING", PROMPT],
        )  # fmt: skip
        run = json.loads(metrics.read_text())
        ours.append((run["generation_tps"], run["generation_tokens"]))
        out = _launch(
            bare_ranks, [str(bare), str(model), bare_strategy, PROMPT, str(args.max_tokens)]
        )
        result = json.loads(out.strip().splitlines()[-1])
        theirs.append((result["generation_tps"], result["generation_tokens"]))
        print(f"  {strategy} x{ranks} {i + 1}/{args.repeats}: mlxnode {ours[-1][0]:.1f} tok/s, "
              f"mlx-lm {theirs[-1][0]:.1f} tok/s", file=sys.stderr)  # fmt: skip
    mlxnode_tps = statistics.median(t for t, _ in ours)
    mlx_lm_tps = statistics.median(t for t, _ in theirs)
    # Other load only ever slows a run down, so the best run is the least disturbed one.
    best_ours, best_theirs = max(t for t, _ in ours), max(t for t, _ in theirs)
    return {
        "ranks": ranks,
        "strategy": strategy,
        "baseline": f"bare mlx-lm, {bare_strategy}, {bare_ranks} rank(s)",
        "mlxnode_tps": [t for t, _ in ours],
        "mlx_lm_tps": [t for t, _ in theirs],
        "generation_tokens": sorted({n for _, n in ours + theirs}),
        "mlxnode_median_tps": mlxnode_tps,
        "mlx_lm_median_tps": mlx_lm_tps,
        "ratio": mlxnode_tps / mlx_lm_tps,
        "mlxnode_best_tps": best_ours,
        "mlx_lm_best_tps": best_theirs,
        "best_ratio": best_ours / best_theirs,
        "target": OVERHEAD_TARGET if bare_ranks == ranks else None,
    }


def _batching(model: Path, args, scratch: Path) -> dict:
    """One batched run of 8 prompts against 8 sequential single runs, repeated."""
    common = ["-m", "mlxnode", "run", "--model-path", str(model), "--strategy", "pipeline",
              "--no-chat-template", "--max-tokens", str(args.max_tokens), "--log-level",
              "WARNING", "--step-timeout", "600"]  # fmt: skip
    prompts = scratch / "prompts.txt"
    prompts.write_text("\n".join(BATCH) + "\n")
    batched, sequential, batched_wall, sequential_wall = [], [], [], []
    for i in range(args.batch_repeats):
        metrics = scratch / f"batch-{i}.json"
        started = time.monotonic()
        _launch(
            args.ranks,
            [*common, "--prompts-file", str(prompts), "--output", str(scratch / "out.jsonl"),
             "--metrics-json", str(metrics)],
        )  # fmt: skip
        batched_wall.append(time.monotonic() - started)
        run = json.loads(metrics.read_text())
        batched.append(run["generation_tokens"] / run["generate_seconds"])

        tokens = seconds = 0.0
        started = time.monotonic()
        for j, prompt in enumerate(BATCH):
            metrics = scratch / f"single-{i}-{j}.json"
            _launch(args.ranks, [*common, "--metrics-json", str(metrics), prompt])
            run = json.loads(metrics.read_text())
            tokens += run["generation_tokens"]
            seconds += run["generate_seconds"]
        sequential_wall.append(time.monotonic() - started)
        sequential.append(tokens / seconds)
        print(f"  batch {i + 1}/{args.batch_repeats}: batched {batched[-1]:.1f} tok/s, "
              f"sequential {sequential[-1]:.1f} tok/s", file=sys.stderr)  # fmt: skip
    batched_tps, sequential_tps = statistics.median(batched), statistics.median(sequential)
    return {
        "prompts": len(BATCH),
        "batched_tps": batched,
        "sequential_tps": sequential,
        "batched_median_tps": batched_tps,
        "sequential_median_tps": sequential_tps,
        "ratio": batched_tps / sequential_tps,
        "target": BATCH_TARGET,
        "batched_wall_seconds": statistics.median(batched_wall),
        "sequential_wall_seconds": statistics.median(sequential_wall),
        "wall_ratio": statistics.median(sequential_wall) / statistics.median(batched_wall),
    }


def _batching_ceiling(model: Path, args) -> dict:
    """What batching buys on this backend at all: mlx-lm alone, one process, no ranks.

    batch_generate of the 8 prompts against 8 stream_generate calls, best of
    `batch_repeats` rounds; the engine cannot beat this ratio by much.
    """
    from mlx_lm import load
    from mlx_lm.generate import batch_generate, stream_generate

    loaded, tokenizer = load(str(model))
    rounds = []
    for _ in range(args.batch_repeats):
        started = time.perf_counter()
        response = batch_generate(
            loaded, tokenizer, [tokenizer.encode(p) for p in BATCH], max_tokens=args.max_tokens
        )
        batched = response.stats.generation_tokens / (time.perf_counter() - started)
        tokens, started = 0, time.perf_counter()
        for prompt in BATCH:
            *_, last = stream_generate(loaded, tokenizer, prompt, max_tokens=args.max_tokens)
            tokens += last.generation_tokens
        sequential = tokens / (time.perf_counter() - started)
        rounds.append((batched, sequential))
    batched, sequential = max(rounds, key=lambda r: r[0] / r[1])
    return {"batched_tps": batched, "sequential_tps": sequential, "ratio": batched / sequential}


def _launch(ranks: int, argv: list[str], env: dict[str, str] | None = None) -> str:
    """Run `python ARGV` on `ranks` ring ranks on this machine (in `env`: default, ours);
    rank 0's stdout."""
    command = [sys.executable, *argv]
    if ranks > 1:
        command = [*MLX_LAUNCH, "--backend", BACKEND, "-n", str(ranks),
                   "--starting-port", str(_free_ports(ranks)), *command]  # fmt: skip
    # Its own session, so an interrupted benchmark can take the launcher's ranks down with it.
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        stdout, stderr = process.communicate(timeout=900)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    if process.returncode != 0 or "exited with code" in stderr:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr}")
    return stdout


def _free_ports(n: int) -> int:
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


def _parameters(shape: dict) -> int:
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_layers"]
    kv = h * shape["num_kv_heads"] // shape["num_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    return n * per_layer + 2 * shape["vocab_size"] * h


def _markdown(report: dict) -> str:
    m, v, shape = report["machine"], report["versions"], report["model"]
    lines = [
        f"{machine_line(m, v)} after, {m['load_average_before'][0]:.1f} before; "
        f"backend {report['backend']}, {report['ranks']} ranks on one host.",
        f"Model: {shape.get('name', 'tiny ' + shape['arch'])}, {shape['num_layers']} layers, "
        f"{shape['parameters'] / 1e6:.1f}M params, "
        f"{shape['dtype']}; greedy, {report['max_tokens']} tokens per prompt; medians of "
        f"{report['repeats']} (overhead) and {report['batch_repeats']} (batching) rounds.",
        "",
        "| Measurement | mlxnode | baseline | ratio | target |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, o in report["overhead"].items():
        target = f">= {o['target']}" if o["target"] else "-"
        lines.append(
            f"| {name}: generation tok/s vs {o['baseline']} (median) | "
            f"{o['mlxnode_median_tps']:.1f} | {o['mlx_lm_median_tps']:.1f} | "
            f"{o['ratio']:.3f} | {target} |"
        )
        lines.append(
            f"| {name}: same, best run of each | {o['mlxnode_best_tps']:.1f} | "
            f"{o['mlx_lm_best_tps']:.1f} | {o['best_ratio']:.3f} | - |"
        )
    b = report["batching"]
    lines.append(
        f"| {b['prompts']} prompts batched vs sequential: aggregate tok/s | "
        f"{b['batched_median_tps']:.1f} | {b['sequential_median_tps']:.1f} | "
        f"{b['ratio']:.2f}x | >= {b['target']}x |"
    )
    c = b["mlx_lm_in_process"]
    lines.append(
        f"| same, bare mlx-lm in one process (batch_generate vs stream_generate): what this "
        f"backend allows | {c['batched_tps']:.1f} | {c['sequential_tps']:.1f} | "
        f"{c['ratio']:.2f}x | - |"
    )
    lines.append(
        f"| {b['prompts']} prompts batched vs sequential: end-to-end wall s (lower is better) | "
        f"{b['batched_wall_seconds']:.1f} | {b['sequential_wall_seconds']:.1f} | "
        f"{b['wall_ratio']:.2f}x | - |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
