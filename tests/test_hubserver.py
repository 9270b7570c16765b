"""The Hub stand-in against the real huggingface_hub client, over real sockets.

Client behaviour these tests pin down (huggingface_hub 2.4.0):
- HEAD /resolve answering 5xx/429 is retried by the client (one plain attempt, then
  up to 5 retries with 1, 2, 4, 8, 8 s backoff).
- GET /resolve answering 5xx is *not* retried: it surfaces as `HfHubHTTPError`.
  GET answering 408/429 is retried, waiting ``Retry-After + 1`` seconds.
- A body cut short (FIN) is retried after 1 s; only bytes already handed over in
  10 MiB chunks are kept, so below 10 MiB the file restarts from zero and above it
  the client resumes with ``Range: bytes=<n*10MiB>-``. A TCP reset is not retried.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, constants, file_download, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.support.hubserver import HubServer, parse_rate

REPO = "acme/tiny-model"
TOKEN = "hf_test_token_for_gated_repos"
SHARDS = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
SHARD_SIZE = 200_000
MIB = 1024 * 1024


def _make_repo(root: Path, repo_id: str = REPO) -> dict[str, bytes]:
    """A small model repo on disk; returns its files by repo path."""
    rng = random.Random(repo_id)
    files: dict[str, bytes] = {
        "config.json": json.dumps({"model_type": "llama", "num_hidden_layers": 3}).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"vocab": {"a": 0}}}).encode(),
        "tokenizer_config.json": json.dumps({"eos_token": "</s>"}).encode(),
    }
    weight_map = {}
    for layer, shard in enumerate(SHARDS):
        files[shard] = rng.randbytes(SHARD_SIZE)
        weight_map[f"model.layers.{layer}.weight"] = shard
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": 3 * SHARD_SIZE}, "weight_map": weight_map}
    ).encode()
    for path, data in files.items():
        target = root / repo_id / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return files


@pytest.fixture(autouse=True)
def _offline_client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real token, no Xet, and no connection anywhere but loopback."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_xet(*args: object, **kwargs: object) -> None:
        raise AssertionError("the client tried a Xet download")

    monkeypatch.setattr(file_download, "xet_get", no_xet)
    connect = socket.socket.connect

    def loopback_only(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"connection attempt to {address!r} left loopback")
        connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


@pytest.fixture
def repo_files(tmp_path: Path) -> dict[str, bytes]:
    return _make_repo(tmp_path / "hub")


@pytest.fixture
def hub(tmp_path: Path, repo_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch):
    with HubServer(tmp_path / "hub", token=TOKEN) as server:
        # huggingface_hub reads HF_ENDPOINT once, at import: patch the parsed constants too,
        # and still pass endpoint= explicitly below.
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        yield server


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _download(hub: HubServer, cache: Path, filename: str, **kwargs: object) -> Path:
    kwargs.setdefault("token", False)
    return Path(hf_hub_download(REPO, filename, endpoint=hub.endpoint, cache_dir=cache, **kwargs))


def _cached_blobs(cache: Path) -> list[Path]:
    return sorted((cache / "models--acme--tiny-model" / "blobs").glob("*"))


def test_snapshot_download_gets_identical_bytes(hub, cache, repo_files):
    folder = Path(snapshot_download(REPO, endpoint=hub.endpoint, cache_dir=cache, token=False))

    assert folder.name == hub.commit_sha(REPO)
    got = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    assert got == repo_files
    assert hub.stats.file_gets() == len(repo_files)
    assert hub.stats.bytes_sent == sum(len(data) for data in repo_files.values())
    # One revision lookup, one recursive tree listing, then HEAD + GET per file at the sha.
    assert hub.stats.count(f"/api/models/{REPO}/revision/main", method="GET") == 1
    assert hub.stats.count(f"/api/models/{REPO}/tree/*", method="GET") == 1
    assert hub.stats.count(f"/{REPO}/resolve/{hub.commit_sha(REPO)}/*", method="HEAD") == len(
        repo_files
    )


def test_allow_patterns_fetches_only_matching_files(hub, cache, repo_files):
    snapshot_download(
        REPO, endpoint=hub.endpoint, cache_dir=cache, token=False, allow_patterns=["*.json"]
    )

    json_files = [p for p in repo_files if p.endswith(".json")]
    assert hub.stats.file_gets("*.json") == len(json_files)
    assert hub.stats.file_gets("*.safetensors") == 0
    assert hub.stats.file_heads("*.safetensors") == 0
    assert hub.stats.bytes_sent == sum(len(repo_files[p]) for p in json_files)


def test_local_dir_download_of_exact_names_at_a_commit(hub, tmp_path, repo_files):
    """What mlxnode's cache relies on: plain files, only the names asked for, one listing."""
    commit = hub.commit_sha(REPO)
    wanted = [SHARDS[1], "config.json"]
    staging = tmp_path / "staging"
    kwargs = dict(revision=commit, local_dir=staging, endpoint=hub.endpoint, token=False)

    snapshot_download(REPO, allow_patterns=wanted, **kwargs)

    for name in wanted:
        path = staging / name
        assert not path.is_symlink() and path.read_bytes() == repo_files[name]
    assert hub.stats.file_gets() == len(wanted) and hub.stats.file_gets(f"*/{SHARDS[0]}") == 0
    # A commit needs no revision lookup; the tree listing is the only API call.
    assert hub.stats.count("/api/models/*") == hub.stats.count("/api/models/*/tree/*") == 1

    # A 5xx on a body surfaces from snapshot_download as it does from hf_hub_download,
    # after the other files of the batch arrived.
    hub.faults.add(f"*/{SHARDS[2]}", "status", status=503, times=1)
    with pytest.raises(HfHubHTTPError) as excinfo:
        snapshot_download(REPO, allow_patterns=[SHARDS[0], SHARDS[2]], **kwargs)
    assert excinfo.value.response.status_code == 503
    assert (staging / SHARDS[0]).read_bytes() == repo_files[SHARDS[0]]
    assert not (staging / SHARDS[2]).exists()


def test_model_info_reports_sizes_and_lfs_sha256(hub, repo_files):
    api = HfApi(endpoint=hub.endpoint, token=False)

    info = api.model_info(REPO, files_metadata=True)

    assert info.sha == hub.commit_sha(REPO)
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == set(repo_files)
    for path, data in repo_files.items():
        assert siblings[path].size == len(data)
    for shard in SHARDS:
        assert siblings[shard].lfs.sha256 == hashlib.sha256(repo_files[shard]).hexdigest()
        assert siblings[shard].lfs.size == SHARD_SIZE
    assert siblings["config.json"].lfs is None
    assert api.model_info(REPO, revision=info.sha).sha == info.sha
    assert sorted(api.list_repo_files(REPO)) == sorted(repo_files)
    paths = api.get_paths_info(REPO, ["config.json", SHARDS[0], "missing.bin"])
    assert [p.path for p in paths] == ["config.json", SHARDS[0]]


def test_file_metadata_is_plain_http_lfs(hub, repo_files):
    url = f"{hub.endpoint}/{REPO}/resolve/main/{SHARDS[0]}"

    meta = file_download.get_hf_file_metadata(url, token=False, endpoint=hub.endpoint)

    assert meta.xet_file_data is None
    assert meta.etag == hashlib.sha256(repo_files[SHARDS[0]]).hexdigest()
    assert meta.size == SHARD_SIZE
    assert meta.commit_hash == hub.commit_sha(REPO)


def test_head_503_is_retried_by_the_client(hub, cache, repo_files):
    hub.faults.add(f"*/{SHARDS[0]}", "status", status=503, times=2, methods=["HEAD"])

    path = _download(hub, cache, SHARDS[0])

    assert path.read_bytes() == repo_files[SHARDS[0]]
    assert hub.stats.file_heads(f"*/{SHARDS[0]}") == 3


def test_get_503_is_not_retried_and_surfaces_as_http_error(hub, cache, repo_files):
    fault = hub.faults.add(f"*/{SHARDS[0]}", "status", status=503, times=2)

    for _ in range(2):
        with pytest.raises(HfHubHTTPError) as excinfo:
            _download(hub, cache, SHARDS[0])
        assert excinfo.value.response.status_code == 503
    assert fault.hits == 2
    assert not (cache / "models--acme--tiny-model" / "snapshots").exists() or not list(
        (cache / "models--acme--tiny-model" / "snapshots").rglob("*.safetensors")
    )

    assert _download(hub, cache, SHARDS[0]).read_bytes() == repo_files[SHARDS[0]]


def test_get_429_waits_retry_after_and_retries(hub, cache, repo_files):
    hub.faults.add(f"*/{SHARDS[1]}", "status", status=429, retry_after=0)

    assert _download(hub, cache, SHARDS[1]).read_bytes() == repo_files[SHARDS[1]]
    assert hub.stats.file_gets(f"*/{SHARDS[1]}") == 2


def test_truncated_body_is_downloaded_again_from_scratch(hub, cache, repo_files):
    hub.faults.add(f"*/{SHARDS[2]}", "reset")

    assert _download(hub, cache, SHARDS[2]).read_bytes() == repo_files[SHARDS[2]]
    gets = [r for r in hub.stats.records if r.method == "GET"]
    assert [(r.fault, r.body_bytes, r.range) for r in gets] == [
        ("reset", SHARD_SIZE // 2, None),
        (None, SHARD_SIZE, None),
    ]


def test_connection_reset_raises_and_leaves_no_corrupt_file(hub, cache, repo_files):
    hub.faults.add(f"*/{SHARDS[0]}", "reset", rst=True, times=None)

    with pytest.raises(httpx2.TransportError):
        _download(hub, cache, SHARDS[0])

    repo_cache = cache / "models--acme--tiny-model"
    assert _cached_blobs(cache) == []
    assert not list(repo_cache.rglob("*.incomplete"))
    assert not list(repo_cache.rglob("*.safetensors"))

    hub.faults.clear()
    assert _download(hub, cache, SHARDS[0]).read_bytes() == repo_files[SHARDS[0]]


def test_large_truncated_body_resumes_with_range(hub, cache, tmp_path):
    data = os.urandom(12 * MIB)
    (tmp_path / "hub" / REPO / "big.safetensors").write_bytes(data)
    hub.faults.add("*/big.safetensors", "reset", after_bytes=11 * MIB)

    assert _download(hub, cache, "big.safetensors").read_bytes() == data
    gets = [r for r in hub.stats.records if r.method == "GET"]
    assert [(r.status, r.range) for r in gets] == [(200, None), (206, f"bytes={10 * MIB}-")]
    assert hub.stats.file_bytes("*/big.safetensors") == 11 * MIB + 2 * MIB


def test_gated_repo_needs_the_server_token(hub, cache, repo_files, tmp_path):
    (tmp_path / "hub" / REPO / ".gated").touch()

    with pytest.raises(GatedRepoError) as missing:
        _download(hub, cache, "config.json", token=False)
    with pytest.raises(GatedRepoError) as wrong:
        _download(hub, cache, "config.json", token="hf_wrong")
    with pytest.raises(GatedRepoError):
        snapshot_download(REPO, endpoint=hub.endpoint, cache_dir=cache, token=False)

    assert missing.value.response.status_code == 401
    assert wrong.value.response.status_code == 403
    assert (
        _download(hub, cache, "config.json", token=TOKEN).read_bytes() == repo_files["config.json"]
    )
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    assert ".gated" not in api.list_repo_files(REPO)


def test_missing_repo_revision_and_file_map_to_client_errors(hub, cache):
    api = HfApi(endpoint=hub.endpoint, token=False)

    with pytest.raises(RepositoryNotFoundError) as repo_error:
        hf_hub_download("acme/nope", "config.json", endpoint=hub.endpoint, cache_dir=cache)
    assert not isinstance(repo_error.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/nope")
    with pytest.raises(RevisionNotFoundError):
        _download(hub, cache, "config.json", revision="v9")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        _download(hub, cache, "missing.json")


def test_rate_limit_paces_a_download(tmp_path, cache):
    data = os.urandom(2_000_000)
    (tmp_path / "hub" / REPO).mkdir(parents=True)
    (tmp_path / "hub" / REPO / "weights.safetensors").write_bytes(data)

    with HubServer(tmp_path / "hub", rate_limit_bytes_per_s=4_000_000) as hub:
        started = time.monotonic()
        assert _download(hub, cache, "weights.safetensors").read_bytes() == data
        elapsed = time.monotonic() - started

    assert elapsed >= 0.4  # 2 MB at 4 MB/s is 0.5 s; only a lower bound is reliable


def test_slow_and_hang_faults(tmp_path, repo_files):
    with HubServer(tmp_path / "hub") as hub:
        hub.faults.add("*/config.json", "slow", delay=0.3)
        hub.faults.add("*/tokenizer.json", "hang")
        conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=5)
        started = time.monotonic()
        conn.request("GET", f"/{REPO}/resolve/main/config.json")
        assert conn.getresponse().read() == repo_files["config.json"]
        assert time.monotonic() - started >= 0.3

        hung = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=0.3)
        hung.request("GET", f"/{REPO}/resolve/main/tokenizer.json")
        with pytest.raises(TimeoutError):
            hung.getresponse()
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 3


def test_tree_listing_is_paginated_with_link_headers(hub, repo_files):
    hub.tree_page_size = 2

    files = HfApi(endpoint=hub.endpoint, token=False).list_repo_files(REPO)

    assert sorted(files) == sorted(repo_files)
    assert hub.stats.count(f"/api/models/{REPO}/tree/main") == 4


def test_stats_reset(hub, cache):
    _download(hub, cache, "config.json")
    assert hub.stats.bytes_sent > 0

    hub.stats.reset()

    assert hub.stats.bytes_sent == 0
    assert hub.stats.requests == {}
    assert hub.stats.records == []


def test_cli_serves_until_sigterm(tmp_path, repo_files):
    port_file = tmp_path / "hub.port"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.hubserver",
            "--root",
            str(tmp_path / "hub"),
            "--rate-limit",
            "50MB",
            "--token-file",
            str(token_file),
            "--port-file",
            str(port_file),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        port = int(port_file.read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models/{REPO}", timeout=5) as r:
            assert json.load(r)["id"] == REPO
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert f'"GET /api/models/{REPO}" 200' in stderr
    assert not port_file.exists()


def test_cli_rejects_a_missing_root(tmp_path, capsys):
    from tests.support.hubserver import main

    assert main(["--root", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "rate"),
    [("20MB", 20e6), ("20MB/s", 20e6), ("512KiB", 512 * 1024), ("800000", 8e5), ("1e6", 1e6)],
)
def test_parse_rate(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "0", "-3MB"])
def test_parse_rate_rejects_nonsense(text):
    with pytest.raises(ValueError):
        parse_rate(text)


def test_unknown_fault_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown fault kind"):
        HubServer(tmp_path).faults.add("*", "explode")  # type: ignore[arg-type]
