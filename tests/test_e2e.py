"""The Ansible layer end to end on a real 3-host testbed, with a Hub server on the bridge.

site.yml installs from the controller's wheelhouse (the hosts have no package index) and
prewarms an uneven pipeline split; run.yml generates across the three hosts with
mlx.launch and must equal single-process mlx-lm; a second site.yml changes nothing;
health.yml passes, then fails with a table once a cache file is gone; fanout fetches
every file from the Hub once. The testbed is the session's shared one (the `cluster`
fixture, tests/support/cluster.py), torn down even when a test fails; each test leaves it
as it found it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import requires

from tests.support.cluster import HOSTS, MODEL, ROOT, SPLIT, VENV_BIN, Cluster

METADATA = {
    "config.json",
    "model.safetensors.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def _shards(*numbers: int, of: int) -> set[str]:
    return {f"model-{k:05d}-of-{of:05d}.safetensors" for k in numbers}


# Written out by hand, not computed by mlxnode: tiny-llama's shard k holds layers 2k-2 and
# 2k-1, the embeddings sit in shard 1 and the final norm and head in shard 4; every rank
# needs the embeddings, only rank 0 (the last layers, the only one computing logits) the head.
NEEDED = {
    0: METADATA | _shards(1, 3, 4, of=4),  # layers 4-7
    1: METADATA | _shards(1, 2, of=4),  # layers 2-3
    2: METADATA | _shards(1, of=4),  # layers 0-1
}
# 64 layers, one a file (embeddings in file 1, head in file 64), split by memory weights
# equal to 4 significant digits: any rounding of them moves a layer, and so a file.
WIDE = "mlxnode-test/tiny-wide"
MEMORY = [34358465949, 34358546518, 34357273877]
WIDE_SPLIT = [21, 22, 21]  # rank 0 holds layers 43-63, rank 1 21-42, rank 2 0-20
WIDE_NEEDED = {
    0: METADATA | _shards(1, *range(44, 65), of=64),
    1: METADATA | _shards(1, *range(22, 44), of=64),
    2: METADATA | _shards(*range(1, 22), of=64),
}
# The real 4-bit SmolLM2 (tests.support.real_model): 30 layers over 8 files, embeddings
# with layers 0-3 in file 1, the final norm with layers 27-29 in file 8 (tied: no head).
REAL = "mlxnode-test/SmolLM2-135M-Instruct-4bit"
REAL_SPLIT = [14, 10, 6]  # rank 0 holds layers 16-29, rank 1 6-15, rank 2 0-5
REAL_NEEDED = {
    0: METADATA | {"generation_config.json"} | _shards(1, 5, 6, 7, 8, of=8),
    1: METADATA | {"generation_config.json"} | _shards(1, 2, 3, 4, 5, of=8),
    2: METADATA | {"generation_config.json"} | _shards(1, 2, of=8),
}
PROMPT = "The morning train left the station"
MAX_TOKENS = 12
LOG_LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \[Rank (\d+)/3\] (DEBUG|INFO|WARNING|ERROR) \S+: "
)

# Missing root, iproute2, sshd or rsync skips these tests, or fails them under CI.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, requires("root", "iproute2", "sshd", "rsync")]


def test_site_deploys_from_the_wheelhouse_and_prewarms_each_rank_its_files(cluster):
    play = cluster.site.check()
    print(f"\nfirst site.yml: {play.seconds:.1f} s")
    recap = play.recap()
    assert set(recap) == {"h1", "h2", "h3"} and all(r["failed"] == 0 for r in recap.values())
    for rank, host in enumerate(HOSTS):
        held = cluster.snapshot_files(host)
        assert held == NEEDED[rank], f"{host} (rank {rank}) holds {sorted(held)}"
        # Installed from the copied wheelhouse with --no-index: the hosts have no index.
        wheels = cluster.out(host, "ls ~/.mlxnode/wheelhouse")
        assert "requirements.lock" in wheels and "mlxnode-" in wheels
    assert len({frozenset(cluster.snapshot_files(h)) for h in ("h1", "h2", "h3")}) == 3
    assert "Hosts disagree" not in play.output


def test_second_site_run_changes_nothing(cluster):
    play = cluster.playbook("site.yml").check()
    print(f"\nsecond site.yml: {play.seconds:.1f} s")
    recap = play.recap()
    assert recap and all(r["changed"] == 0 for r in recap.values()), recap


def test_run_equals_single_process_mlx_lm_and_brings_back_every_rank_log(cluster):
    from mlx_lm import load
    from mlx_lm.generate import stream_generate

    run_id = "e2e-greedy"
    play = cluster.playbook(
        "run.yml",
        "-e",
        json.dumps(
            {
                "prompt": PROMPT,
                "run_id": run_id,
                "mlxnode_run_args": ["--max-tokens", str(MAX_TOKENS), "--no-chat-template"],
            }
        ),
    ).check()
    logs = cluster.work / "logs" / run_id
    (record,) = [json.loads(x) for x in (logs / "h1" / "results.jsonl").read_text().splitlines()]
    model, tokenizer = load(str(cluster.hub_root / MODEL))
    expected = [
        r.token
        for r in stream_generate(model, tokenizer, PROMPT, max_tokens=MAX_TOKENS)
        if r.finish_reason != "stop"
    ]
    assert record["token_ids"] == expected
    assert record["completion"] in play.output  # rank 0's answer is printed
    metrics = json.loads((logs / "h1" / "metrics.json").read_text())
    assert metrics["world_size"] == 3 and metrics["split"] == SPLIT
    assert [r["host"] for r in metrics["ranks"]] == ["h1", "h2", "h3"]
    for rank, host in enumerate(("h1", "h2", "h3")):
        lines = (logs / host / f"inference.rank{rank}.log").read_text().splitlines()
        assert lines and all(LOG_LINE.match(line) for line in lines), lines[:3]
        assert {int(LOG_LINE.match(line)[1]) for line in lines} == {rank}


def test_a_failed_rank_fails_the_play_and_its_logs_still_come_back(cluster):
    run_id = "e2e-bad-split"
    play = cluster.playbook(
        "run.yml",
        "-e",
        json.dumps(
            {
                "prompt": PROMPT,
                "run_id": run_id,
                # Adds up to 9 layers for an 8-layer model: every rank refuses to start.
                "mlxnode_run_args": ["--max-tokens", "2", "--split", "5,2,2"],
            }
        ),
    )
    assert play.rc != 0
    logs = cluster.work / "logs" / run_id
    assert (logs / "h1" / "launcher.stderr.log").is_file()
    for rank, host in enumerate(("h1", "h2", "h3")):
        assert (logs / host / f"inference.rank{rank}.log").is_file(), sorted(logs.rglob("*"))

    # After a crash the logs can be fetched again: the newest run, with no run id given.
    shutil.rmtree(logs)
    cluster.playbook("collect_logs.yml").check()
    for rank, host in enumerate(("h1", "h2", "h3")):
        assert (logs / host / f"inference.rank{rank}.log").is_file(), sorted(logs.rglob("*"))


def test_health_passes_then_names_what_a_host_lacks(cluster, tmp_path):
    """A missing file, and memory: the facts report the machine's, a cgroup leaves h2 less."""
    from tests.support.testbed import Testbed

    play = cluster.playbook("health.yml").check()
    assert "All 3 hosts are ready" in play.output
    missing = sorted(f for f in NEEDED[1] if f.endswith(".safetensors"))[0]
    rank_bytes = sum((cluster.hub_root / MODEL / f).stat().st_size for f in NEEDED[1])
    cluster.ssh("h2", f"rm ~/.cache/mlx_models/*/snapshots/*/{missing}")
    # Each rank must have 4 GiB free: h1 and h3 have the machine's, h2 is capped at 1 GiB.
    Testbed(cluster.bed.name, memory={"h2": "1G"}).up()
    try:
        play = cluster.playbook(
            "health.yml",
            "-e", f"mlxnode_cache_health_memory_factor={4 * 2**30 / rank_bytes}",
            # Fresh ssh connections: the open ones were forked outside the new cgroup.
            "-e", f"ansible_control_path_dir={tmp_path / 'cp'}",
        )  # fmt: skip
        assert play.rc != 0 and "Not ready: h2" in play.output, play.output[-3000:]
        row = next(line for line in play.output.splitlines() if line.strip().startswith("h2 "))
        assert " NO " in row and f"missing {missing}" in row
        free = re.search(r"free memory ([\d.]+) (MiB|GiB) < 4\.0 GiB", row)
        assert free and (free[2] == "MiB" or float(free[1]) <= 1.0), row
        assert re.search(r"^\s*h1\s+0\s+yes\s", play.output, re.M)
    finally:
        Testbed(cluster.bed.name, memory={"h2": "64G"}).up()
        cluster.playbook("prewarm.yml").check()


@contextmanager
def _stray_configs(cluster: Cluster) -> Iterator[None]:
    """A config.yaml in each host's home directory (where Ansible runs commands), not ours."""
    strays = {
        "h1": "server:\n  port: 8080\n",  # another tool's: mlxnode would refuse it, exit 2
        "h2": "distributed:\n  split: [1, 1, 6]\n",  # would move rank 1's layers
        "h3": "distributed:\n  strategy: tensor\n",  # would fetch every file
    }
    for host, text in strays.items():
        cluster.ssh(host, f"printf '{text}' > ~/config.yaml")
    try:
        yield
    finally:
        for host in strays:
            cluster.ssh(host, "rm -f ~/config.yaml")


def test_a_stray_config_yaml_in_the_home_directory_is_never_read(cluster):
    with _stray_configs(cluster):
        cluster.forget()
        cluster.playbook("prewarm.yml").check()
        for rank, host in enumerate(HOSTS):
            assert cluster.snapshot_files(host) == NEEDED[rank], host
        assert "All 3 hosts are ready" in cluster.playbook("health.yml").check().output


def test_memory_weights_give_the_prewarm_and_the_run_the_same_split(cluster):
    from tests.support.tiny_model import make_tiny_model

    make_tiny_model(cluster.hub_root / WIDE, arch="llama", num_layers=64, num_shards=64)
    layout = (
        "-e",
        json.dumps({"mlxnode_model": WIDE, "mlxnode_split": [], "mlxnode_weights": MEMORY}),
    )
    try:
        cluster.playbook("configure.yml", *layout).check()
        for mode in ("direct", "fanout"):
            cluster.forget(WIDE)
            cluster.playbook("prewarm.yml", *layout, "-e", f"mlxnode_cache_mode={mode}").check()
            for rank, host in enumerate(HOSTS):
                held = cluster.snapshot_files(host, WIDE)
                assert held == WIDE_NEEDED[rank], (mode, host, sorted(held ^ WIDE_NEEDED[rank]))
        # Offline, as every run is: it needs exactly the files the prewarm fetched.
        run_id = "e2e-memory-weights"
        extra = {
            "prompt": PROMPT,
            "run_id": run_id,
            "mlxnode_run_args": ["--max-tokens", "4", "--no-chat-template"],
        }
        cluster.playbook("run.yml", "-e", json.dumps(extra)).check()
        metrics = json.loads((cluster.work / "logs" / run_id / "h1" / "metrics.json").read_text())
        assert metrics["split"] == WIDE_SPLIT
    finally:
        cluster.playbook("configure.yml").check()
        cluster.forget(WIDE)


def test_a_real_4_bit_checkpoint_through_run_yml_equals_single_process_mlx_lm(cluster):
    """The real-checkpoint matrix's cell that goes through the whole Ansible path."""
    from mlx_lm import load
    from mlx_lm.generate import stream_generate

    from tests.support.real_model import real_model

    if not (cluster.hub_root / REAL).exists():
        shutil.copytree(real_model("q4"), cluster.hub_root / REAL)
    layout = ("-e", json.dumps({"mlxnode_model": REAL, "mlxnode_split": REAL_SPLIT}))
    question = "What is the capital of France?"
    try:
        cluster.playbook("configure.yml", *layout).check()
        cluster.playbook("prewarm.yml", *layout).check()
        for rank, host in enumerate(HOSTS):
            held = cluster.snapshot_files(host, REAL)
            assert held == REAL_NEEDED[rank], (host, sorted(held ^ REAL_NEEDED[rank]))
        run_id = "e2e-real-checkpoint"
        extra = {
            "prompt": question,
            "run_id": run_id,
            "mlxnode_run_args": ["--max-tokens", str(MAX_TOKENS)],  # chat template on
        }
        play = cluster.playbook("run.yml", "-e", json.dumps(extra)).check()
        logs = cluster.work / "logs" / run_id
        (record,) = [
            json.loads(x) for x in (logs / "h1" / "results.jsonl").read_text().split("\n") if x
        ]
        model, tokenizer = load(str(cluster.hub_root / REAL))
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True
        )
        expected = [
            r.token
            for r in stream_generate(model, tokenizer, ids, max_tokens=MAX_TOKENS)
            if r.finish_reason != "stop"
        ]
        assert record["token_ids"] == expected
        assert "Paris" in record["completion"] and record["completion"] in play.output
        metrics = json.loads((logs / "h1" / "metrics.json").read_text())
        assert metrics["split"] == REAL_SPLIT and metrics["implementation"] == (
            "mlxnode generic pipeline"
        )
    finally:
        cluster.playbook("configure.yml").check()
        cluster.forget(REAL)


def test_fanout_fetches_every_file_from_the_hub_once(cluster):
    cluster.forget()
    shutil.rmtree(cluster.work / "controller-cache", ignore_errors=True)
    cluster.hub.stats.reset()
    with _stray_configs(cluster):
        play = cluster.playbook("prewarm.yml", "-e", "mlxnode_cache_mode=fanout").check()
    repo = cluster.hub_root / MODEL
    for path in repo.iterdir():
        assert cluster.hub.stats.file_gets(f"*/{path.name}") == 1, path.name
    total = sum(p.stat().st_size for p in repo.iterdir())
    assert cluster.hub.stats.file_bytes() == total
    for rank, host in enumerate(HOSTS):
        assert cluster.snapshot_files(host) == NEEDED[rank]
    assert "fanout mode" in play.output
    # A rerun pushes nothing.
    again = cluster.playbook("prewarm.yml", "-e", "mlxnode_cache_mode=fanout").check()
    assert all(r["changed"] == 0 for r in again.recap().values())


def test_fanout_takes_a_commit_as_the_revision(cluster):
    pinned = ("-e", f"mlxnode_model_revision={cluster.hub.commit_sha(MODEL)}")
    cluster.forget()
    try:
        cluster.playbook("configure.yml", *pinned).check()
        cluster.playbook("prewarm.yml", *pinned, "-e", "mlxnode_cache_mode=fanout").check()
        for rank, host in enumerate(HOSTS):
            assert cluster.snapshot_files(host) == NEEDED[rank]
            # A commit names itself: no ref is written, or pushed.
            assert cluster.out(host, "ls ~/.cache/mlx_models/*/refs 2>/dev/null || true") == ""
        assert "All 3 hosts are ready" in cluster.playbook("health.yml", *pinned).check().output
    finally:
        cluster.playbook("configure.yml").check()
        cluster.playbook("prewarm.yml").check()  # `main` points at the commit again


@pytest.mark.skipif(not (VENV_BIN / "molecule").exists(), reason="molecule is not installed")
# Each scenario converges, converges again expecting changed=0 (not mlxnode_run: every
# converge is a new run) and verifies. All four take about 5 minutes on a busy 2-core
# machine, so the default suite runs mlxnode_cache's (its verify checks each rank's files);
# site.yml above already converges mlxnode_host and mlxnode_config twice. `-m molecule`
# runs the other three.
@pytest.mark.parametrize(
    "role",
    [
        "mlxnode_cache",
        pytest.param("mlxnode_host", marks=pytest.mark.molecule),
        pytest.param("mlxnode_config", marks=pytest.mark.molecule),
        pytest.param("mlxnode_run", marks=pytest.mark.molecule),
    ],
)
def test_molecule_scenario(cluster, role):
    env = {
        **os.environ,
        "MLXNODE_INVENTORY": str(cluster.inventory),
        "MLXNODE_SOURCE_DIR": str(cluster.work / "src"),
        "ANSIBLE_NOCOLOR": "1",
        "NO_COLOR": "1",
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(
        [str(VENV_BIN / "molecule"), "test"],
        cwd=ROOT / "roles" / role,
        env=env,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]
