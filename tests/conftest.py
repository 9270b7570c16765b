"""Fixtures shared by every test module.

- Every test gets its own HOME-ish cache directories, so nothing reads or writes the
  real ``~/.cache`` (or finds a real Hub token).
- ``hub``: one local Hub-compatible server per session, publishing tiny models.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# Repos the `hub` fixture publishes.
TINY_LLAMA = "mlxnode-test/tiny-llama"  # 8 layers over 4 weight files, with an index
TINY_QWEN2 = "mlxnode-test/tiny-qwen2"  # 8 layers over 4 weight files (qwen2 has pipeline())
TINY_SINGLE = "mlxnode-test/tiny-single"  # one model.safetensors, no index
TINY_GATED = "mlxnode-test/tiny-gated"  # answers 401/403 without HUB_TOKEN
# The one token the test Hub accepts for gated repos; shaped like a real one so redaction applies.
HUB_TOKEN = "hf_mlxnodeTestToken0123456789abcdef"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point HF_HOME, XDG_CACHE_HOME and the model cache at a per-test directory.

    huggingface_hub reads its paths and offline flag once, at import, so its constants
    are patched too; tokens from the environment are removed.
    """
    from huggingface_hub import constants

    home = tmp_path / "home"
    hf_home = home / ".cache" / "huggingface"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("MLXNODE_CACHE_DIR", str(home / ".cache" / "mlx_models"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return home


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A running `HubServer` over tiny models; tests must undo any faults they add."""
    from mlxnode.testing.hubserver import GATED_MARKER, HubServer
    from mlxnode.testing.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("hub")
    make_tiny_model(root / TINY_LLAMA, arch="llama", num_layers=8, num_shards=4)
    make_tiny_model(root / TINY_QWEN2, arch="qwen2", num_layers=8, num_shards=4)
    make_tiny_model(root / TINY_SINGLE, arch="llama", num_layers=4, num_shards=1)
    make_tiny_model(root / TINY_GATED, arch="llama", num_layers=4, num_shards=2)
    (root / TINY_GATED / GATED_MARKER).touch()
    with HubServer(root, token=HUB_TOKEN) as server:
        yield server
