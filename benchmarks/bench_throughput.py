"""Throughput on pinned testbed hosts: replicas vs one host, and "too big for one host".

A 2-host testbed whose hosts are pinned to one core each (cgroup v1 cpusets: two 1-core
machines on this 2-core one) is provisioned (provision.yml, configure.yml) from the
controller's wheelhouse;
the real SmolLM2-135M checkpoint (tests/support/real_model.py) is copied into each host's
private /tmp and run by path.

1. A batch of 16 prompts with `--strategy replicas` over both hosts vs the same batch on h1
   alone: aggregate generated tok/s (generated tokens / the run's generation seconds),
   median of --reps; target >= 1.8x. The two runs alternate in each repetition.
2. Single stream on h1: `mlxnode run` vs bare mlx-lm `stream_generate` on the same pinned
   host (the path mlxnode's single rank wraps); target >= 0.97x.
3. Memory: each host limited by its memory cgroup below the 16-bit model's size plus the
   runtime; one host alone is refused before loading, the pipeline over both runs; with
   uneven limits, memory weights (mlxnode_memory_weight, as the inventory sets them) split
   the layers so that each host fits.

4. Overlapped pipeline (`--overlap`, the default, vs `--no-overlap`), both hosts, q4 model:
   (a) time to first token of a ~2,000-token prompt (chunked prefill); target <= 0.6x of the
   non-overlapped run. (b) a batch of 8 prompts: aggregate generated tok/s (one micro-batch
   per stage); target >= 1.7x. Token ids must be identical. The two runs alternate in each
   repetition.

Writes benchmarks/results/throughput.json and a Markdown table on stdout.

    sudo .venv/bin/python benchmarks/bench_throughput.py [--reps 5] [--max-tokens 24]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_ansible import machine, playbook, snapshot_source  # noqa: E402

from tests.support.real_model import real_model  # noqa: E402
from tests.support.testbed import Testbed  # noqa: E402

NAME = "mlxthru"
SUBNET = "10.213.12.0/24"
HOSTS = ("h1", "h2")
PINS = {"h1": "0", "h2": "1"}
VENV = "/root/.mlxnode/venv"
CONFIG = "/root/.mlxnode/config.yaml"
HOSTFILE = "/root/.mlxnode/hosts.json"
MODELS = {"q4": "/tmp/smollm2-q4", "bfloat16": "/tmp/smollm2-bf16"}
TOPICS = [
    "the sea", "a train journey", "bread", "the moon", "a library", "winter", "rivers",
    "a clock", "gardens", "the desert", "a violin", "bees", "mountains", "rain", "a lighthouse",
    "autumn leaves",
]  # fmt: skip
# Lengths differ on purpose: a replica's share is balanced by prompt length.
PROMPTS = [
    f"Write {'a short' if i % 2 else 'a long, detailed'} paragraph about {topic}."
    + " Mention colours and sounds." * (i % 4)
    for i, topic in enumerate(TOPICS)
]
SINGLE_PROMPT = "What is the capital of France? Answer in one sentence, then explain why."
BARE_MLX_LM = """
import json, sys, time
from mlx_lm import load
from mlx_lm.generate import stream_generate
model, tokenizer = load(sys.argv[1])
ids = tokenizer.apply_chat_template([{"role": "user", "content": sys.argv[2]}],
                                    add_generation_prompt=True)
last = None
for last in stream_generate(model, tokenizer, ids, max_tokens=int(sys.argv[3])):
    pass
print(json.dumps({"generation_tps": last.generation_tps, "tokens": last.generation_tokens}))
"""


def ssh(
    bed: Testbed, host: str, command: str, *, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        bed.ssh_command(host, command), capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"on {host}: {command[:120]}... failed (exit {proc.returncode})")
    return proc


def place_files(bed: Testbed) -> None:
    """Copy the models and the prompts into every host's private /tmp."""
    prompts = "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS))
    for host in HOSTS:
        tmp = bed.state_dir / "hosts" / host / "tmp"
        for variant, dest in MODELS.items():
            target = tmp / Path(dest).name
            if not target.exists():
                shutil.copytree(real_model(variant), target)
        (tmp / "prompts.jsonl").write_text(prompts)


def run(bed: Testbed, *args: str, hosts: int, check: bool = True) -> dict:
    """`mlxnode run` on h1 alone, or `mlxnode launch` from h1 over both hosts; its metrics."""
    tail = ["--config", CONFIG, "--metrics-json", "/tmp/metrics.json", "--output", "/tmp/out.jsonl"]
    tail += ["--step-timeout", "600", *args]
    if hosts == 1:
        argv = [f"{VENV}/bin/mlxnode", "run", *tail]
    else:
        argv = [f"{VENV}/bin/mlxnode", "launch", "--hostfile", HOSTFILE, "--backend", "ring"]
        argv += ["--python", f"{VENV}/bin/python", "--no-config", "--", *tail]
    command = "rm -f /tmp/metrics.json /tmp/out.jsonl; cd /tmp && " + shlex.join(argv)
    started = time.monotonic()
    proc = ssh(bed, "h1", command, check=check)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        return {"exit_code": proc.returncode, "error": _error_line(proc.stderr), "wall_s": wall}
    metrics = json.loads(ssh(bed, "h1", "cat /tmp/metrics.json").stdout)
    records = [
        json.loads(line) for line in ssh(bed, "h1", "cat /tmp/out.jsonl").stdout.split("\n") if line
    ]
    return {"exit_code": 0, "wall_s": wall, "metrics": metrics, "records": records}


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "ModelLoadError" in line or "error" in line]
    return (lines or stderr.splitlines() or [""])[-1][-400:]


def _aggregate(result: dict) -> float:
    m = result["metrics"]
    return m["generation_tokens"] / m["generate_seconds"]


def bench_replicas(bed: Testbed, reps: int, max_tokens: int) -> dict:
    # No chat template: SmolLM2's adds a 30-token system prompt to every prompt, and on a
    # loaded 2-core machine the prefill of 16 of them took minutes per run.
    common = ["--model-path", MODELS["q4"], "--max-tokens", str(max_tokens), "--no-chat-template"]
    common += ["--prompts-file", "/tmp/prompts.jsonl"]
    one, two, ids_equal = [], [], []
    for rep in range(reps):
        single = run(bed, *common, hosts=1)
        replicas = run(bed, *common, "--strategy", "replicas", hosts=2)
        one.append(_aggregate(single))
        two.append(_aggregate(replicas))
        ids_equal.append(
            [r["token_ids"] for r in single["records"]]
            == [r["token_ids"] for r in replicas["records"]]
        )
        print(f"  rep {rep + 1}: 1 host {one[-1]:.1f} tok/s, replicas x2 {two[-1]:.1f} tok/s",
              file=sys.stderr)  # fmt: skip
    return {
        "prompts": len(PROMPTS),
        "max_tokens": max_tokens,
        "generation_tokens": replicas["metrics"]["generation_tokens"],
        "one_host_tps": one,
        "replicas_tps": two,
        "one_host_median_tps": statistics.median(one),
        "replicas_median_tps": statistics.median(two),
        "ratio": statistics.median(two) / statistics.median(one),
        "ratios_per_rep": [b / a for a, b in zip(one, two, strict=True)],
        "goal": 1.8,
        "token_ids_equal_single_host": all(ids_equal),
        "replicas_ranks": replicas["metrics"]["ranks"],
    }


def bench_single_stream(bed: Testbed, reps: int, max_tokens: int) -> dict:
    ours, bare = [], []
    for _ in range(reps):
        result = run(bed, "--model-path", MODELS["q4"], "--max-tokens", str(max_tokens),
                     SINGLE_PROMPT, hosts=1)  # fmt: skip
        ours.append(result["metrics"]["generation_tps"])
        argv = [f"{VENV}/bin/python", "-c", BARE_MLX_LM, MODELS["q4"], SINGLE_PROMPT]
        out = ssh(bed, "h1", shlex.join([*argv, str(max_tokens)])).stdout
        bare.append(json.loads(out.strip().splitlines()[-1])["generation_tps"])
        print(f"  single stream: mlxnode {ours[-1]:.1f}, mlx-lm {bare[-1]:.1f} tok/s",
              file=sys.stderr)  # fmt: skip
    return {
        "max_tokens": max_tokens,
        "mlxnode_tps": ours,
        "mlx_lm_tps": bare,
        "ratio": statistics.median(ours) / statistics.median(bare),
        "goal": 0.97,
    }


def long_prompt(tokens: int) -> str:
    """Plain text that the model's tokenizer reads as at least `tokens` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(real_model("q4")))
    sentence = "The river carried the boat past the mill, the bridge and the quiet fields. "
    text = sentence
    while len(tokenizer.encode(text)) < tokens:
        text += sentence
    return text


def balanced_split(model_dir: Path) -> list[int]:
    """Layers per rank (2 ranks) so that both do the same work per generated token.

    Rank 0 also projects to the vocabulary, which costs vocabulary x hidden multiply-adds,
    as many as that many parameters of layers; the layers' parameters come from the config.
    """
    c = json.loads((model_dir / "config.json").read_text())
    h, layers = c["hidden_size"], c["num_hidden_layers"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * c["intermediate_size"]
    head_layers = c["vocab_size"] * h / per_layer
    rank0 = max(1, round((layers - head_layers) / 2))
    return [rank0, layers - rank0]


def _overlap_pair(bed: Testbed, reps: int, args: list[str], measure) -> tuple[dict, bool]:
    """`args` on both hosts with --no-overlap and --overlap, alternating; `measure(result)`."""
    values: dict[str, list[float]] = {"overlap": [], "no_overlap": []}
    ids: dict[str, list] = {}
    for rep in range(reps):
        for name, flag in (("no_overlap", "--no-overlap"), ("overlap", "--overlap")):
            result = run(bed, *args, flag, hosts=2)
            assert result["metrics"]["overlap"] == (name == "overlap"), result["metrics"]
            values[name].append(measure(result))
            ids.setdefault(name, [r["token_ids"] for r in result["records"]])
        print(f"  rep {rep + 1}: --no-overlap {values['no_overlap'][-1]:.2f}, "
              f"--overlap {values['overlap'][-1]:.2f}", file=sys.stderr)  # fmt: skip
    return values, ids["overlap"] == ids["no_overlap"]


def bench_overlap_prefill(bed: Testbed, reps: int, prompt_tokens: int) -> dict:
    """Time to first token of one long prompt, pipeline over both hosts, even split."""
    path = bed.state_dir / "hosts" / "h1" / "tmp" / "long.jsonl"
    path.write_text(json.dumps({"id": 0, "prompt": long_prompt(prompt_tokens)}) + "\n")
    args = ["--model-path", MODELS["q4"], "--strategy", "pipeline", "--no-chat-template"]
    args += ["--prompts-file", "/tmp/long.jsonl", "--max-tokens", "1"]
    seen: dict = {}

    def ttft(result: dict) -> float:
        seen.update(result["metrics"])
        return result["metrics"]["ttft_seconds"]

    values, equal = _overlap_pair(bed, reps, args, ttft)
    median = {k: statistics.median(v) for k, v in values.items()}
    return {
        "split": seen["split"],
        "prompt_tokens": seen["prompt_tokens"],
        "ttft_s": values,
        "median_ttft_s": median,
        "ratio": median["overlap"] / median["no_overlap"],
        "goal": 0.6,
        "limit": 0.5,
        "token_ids_equal": equal,
    }


# Prompts whose continuation never ends early, so every row decodes to --max-tokens and the
# micro-batches stay full: decode throughput, not where each answer happens to stop.
COUNTING = [
    f"Count upward from {b}, one number per line:\n{b}\n{b + 1}\n" for b in range(100, 900, 100)
]


def bench_overlap_decode(bed: Testbed, reps: int, max_tokens: int) -> dict:
    """A batch of 8 over both hosts, split so both do equal work per token: aggregate tok/s."""
    path = bed.state_dir / "hosts" / "h1" / "tmp" / "count.jsonl"
    path.write_text(
        "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(COUNTING))
    )
    split = balanced_split(real_model("q4"))
    args = ["--model-path", MODELS["q4"], "--strategy", "pipeline", "--no-chat-template"]
    args += ["--split", ",".join(map(str, split)), "--prompts-file", "/tmp/count.jsonl"]
    args += ["--max-tokens", str(max_tokens)]
    decode: dict[str, list[float]] = {"overlap": [], "no_overlap": []}
    tokens: list[int] = []

    def aggregate(result: dict) -> float:
        m = result["metrics"]
        decode["overlap" if m["overlap"] else "no_overlap"].append(m["generation_tps"])
        tokens.append(m["generation_tokens"])
        return _aggregate(result)

    values, equal = _overlap_pair(bed, reps, args, aggregate)
    median = {k: statistics.median(v) for k, v in values.items()}
    median_decode = {k: statistics.median(v) for k, v in decode.items()}
    return {
        "batch": len(COUNTING),
        "max_tokens": max_tokens,
        "split": split,
        "generation_tokens": sorted(set(tokens)),
        "aggregate_tps": values,
        "median_aggregate_tps": median,
        "ratio": median["overlap"] / median["no_overlap"],
        "goal": 1.7,
        "decode_tps": decode,
        "median_decode_tps": median_decode,
        "decode_ratio": median_decode["overlap"] / median_decode["no_overlap"],
        "token_ids_equal": equal,
    }


def bench_memory(bed: Testbed, even: str, uneven: dict[str, str], max_tokens: int) -> dict:
    model = real_model("bfloat16")
    model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    common = ["--model-path", MODELS["bfloat16"], "--max-tokens", str(max_tokens)]
    Testbed(NAME, cpus=PINS, memory=dict.fromkeys(HOSTS, even)).up()
    single = run(bed, *common, SINGLE_PROMPT, hosts=1, check=False)
    pipeline = run(bed, *common, "--strategy", "pipeline", SINGLE_PROMPT, hosts=2, check=False)
    Testbed(NAME, cpus=PINS, memory=uneven).up()
    limits = {h: s.memory_bytes for h, s in zip(HOSTS, bed.status(), strict=True)}
    # What mlxnode_memory_weight does in the inventory: the layers split by these weights.
    weights = ",".join(str(limits[h] // 2**20) for h in HOSTS)
    weighted = run(bed, *common, "--strategy", "pipeline", "--weights", weights, SINGLE_PROMPT,
                   hosts=2, check=False)  # fmt: skip
    Testbed(NAME, cpus=PINS, memory={}).up()
    summary = {}
    for name, result in (("single_host", single), ("pipeline_even", pipeline),
                         ("pipeline_weighted", weighted)):  # fmt: skip
        entry = {"exit_code": result["exit_code"]}
        if result["exit_code"]:
            entry["error"] = result["error"]
        else:
            m = result["metrics"]
            entry["split"] = m["split"]
            entry["peak_memory_mib"] = [r["peak_memory_bytes"] / 2**20 for r in m["ranks"]]
            entry["completion"] = result["records"][0]["completion"][:80]
        summary[name] = entry
    return {
        "model": "SmolLM2-135M-Instruct bfloat16",
        "model_mib": model_bytes / 2**20,
        "even_limit": even,
        "uneven_limits": uneven,
        "weights": weights,
        **summary,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per batch prompt")
    parser.add_argument("--single-tokens", type=int, default=32)
    parser.add_argument("--memory", default="540M", help="each host's limit, both hosts")
    parser.add_argument("--uneven", default="h1=560M,h2=400M")
    parser.add_argument("--long-prompt", type=int, default=2000, help="tokens, overlap (a)")
    parser.add_argument("--batch-tokens", type=int, default=48, help="per prompt, overlap (b)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/throughput.json")
    parser.add_argument(
        "--only",
        choices=("replicas", "memory", "single_stream", "overlap_prefill", "overlap_decode"),
        action="append",
        help="measure only these phases, keeping the others' results in --out",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="use the testbed a killed run left up, as provisioned"
    )
    args = parser.parse_args(argv)
    uneven = dict(item.split("=", 1) for item in args.uneven.split(","))

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    snapshot_source(work / "src")
    bed = Testbed(NAME, hosts=len(HOSTS), subnet=SUBNET, cpus=PINS)
    try:
        reuse = args.reuse and bool(bed.status())
        if not reuse:
            bed.down()
        for host in HOSTS if reuse else ():
            bed.kill_host_processes(host, r"mlxnode (run|launch)", sig=signal.SIGKILL)
        bed.up()
        inventory = bed.write_inventory(
            work / "inventory" / "hosts.yml",
            group_vars={
                "mlxnode_model_path": MODELS["q4"],
                "mlxnode_host_source_dir": str(work / "src"),
                "mlxnode_host_wheelhouse_controller_dir": str(ROOT / "wheelhouse"),
            },
        )
        place_files(bed)
        # site.yml without its prewarm: the models are already on the hosts, by path.
        site_s = 0.0
        if not reuse:
            site_s = playbook(inventory, "provision.yml", work)[0]
            site_s += playbook(inventory, "configure.yml", work)[0]
        print(f"provision.yml + configure.yml {site_s:.1f} s", file=sys.stderr)
        pinning = {s.name: {"cpus": s.cpus, "memory_bytes": s.memory_bytes} for s in bed.status()}
        kept = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
        result = {
            **kept,
            "machine": machine(),
            "testbed": {"hosts": list(HOSTS), "pinning": pinning, "provision_s": site_s},
            "model": "SmolLM2-135M-Instruct 4-bit (tests/support/real_model.py q4)",
            "reps": args.reps,
        }
        # Each phase is saved as it ends, so a slow machine still leaves what it measured.
        for phase, measure in (
            ("replicas", lambda: bench_replicas(bed, args.reps, args.max_tokens)),
            ("memory", lambda: bench_memory(bed, args.memory, uneven, 8)),
            ("single_stream", lambda: bench_single_stream(bed, args.reps, args.single_tokens)),
            ("overlap_prefill", lambda: bench_overlap_prefill(bed, args.reps, args.long_prompt)),
            ("overlap_decode", lambda: bench_overlap_decode(bed, args.reps, args.batch_tokens)),
        ):
            if args.only and phase not in args.only:
                continue
            result[phase] = measure()
            result["machine"]["loadavg_at_end"] = os.getloadavg()
            result["seconds"] = time.monotonic() - started
            result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        bed.down()
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    rep, one, mem = r["replicas"], r["single_stream"], r["memory"]
    lines = [
        f"## Throughput, 2 testbed hosts pinned to 1 core each ({r['machine']['cpu_count']} cores)",
        "",
        "| measurement | result | goal |",
        "|---|---|---|",
        f"| 16 prompts x {rep['max_tokens']} tokens, 1 host (median of {r['reps']}) | "
        f"{rep['one_host_median_tps']:.1f} tok/s | |",
        f"| same batch, `--strategy replicas` on 2 hosts | {rep['replicas_median_tps']:.1f} tok/s"
        f" | |",
        f"| replicas / 1 host | {rep['ratio']:.2f}x | >= 1.8x |",
        f"| single stream, mlxnode / bare mlx-lm, 1 pinned host | {one['ratio']:.2f}x | >= 0.97x |",
    ]
    labels = {
        "single_host": f"1 host, {mem['even_limit']} limit",
        "pipeline_even": f"pipeline on 2 hosts, {mem['even_limit']} each",
        "pipeline_weighted": f"pipeline, {mem['uneven_limits']}, weights {mem['weights']}",
    }
    for name, label in labels.items():
        e = mem[name]
        if e["exit_code"]:
            outcome = f"refused (exit {e['exit_code']})"
        else:
            peaks = ", ".join(f"{p:.0f}" for p in e["peak_memory_mib"])
            outcome = f"runs, split {e['split']}, peak MiB {peaks}"
        lines.append(f"| {mem['model_mib']:.0f} MiB bf16 model: {label} | {outcome} | |")
    if "overlap_prefill" in r:
        pre = r["overlap_prefill"]
        lines += [
            f"| pipeline on 2 hosts (split {pre['split']}), {pre['prompt_tokens']}-token prompt: "
            f"TTFT --no-overlap / --overlap | {pre['median_ttft_s']['no_overlap']:.1f} s / "
            f"{pre['median_ttft_s']['overlap']:.1f} s | |",
            f"| overlapped / plain TTFT | {pre['ratio']:.2f}x | <= 0.6x (limit 0.5x) |",
        ]
    if "overlap_decode" in r:
        dec = r["overlap_decode"]
        lines += [
            f"| pipeline on 2 hosts (split {dec['split']}), batch of {dec['batch']} x "
            f"{dec['max_tokens']} tokens: --no-overlap / --overlap | "
            f"{dec['median_aggregate_tps']['no_overlap']:.1f} / "
            f"{dec['median_aggregate_tps']['overlap']:.1f} tok/s | |",
            f"| overlapped / plain batch tok/s (decode alone: {dec['decode_ratio']:.2f}x) | "
            f"{dec['ratio']:.2f}x | >= 1.7x |",
            f"| greedy ids identical with and without overlap | {dec['token_ids_equal']} | True |",
        ]
    lines += ["", f"took {r['seconds']:.0f} s; results in benchmarks/results/throughput.json"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
