"""One provisioned 3-host testbed for the whole test session, and the ways tests drive it.

`provisioned` brings up a testbed of its own (name and subnet), a Hub server on its bridge
(with a gated repo that needs `TOKEN`), and runs site.yml once from a snapshot of the tree.
The Ansible end-to-end tests and the reliability tests share it (the `cluster` fixture in
tests/conftest.py): each test leaves the cluster as it found it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from secrets import token_hex

from .hubserver import GATED_MARKER, HubServer
from .testbed import Testbed
from .tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
HOSTS = ("h1", "h2", "h3")
MODEL = "mlxnode-test/tiny-llama"
SPLIT = [4, 2, 2]  # uneven on purpose: rank 0 holds layers 4-7, rank 1 2-3, rank 2 0-1
GATED = "mlxnode-test/tiny-gated"
# New each session, so a file left by an earlier session can never be mistaken for a leak.
TOKEN = f"hf_mlxrel{token_hex(16)}"
CACHE_DIR = "/root/.cache/mlx_models"
PROMPT = "The morning train left the station"
# Long enough that a run is still generating when a fault hits it (the model allows 8192).
LONG = 4000
RING_PORT = 32323  # mlx.launch's default; rank r listens on RING_PORT + r
RUNS_DIR = "/root/.mlxnode/runs"
LOCK = "/root/.mlxnode/cluster.lock"  # the launcher's one lock (never unlinked)


@dataclass
class Play:
    """A finished ansible-playbook: exit code, output (stdout and stderr), wall time."""

    rc: int
    output: str
    seconds: float

    def check(self) -> Play:
        assert self.rc == 0, self.output[-8000:]
        return self

    def failure(self) -> str:
        """The play's failure message, with Ansible's line wrapping undone."""
        assert self.rc != 0, self.output[-4000:]
        return " ".join(self.output.split())

    def recap(self) -> dict[str, dict[str, int]]:
        return {
            m[0]: {"ok": int(m[1]), "changed": int(m[2]), "unreachable": int(m[3]),
                   "failed": int(m[4])}
            for m in _RECAP.findall(self.output)
        }  # fmt: skip


class Running:
    """An ansible-playbook started in the background."""

    def __init__(self, proc: subprocess.Popen, log: Path, started: float):
        self.proc, self.log, self.started = proc, log, started

    def wait(self, timeout: float = 600) -> Play:
        self.proc.wait(timeout=timeout)
        return Play(self.proc.returncode, self.log.read_text(), time.monotonic() - self.started)


@dataclass
class Cluster:
    bed: Testbed
    hub: HubServer
    hub_root: Path
    inventory: Path
    work: Path
    site: Play | None = None  # the first site.yml, run when the cluster was provisioned

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def playbook(self, name: str, *extra: str, timeout: float = 600) -> Play:
        argv, env = self._argv_env(name, extra)
        started = time.monotonic()
        proc = subprocess.run(
            argv,
            cwd=ROOT,
            env=env,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=timeout,
        )
        return Play(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started)

    def start(self, name: str, *extra: str, log: str) -> Running:
        """`playbook` in the background, its output going to `<work>/<log>.out`."""
        argv, env = self._argv_env(name, extra)
        path = self.work / f"{log}.out"
        with path.open("w") as out:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return Running(proc, path, time.monotonic())

    def _argv_env(self, name: str, extra: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
        argv = [str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory)]
        argv += [str(ROOT / "playbooks" / name), *extra]
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_LOCAL_TEMP": str(self.work / "ansible-tmp"),
        }
        return argv, env

    def ssh(
        self, host: str, command: str, *, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            self.bed.ssh_command(host, command), capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert proc.returncode == 0, f"{host}: {command}: {proc.stderr}"
        return proc

    def out(self, host: str, command: str) -> str:
        """The stdout of `command` on `host`, which must succeed."""
        return self.ssh(host, command).stdout

    def snapshot_files(self, host: str, model: str = MODEL) -> set[str]:
        folder = model.replace("/", "--")
        listing = self.out(host, f"ls {CACHE_DIR}/{folder}/snapshots/*/ 2>/dev/null || true")
        return set(listing.split())

    def forget(self, model: str = MODEL) -> None:
        """Delete `model` from every host's cache."""
        for host in HOSTS:
            self.ssh(host, f"rm -rf {CACHE_DIR}/{model.replace('/', '--')}")

    # -- runs through run.yml

    def run_vars(self, run_id: str, *args: str, max_tokens: int = 8) -> tuple[str, ...]:
        extra = {
            "prompt": PROMPT,
            "run_id": run_id,
            "mlxnode_run_args": ["--max-tokens", str(max_tokens), "--no-chat-template", *args],
        }
        return ("-e", json.dumps(extra))

    def run(self, run_id: str, *args: str, max_tokens: int = 8, verbose: bool = False) -> Play:
        extra = self.run_vars(run_id, *args, max_tokens=max_tokens)
        return self.playbook("run.yml", *extra, *(["-vvv"] if verbose else []))

    def start_run(self, run_id: str, *args: str, max_tokens: int = LONG) -> Running:
        return self.start(
            "run.yml", *self.run_vars(run_id, *args, max_tokens=max_tokens), log=run_id
        )

    def generating(self, run_id: str) -> bool:
        """Rank 0 has streamed answer text: every rank is past loading and in generation."""
        out = self.ssh(
            "h1", f"cat {RUNS_DIR}/{run_id}/launcher.stdout.log 2>/dev/null", check=False
        ).stdout
        marker = out.rfind("waiting for the other ranks")
        return marker >= 0 and len(out[marker:].split("\n", 1)[-1].strip()) >= 5

    def leftovers(self) -> dict[str, str]:
        """Per host: ranks (of a run or a server) still running, ring ports still listening,
        the lock still held."""
        ports = f"sport >= :{RING_PORT} and sport <= :{RING_PORT + len(HOSTS) - 1}"
        found = {}
        for host in HOSTS:
            out = self.ssh(
                host,
                f"pgrep -af '[m]lxnode (run|serve)'; ss -Htln '( {ports} )'; "
                f"test -e {LOCK} && ! flock -n {LOCK} true && echo 'lock held: {LOCK}'",
                check=False,
            ).stdout.strip()
            if out:
                found[host] = out
        return found

    def assert_nothing_started(self, run_id: str) -> None:
        """No rank of `run_id` runs, or ever wrote its log, on any host."""
        for host in HOSTS:
            out = self.ssh(
                host,
                f"pgrep -af '[m]lxnode run --run-id {run_id}'; "
                f"ls {RUNS_DIR}/{run_id}/inference.rank*.log 2>/dev/null",
                check=False,
            ).stdout.strip()
            assert out == "", f"{host}: {out}"

    def rank_logs(self, run_id: str) -> dict[str, Path]:
        return {
            host: self.logs / run_id / host / f"inference.rank{rank}.log"
            for rank, host in enumerate(HOSTS)
        }

    def weight_file(self, rank: int, model: str = MODEL, split=SPLIT) -> str:
        """The first weight file `rank` needs, as a (glob) path on its host."""
        from mlxnode.sharding import files_for_layers

        index = json.loads((self.hub_root / model / "model.safetensors.index.json").read_text())
        start = sum(split[:rank])
        name = sorted(files_for_layers(index["weight_map"], start, start + split[rank]))[0]
        return f"{CACHE_DIR}/{model.replace('/', '--')}/snapshots/*/{name}"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `predicate` held; fails the test after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.3)
    return time.monotonic() - started


@contextmanager
def provisioned(work: Path, name: str, subnet: str) -> Iterator[Cluster]:
    """A testbed `name` on `subnet`, its Hub server, and site.yml run once; torn down after."""
    # Build the wheel from a snapshot: edits to the tree during the session would otherwise
    # rebuild it and make the idempotence checks fail for the wrong reason.
    source = work / "src"
    source.mkdir()
    for file in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / file, source / file)
    shutil.copytree(
        ROOT / "mlxnode", source / "mlxnode", ignore=shutil.ignore_patterns("__pycache__")
    )
    hub_root = work / "hub"
    # Long enough a context that a run is still generating when a fault hits it.
    make_tiny_model(
        hub_root / MODEL, arch="llama", num_layers=8, num_shards=4, max_position_embeddings=8192
    )
    make_tiny_model(hub_root / GATED, arch="llama", num_layers=4, num_shards=2)
    (hub_root / GATED / GATED_MARKER).touch()
    bed = Testbed(name, hosts=len(HOSTS), subnet=subnet)
    bed.down()  # whatever an interrupted earlier run left behind
    try:
        bed.up()
        with HubServer(hub_root, host=bed.controller_ip, port=0, token=TOKEN) as hub:
            inventory = work / "inventory" / "hosts.yml"
            bed.write_inventory(
                inventory,
                group_vars={
                    "mlxnode_model": MODEL,
                    "mlxnode_split": SPLIT,
                    "mlxnode_strategy": "pipeline",
                    "mlxnode_hf_endpoint": hub.endpoint,
                    "mlxnode_cache_controller_dir": str(work / "controller-cache"),
                    "mlxnode_run_logs_dir": str(work / "logs"),
                    "mlxnode_host_source_dir": str(source),
                },
            )
            cluster = Cluster(bed, hub, hub_root, inventory, work)
            cluster.site = cluster.playbook("site.yml", timeout=900)
            yield cluster
    finally:
        bed.down()


_RECAP = re.compile(
    r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M
)
