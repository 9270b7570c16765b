"""Serving under load: `mlxnode serve` vs distributed `mlx_lm.server`, streaming clients.

Both servers run on 2 ring ranks on 127.0.0.1 (`mlxnode launch --hostfile` for mlxnode,
`mlx.launch --backend ring -n 2` for mlx-lm), one server up at a time. Each cell sends,
from 1, 4 and 16 threads at once, one streaming chat request per thread (the official
`openai` client, greedy, `max_tokens` fixed) and measures: aggregate tok/s (completion
tokens of all requests / wall time from the first request sent to the last stream ended),
time to first token and inter-token latency (p50/p95 over requests; a request's
inter-token latency is (last token - first token) / (tokens - 1)), failed requests.
Median of --reps repetitions per cell; every repetition kept.

Models:
- `real`: SmolLM2-135M-Instruct 4-bit (tests/support/real_model.py q4), mlxnode
  `--strategy pipeline`. mlx-lm cannot serve it on 2 ranks (its llama has no pipeline(),
  and tensor parallelism needs a divisor of its 9 heads), so it has no anchor here.
- `tiny`: the synthetic qwen2 of bench_engine.py (float32, random weights), which mlx-lm
  pipelines: mlxnode `--strategy pipeline` against `mlx_lm.server --pipeline`, the same
  layers per rank. The anchor's targets are measured on it.

An anchor whose server dies during a cell is data: the cell records the failed requests
and the exit, and the server is started again for the next repetition.

Writes benchmarks/results/serve.json and a Markdown table on stdout.

    .venv/bin/python benchmarks/bench_serve.py [--reps 3] [--max-tokens 24] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import openai
from bench_engine import TINY_SHAPE, _free_ports
from common import RESULTS, machine, machine_line, now, versions, write_results

from tests.support.real_model import real_model
from tests.support.tiny_model import make_tiny_model

BIN = Path(sys.executable).parent
RANKS = 2
STARTUP_TIMEOUT = 300.0
REQUEST_TIMEOUT = 600.0
# Long enough for a step on 2 cores shared with other jobs; a hung rank is not measured here.
STEP_TIMEOUT = 600
TARGETS = {
    "scaling_16_vs_1": 4.0,  # mlxnode at 16 clients / mlxnode at 1 client
    "vs_anchor_16": 1.5,  # mlxnode / anchor at 16 clients
    "vs_anchor_1": 0.95,  # mlxnode / anchor at 1 client
}
TOPICS = [
    "the sea", "a train journey", "bread", "the moon", "a library", "winter", "rivers",
    "a clock", "gardens", "the desert", "a violin", "bees", "mountains", "rain", "a lighthouse",
    "autumn leaves",
]  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    """One streamed request as its client saw it (seconds from the cell's start)."""

    ok: bool
    error: str | None
    started: float
    ended: float
    ttft: float | None
    itl: float | None
    tokens: int


@dataclass
class Job:
    """A server on the ranks: its process group, URL and log."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    port: int
    ready_path: str
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start the ranks and wait until the server answers; the seconds it took."""
        started = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # so stop() takes every rank down with the launcher
            )
        while time.monotonic() - started < STARTUP_TIMEOUT:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited {self.proc.returncode}: {self._tail()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + self.ready_path, timeout=5) as r,
            ):
                if r.status == 200:
                    return time.monotonic() - started
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"{self.name} not ready in {STARTUP_TIMEOUT:.0f} s: {self._tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """Stop every rank; the launcher's exit code (None if it was not running)."""
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
        # Ranks still in the group (one that ignored SIGTERM) go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
        return code

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def mlxnode_job(model: Path, scratch: Path, max_tokens: int) -> Job:
    hostfile = scratch / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * RANKS))
    port = _free_ports(1)
    argv = [
        str(BIN / "mlxnode"), "launch", "--hostfile", str(hostfile), "--no-config",
        "--starting-port", str(_free_ports(RANKS)), "--lock-file", str(scratch / "cluster.lock"),
        "--log-dir", str(scratch / "mlxnode-run"), "--",
        "serve", "--no-config", "--model-path", str(model), "--strategy", "pipeline",
        "--port", str(port), "--max-tokens", str(max_tokens), "--step-timeout", str(STEP_TIMEOUT),
    ]  # fmt: skip
    return Job("mlxnode serve", argv, _clean_env(scratch), scratch / "mlxnode.log", port, "/ready")


def anchor_job(model: Path, scratch: Path, max_tokens: int) -> Job:
    port = _free_ports(1)
    argv = [
        str(BIN / "mlx.launch"), "--backend", "ring", "-n", str(RANKS),
        "--starting-port", str(_free_ports(RANKS)), "--",
        sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--pipeline",
        "--port", str(port), "--max-tokens", str(max_tokens), "--log-level", "WARNING",
    ]  # fmt: skip
    return Job("mlx_lm.server", argv, _clean_env(scratch), scratch / "mlx_lm.log", port, "/health")


def _clean_env(scratch: Path) -> dict[str, str]:
    # No MLX_* of an outer launcher; HOME in scratch, so no lock or run directory of the user's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX")}
    return {**env, "HOME": str(scratch / "home")}


def stream_one(url: str, prompt: str, max_tokens: int, origin: float) -> Outcome:
    """One streaming chat request through the official client, timed at each chunk."""
    client = openai.OpenAI(
        base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=REQUEST_TIMEOUT
    )
    started = time.monotonic()
    first = last = None
    chunks = 0
    usage = None
    try:
        stream = client.chat.completions.create(
            model="default_model",  # mlx_lm.server's name for its --model; mlxnode: any
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.monotonic()
                first = first or last
                chunks += 1
    except Exception as e:  # noqa: BLE001 -- any failure is a data point of the cell
        ended = time.monotonic()
        error = f"{type(e).__name__}: {str(e)[:200]}"
        return Outcome(False, error, started - origin, ended - origin, None, None, chunks)
    ended = time.monotonic()
    tokens = usage.completion_tokens if usage is not None else chunks
    ttft = first - started if first is not None else None
    itl = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return Outcome(True, None, started - origin, ended - origin, ttft, itl, tokens)


def cell(url: str, clients: int, max_tokens: int) -> dict:
    """`clients` threads, each one streaming request, released together."""
    outcomes: list[Outcome | None] = [None] * clients
    gate = threading.Barrier(clients + 1)
    origin = time.monotonic()

    def client(i: int) -> None:
        gate.wait()
        prompt = f"Write two sentences about {TOPICS[i % len(TOPICS)]}."
        outcomes[i] = stream_one(url, prompt, max_tokens, origin)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    gate.wait()
    for t in threads:
        t.join()
    done = [o for o in outcomes if o is not None]
    ok = [o for o in done if o.ok]
    wall = max(o.ended for o in done) - min(o.started for o in done)
    ttfts = [o.ttft for o in ok if o.ttft is not None]
    itls = [o.itl for o in ok if o.itl is not None]
    return {
        "clients": clients,
        "tokens": sum(o.tokens for o in ok),
        "wall_s": wall,
        "aggregate_tps": sum(o.tokens for o in ok) / wall,
        "ttft_p50_s": _percentile(ttfts, 50),
        "ttft_p95_s": _percentile(ttfts, 95),
        "itl_p50_s": _percentile(itls, 50),
        "itl_p95_s": _percentile(itls, 95),
        "failed": len(done) - len(ok),
        "errors": sorted({o.error for o in done if o.error}),
        "requests": [asdict(o) for o in done],
    }


def _percentile(values: list[float], p: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def measure(job: Job, client_counts: list[int], reps: int, max_tokens: int) -> dict:
    """Every cell of one server, --reps times; the server restarted if it died."""
    starts, exits = [job.start()], []
    # Warm-up: the first request of a server pays compilation and cache set-up.
    warm = stream_one(job.url, "Say hello.", max_tokens, time.monotonic())
    cells: dict[str, list[dict]] = {str(c): [] for c in client_counts}
    try:
        for rep in range(reps):
            for clients in client_counts:
                if not job.alive():
                    exits.append(job.stop())
                    starts.append(job.start())
                result = cell(job.url, clients, max_tokens)
                result["server_died"] = not job.alive()
                cells[str(clients)].append(result)
                print(
                    f"  {job.name} rep {rep + 1}, {clients} clients: "
                    f"{result['aggregate_tps']:.1f} tok/s, failed {result['failed']}",
                    file=sys.stderr,
                )
    finally:
        exits.append(job.stop())
    return {
        "server": job.name,
        "argv": job.argv,
        "startup_s": starts,
        "restarts": len(starts) - 1,
        "exit_codes": exits,
        "warm_up": asdict(warm),
        "cells": {c: _summary(runs) for c, runs in cells.items()},
    }


def _summary(runs: list[dict]) -> dict:
    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None

    return {
        "aggregate_tps": median("aggregate_tps"),
        "ttft_p50_s": median("ttft_p50_s"),
        "ttft_p95_s": median("ttft_p95_s"),
        "itl_p50_s": median("itl_p50_s"),
        "itl_p95_s": median("itl_p95_s"),
        "failed": sum(r["failed"] for r in runs),
        "requests": sum(r["clients"] for r in runs),
        "runs": runs,
    }


def ratios(ours: dict, anchor: dict | None, client_counts: list[int]) -> dict:
    """Each target's ratio and whether it is met (None where this run lacks a cell)."""
    lo, hi = str(min(client_counts)), str(max(client_counts))
    tps = {c: s["aggregate_tps"] for c, s in ours["cells"].items()}
    found = {"scaling_16_vs_1": {"ratio": _ratio(tps[hi], tps[lo])}}
    found["scaling_16_vs_1"]["goal"] = TARGETS["scaling_16_vs_1"]
    if anchor is not None:
        theirs = {c: s["aggregate_tps"] for c, s in anchor["cells"].items()}
        found["vs_anchor_16"] = {"ratio": _ratio(tps[hi], theirs[hi])}
        found["vs_anchor_1"] = {"ratio": _ratio(tps[lo], theirs[lo])}
        found["vs_anchor_16"]["goal"] = TARGETS["vs_anchor_16"]
        found["vs_anchor_1"]["goal"] = TARGETS["vs_anchor_1"]
        anchor_failed = sum(s["failed"] for s in anchor["cells"].values())
        ours_failed = sum(s["failed"] for s in ours["cells"].values())
        found["failed_requests"] = {
            "mlxnode": ours_failed,
            "anchor": anchor_failed,
            "met": ours_failed == 0,
        }
    for entry in found.values():
        if "goal" in entry:
            entry["met"] = entry["ratio"] is not None and entry["ratio"] >= entry["goal"]
    found["clients_compared"] = [int(lo), int(hi)]
    return found


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="Repetitions per cell.")
    parser.add_argument("--max-tokens", type=int, default=24, help="max_tokens per request.")
    parser.add_argument("--clients", default="1,4,16", help="Concurrent clients per cell.")
    parser.add_argument(
        "--models", default="tiny,real", help="Which models: tiny, real (others kept in the file)."
    )
    parser.add_argument(
        "--quick", action="store_true", help="Smoke run: 1 repetition, 1 and 4 clients, 8 tokens."
    )
    parser.add_argument("--output", type=Path, default=None, help="Where to write the JSON.")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.max_tokens, args.clients = 1, 8, "1,4"
    client_counts = [int(c) for c in args.clients.split(",")]
    output = args.output or RESULTS / ("serve-quick.json" if args.quick else "serve.json")

    began = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="bench_serve."))
    print(f"servers' logs in {scratch}", file=sys.stderr)
    load_before = os.getloadavg()
    report: dict = {
        "date": now(),
        "machine": {**machine(), "load_average_before": load_before},
        "versions": versions("mlx", "mlx-lm", "openai"),
        "ranks": RANKS,
        "placement": "2 ring ranks on 127.0.0.1 (one machine; the ranks share its cores)",
        "strategy": "pipeline",
        "clients": client_counts,
        "request": "one streaming chat request per client, greedy, 'Write two sentences "
        "about TOPIC.', released together",
        "targets": TARGETS,
        # A run of some --models keeps the others' results already in the file.
        "models": json.loads(output.read_text())["models"] if output.exists() else {},
    }
    for name in args.models.split(","):
        model = real_model("q4") if name == "real" else _tiny(scratch)
        home = scratch / name
        home.mkdir()
        # Per model too: a run of one model may use other settings than the file's others.
        entry: dict = {"model": _describe(name), "max_tokens": args.max_tokens, "reps": args.reps}
        print(f"{name}: mlxnode serve", file=sys.stderr)
        entry["mlxnode"] = measure(
            mlxnode_job(model, home, args.max_tokens), client_counts, args.reps, args.max_tokens
        )
        entry["anchor"] = None
        if name == "tiny":
            print(f"{name}: mlx_lm.server", file=sys.stderr)
            entry["anchor"] = measure(
                anchor_job(model, home, args.max_tokens), client_counts, args.reps, args.max_tokens
            )
        entry["ratios"] = ratios(entry["mlxnode"], entry["anchor"], client_counts)
        entry["load_average_after"] = os.getloadavg()
        report["models"][name] = entry
        report["seconds"] = time.monotonic() - began
        write_results(output, report)  # each model saved as it ends
    print(_markdown(report))
    print(f"\nwrote {output}")
    return 0


def _tiny(scratch: Path) -> Path:
    return make_tiny_model(scratch / "tiny-model", **TINY_SHAPE)


def _describe(name: str) -> str:
    if name == "real":
        return "SmolLM2-135M-Instruct 4-bit (8-bit embeddings), llama, 30 layers"
    shape = TINY_SHAPE
    return (
        f"synthetic {shape['arch']}, {shape['num_layers']} layers, hidden {shape['hidden_size']}, "
        "float32, random weights"
    )


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"{machine_line(m, report['versions'])} at the end, "
        f"{m['load_average_before'][0]:.1f} before.",
        f"{report['placement']}; {report['strategy']}.",
        "",
        "| model, max_tokens, reps | server | clients | aggregate tok/s | TTFT p50 / p95 ms | "
        "ITL p50 / p95 ms | failed |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, entry in report["models"].items():
        for side in ("mlxnode", "anchor"):
            served = entry[side]
            if served is None:
                continue
            for clients, s in served["cells"].items():
                lines.append(
                    f"| {name}, {entry['max_tokens']}, {entry['reps']} | {served['server']} | "
                    f"{clients} | {_fmt(s['aggregate_tps'])} | "
                    f"{_fmt(s['ttft_p50_s'], 1e3, 0)} / {_fmt(s['ttft_p95_s'], 1e3, 0)} | "
                    f"{_fmt(s['itl_p50_s'], 1e3, 0)} / {_fmt(s['itl_p95_s'], 1e3, 0)} | "
                    f"{s['failed']}/{s['requests']} |"
                )
    lines += ["", "| model | target | ratio | goal | met |", "|---|---|---:|---:|---|"]
    for name, entry in report["models"].items():
        for target, r in entry["ratios"].items():
            if "goal" in r:
                met = "yes" if r["met"] else "no"
                lines.append(f"| {name} | {target} | {_fmt(r['ratio'], digits=2)} | "
                             f"{r['goal']} | {met} |")  # fmt: skip
        failed = entry["ratios"].get("failed_requests")
        if failed:
            met = "yes" if failed["met"] else "no"
            lines.append(f"| {name} | failed requests (mlxnode / anchor) | "
                         f"{failed['mlxnode']} / {failed['anchor']} | 0 | {met} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
