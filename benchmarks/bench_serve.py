"""Serving under load: `mlxnode serve` vs distributed `mlx_lm.server`, streaming clients.

Both servers run on 2 ring ranks, one server up at a time (`mlxnode launch --hostfile` for
mlxnode, `mlx.launch --backend ring` for mlx-lm, both through mlxnode's shim that keeps
MLX 0.32's mlx.launch from spinning a core: the same launcher for both), placed by
--placement:

- `testbed` (the default): a 2-host testbed (tests/support/testbed.py), each host pinned
  to one core of its own by a cpuset cgroup, provisioned by provision.yml and
  configure.yml; rank r runs on host r + 1, the models are copied into each host's
  private /tmp, and rank 0 serves on h1's address on the testbed bridge. Needs root.
- `local`: both ranks on 127.0.0.1, sharing every core of this machine.

Each cell sends, from 1, 4 and 16 threads at once, one streaming chat request per thread
(the official `openai` client, greedy, `max_tokens` fixed) and measures: aggregate tok/s
(completion tokens of all requests / wall time from the first request sent to the last
stream ended), time to first token and inter-token latency (p50/p95 over requests; a
request's inter-token latency is (last token - first token) / (tokens - 1)), failed
requests. Median of --reps repetitions per cell; every repetition kept. The clients run on
this machine, outside the testbed's cgroups.

Models:
- `real`: SmolLM2-135M-Instruct 4-bit (tests/support/real_model.py q4), mlxnode
  `--strategy pipeline`. mlx-lm cannot serve it on 2 ranks (its llama has no pipeline(),
  and tensor parallelism needs a divisor of its 9 heads), so it has no anchor here.
- `tiny`: the synthetic qwen2 of bench_engine.py (float32, random weights), which mlx-lm
  pipelines: mlxnode `--strategy pipeline` against `mlx_lm.server --pipeline`, the same
  layers per rank. The anchor's targets are measured on it.

An anchor whose server dies during a cell is data: the cell records the failed requests
and the exit, and the server is started again for the next repetition.

Writes benchmarks/results/serve.json (testbed) or serve-local.json (local) and a Markdown
table on stdout.

    sudo .venv/bin/python benchmarks/bench_serve.py [--placement testbed|local] [--reps 3]
        [--max-tokens 24] [--models tiny,real] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import openai
from bench_ansible import playbook, snapshot_source
from bench_engine import MLX_LAUNCH, TINY_SHAPE, _free_ports
from common import RESULTS, machine, machine_line, now, versions, write_results

from tests.support.real_model import real_model
from tests.support.testbed import Testbed
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

# The testbed placement: its own name and subnet (bench_throughput uses 10.213.12.0/24).
TESTBED_NAME = "mlxserve"
TESTBED_SUBNET = "10.213.13.0/24"
TESTBED_HOSTS = ("h1", "h2")
TESTBED_PINS = {"h1": "0", "h2": "1"}  # two 1-core machines on this 2-core one
# Where provision.yml and configure.yml put the venv and the hostfile on every host.
HOST_VENV = "/root/.mlxnode/venv"
HOST_HOSTFILE = "/root/.mlxnode/hosts.json"
# What a server's processes look like on a host: the launchers and every rank.
SERVER_PROCESSES = r"mlxnode|mlx\.launch|mlx_lm\.server"
TINY_DIR = "tiny-model"


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
    """A server on the ranks: its launcher process, URL and log.

    `cleanup` ends what the launcher leaves behind when it is stopped (ranks on other hosts).
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    url: str
    ready_path: str
    cleanup: Callable[[], None] = lambda: None
    proc: subprocess.Popen | None = None

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
        self.cleanup()
        self.proc = None
        return code

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _mlxnode_serve_args(model: str, port: int, max_tokens: int, host: str) -> list[str]:
    return [
        "serve", "--no-config", "--model-path", model, "--strategy", "pipeline",
        "--host", host, "--port", str(port), "--max-tokens", str(max_tokens),
        "--step-timeout", str(STEP_TIMEOUT),
    ]  # fmt: skip


def _anchor_args(python: str, model: str, port: int, max_tokens: int, host: str) -> list[str]:
    return [
        python, "-m", "mlx_lm.server", "--model", model, "--pipeline", "--host", host,
        "--port", str(port), "--max-tokens", str(max_tokens), "--log-level", "WARNING",
    ]  # fmt: skip


class LocalRanks:
    """Both ranks on 127.0.0.1: they share this machine's cores (and the clients' cores)."""

    name = "local"
    description = "2 ring ranks on 127.0.0.1 (one machine; the ranks share its cores)"

    def __enter__(self) -> LocalRanks:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def details(self) -> dict:
        return {"pinning": None}

    def place(self, model: Path) -> str:
        return str(model)

    def mlxnode_job(self, model: str, home: Path, max_tokens: int) -> Job:
        hostfile = home / "hosts.json"
        hostfile.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * RANKS))
        port = _free_ports(1)
        argv = [
            str(BIN / "mlxnode"), "launch", "--hostfile", str(hostfile), "--no-config",
            "--starting-port", str(_free_ports(RANKS)), "--lock-file", str(home / "cluster.lock"),
            "--log-dir", str(home / "mlxnode-run"), "--",
            *_mlxnode_serve_args(model, port, max_tokens, "127.0.0.1"),
        ]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        return Job("mlxnode serve", argv, _clean_env(home), home / "mlxnode.log", url, "/ready")

    def anchor_job(self, model: str, home: Path, max_tokens: int) -> Job:
        port = _free_ports(1)
        argv = [
            *MLX_LAUNCH, "--backend", "ring", "-n", str(RANKS),
            "--starting-port", str(_free_ports(RANKS)), "--",
            *_anchor_args(sys.executable, model, port, max_tokens, "127.0.0.1"),
        ]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        return Job("mlx_lm.server", argv, _clean_env(home), home / "mlx_lm.log", url, "/health")


def _clean_env(scratch: Path) -> dict[str, str]:
    # No MLX_* of an outer launcher; HOME in scratch, so no lock or run directory of the user's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX")}
    return {**env, "HOME": str(scratch / "home")}


class TestbedRanks:
    """Rank r on testbed host h(r+1), each host pinned to a core of its own.

    Entering brings the testbed up (fresh: an earlier one of the same name goes first) and
    provisions it as a real cluster is (provision.yml, configure.yml: the venv from the
    controller's wheelhouse, the SSH mesh, hosts.json); leaving takes it down. Servers are
    started over SSH on h1, as an operator would, and bind h1's address on the bridge.
    """

    name = "testbed"
    description = (
        "2 testbed hosts (network namespaces with sshd), each pinned to 1 core of its own "
        "by a cpuset cgroup; rank 0 on h1, rank 1 on h2, ring over the testbed bridge"
    )

    def __init__(self, work: Path):
        self.work = work
        self.bed = Testbed(
            TESTBED_NAME, hosts=len(TESTBED_HOSTS), subnet=TESTBED_SUBNET, cpus=TESTBED_PINS
        )
        self.provision_s = 0.0
        self._ports = itertools.count(0)

    def __enter__(self) -> TestbedRanks:
        self.bed.down()
        self.bed.up()
        snapshot_source(self.work / "src")
        inventory = self.bed.write_inventory(
            self.work / "inventory" / "hosts.yml",
            group_vars={
                "mlxnode_host_source_dir": str(self.work / "src"),
                # configure.yml's config.yaml needs a model; the servers name theirs by path.
                "mlxnode_model_path": f"/tmp/{TINY_DIR}",
            },
        )
        started = time.monotonic()
        for name in ("provision.yml", "configure.yml"):
            playbook(inventory, name, self.work)
        self.provision_s = time.monotonic() - started
        print(f"testbed provisioned in {self.provision_s:.0f} s", file=sys.stderr)
        return self

    def __exit__(self, *_: object) -> None:
        self.bed.down()

    def details(self) -> dict:
        pinning = {
            s.name: {"cpus": s.cpus, "memory_bytes": s.memory_bytes} for s in self.bed.status()
        }
        return {"pinning": pinning, "provision_s": self.provision_s}

    def place(self, model: Path) -> str:
        """Copy `model` into every host's private /tmp; its path there."""
        for host in TESTBED_HOSTS:
            target = self.bed.state_dir / "hosts" / host / "tmp" / model.name
            if not target.exists():
                shutil.copytree(model, target)
        return f"/tmp/{model.name}"

    def mlxnode_job(self, model: str, home: Path, max_tokens: int) -> Job:
        ring, port = self._next_ports()
        argv = [
            f"{HOST_VENV}/bin/mlxnode", "launch", "--hostfile", HOST_HOSTFILE,
            "--backend", "ring", "--python", f"{HOST_VENV}/bin/python", "--no-config",
            "--starting-port", str(ring), "--",
            *_mlxnode_serve_args(model, port, max_tokens, "0.0.0.0"),
        ]  # fmt: skip
        return self._job("mlxnode serve", argv, home / "mlxnode.log", port, "/ready")

    def anchor_job(self, model: str, home: Path, max_tokens: int) -> Job:
        ring, port = self._next_ports()
        argv = [
            f"{HOST_VENV}/bin/python", "-m", "mlxnode.mlx_launch", "--hostfile", HOST_HOSTFILE,
            "--backend", "ring",
            "--starting-port", str(ring), "--",
            *_anchor_args(f"{HOST_VENV}/bin/python", model, port, max_tokens, "0.0.0.0"),
        ]  # fmt: skip
        return self._job("mlx_lm.server", argv, home / "mlx_lm.log", port, "/health")

    def _next_ports(self) -> tuple[int, int]:
        """Ring and HTTP ports new to each server, so none waits for an old socket."""
        n = next(self._ports)
        return 33000 + 10 * n, 8100 + n

    def _job(self, name: str, argv: list[str], log: Path, port: int, ready: str) -> Job:
        command = "cd /tmp && exec " + shlex.join(argv)
        url = f"http://{self.bed.host('h1').ip}:{port}"
        return Job(
            name, self.bed.ssh_command("h1", command), dict(os.environ), log, url, ready,
            cleanup=self._kill_servers,
        )  # fmt: skip

    def _kill_servers(self) -> None:
        """Closing the SSH session does not reach the ranks: end them on every host."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for host in TESTBED_HOSTS:
                self.bed.kill_host_processes(host, SERVER_PROCESSES, sig=sig)
            time.sleep(2)


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
    parser.add_argument(
        "--placement",
        choices=("testbed", "local"),
        default="testbed",
        help="Where the 2 ranks run: pinned testbed hosts (needs root), or both on 127.0.0.1.",
    )
    parser.add_argument("--reps", type=int, default=3, help="Repetitions per cell.")
    parser.add_argument("--max-tokens", type=int, default=24, help="max_tokens per request.")
    parser.add_argument(
        "--real-reps", type=int, default=None, help="Repetitions for SmolLM2 (default: --reps)."
    )
    parser.add_argument(
        "--real-max-tokens",
        type=int,
        default=None,
        help="max_tokens for SmolLM2, whose prefill is slow on CPU (default: --max-tokens).",
    )
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
        args.real_reps, args.real_max_tokens = 1, 8
    settings = {
        "tiny": (args.reps, args.max_tokens),
        "real": (args.real_reps or args.reps, args.real_max_tokens or args.max_tokens),
    }
    client_counts = [int(c) for c in args.clients.split(",")]
    stem = "serve" if args.placement == "testbed" else f"serve-{args.placement}"
    output = args.output or RESULTS / (f"{stem}-quick.json" if args.quick else f"{stem}.json")

    began = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="bench_serve."))
    print(f"servers' logs in {scratch}", file=sys.stderr)
    load_before = os.getloadavg()
    placement = TestbedRanks(scratch / "testbed") if args.placement == "testbed" else LocalRanks()
    with placement:
        report: dict = {
            "date": now(),
            "machine": {**machine(), "load_average_before": load_before},
            "versions": versions("mlx", "mlx-lm", "openai"),
            "ranks": RANKS,
            "placement": placement.name,
            "placement_description": placement.description,
            **placement.details(),
            "strategy": "pipeline",
            "clients": client_counts,
            "request": "one streaming chat request per client, greedy, 'Write two sentences "
            "about TOPIC.', released together",
            "targets": TARGETS,
            # A run of some --models keeps the others' results already in the file.
            "models": json.loads(output.read_text())["models"] if output.exists() else {},
        }
        for name in args.models.split(","):
            reps, max_tokens = settings[name]
            model = placement.place(real_model("q4") if name == "real" else _tiny(scratch))
            home = scratch / name
            home.mkdir()
            # Per model too: a run of one model may use other settings than the file's others.
            entry: dict = {"model": _describe(name), "max_tokens": max_tokens, "reps": reps}
            print(f"{name}: mlxnode serve", file=sys.stderr)
            job = placement.mlxnode_job(model, home, max_tokens)
            entry["mlxnode"] = measure(job, client_counts, reps, max_tokens)
            entry["anchor"] = None
            if name == "tiny":
                print(f"{name}: mlx_lm.server", file=sys.stderr)
                job = placement.anchor_job(model, home, max_tokens)
                entry["anchor"] = measure(job, client_counts, reps, max_tokens)
            entry["ratios"] = ratios(entry["mlxnode"], entry["anchor"], client_counts)
            entry["load_average_after"] = os.getloadavg()
            report["models"][name] = entry
            report["seconds"] = time.monotonic() - began
            write_results(output, report)  # each model saved as it ends
    print(_markdown(report))
    print(f"\nwrote {output} in {time.monotonic() - began:.0f} s")
    return 0


def _tiny(scratch: Path) -> Path:
    return make_tiny_model(scratch / TINY_DIR, **TINY_SHAPE)


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
        f"{report.get('placement_description', report['placement'])}; {report['strategy']}.",
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
