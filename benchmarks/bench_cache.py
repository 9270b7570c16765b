"""Benchmark the per-rank model cache against a local Hub: bytes per rank, and prewarm time.

For the real SmolLM2-135M-Instruct (4-bit, 30 layers over 8 files, tied embeddings) and a
synthetic model with one file per layer (as in large checkpoints, which the real one cannot
show), it measures, with a fresh cache every time:

1. bytes of weight files one pipeline rank downloads, for N = 2, 3, 4, against the
   target ``layer share + non-layer weights + one file of slack`` (exact tensor sizes
   read from the safetensors headers);
2. wall time of ``ModelCacheManager.ensure_model`` for each rank of a 4-way pipeline
   against a plain ``huggingface_hub.snapshot_download`` of the whole model from the
   same (rate-limited) server; median of several repetitions, and the ratio.

Prints a Markdown table and writes everything, with the machine and library
versions, to ``benchmarks/results/cache.json``. Never contacts huggingface.co.

    .venv/bin/python benchmarks/bench_cache.py [--repeats 5] [--rate-limit 20MB]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common import RESULTS, machine, machine_line, now, versions, write_results

# Isolate huggingface_hub from the real home before anything imports it.
_SCRATCH = Path(tempfile.mkdtemp(prefix="bench_cache."))
os.environ["HF_HOME"] = str(_SCRATCH / "hf_home")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_TOKEN", None)

from huggingface_hub import snapshot_download  # noqa: E402

from mlxnode import sharding  # noqa: E402
from mlxnode.cache import ModelCacheManager, RankSpec  # noqa: E402
from mlxnode.formatting import format_bytes  # noqa: E402
from tests.support.hubserver import HubServer, parse_rate  # noqa: E402
from tests.support.real_model import real_model  # noqa: E402
from tests.support.tiny_model import make_tiny_model  # noqa: E402

RESULT_FILE = RESULTS / "cache.json"
DEFAULT_REPEATS = 5
DEFAULT_RATE = "20MB"
TIME_TARGET = 0.35
ORG = "bench"


@dataclass(frozen=True)
class Shape:
    name: str
    num_layers: int
    num_shards: int
    hidden_size: int = 256
    real_variant: str | None = None  # a converted real checkpoint instead of a tiny model


SHAPES = (
    Shape("smollm2-135m-q4", 30, 8, hidden_size=576, real_variant="q4"),
    Shape("fine", 32, 32),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="Runs per timing.")
    parser.add_argument(
        "--rate-limit",
        default=DEFAULT_RATE,
        help="Server body rate for the timings, e.g. 20MB; 'none' for loopback speed.",
    )
    parser.add_argument("--output", type=Path, default=RESULT_FILE, help="Where to write the JSON.")
    args = parser.parse_args()
    rate = None if args.rate_limit.lower() == "none" else parse_rate(args.rate_limit)

    root = _SCRATCH / "hub"
    report: dict = {
        "machine": machine(),
        "versions": versions("mlx", "mlx-lm", "huggingface_hub"),
        "date": now(),
        "repeats": args.repeats,
        "rate_limit_bytes_per_s": rate,
        "time_target": TIME_TARGET,
        "shapes": [],
    }
    for shape in SHAPES:
        repo = f"{ORG}/{shape.name}"
        if shape.real_variant:
            path = root / repo
            shutil.copytree(real_model(shape.real_variant), path)
        else:
            path = make_tiny_model(
                root / repo,
                num_layers=shape.num_layers,
                num_shards=shape.num_shards,
                hidden_size=shape.hidden_size,
            )
        tensors = _tensor_sizes(path)
        with HubServer(root) as hub:
            bytes_rows = _bytes_per_rank(hub, repo, shape, tensors)
        with _server_process(root, rate) as endpoint:
            time_rows = _prewarm_times(endpoint, repo, args.repeats)
        report["shapes"].append(
            {
                "shape": shape.__dict__,
                "total_weight_bytes": sum(tensors["files"].values()),
                "bytes_per_rank": bytes_rows,
                "prewarm_time": time_rows,
            }
        )
        print(_markdown(shape, bytes_rows, time_rows, sum(tensors["files"].values()), rate))
        print()
    print(machine_line(report["machine"], report["versions"]))
    write_results(args.output, report)
    print(f"\nwrote {args.output}")
    return 0


def _bytes_per_rank(hub: HubServer, repo: str, shape: Shape, tensors: dict) -> list[dict]:
    rows = []
    for world_size in (2, 3, 4):
        for rank in range(world_size):
            hub.stats.reset()
            cache = Path(tempfile.mkdtemp(dir=_SCRATCH, prefix="bytes."))
            _manager(hub, cache).ensure_model(
                repo, RankSpec(ranks=[rank], world_size=world_size, strategy="pipeline")
            )
            start, end = sharding.layer_range(shape.num_layers, rank, world_size)
            layer_share = sum(tensors["layers"][layer] for layer in range(start, end))
            target = layer_share + tensors["non_layer"] + max(tensors["files"].values())
            fetched = hub.stats.file_bytes(f"{repo}/*.safetensors")
            rows.append(
                {
                    "world_size": world_size,
                    "rank": rank,
                    "layers": [start, end],
                    "weight_bytes": fetched,
                    "fraction": fetched / sum(tensors["files"].values()),
                    "layer_share_bytes": layer_share,
                    "target_bytes": target,
                    "within_target": fetched <= target,
                }
            )
    return rows


def _prewarm_times(endpoint: str, repo: str, repeats: int) -> list[dict]:
    def snapshot() -> float:
        cache = Path(tempfile.mkdtemp(dir=_SCRATCH, prefix="snap."))
        started = time.perf_counter()
        snapshot_download(repo, cache_dir=cache, endpoint=endpoint)
        return time.perf_counter() - started

    def prewarm(rank: int) -> float:
        cache = Path(tempfile.mkdtemp(dir=_SCRATCH, prefix="rank."))
        manager = ModelCacheManager(cache, endpoint=endpoint, progress=False)
        started = time.perf_counter()
        manager.ensure_model(repo, RankSpec(ranks=[rank], world_size=4, strategy="pipeline"))
        return time.perf_counter() - started

    snapshot()  # warm the server's hash cache and the client's connection pool
    baseline = [snapshot() for _ in range(repeats)]
    rows = [
        {
            "what": "snapshot_download (whole model)",
            "rank": None,
            "median_s": statistics.median(baseline),
            "runs_s": baseline,
            "ratio": 1.0,
        }
    ]
    for rank in range(4):
        runs = [prewarm(rank) for _ in range(repeats)]
        rows.append(
            {
                "what": "mlxnode prewarm, 4-way pipeline",
                "rank": rank,
                "median_s": statistics.median(runs),
                "runs_s": runs,
                "ratio": statistics.median(runs) / statistics.median(baseline),
            }
        )
    return rows


def _manager(hub: HubServer, cache: Path) -> ModelCacheManager:
    return ModelCacheManager(cache, endpoint=hub.endpoint, progress=False, backoff_base=0.1)


@contextlib.contextmanager
def _server_process(root: Path, rate: float | None) -> Iterator[str]:
    """The Hub in its own process, so its threads do not share the client's GIL."""
    port_file = _SCRATCH / "hub.port"
    args = [sys.executable, "-m", "tests.support.hubserver", "--root", str(root)]
    args += ["--port-file", str(port_file)]
    if rate is not None:
        args += ["--rate-limit", str(rate)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Hub server did not start (exit {proc.poll()})")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port_file.read_text().strip()}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _tensor_sizes(model_dir: Path) -> dict:
    """Bytes per layer, of non-layer tensors, and per file, from the safetensors headers."""
    layers: dict[int, int] = {}
    non_layer = 0
    files: dict[str, int] = {}
    for path in sorted(model_dir.glob("model*.safetensors")):
        files[path.name] = path.stat().st_size
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            layer = sharding.layer_of_key(key)
            if layer is None:
                non_layer += end - begin
            else:
                layers[layer] = layers.get(layer, 0) + end - begin
    return {"layers": layers, "non_layer": non_layer, "files": files}


def _markdown(
    shape: Shape, bytes_rows: list[dict], time_rows: list[dict], total: int, rate: float | None
) -> str:
    lines = [
        f"### {shape.name}: {shape.num_layers} layers in {shape.num_shards} files, "
        f"hidden {shape.hidden_size}, {format_bytes(total)} of weights",
        "",
        "| N | rank | layers | weights fetched | share of all weights | target | within |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in bytes_rows:
        lines.append(
            f"| {row['world_size']} | {row['rank']} | {row['layers'][0]}-{row['layers'][1] - 1} "
            f"| {format_bytes(row['weight_bytes'])} | {row['fraction']:.0%} "
            f"| {format_bytes(row['target_bytes'])} | {'yes' if row['within_target'] else 'no'} |"
        )
    rate_text = "unlimited (loopback)" if rate is None else f"{format_bytes(rate)}/s"
    lines += [
        "",
        f"Prewarm wall time, server rate {rate_text} (median of "
        f"{len(time_rows[0]['runs_s'])}; target <= {TIME_TARGET}x):",
        "",
        "| what | rank | median s | ratio | within |",
        "|---|---|---|---|---|",
    ]
    for row in time_rows:
        within = "" if row["rank"] is None else ("yes" if row["ratio"] <= TIME_TARGET else "no")
        rank = "-" if row["rank"] is None else str(row["rank"])
        lines.append(
            f"| {row['what']} | {rank} | {row['median_s']:.3f} | {row['ratio']:.2f} | {within} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        import shutil

        shutil.rmtree(_SCRATCH, ignore_errors=True)
