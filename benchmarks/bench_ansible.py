"""Benchmark the Ansible layer on the 3-host namespace testbed.

1. site.yml on fresh hosts vs. a second, idempotent site.yml (target: second <= 0.3x first,
   changed=0). The controller's wheelhouse is built before the first timed run, so "first"
   measures what every new cluster pays: venv, install from the wheelhouse, ssh mesh,
   config, prewarm.
2. prewarm in direct vs. fanout mode with the Hub server rate-limited (default 20 MB/s),
   measuring the Hub's bytes and the wall time, for a pipeline split (each host fetches
   only its rank's files) and for full replicas (every host holds every file). Target:
   fanout Hub bytes = 1.0x the model; fanout wall <= 0.5x direct for 3 hosts.

Writes a Markdown table to stdout and benchmarks/results/ansible.json.

    python benchmarks/bench_ansible.py [--reps 2] [--rate 20MB] [--hidden-size 384]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, machine, now, versions, write_results

from mlxnode.formatting import format_bytes
from tests.support.hubserver import HubServer, parse_rate
from tests.support.testbed import Testbed
from tests.support.tiny_model import make_tiny_model

NAME = "mlxbench"
SUBNET = "10.213.11.0/24"
MODEL = "mlxnode-test/bench-llama"
SPLIT = [4, 2, 2]
HOSTS = ("h1", "h2", "h3")
VENV_BIN = Path(sys.executable).parent
RECAP = re.compile(r"^(\S+)\s+:\s+ok=\d+\s+changed=(\d+)\s+unreachable=\d+\s+failed=(\d+)", re.M)


def playbook(inventory: Path, name: str, work: Path, *extra: str) -> tuple[float, dict, str]:
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(work / "ansible-tmp"),
    }
    argv = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory)]
    argv += [str(ROOT / "playbooks" / name), *extra]
    started = time.monotonic()
    proc = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    seconds = time.monotonic() - started
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.stderr.write(out[-6000:])
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    changed = {m[0]: int(m[1]) for m in RECAP.findall(out)}
    return seconds, changed, out


def snapshot_source(dest: Path) -> None:
    """Copy what the mlxnode wheel is built from, so the tree can change meanwhile."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(
        ROOT / "mlxnode", dest / "mlxnode", ignore=shutil.ignore_patterns("__pycache__")
    )


def fresh_testbed() -> Testbed:
    bed = Testbed(NAME, hosts=len(HOSTS), subnet=SUBNET)
    bed.down()  # fresh hosts: empty /root, so no venv and no cache
    bed.up()
    return bed


def write_inventory(bed: Testbed, hub: HubServer, work: Path, **extra) -> Path:
    return bed.write_inventory(
        work / "inventory" / "hosts.yml",
        group_vars={
            "mlxnode_model": MODEL,
            "mlxnode_split": SPLIT,
            "mlxnode_hf_endpoint": hub.endpoint,
            "mlxnode_cache_controller_dir": str(work / "controller-cache"),
            # A snapshot of the source: edits to the tree while the benchmark runs would
            # rebuild the mlxnode wheel and make the second run look non-idempotent.
            "mlxnode_host_source_dir": str(work / "src"),
            **extra,
        },
    )


def clear_caches(bed: Testbed, work: Path) -> None:
    for host in HOSTS:
        subprocess.run(bed.ssh_command(host, "rm -rf ~/.cache/mlx_models"), check=True)
    shutil.rmtree(work / "controller-cache", ignore_errors=True)


def bench_site(hub: HubServer, work: Path, reps: int) -> dict:
    firsts, seconds, changed_second = [], [], []
    for rep in range(reps):
        bed = fresh_testbed()
        inventory = write_inventory(bed, hub, work)
        if rep == 0:
            # Warm the controller's wheelhouse once; it is reused by every later cluster.
            playbook(inventory, "provision.yml", work)
            bed = fresh_testbed()
            inventory = write_inventory(bed, hub, work)
        first, _, _ = playbook(inventory, "site.yml", work)
        second, changed, _ = playbook(inventory, "site.yml", work)
        firsts.append(first)
        seconds.append(second)
        changed_second.append(sum(changed.values()))
        print(f"  site rep {rep + 1}: first {first:.1f} s, second {second:.1f} s, "
              f"changed={sum(changed.values())}", file=sys.stderr)  # fmt: skip
    return {
        "first_s": firsts,
        "second_s": seconds,
        "second_changed": changed_second,
        "first_median_s": statistics.median(firsts),
        "second_median_s": statistics.median(seconds),
        "ratio": statistics.median(seconds) / statistics.median(firsts),
    }


def bench_prewarm(bed: Testbed, hub: HubServer, work: Path, reps: int, all_files: bool) -> dict:
    results: dict[str, dict] = {}
    for mode in ("direct", "fanout"):
        walls, hub_bytes = [], []
        inventory = write_inventory(bed, hub, work, mlxnode_cache_all_files=all_files)
        for _ in range(reps):
            clear_caches(bed, work)
            hub.stats.reset()
            wall, _, _ = playbook(
                inventory, "prewarm.yml", work, "-e", f"mlxnode_cache_mode={mode}"
            )
            walls.append(wall)
            hub_bytes.append(hub.stats.file_bytes())
        results[mode] = {
            "wall_s": walls,
            "wall_median_s": statistics.median(walls),
            "hub_bytes": hub_bytes,
            "hub_bytes_median": statistics.median(hub_bytes),
        }
        print(f"  prewarm {'replicas' if all_files else 'pipeline'} {mode}: "
              f"{statistics.median(walls):.1f} s, {format_bytes(statistics.median(hub_bytes))}",
              file=sys.stderr)  # fmt: skip
    results["wall_ratio_fanout_to_direct"] = (
        results["fanout"]["wall_median_s"] / results["direct"]["wall_median_s"]
    )
    return results


def _rsync() -> str:
    """rsync's version line: fanout mode's pushes depend on it."""
    return subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.split(
        "\n"
    )[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2, help="repetitions of each measurement")
    parser.add_argument("--prewarm-reps", type=int, default=3)
    parser.add_argument("--rate", default="20MB", help="Hub byte rate, e.g. 20MB (per second)")
    parser.add_argument("--hidden-size", type=int, default=384, help="size of the bench model")
    parser.add_argument("--out", type=Path, default=RESULTS / "ansible.json")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-ansible-"))
    snapshot_source(work / "src")
    hub_root = work / "hub"
    make_tiny_model(hub_root / MODEL, arch="llama", num_layers=8, num_shards=4,
                    hidden_size=args.hidden_size)  # fmt: skip
    model_bytes = sum(p.stat().st_size for p in (hub_root / MODEL).iterdir())
    bed = Testbed(NAME, hosts=len(HOSTS), subnet=SUBNET)
    try:
        bed.down()
        bed.up()
        with HubServer(hub_root, host=bed.controller_ip, port=0) as hub:
            print(f"model {format_bytes(model_bytes)}; site.yml x{args.reps}", file=sys.stderr)
            site = bench_site(hub, work, args.reps)
        bed = Testbed(NAME, hosts=len(HOSTS), subnet=SUBNET)
        rate = parse_rate(args.rate)
        with HubServer(
            hub_root, host=bed.controller_ip, port=0, rate_limit_bytes_per_s=rate
        ) as hub:
            prewarm = {
                "pipeline": bench_prewarm(bed, hub, work, args.prewarm_reps, all_files=False),
                "replicas": bench_prewarm(bed, hub, work, args.prewarm_reps, all_files=True),
            }
    finally:
        bed.down()
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "date": now(),
        "machine": machine(),
        "versions": {**versions("ansible-core", "mlx", "mlx-lm", "mlxnode"), "rsync": _rsync()},
        "hosts": len(HOSTS),
        "model_bytes": model_bytes,
        "hub_rate_bytes_per_s": rate,
        "split": SPLIT,
        "site": site,
        "prewarm": prewarm,
    }
    write_results(args.out, result)

    print(f"## Ansible layer, {len(HOSTS)}-host testbed ({result['machine']['cpu_count']} cores)\n")
    print("| measurement | result | target |")
    print("|---|---|---|")
    print(f"| site.yml first (median of {args.reps}) | {site['first_median_s']:.1f} s | |")
    print(f"| site.yml second | {site['second_median_s']:.1f} s, changed="
          f"{max(site['second_changed'])} | changed=0 |")  # fmt: skip
    print(f"| second / first | {site['ratio']:.2f}x | <= 0.3x |")
    for layout, res in prewarm.items():
        for mode in ("direct", "fanout"):
            r = res[mode]
            share = r["hub_bytes_median"] / model_bytes
            target = "1.0x model" if mode == "fanout" else ""
            print(
                f"| prewarm {layout} {mode} @ {args.rate}/s | {r['wall_median_s']:.1f} s, "
                f"Hub {format_bytes(r['hub_bytes_median'])} ({share:.2f}x model) | {target} |"
            )
        ratio = res["wall_ratio_fanout_to_direct"]
        print(f"| fanout / direct wall ({layout}) | {ratio:.2f}x | <= 0.5x |")
    print(f"\nmodel {format_bytes(model_bytes)}; results in {args.out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
