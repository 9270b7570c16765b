"""The model cache against a real local Hub and the real huggingface_hub client.

No mocks of the Hub client: failures come from the server's fault injection, CLI
behaviour from real `mlxnode` subprocesses, crashes from real SIGKILLs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from filelock import FileLock
from mlx_lm.utils import load_model

from mlxnode import sharding
from mlxnode.cache import ModelCacheManager, RankSpec
from mlxnode.cache import hub as cache_hub
from mlxnode.cache import progress as cache_progress
from mlxnode.cache.layout import ModelPaths, validate_repo_id, validate_revision
from mlxnode.config import load_config
from mlxnode.errors import CacheError, ModelDownloadError, UsageError

# Published by the `hub` fixture in conftest.py.
TINY_LLAMA = "mlxnode-test/tiny-llama"
TINY_QWEN2 = "mlxnode-test/tiny-qwen2"
TINY_SINGLE = "mlxnode-test/tiny-single"
TINY_GATED = "mlxnode-test/tiny-gated"
HUB_TOKEN = "hf_mlxnodeTestToken0123456789abcdef"
SHARDS = [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
METADATA = [
    "config.json",
    "model.safetensors.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
]
# tiny-llama's layout: shard k holds layers 2k-2 and 2k-1; the embeddings sit in the
# first shard, the final norm and lm_head in the last.
SHARD_LAYERS = {SHARDS[k]: {2 * k, 2 * k + 1} for k in range(4)}
EMBEDDING_SHARD, HEAD_SHARD = SHARDS[0], SHARDS[3]
NON_LAYER_SHARDS = {EMBEDDING_SHARD, HEAD_SHARD}
# One layer a file (embeddings with layer 0 in the first, the head with the last layer in the
# last), published by `fine_grained`: the layout where a rank's slack is easiest to see.
TINY_FINE = "mlxnode-test/tiny-fine"
FINE_LAYERS = 12


@pytest.fixture
def hub(hub):
    """The session Hub, with faults and counters reset around each test."""
    hub.faults.clear()
    hub.stats.reset()
    yield hub
    hub.faults.clear()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def manager(hub, cache_dir: Path) -> ModelCacheManager:
    return _manager(hub, cache_dir)


def _manager(hub, cache_dir: Path, **kwargs) -> ModelCacheManager:
    options = dict(
        endpoint=hub.endpoint, max_retries=3, backoff_base=0.01, lock_timeout=10, progress=False
    )
    return ModelCacheManager(cache_dir, **{**options, **kwargs})


def _cli(hub, cache_dir: Path, *args: str, env: dict | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "mlxnode", "cache", *args],
        env=_cli_env(hub, cache_dir, env),
        cwd=cache_dir.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _cli_env(hub, cache_dir: Path, extra: dict | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "MLXNODE_CACHE_DIR": str(cache_dir),
        "MLXNODE_CACHE_BACKOFF_BASE": "0.01",
        "MLXNODE_CACHE_MAX_RETRIES": "3",
        **(extra or {}),
    }


def _expected_shards(start: int, end: int) -> set[str]:
    """Embeddings for every rank, the head only for the one holding the last layer."""
    non_layer = {EMBEDDING_SHARD} | ({HEAD_SHARD} if end == 8 else set())
    return non_layer | {f for f, layers in SHARD_LAYERS.items() if layers & {*range(start, end)}}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hub_file(hub, repo: str, name: str) -> Path:
    return hub.root / repo / name


def _weights(files: list[str]) -> set[str]:
    return {f for f in files if f.endswith(".safetensors")}


def _flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- which files each rank gets


def test_tiny_llama_has_the_layout_these_tests_assume(hub):
    index = json.loads(_hub_file(hub, TINY_LLAMA, "model.safetensors.index.json").read_text())
    for key, shard in index["weight_map"].items():
        layer = sharding.layer_of_key(key)
        assert layer in SHARD_LAYERS[shard] if layer is not None else shard in NON_LAYER_SHARDS


@pytest.mark.parametrize(
    ("world_size", "split", "weights"),
    [
        (2, None, None),
        (3, None, None),
        (4, None, None),
        (2, [5, 3], None),
        (2, [1, 7], None),
        (3, [1, 6, 1], None),
        (4, [1, 1, 1, 5], None),
        (2, None, [3, 1]),
    ],
)
def test_pipeline_rank_fetches_only_its_files(hub, tmp_path, world_size, split, weights):
    counts = sharding.resolve_split(8, world_size, split=split, weights=weights)
    for rank in range(world_size):
        hub.stats.reset()
        model = _manager(hub, tmp_path / f"rank{rank}").ensure_model(
            TINY_LLAMA,
            RankSpec(
                ranks=[rank],
                world_size=world_size,
                strategy="pipeline",
                split=split,
                weights=weights,
            ),
        )
        start, end = sharding.layer_range(8, rank, world_size, split=counts)
        expected = _expected_shards(start, end)
        assert _weights(model.files) == expected, (rank, start, end)
        assert set(model.fetched_files) == set(METADATA) | expected
        assert hub.stats.file_bytes(f"{TINY_LLAMA}/*.safetensors") == sum(
            _hub_file(hub, TINY_LLAMA, f).stat().st_size for f in expected
        )
        assert sorted(p.name for p in model.path.iterdir()) == sorted(METADATA + [*expected])


@pytest.fixture
def fine_grained(hub) -> str:
    from tests.support.tiny_model import make_tiny_model

    if not (hub.root / TINY_FINE).exists():  # the Hub lives for the session
        make_tiny_model(
            hub.root / TINY_FINE, arch="llama", num_layers=FINE_LAYERS, num_shards=FINE_LAYERS
        )
    return TINY_FINE


def test_a_middle_rank_fetches_its_layers_the_embeddings_and_at_most_one_file_more(
    hub, tmp_path, fine_grained
):
    """Logits once: no rank but rank 0 fetches the head (final norm, lm_head)."""
    index = json.loads(_hub_file(hub, fine_grained, "model.safetensors.index.json").read_text())
    files = [_hub_file(hub, fine_grained, name) for name in set(index["weight_map"].values())]
    tensors = {k: v.nbytes for f in files for k, v in mx.load(str(f)).items()}  # key -> bytes
    largest_file = max(f.stat().st_size for f in files)
    start, end = sharding.layer_range(FINE_LAYERS, 1, 3)
    share = sum(n for k, n in tensors.items() if sharding.layer_of_key(k) in range(start, end))
    embeddings = sum(n for k, n in tensors.items() if k.startswith("model.embed_tokens."))

    model = _manager(hub, tmp_path / "rank1").ensure_model(
        fine_grained, RankSpec(ranks=[1], world_size=3, strategy="pipeline")
    )
    fetched = hub.stats.file_bytes(f"{fine_grained}/*.safetensors")
    assert fetched <= share + embeddings + largest_file, (fetched, share, embeddings)
    head_file = index["weight_map"]["lm_head.weight"]
    assert head_file not in model.files
    # The rank holding the last layers still gets the head.
    last = _manager(hub, tmp_path / "rank0").ensure_model(
        fine_grained, RankSpec(ranks=[0], world_size=3, strategy="pipeline")
    )
    assert head_file in last.files


def test_ranks_on_one_host_get_the_union(manager):
    model = manager.ensure_model(
        TINY_LLAMA, RankSpec(ranks=[0, 2], world_size=4, strategy="pipeline")
    )
    # rank 0: layers 6-7 (shards 1, 4); rank 2: layers 2-3 (+ shard 2).
    assert _weights(model.files) == {SHARDS[0], SHARDS[1], SHARDS[3]}


@pytest.mark.parametrize("strategy", ["tensor", "auto"])
def test_tensor_and_auto_fetch_every_weight_file(manager, strategy):
    model = manager.ensure_model(TINY_LLAMA, RankSpec(ranks=[1], world_size=2, strategy=strategy))
    assert _weights(model.files) == set(SHARDS)


def test_all_files_fetches_everything_even_for_a_pipeline_rank(manager, hub):
    model = manager.ensure_model(
        TINY_LLAMA, RankSpec(ranks=[0], world_size=4, strategy="pipeline", all_files=True)
    )
    published = sorted(p.name for p in (hub.root / TINY_LLAMA).iterdir())
    assert sorted(model.files) == published


def test_single_file_model_gives_every_rank_the_one_file(hub, tmp_path):
    for rank in range(2):
        model = _manager(hub, tmp_path / f"r{rank}").ensure_model(
            TINY_SINGLE, RankSpec(ranks=[rank], world_size=2, strategy="pipeline")
        )
        assert _weights(model.files) == {"model.safetensors"}


@pytest.mark.parametrize("repo", [TINY_LLAMA, TINY_QWEN2, TINY_SINGLE])
def test_layer_count_is_what_mlx_lm_builds_from_the_snapshot(manager, repo):
    model = manager.ensure_model(repo)
    plan = manager.plan(repo)
    loaded, _ = load_model(model.path, lazy=True, strict=False)
    assert plan.plan.num_layers == len(loaded.model.layers)


def test_fetch_metadata_fetches_no_weights(manager, hub):
    path = manager.fetch_metadata(TINY_LLAMA)
    assert sorted(p.name for p in path.iterdir()) == METADATA
    assert hub.stats.file_gets("*.safetensors") == 0


def test_second_prewarm_fetches_nothing(manager, hub):
    first = manager.ensure_model(TINY_LLAMA, RankSpec(ranks=[1], world_size=2, strategy="pipeline"))
    hub.stats.reset()
    again = manager.ensure_model(TINY_LLAMA, RankSpec(ranks=[1], world_size=2, strategy="pipeline"))
    assert first.fetched_files and again.fetched_files == [] and again.fetched_bytes == 0
    assert hub.stats.file_gets() == 0 and hub.stats.file_heads() == 0
    assert again.path == first.path and again.files == first.files


def test_a_pinned_commit_needs_no_hub_once_cached(manager, hub):
    commit = hub.commit_sha(TINY_SINGLE)
    first = manager.ensure_model(TINY_SINGLE, revision=commit)
    hub.stats.reset()
    again = manager.ensure_model(TINY_SINGLE, revision=commit)
    assert again.commit == first.commit == commit and hub.stats.count() == 0


def test_metadata_records_commit_sizes_hashes_and_prewarm(manager, hub, cache_dir):
    model = manager.ensure_model(TINY_LLAMA, RankSpec(ranks=[0], world_size=2, strategy="pipeline"))
    paths = ModelPaths(cache_dir, TINY_LLAMA)
    assert model.commit == hub.commit_sha(TINY_LLAMA)
    assert paths.ref("main").read_text().strip() == model.commit
    data = json.loads(paths.metadata.read_text())
    assert data["repo_id"] == TINY_LLAMA and data["last_used"] > 0
    files = data["commits"][model.commit]["files"]
    for name in model.files:
        source = _hub_file(hub, TINY_LLAMA, name)
        assert files[name]["size"] == source.stat().st_size
        assert files[name]["sha256"] == _sha256(source), name
    (record,) = data["commits"][model.commit]["prewarmed"]
    assert record["ranks"] == [0] and record["world_size"] == 2
    assert record["strategy"] == "pipeline" and record["split"] == [4, 4]
    assert not list(paths.root.rglob("*.tmp"))


def test_local_dir_is_used_in_place(hub, tmp_path):
    from mlxnode.cache import local_model

    model = local_model(hub.root / TINY_SINGLE)
    assert model.path == hub.root / TINY_SINGLE and "model.safetensors" in model.files
    with pytest.raises(CacheError, match="not a model directory"):
        local_model(tmp_path)


# -- retries


def test_get_503_twice_then_success(manager, hub):
    hub.faults.add(f"*/{SHARDS[1]}", "status", status=503, times=2)
    model = manager.ensure_model(TINY_LLAMA)
    assert hub.stats.file_gets(f"*/{SHARDS[1]}") == 3
    assert _sha256(model.path / SHARDS[1]) == _sha256(_hub_file(hub, TINY_LLAMA, SHARDS[1]))


def test_head_503_is_left_to_huggingface_hub(manager, hub, caplog):
    hub.faults.add(f"*/{SHARDS[0]}", "status", status=503, times=2, methods=("HEAD",))
    with caplog.at_level(logging.WARNING, logger="mlxnode"):
        manager.ensure_model(TINY_LLAMA)
    # One plain HEAD, then huggingface_hub's own retry loop; ours never re-ran it.
    assert hub.stats.file_heads(f"*/{SHARDS[0]}") == 3
    assert not [r for r in caplog.records if r.name == "mlxnode.cache.hub"]


def test_model_info_429_waits_retry_after(manager, hub):
    hub.faults.add("/api/models/*", "status", status=429, retry_after=1, api=True, times=1)
    started = time.monotonic()
    manager.ensure_model(TINY_SINGLE)
    assert time.monotonic() - started >= 1.0
    # model_info only (snapshot_download also lists the commit's tree, under /tree/).
    assert hub.stats.count("/api/models/*/revision/*") == 2


def test_retry_after_is_capped(manager, hub, monkeypatch):
    monkeypatch.setattr(cache_hub, "RETRY_AFTER_CAP", 0.2)
    hub.faults.add("/api/models/*", "status", status=503, retry_after=3600, api=True, times=1)
    started = time.monotonic()
    manager.ensure_model(TINY_SINGLE)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("rst", [True, False], ids=["tcp-reset", "cut-off-body"])
def test_connection_reset_mid_body_then_success(manager, hub, rst):
    hub.faults.add(f"*/{SHARDS[2]}", "reset", rst=rst, times=1)
    model = manager.ensure_model(TINY_LLAMA)
    assert hub.stats.file_gets(f"*/{SHARDS[2]}") == 2
    assert _sha256(model.path / SHARDS[2]) == _sha256(_hub_file(hub, TINY_LLAMA, SHARDS[2]))


def test_retries_are_bounded(hub, cache_dir):
    hub.faults.add(f"*/{SHARDS[1]}", "status", status=503, times=None)
    with pytest.raises(ModelDownloadError) as excinfo:
        _manager(hub, cache_dir, max_retries=2).ensure_model(TINY_LLAMA)
    error = excinfo.value
    assert error.status == 503 and error.filename == SHARDS[1]
    assert SHARDS[1] in str(error) and "after 3 attempts" in str(error)
    assert hub.stats.file_gets(f"*/{SHARDS[1]}") == 3
    assert not list((ModelPaths(cache_dir, TINY_LLAMA).root / "snapshots").glob(f"*/{SHARDS[1]}"))


def test_unreachable_hub_fails_clearly_then_falls_back_to_cache(manager, hub, cache_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    offline_hub = ModelCacheManager(cache_dir, endpoint=dead, max_retries=1, backoff_base=0.01)
    with pytest.raises(ModelDownloadError, match="after 2 attempts: ConnectError"):
        offline_hub.ensure_model(TINY_SINGLE)
    cached = manager.ensure_model(TINY_SINGLE)
    assert offline_hub.ensure_model(TINY_SINGLE).path == cached.path


def test_wrong_bytes_from_the_hub_are_never_visible(hub, cache_dir):
    """The server keeps its recorded sha256 but serves a changed byte: a corrupted transfer."""
    repo = "mlxnode-test/tiny-corrupt"
    shutil.copytree(hub.root / TINY_SINGLE, hub.root / repo)
    try:
        hub.commit_sha(repo)  # the server hashes the files now ...
        served = hub.root / repo / "model.safetensors"
        stat = served.stat()
        _flip_byte(served, offset=stat.st_size // 2)
        os.utime(served, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and never again
        with pytest.raises(ModelDownloadError, match=r"model\.safetensors.*sha256"):
            _manager(hub, cache_dir, max_retries=1).ensure_model(repo)
        assert hub.stats.file_gets(f"{repo}/model.safetensors") == 2
        assert not list(cache_dir.rglob("snapshots/*/model.safetensors"))
    finally:
        shutil.rmtree(hub.root / repo)


# -- errors that are not retried


def test_gated_repo_fails_fast_and_says_set_hf_token(manager, hub, cache_dir):
    started = time.monotonic()
    with pytest.raises(ModelDownloadError) as excinfo:
        manager.ensure_model(TINY_GATED)
    assert time.monotonic() - started < 2
    assert excinfo.value.status == 401 and "HF_TOKEN" in str(excinfo.value)
    assert "hf auth login" in str(excinfo.value)
    assert hub.stats.count("/api/models/*") == 1

    wrong = "hf_wrongTokenWrongToken0123456789"
    with pytest.raises(ModelDownloadError) as excinfo:
        _manager(hub, cache_dir, token=wrong).ensure_model(TINY_GATED)
    assert excinfo.value.status == 403 and wrong not in str(excinfo.value)

    model = _manager(hub, cache_dir, token=HUB_TOKEN).ensure_model(TINY_GATED)
    assert (model.path / "config.json").is_file()


def test_missing_repo_revision_and_file_are_named(manager, hub):
    with pytest.raises(ModelDownloadError, match="repository mlxnode-test/nope not found") as e:
        manager.ensure_model("mlxnode-test/nope")
    assert e.value.status == 404
    with pytest.raises(ModelDownloadError, match="revision 'v9' not found in") as e:
        manager.ensure_model(TINY_LLAMA, revision="v9")
    hub.faults.add(f"*/{SHARDS[2]}", "status", status=404, times=None, methods=("HEAD", "GET"))
    with pytest.raises(ModelDownloadError, match=f"file '{SHARDS[2]}' not found") as e:
        manager.ensure_model(TINY_LLAMA)
    assert e.value.filename == SHARDS[2] and hub.stats.file_heads(f"*/{SHARDS[2]}") == 1


def test_index_naming_a_missing_file_is_reported(manager, hub):
    repo = "mlxnode-test/tiny-broken"
    shutil.copytree(hub.root / TINY_LLAMA, hub.root / repo)
    try:
        (hub.root / repo / SHARDS[1]).unlink()
        with pytest.raises(CacheError, match=f"names {SHARDS[1]}, which the repo does not have"):
            manager.ensure_model(repo)
    finally:
        shutil.rmtree(hub.root / repo)


@pytest.mark.parametrize(
    "bad",
    ["../..", "/etc/passwd", "org/../x", "org--x/y", "a/b/c", "org/na\\me", ".", "org/", ""],
)
def test_bad_repo_ids_are_refused(manager, bad):
    with pytest.raises(UsageError):
        manager.ensure_model(bad)
    with pytest.raises(UsageError):
        validate_repo_id(bad)


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/abs", "a//b", "x y", ""])
def test_bad_revisions_are_refused(bad):
    with pytest.raises(UsageError):
        validate_revision(bad)


def test_bad_rank_specs_are_usage_errors(manager):
    with pytest.raises(UsageError, match="outside 0..3"):
        manager.ensure_model(TINY_LLAMA, RankSpec(ranks=[4], world_size=4, strategy="pipeline"))
    with pytest.raises(UsageError, match="sums to 7"):
        manager.ensure_model(
            TINY_LLAMA, RankSpec(ranks=[0], world_size=2, strategy="pipeline", split=[4, 3])
        )
    with pytest.raises(UsageError, match="strategy"):
        manager.ensure_model(TINY_LLAMA, RankSpec(strategy="diagonal"))


# -- locks, crashes, concurrency


def test_lock_held_past_timeout_is_a_clear_cache_error(hub, cache_dir):
    paths = ModelPaths(cache_dir, TINY_SINGLE)
    paths.lock.parent.mkdir(parents=True)
    with FileLock(paths.lock):
        started = time.monotonic()
        with pytest.raises(CacheError) as excinfo:
            _manager(hub, cache_dir, lock_timeout=0.3).ensure_model(TINY_SINGLE)
    assert 0.3 <= time.monotonic() - started < 3
    assert str(paths.lock) in str(excinfo.value) and "--lock-timeout" in str(excinfo.value)


def test_sigkill_mid_file_then_rerun_gives_a_correct_cache(hub, cache_dir):
    hub.faults.add(f"*/{SHARDS[1]}", "slow", bytes_per_s=50_000, times=1)
    args = [sys.executable, "-m", "mlxnode", "cache", "prewarm", TINY_LLAMA, "--json", "--quiet"]
    proc = subprocess.Popen(
        args,
        env=_cli_env(hub, cache_dir),
        cwd=cache_dir.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while hub.stats.file_bytes(f"*/{SHARDS[1]}") < 100_000:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    root = ModelPaths(cache_dir, TINY_LLAMA).root
    # The half-downloaded file is not in the snapshot, and what is there is whole.
    assert not list(root.glob(f"snapshots/*/{SHARDS[1]}"))
    for path in root.glob("snapshots/*/*"):
        assert _sha256(path) == _sha256(_hub_file(hub, TINY_LLAMA, path.name)), path.name

    rerun = _cli(hub, cache_dir, "prewarm", TINY_LLAMA, "--json", "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads(rerun.stdout)
    assert SHARDS[1] in result["fetched"] and result["changed"] is True
    verify = _cli(hub, cache_dir, "verify", TINY_LLAMA)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # Nothing of the killed download is left anywhere in the model's directory.
    assert not list(root.rglob("*.incomplete")) and not (root / ".staging").exists()


def test_two_concurrent_prewarms_into_one_cache(hub, cache_dir):
    # Slow one file down so the second process really waits on the first one's lock.
    hub.faults.add(f"*/{SHARDS[2]}", "slow", bytes_per_s=500_000, times=1)
    args = [sys.executable, "-m", "mlxnode", "cache", "prewarm", TINY_LLAMA, "--json", "--quiet"]
    procs = [
        subprocess.Popen(
            args,
            env=_cli_env(hub, cache_dir),
            cwd=cache_dir.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    changed = sorted(json.loads(out)["changed"] for out, _ in outputs)
    assert changed == [False, True]
    for shard in SHARDS:
        assert hub.stats.file_gets(f"*/{shard}") == 1
    verify = _cli(hub, cache_dir, "verify", TINY_LLAMA)
    assert verify.returncode == 0, verify.stdout + verify.stderr


# -- offline, verify, force


def test_offline_uses_only_the_cache_and_lists_missing_files(manager, hub, cache_dir):
    manager.ensure_model(TINY_LLAMA, RankSpec(ranks=[3], world_size=4, strategy="pipeline"))
    hub.stats.reset()
    offline = _manager(hub, cache_dir, offline=True)
    model = offline.ensure_model(TINY_LLAMA, RankSpec(ranks=[3], world_size=4, strategy="pipeline"))
    assert model.fetched_files == [] and hub.stats.count() == 0
    with pytest.raises(CacheError, match=f"offline.*{SHARDS[2]}") as excinfo:
        offline.ensure_model(TINY_LLAMA, RankSpec(ranks=[1], world_size=4, strategy="pipeline"))
    assert SHARDS[1] not in str(excinfo.value)
    with pytest.raises(CacheError, match="not in the cache"):
        offline.ensure_model(TINY_QWEN2)
    assert hub.stats.count() == 0

    cli = _cli(
        hub,
        cache_dir,
        "prewarm",
        TINY_LLAMA,
        "--world-size=4",
        "--strategy=pipeline",
        "--rank=1",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert cli.returncode == CacheError.exit_code and SHARDS[2] in cli.stderr
    assert hub.stats.count() == 0


def test_the_ref_moves_only_once_the_new_commit_is_complete(hub, cache_dir):
    """A dry run or a failed prewarm of a new commit leaves offline runs on the old one."""
    repo = "mlxnode-test/tiny-moving"
    shutil.copytree(hub.root / TINY_LLAMA, hub.root / repo)
    rank0 = ["--world-size=4", "--strategy=pipeline", "--rank=0", "--json", "--quiet"]
    ref = ModelPaths(cache_dir, repo).ref("main")

    def prewarm(*args: str, **env: str) -> subprocess.CompletedProcess:
        return _cli(hub, cache_dir, "prewarm", repo, *rank0, *args, env=env)

    try:
        first = prewarm()
        assert first.returncode == 0, first.stderr
        old = json.loads(first.stdout)["commit"]
        config = hub.root / repo / "config.json"
        config.write_text(config.read_text().replace("{", '{"mlxnode_note": 2, ', 1))
        new = hub.commit_sha(repo)
        assert new != old and ref.read_text().strip() == old

        dry = prewarm("--dry-run")
        assert dry.returncode == 0 and json.loads(dry.stdout)["commit"] == new, dry.stderr
        assert ref.read_text().strip() == old, "a dry run moved the ref"

        hub.faults.add(f"*{repo}/*/{SHARDS[3]}", "status", status=500, times=None)
        failed = prewarm(MLXNODE_CACHE_MAX_RETRIES="0")
        assert failed.returncode == ModelDownloadError.exit_code, failed.stderr
        assert ref.read_text().strip() == old, "a failed prewarm moved the ref"
        # The previous commit is whole, so offline use goes on with it.
        offline = prewarm("--offline")
        assert offline.returncode == 0, offline.stderr
        assert json.loads(offline.stdout)["commit"] == old
        verify = _cli(hub, cache_dir, "verify", repo, *rank0[:-1], "--offline")
        assert verify.returncode == 0 and json.loads(verify.stdout)["commit"] == old

        hub.faults.clear()
        done = prewarm()
        assert done.returncode == 0 and json.loads(done.stdout)["commit"] == new, done.stderr
        assert ref.read_text().strip() == new
    finally:
        shutil.rmtree(hub.root / repo)


def test_offline_names_a_truncated_file_with_its_size(manager, hub, cache_dir):
    model = manager.ensure_model(TINY_LLAMA, RankSpec(ranks=[0], world_size=4, strategy="pipeline"))
    target = model.path / SHARDS[3]
    size = target.stat().st_size
    with target.open("r+b") as f:
        f.truncate(size // 2)
    offline = _manager(hub, cache_dir, offline=True)
    with pytest.raises(CacheError) as excinfo:
        offline.ensure_model(TINY_LLAMA, RankSpec(ranks=[0], world_size=4, strategy="pipeline"))
    assert f"1 of the wrong size: {SHARDS[3]} ({size // 2} bytes, expected {size})" in str(
        excinfo.value
    )
    assert "not cached" not in str(excinfo.value)


def test_metadata_refuses_a_truncated_weight_offline_and_refetches_it_online(
    manager, hub, cache_dir
):
    # Loading a model reads every cached weight file's header, so this is checked first.
    model = manager.ensure_model(TINY_LLAMA)
    target = model.path / SHARDS[1]
    size = target.stat().st_size
    with target.open("r+b") as f:
        f.truncate(100)
    offline = _manager(hub, cache_dir, offline=True)
    with pytest.raises(CacheError, match=rf"{SHARDS[1]} is 100 bytes, expected {size}"):
        offline.fetch_metadata(TINY_LLAMA)
    assert target.stat().st_size == 100  # offline: refused, not touched
    manager.fetch_metadata(TINY_LLAMA)
    assert not target.exists()  # online: discarded...
    assert SHARDS[1] in manager.ensure_model(TINY_LLAMA).fetched_files  # ...and fetched again
    assert target.stat().st_size == size


def test_verify_detects_a_flipped_byte_and_force_repairs_it(manager, cache_dir, hub):
    model = manager.ensure_model(TINY_LLAMA)
    _flip_byte(model.path / SHARDS[1])
    result = _cli(hub, cache_dir, "verify", TINY_LLAMA, "--json")
    assert result.returncode == 3
    report = json.loads(result.stdout)
    assert report["ok"] is False and list(report["corrupt"]) == [SHARDS[1]]
    assert SHARDS[1] in result.stderr and "--force-download" in result.stderr

    # Sizes still match, so the default check passes; hashing finds it.
    manager.ensure_model(TINY_LLAMA)
    with pytest.raises(CacheError, match=re.escape(SHARDS[1])):
        manager.ensure_model(TINY_LLAMA, verify_hashes=True)
    repaired = manager.ensure_model(TINY_LLAMA, force=True, verify_hashes=True)
    assert SHARDS[1] in repaired.fetched_files
    assert _cli(hub, cache_dir, "verify", TINY_LLAMA).returncode == 0


def test_verify_checks_the_ranks_the_cache_was_prewarmed_for(hub, cache_dir):
    # Rank 1 of a 2-way pipeline (split 4,4) holds layers 0-3: shards 1 and 2; shards 3
    # and 4 (the head) are rank 0's alone. Checking the whole model called this
    # correct cache broken and said to download everything.
    rank1 = ["--rank", "1", "--world-size", "2", "--strategy", "pipeline", "--split", "4,4"]
    prewarmed = _cli(hub, cache_dir, "prewarm", TINY_LLAMA, *rank1, "--json", "--quiet")
    assert prewarmed.returncode == 0, prewarmed.stderr
    snapshot = Path(json.loads(prewarmed.stdout)["path"])

    ok = _cli(hub, cache_dir, "verify", TINY_LLAMA)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "MISSING" not in ok.stdout and "for: ranks 1 of 2 (pipeline, split 4,4)" in ok.stdout
    as_json = json.loads(_cli(hub, cache_dir, "verify", TINY_LLAMA, "--json").stdout)
    assert as_json["ok"] and as_json["checked_for"] == [
        {"ranks": [1], "world_size": 2, "strategy": "pipeline", "split": [4, 4],
         "all_files": False}
    ]  # fmt: skip
    whole = _cli(hub, cache_dir, "verify", TINY_LLAMA, "--all")  # flags still decide
    assert whole.returncode == 3 and re.search(rf"MISSING\s+{SHARDS[2]}", whole.stdout)
    assert f"`mlxnode cache prewarm {TINY_LLAMA} --all`" in whole.stderr

    (snapshot / SHARDS[1]).unlink()
    broken = _cli(hub, cache_dir, "verify", TINY_LLAMA)
    assert broken.returncode == 3 and broken.stderr.count("\n") == 1, broken.stderr
    fix = (
        f"mlxnode cache prewarm {TINY_LLAMA} --ranks 1 --world-size 2 --strategy pipeline "
        "--split 4,4"
    )
    assert f"run `{fix}`" in broken.stderr and "--force-download" not in broken.stderr
    by_flag = _cli(hub, cache_dir, "verify", TINY_LLAMA, "--cache-dir", str(cache_dir))
    assert f"prewarm {TINY_LLAMA} --cache-dir {cache_dir} --ranks 1" in by_flag.stderr
    fixed = _cli(hub, cache_dir, *fix.split()[2:])
    assert fixed.returncode == 0, fixed.stderr
    assert "] [prewarm] INFO mlxnode.cache" in fixed.stderr  # no rank of a run: no [Rank 0/1]
    assert _cli(hub, cache_dir, "verify", TINY_LLAMA).returncode == 0


def test_a_truncated_cached_file_is_fetched_again(manager, hub):
    model = manager.ensure_model(TINY_SINGLE)
    target = model.path / "model.safetensors"
    target.write_bytes(target.read_bytes()[:1000])
    again = manager.ensure_model(TINY_SINGLE)
    assert again.fetched_files == ["model.safetensors"]
    assert _sha256(target) == _sha256(_hub_file(hub, TINY_SINGLE, "model.safetensors"))


# -- disk full


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MB tmpfs (needs root); unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        from conftest import require

        require(reason=f"a tmpfs mount ({done.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _grow(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=16m", str(mount)], check=True)


def test_disk_full_is_reported_before_downloading(hub, small_disk):
    manager = _manager(hub, small_disk / "cache")
    with pytest.raises(ModelDownloadError) as excinfo:
        manager.ensure_model(TINY_LLAMA)
    message = str(excinfo.value)
    assert "needed" in message and "free" in message and str(small_disk / "cache") in message
    assert not list(small_disk.rglob("*.safetensors")) and not list(
        small_disk.rglob("*.incomplete")
    )
    # Nothing completed, so `main` names no cached commit yet; the commit itself has no weights.
    with pytest.raises(CacheError, match="not in the cache"):
        manager.verify(TINY_LLAMA)
    assert manager.verify(TINY_LLAMA, revision=hub.commit_sha(TINY_LLAMA)).missing == SHARDS
    _grow(small_disk)
    model = manager.ensure_model(TINY_LLAMA)
    assert manager.verify(TINY_LLAMA).ok and set(SHARDS) <= set(model.files)


@pytest.mark.filterwarnings("ignore:Not enough free disk space")
def test_disk_filling_up_mid_download_leaves_no_partial_file(hub, small_disk, monkeypatch):
    import mlxnode.cache.manager as manager_module

    # Skip the up-front check so the download itself runs into ENOSPC.
    monkeypatch.setattr(manager_module, "check_free_space", lambda *a, **k: None)
    manager = _manager(hub, small_disk / "cache")
    with pytest.raises(ModelDownloadError, match="no space left on device.*needed.*free"):
        manager.ensure_model(TINY_LLAMA)
    snapshot = next((small_disk / "cache").glob("*/snapshots/*"))
    for path in snapshot.iterdir():
        assert _sha256(path) == _sha256(_hub_file(hub, TINY_LLAMA, path.name)), path.name
    assert not list(small_disk.rglob("*.incomplete"))
    _grow(small_disk)
    manager.ensure_model(TINY_LLAMA)
    assert manager.verify(TINY_LLAMA).ok


# -- secrets, progress


def test_token_never_appears_in_logs_or_errors(hub, cache_dir, caplog):
    # Retries log the URL they retry; make sure some happen.
    hub.faults.add(f"/{TINY_GATED}/*/model-00001-of-00002.safetensors", "status", times=1)
    with caplog.at_level(logging.DEBUG):
        _manager(hub, cache_dir, token=HUB_TOKEN).ensure_model(TINY_GATED)
        hub.faults.add("/api/models/*", "status", status=403, api=True, times=1)
        with pytest.raises(ModelDownloadError) as excinfo:
            _manager(hub, cache_dir / "x", token=HUB_TOKEN).ensure_model(TINY_GATED)
    assert "retry 1/3" in caplog.text and "403" in str(excinfo.value)
    assert HUB_TOKEN not in caplog.text and HUB_TOKEN not in str(excinfo.value)
    assert HUB_TOKEN not in repr(_manager(hub, cache_dir, token=HUB_TOKEN))

    hub.faults.add(f"/{TINY_GATED}/*/model-00002-of-00002.safetensors", "status", times=1)
    cli = _cli(
        hub,
        cache_dir / "cli",
        "prewarm",
        TINY_GATED,
        "--log-level=DEBUG",
        env={"HF_TOKEN": HUB_TOKEN},
    )
    assert cli.returncode == 0, cli.stderr
    assert "retry" in cli.stderr.lower()
    assert HUB_TOKEN not in cli.stdout + cli.stderr


def test_progress_logs_plain_lines_when_not_a_tty(hub, cache_dir, caplog, monkeypatch):
    monkeypatch.setattr(cache_progress, "LOG_EVERY", 0.0)
    with caplog.at_level(logging.INFO, logger="mlxnode.cache"):
        _manager(hub, cache_dir, progress=True).ensure_model(TINY_SINGLE)
    lines = [r.getMessage() for r in caplog.records if r.name == "mlxnode.cache.progress"]
    pattern = re.compile(r"downloaded [\d.]+/[\d.]+ (?:[KMG]i)?B \(\d+%, [\d.]+ (?:[KMG]i)?B/s")
    assert any(pattern.search(line) for line in lines), lines


def test_quiet_shows_no_progress(hub, cache_dir, caplog, monkeypatch):
    monkeypatch.setattr(cache_progress, "LOG_EVERY", 0.0)
    with caplog.at_level(logging.INFO, logger="mlxnode.cache"):
        _manager(hub, cache_dir, progress=False).ensure_model(TINY_SINGLE)
    assert not [r for r in caplog.records if r.name == "mlxnode.cache.progress"]


def test_progress_draws_bars_on_a_terminal(hub, cache_dir):
    """huggingface_hub's bars, drawn through our tqdm class, reach a terminal on stderr."""
    import fcntl
    import pty
    import struct
    import termios

    from tqdm import tqdm

    controller, terminal = pty.openpty()
    # A terminal of no width gets empty bars: give it the size a real one has.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mlxnode", "cache", "prewarm", TINY_SINGLE],
            env=_cli_env(hub, cache_dir),
            cwd=cache_dir.parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal,
            timeout=60,
        )
        os.close(terminal)
        drawn = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(controller, 65536):
                drawn += chunk
    finally:
        os.close(controller)
    assert result.returncode == 0
    size = _hub_file(hub, TINY_SINGLE, "model.safetensors").stat().st_size
    # Binary units, as everywhere in mlxnode.
    shown = tqdm.format_sizeof(size, divisor=1024)
    assert f"{shown}/{shown}" in drawn.decode(), drawn


# -- the CLI


def test_prewarm_json_reports_changed_for_idempotence(hub, cache_dir):
    args = ["prewarm", TINY_LLAMA, "--world-size", "4", "--strategy", "pipeline", "--rank", "2"]
    first = _cli(hub, cache_dir, *args, "--json", "--quiet")
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["changed"] is True and result["commit"] == hub.commit_sha(TINY_LLAMA)
    assert {n["file"] for n in result["needed"]} == set(METADATA) | {SHARDS[0], SHARDS[1]}
    assert (
        result["fetched_bytes"]
        == result["needed_bytes"]
        == sum(n["size"] for n in result["needed"])
    )
    assert Path(result["path"]).is_dir() and result["seconds"] >= 0

    second = json.loads(_cli(hub, cache_dir, *args, "--json", "--quiet").stdout)
    assert second["changed"] is False and second["fetched"] == [] and second["fetched_bytes"] == 0


def test_prewarm_dry_run_lists_files_without_downloading_weights(hub, cache_dir):
    args = ["prewarm", TINY_LLAMA, "--world-size=4", "--strategy=pipeline", "--rank=1", "--json"]
    result = _cli(hub, cache_dir, *args, "--dry-run")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True and plan["changed"] is False
    assert plan["missing"] == [SHARDS[0], SHARDS[2]]
    assert hub.stats.file_gets("*.safetensors") == 0

    text = _cli(hub, cache_dir, *args[:-1], "--dry-run")
    assert "would fetch 2 files" in text.stdout


def test_prewarm_pipeline_without_a_rank_is_a_usage_error(hub, cache_dir):
    result = _cli(hub, cache_dir, "prewarm", TINY_LLAMA, "--world-size=2", "--strategy=pipeline")
    assert result.returncode == 2 and "--rank" in result.stderr
    assert result.stderr.count("\n") == 1, "one line, no traceback"


def test_list_and_size_report_what_is_cached(manager, hub, cache_dir):
    manager.ensure_model(TINY_LLAMA, RankSpec(ranks=[0, 1], world_size=4, strategy="pipeline"))
    listing = json.loads(_cli(hub, cache_dir, "list", "--json").stdout)
    (model,) = listing["models"]
    (commit,) = model["commits"]
    assert model["model"] == TINY_LLAMA and commit["revisions"] == ["main"]
    assert commit["files_present"] == 8 and commit["files_expected"] == 9
    assert commit["complete_for"] == [
        {"ranks": [0, 1], "world_size": 4, "strategy": "pipeline", "split": [2, 2, 2, 2],
         "all_files": False}
    ]  # fmt: skip
    text = _cli(hub, cache_dir, "list").stdout
    assert TINY_LLAMA in text and "ranks 0,1/4 pipeline" in text and "8/9" in text

    size = json.loads(_cli(hub, cache_dir, "size", TINY_LLAMA, "--json").stdout)
    on_disk = sum(p.stat().st_size for p in ModelPaths(cache_dir, TINY_LLAMA).root.rglob("*")
                  if p.is_file())  # fmt: skip
    assert size["bytes"] == on_disk and size["models"] == {TINY_LLAMA: on_disk}
    missing = _cli(hub, cache_dir, "size", TINY_QWEN2)
    assert missing.returncode == 3 and "not in the cache" in missing.stderr


def test_clear_never_touches_anything_outside_the_cache(manager, hub, cache_dir, tmp_path):
    model = manager.ensure_model(TINY_SINGLE)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    (cache_dir / "notes.txt").write_text("not a model")
    (cache_dir / "evil--model").symlink_to(outside, target_is_directory=True)
    (model.path / "link-out").symlink_to(outside / "precious")

    for bad in ("../..", str(outside), "/etc", "mlxnode-test/../..", "a/b/c"):
        result = _cli(hub, cache_dir, "clear", bad, "--yes")
        assert result.returncode == 2, (bad, result.stderr)
    symlinked = _cli(hub, cache_dir, "clear", "evil/model", "--yes")
    assert symlinked.returncode == 3 and "outside the cache" in symlinked.stderr
    refused = _cli(hub, cache_dir, "clear", TINY_SINGLE)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert model.path.is_dir()
    # Another tool's directory with a model-like name: no mlxnode.json, so not ours.
    foreign = cache_dir / "other--tool"
    (foreign / "snapshots").mkdir(parents=True)
    (foreign / "snapshots" / "data.bin").write_bytes(b"not mlxnode's")
    named = _cli(hub, cache_dir, "clear", "other/tool", "--yes")
    assert named.returncode == 3 and "no mlxnode.json" in named.stderr, named.stderr

    cleared = _cli(hub, cache_dir, "clear", "--all", "--yes")
    assert cleared.returncode == 0, cleared.stderr
    assert [line.split(" (")[0] for line in cleared.stdout.splitlines()] == [
        f"removed {TINY_SINGLE}"
    ]
    assert not ModelPaths(cache_dir, TINY_SINGLE).root.exists()
    assert (outside / "precious").read_text() == "keep me"
    assert (cache_dir / "notes.txt").exists() and (cache_dir / "evil--model").is_symlink()
    assert (foreign / "snapshots" / "data.bin").read_bytes() == b"not mlxnode's"


def test_clear_deletes_only_the_model_asked_for(manager, hub, cache_dir, tmp_path):
    def cache_both() -> None:
        manager.fetch_metadata(TINY_LLAMA)
        manager.fetch_metadata(TINY_SINGLE)

    def cached() -> set[str]:
        return {m.repo_id for m in manager.list_models()}

    cache_both()
    by_flag = _cli(hub, cache_dir, "clear", "--model", TINY_LLAMA, "--yes")
    assert by_flag.returncode == 0, by_flag.stderr
    assert (
        by_flag.stdout.startswith(f"removed {TINY_LLAMA} (") and TINY_SINGLE not in by_flag.stdout
    )
    assert cached() == {TINY_SINGLE}

    config = tmp_path / "settings.yaml"
    config.write_text(f"model:\n  name: {TINY_SINGLE}\n")
    cache_both()
    by_config = _cli(hub, cache_dir, "clear", "--config", str(config), "--yes")
    assert by_config.returncode == 0, by_config.stderr
    assert cached() == {TINY_LLAMA}

    ran = subprocess.run(
        [sys.executable, "-m", "mlxnode", "run", "--clear-cache", "--model", TINY_LLAMA, "--yes"],
        env=_cli_env(hub, cache_dir), cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert cached() == set()

    cache_both()
    local = tmp_path / "local-model"
    shutil.copytree(hub.root / TINY_SINGLE, local)
    for args, message in [
        (["--yes"], "nothing to clear: give the MODEL"),
        (["--model-path", str(local), "--yes"], f"--model-path {local} is a local model"),
        ([TINY_SINGLE, "--model", TINY_LLAMA, "--yes"], "two models to clear"),
        (["--all", "--model", TINY_LLAMA, "--yes"], "not both"),
        (["--all", TINY_LLAMA, "--yes"], "not both"),
    ]:
        refused = _cli(hub, cache_dir, "clear", *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert refused.stderr.count("\n") == 1 and message in refused.stderr, refused.stderr
    assert cached() == {TINY_LLAMA, TINY_SINGLE}
    assert (local / "config.json").is_file()

    everything = _cli(hub, cache_dir, "clear", "--all", "--yes")
    assert everything.returncode == 0, everything.stderr
    assert cached() == set()


@pytest.mark.parametrize(("answer", "deleted"), [("n", False), ("y", True)])
def test_clear_asks_on_a_terminal(manager, hub, cache_dir, answer, deleted):
    import pty

    model = manager.ensure_model(TINY_SINGLE)
    controller, terminal = pty.openpty()
    try:
        os.write(controller, f"{answer}\n".encode())
        result = subprocess.run(
            [sys.executable, "-m", "mlxnode", "cache", "clear", TINY_SINGLE],
            env=_cli_env(hub, cache_dir),
            cwd=cache_dir.parent,
            stdin=terminal,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert result.returncode == 0, result.stderr
    assert f"Delete {TINY_SINGLE}" in result.stderr and "[y/N]" in result.stderr
    assert model.path.exists() is not deleted


def test_list_and_clear_functions_for_the_run_command(manager, cache_dir, capsys):
    from mlxnode.commands.cache import clear_models, list_models

    manager.ensure_model(TINY_SINGLE)
    resolved = load_config(environ={"MLXNODE_CACHE_DIR": str(cache_dir)}, cwd=cache_dir)
    assert list_models(resolved, as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["models"][0]["model"] == TINY_SINGLE
    with pytest.raises(UsageError, match="--yes"):
        clear_models(resolved, TINY_SINGLE)
    assert clear_models(resolved, TINY_SINGLE, yes=True) == 0
    assert list_models(resolved) == 0
    assert "no models cached" in capsys.readouterr().out


def test_from_config_takes_the_cache_section(tmp_path):
    resolved = load_config(
        environ={
            "MLXNODE_CACHE_DIR": str(tmp_path / "c"),
            "MLXNODE_CACHE_OFFLINE": "1",
            "MLXNODE_CACHE_MAX_RETRIES": "7",
            "MLXNODE_CACHE_BACKOFF_BASE": "0.5",
            "MLXNODE_CACHE_LOCK_TIMEOUT": "9",
        },
        cwd=tmp_path,
    )
    manager = ModelCacheManager.from_config(resolved.config, progress=False)
    assert manager.cache_dir == tmp_path / "c" and manager.offline
    assert (manager.max_retries, manager.backoff_base, manager.lock_timeout) == (7, 0.5, 9.0)
    default = ModelCacheManager.from_config(load_config(environ={}, cwd=tmp_path).config)
    assert default.cache_dir == Path("~/.cache/mlx_models").expanduser()
