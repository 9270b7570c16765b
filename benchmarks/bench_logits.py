"""Benchmark "logits once": memory of the ranks that no longer hold the head, and decode speed.

The model is the real SmolLM2-135M-Instruct (4-bit, 8-bit embeddings; `tests.support.
real_model`) made untied: `lm_head` is a copy of the embedding (same bits, so the greedy text
is the tied model's), stored with the final norm in the last file, as untied checkpoints do.
Each round runs ``mlxnode run`` on 2 local ring ranks (pipeline, greedy, no chat template)
with this checkout, and, given ``--baseline DIR`` (a checkout of the code before the change),
with that one too, interleaved. It records decode tok/s, every rank's peak memory (MLX's
peak, from ``--metrics-json``) and the greedy ids of each run, which must be equal.

Prints a Markdown table and writes ``benchmarks/results/logits.json``.

    .venv/bin/python benchmarks/bench_logits.py [--baseline DIR] [--repeats 5] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from bench_engine import BACKEND, PROMPT, _launch
from common import RESULTS, machine, machine_line, now, versions, write_results

from tests.support.real_model import real_model

RANKS = 2


def untied_copy(tied: Path, out: Path) -> Path:
    """`tied` (a tied-embedding mlx checkpoint) with `lm_head` = the embedding, in the last file."""
    shutil.copytree(tied, out)
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = False
    quantization = config.get("quantization_config") or config.get("quantization")
    if quantization and "model.embed_tokens" in quantization:
        quantization["lm_head"] = quantization["model.embed_tokens"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    embedding_file = weight_map["model.embed_tokens.weight"]
    last_file = weight_map["model.norm.weight"]
    embedding = {
        k.replace("model.embed_tokens.", "lm_head."): v
        for k, v in mx.load(str(out / embedding_file)).items()
        if k.startswith("model.embed_tokens.")
    }
    last = dict(mx.load(str(out / last_file)))
    mx.save_safetensors(str(out / last_file), {**last, **embedding}, metadata={"format": "mlx"})
    for key, value in embedding.items():
        weight_map[key] = last_file
        index["metadata"]["total_size"] = index["metadata"].get("total_size", 0) + value.nbytes
    index_path.write_text(json.dumps(index, indent=2))
    return out


def _run(model: Path, code: Path | None, max_tokens: int, metrics: Path, output: Path) -> dict:
    """One 2-rank pipeline run of `code` (None: this checkout): its metrics and greedy ids."""
    prompts = output.with_suffix(".prompts.txt")
    prompts.write_text(PROMPT + "\n")
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)  # ahead of the editable install of this checkout
    argv = ["-m", "mlxnode", "run", "--model-path", str(model), "--strategy", "pipeline",
            "--no-chat-template", "--max-tokens", str(max_tokens), "--metrics-json",
            str(metrics), "--log-level", "WARNING", "-f", str(prompts), "-o", str(output),
            ]  # fmt: skip
    _launch(RANKS, argv, env=env)
    run = json.loads(metrics.read_text())
    (record,) = [json.loads(line) for line in output.read_text().splitlines() if line]
    return {
        "generation_tps": run["generation_tps"],
        "generation_tokens": run["generation_tokens"],
        "peak_memory_bytes": {r["rank"]: r["peak_memory_bytes"] for r in run["ranks"]},
        "token_ids": record["token_ids"],
    }


def _summary(runs: list[dict]) -> dict:
    return {
        "decode_tps": [r["generation_tps"] for r in runs],
        "decode_tps_median": statistics.median(r["generation_tps"] for r in runs),
        # Other load only ever slows a run down, so the best run is the least disturbed one.
        "decode_tps_best": max(r["generation_tps"] for r in runs),
        "peak_memory_bytes_median": {
            rank: statistics.median(r["peak_memory_bytes"][rank] for r in runs)
            for rank in runs[0]["peak_memory_bytes"]
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="A checkout of the code to compare with.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS / "logits.json")
    args = parser.parse_args()

    codes = {"after": None} | ({"before": args.baseline.resolve()} if args.baseline else {})
    output = args.output.resolve()
    scratch = Path(tempfile.mkdtemp(prefix="bench_logits."))
    # Ranks start in the current directory, which Python puts ahead of PYTHONPATH: outside
    # any checkout, the baseline's PYTHONPATH and this checkout's editable install decide.
    os.chdir(scratch)
    model = untied_copy(real_model("q4"), scratch / "smollm2-q4-untied")
    runs: dict[str, list[dict]] = {name: [] for name in codes}
    load_before = os.getloadavg()
    for i in range(args.repeats):
        for name, code in codes.items():
            run = _run(model, code, args.max_tokens, scratch / f"{name}-{i}.json",
                       scratch / f"{name}-{i}.jsonl")  # fmt: skip
            runs[name].append(run)
            print(f"  {name} {i + 1}/{args.repeats}: {run['generation_tps']:.1f} tok/s, peak "
                  f"{run['peak_memory_bytes']}", file=sys.stderr)  # fmt: skip
    ids = {tuple(r["token_ids"]) for rs in runs.values() for r in rs}
    report = {
        "date": now(),
        "machine": {**machine(), "load_average_before": load_before},
        "versions": versions("mlx", "mlx-lm"),
        "baseline": {"path": str(args.baseline), "commit": _commit(args.baseline)}
        if args.baseline
        else None,
        "backend": BACKEND,
        "ranks": RANKS,
        "model": "SmolLM2-135M-Instruct 4-bit, untied (lm_head = a copy of the 8-bit embedding)",
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "greedy_ids_equal": len(ids) == 1,
        "results": {name: _summary(rs) for name, rs in runs.items()},
        "runs": runs,
    }
    write_results(output, report)
    print(_markdown(report))
    print(f"\nwrote {output}")
    return 0 if report["greedy_ids_equal"] else 1


def _commit(checkout: Path) -> str | None:
    done = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or None


def _markdown(report: dict) -> str:
    lines = [
        "| code | decode tok/s, median (best) | peak memory rank 0 | peak memory rank 1 |",
        "|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        peaks = r["peak_memory_bytes_median"]
        lines.append(
            f"| {name} | {r['decode_tps_median']:.1f} ({r['decode_tps_best']:.1f}) "
            f"| {peaks[0]:,} | {peaks[1]:,} |"
        )
    lines.append("")
    lines.append(f"Greedy ids equal in every run: {report['greedy_ids_equal']}")
    lines.append(machine_line(report["machine"], report["versions"]))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
