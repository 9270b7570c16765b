"""Benchmark mlxnode on one Linux host with NVIDIA GPUs (MLX for CUDA, the nccl backend).

A random-weight llama of a realistic shape in bf16 (16 layers, hidden 2048, MLP 8192, 32
heads, 8 KV heads, vocabulary 32000: about 1.1 B parameters) and a 128-token prompt:

1. One GPU: generation tok/s of ``mlxnode run`` against bare mlx-lm (``load`` +
   ``stream_generate`` of the same prompt ids, in one process per repetition), ratio
   (target >= 0.97); greedy ids of both.
2. Two GPUs over NCCL (``mlx.launch --backend nccl``): the pipeline (hidden states relayed
   with all-sums, since MLX 0.32's NCCL has no send/recv) and tensor parallelism; the
   pipeline's greedy ids must equal one GPU's.
3. The same at batch 8 (8 prompts of 128 tokens in one batched run), as time allows.

Every configuration first runs once unmeasured (CUDA kernels are compiled at first use), then
``--repeats`` times; medians are reported. Runs stop being started once ``--budget`` seconds
have passed; what did not run is listed. Writes the GPU, driver, library versions, commands
and every sample to ``benchmarks/results/cuda.json`` (``--out``).

    python3 benchmarks/bench_cuda.py [--repeats 3] [--max-tokens 256] [--budget 420]

Where `mlx.launch` has no entry point (wheels installed with ``pip --target``), it is started
as ``python3 -c 'from mlx._distributed_utils.launch import main; main()'``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    "max_position_embeddings": 4096,
}
# For a smoke test of this script on CPU (--small --backend ring).
SMALL = {**SHAPE, "num_layers": 4, "hidden_size": 128, "intermediate_size": 256,
         "num_heads": 4, "num_kv_heads": 2, "vocab_size": 512}  # fmt: skip
PROMPT_TOKENS = 128
LAUNCH = [
    sys.executable,
    "-c",
    "import sys; from mlx._distributed_utils.launch import main; "
    "sys.argv[0] = 'mlx.launch'; main()",
]
# NVLink multicast stays off on shared hosts (it can take the host's GPUs out of service).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0"}

MLX_LM_SCRIPT = """
import json, sys
import mlx.core as mx
from mlx_lm import load, stream_generate
model_dir, prompts_file, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = json.loads(open(prompts_file).read())
model, tokenizer = load(model_dir)
tokens, last = [], None
for r in stream_generate(model, tokenizer, mx.array(ids), max_tokens=max_tokens):
    last = r
    if r.finish_reason != "stop":
        tokens.append(r.token)
print(json.dumps({"generation_tps": last.generation_tps, "prompt_tps": last.prompt_tps,
                  "prompt_tokens": last.prompt_tokens, "generation_tokens": last.generation_tokens,
                  "peak_memory_gb": last.peak_memory, "token_ids": tokens}))
"""


def _prompts(model_dir: Path, count: int) -> list[tuple[str, list[int]]]:
    """`count` distinct prompts of PROMPT_TOKENS tokens each (text, ids without the template)."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    words = " ".join(
        ("the morning train left the station while gardens waited for rain and a quiet",
         "library kept its numbers in order across the long summer of the river town")
    ).split()  # fmt: skip
    out = []
    for n in range(count):
        text, ids = "", []
        i = n
        while len(ids) < PROMPT_TOKENS:
            text += words[i % len(words)] + " "
            i += 1 + n
            ids = tokenizer.encode(text.strip())
        # Trim by decoding the first PROMPT_TOKENS ids (BOS included) back to text.
        text = tokenizer.decode(ids[:PROMPT_TOKENS], skip_special_tokens=True)
        out.append((text, tokenizer.encode(text)))
    return out


def _run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 240) -> dict:
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **NCCL_ENV, **(env or {})},
        )
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = 124, str(e.stdout or ""), str(e.stderr or "")
    return {
        "rc": rc,
        "stdout": stdout,
        "stderr_tail": stderr[-3000:],
        "seconds": time.perf_counter() - started,
    }


def _mlxnode_argv(
    ranks: int,
    strategy: str,
    model: Path,
    prompts_file: Path,
    out: Path,
    metrics: Path,
    mt: int,
    backend: str,
) -> list[str]:
    run = [
        sys.executable, "-m", "mlxnode", "run", "--model-path", str(model),
        "--no-chat-template", "--max-tokens", str(mt), "--prompts-file", str(prompts_file),
        "--output", str(out), "--metrics-json", str(metrics),
    ]  # fmt: skip
    if ranks == 1:
        return run
    run += ["--backend", backend, "--strategy", strategy]
    env = [a for k, v in NCCL_ENV.items() for a in ("--env", f"{k}={v}")]
    return [*LAUNCH, "--backend", backend, "-n", str(ranks), *env, "--", *run]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--budget", type=float, default=420, help="seconds to start runs in")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "cuda.json")
    parser.add_argument("--backend", default="nccl")
    parser.add_argument("--small", action="store_true", help="a tiny model, for a CPU smoke test")
    args = parser.parse_args()
    t0 = time.perf_counter()

    from tests.support.tiny_model import make_tiny_model

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-cuda-"))
    model = work / "llama-1b-bf16"
    if not (model / "config.json").exists():
        started = time.perf_counter()
        make_tiny_model(model, **(SMALL if args.small else SHAPE), overwrite=True)
        print(f"made the model in {time.perf_counter() - started:.1f}s", flush=True)

    report: dict = {
        "date": now(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "versions": versions("mlx", "mlx-cuda-13", "mlx-lm"),
        "backend": args.backend,
        "model": {**(SMALL if args.small else SHAPE), "weights": "random (tiny_model)"},
        "prompt_tokens": PROMPT_TOKENS,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "nccl_env": NCCL_ENV,
        "results": [],
        "skipped": [],
    }
    batches = [int(b) for b in args.batches.split(",")]
    prompts = _prompts(model, max(batches))
    configs = []
    for batch in batches:
        configs += [("mlx-lm", 1, "local", batch)] if batch == 1 else []
        configs += [("mlxnode", 1, "local", batch), ("mlxnode", 2, "pipeline", batch)]
        configs += [("mlxnode", 2, "tensor", batch)]

    for tool, ranks, strategy, batch in configs:
        name = f"{tool} {ranks} GPU{'s' if ranks > 1 else ''} {strategy} batch {batch}"
        if time.perf_counter() - t0 > args.budget:
            report["skipped"].append(name)
            continue
        pfile = work / f"prompts{batch}.jsonl"
        pfile.write_text(
            "".join(
                json.dumps({"id": str(i), "prompt": t}) + "\n"
                for i, (t, _) in enumerate(prompts[:batch])
            )
        )
        idsfile = work / "ids.json"
        idsfile.write_text(json.dumps(prompts[0][1]))
        samples, errors, command = [], [], None
        for rep in range(args.repeats + 1):  # the first one compiles kernels
            if rep and time.perf_counter() - t0 > args.budget:
                break
            out, metrics = work / "out.jsonl", work / "metrics.json"
            out.unlink(missing_ok=True)
            metrics.unlink(missing_ok=True)
            if tool == "mlx-lm":
                argv = [
                    sys.executable,
                    "-c",
                    MLX_LM_SCRIPT,
                    str(model),
                    str(idsfile),
                    str(args.max_tokens),
                ]
            else:
                argv = _mlxnode_argv(
                    ranks, strategy, model, pfile, out, metrics, args.max_tokens, args.backend
                )
            command = " ".join(argv)
            res = _run(argv)
            if tool == "mlxnode" and res["rc"] == 0 and not metrics.exists():
                res["rc"] = -1  # mlx.launch exits 0 even when its ranks failed
            if res["rc"] != 0:
                errors.append({"rc": res["rc"], "stderr_tail": res["stderr_tail"]})
                print(f"{name}: rc {res['rc']}\n{res['stderr_tail']}", flush=True)
                break
            if tool == "mlx-lm":
                sample = json.loads(res["stdout"].strip().splitlines()[-1])
                ids = [sample.pop("token_ids")]
            else:
                sample = json.loads(metrics.read_text())
                ids = [r["token_ids"] for r in map(json.loads, out.read_text().splitlines())]
                sample = {k: sample.get(k) for k in (
                    "generation_tps", "prompt_tps", "ttft_seconds", "prompt_tokens",
                    "generation_tokens", "implementation", "wall_seconds", "ranks")}  # fmt: skip
            sample["process_seconds"] = res["seconds"]
            sample["token_ids"] = ids
            if rep:
                samples.append(sample)
            print(f"{name} #{rep}: {sample['generation_tps']:.1f} tok/s", flush=True)
        row = {
            "name": name, "tool": tool, "ranks": ranks, "strategy": strategy, "batch": batch,
            "command": command, "errors": errors,
            "samples": [{k: v for k, v in s.items() if k != "token_ids"} for s in samples],
        }  # fmt: skip
        if samples:
            row["generation_tps_median"] = statistics.median(s["generation_tps"] for s in samples)
            row["ttft_seconds_median"] = (
                statistics.median(s["ttft_seconds"] for s in samples)
                if samples[0].get("ttft_seconds") is not None
                else None
            )
            row["token_ids"] = samples[-1]["token_ids"]
        report["results"].append(row)
        write_results(args.out, report)

    _compare(report)
    report["total_seconds"] = time.perf_counter() - t0
    write_results(args.out, report)
    print(json.dumps(report["summary"], indent=1), flush=True)


def _compare(report: dict) -> None:
    rows = {(r["tool"], r["ranks"], r["strategy"], r["batch"]): r for r in report["results"]}
    summary: dict = {}
    for (tool, ranks, _strategy, batch), row in rows.items():
        if "generation_tps_median" not in row:
            summary[row["name"]] = "failed" if row["errors"] else "no samples"
            continue
        entry = {"generation_tps": round(row["generation_tps_median"], 1)}
        one = rows.get(("mlxnode", 1, "local", batch))
        if one and "token_ids" in one and (tool, ranks) != ("mlxnode", 1):
            entry["ids_equal_one_gpu"] = row["token_ids"] == one["token_ids"]
            entry["vs_one_gpu"] = round(
                row["generation_tps_median"] / one["generation_tps_median"], 3
            )
        summary[row["name"]] = entry
    bare, ours = rows.get(("mlx-lm", 1, "local", 1)), rows.get(("mlxnode", 1, "local", 1))
    if bare and ours and "generation_tps_median" in bare and "generation_tps_median" in ours:
        summary["mlx_lm_ids_equal_one_gpu"] = bare["token_ids"][0] == ours["token_ids"][0]
        ratio = ours["generation_tps_median"] / bare["generation_tps_median"]
        summary["overhead_ratio"] = round(ratio, 3)
        summary["overhead_target_met"] = ratio >= TARGET
    report["summary"] = summary


if __name__ == "__main__":
    main()
