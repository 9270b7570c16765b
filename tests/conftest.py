"""Fixtures shared by every test module.

- Every test gets its own HOME-ish cache directories, so nothing reads or writes the
  real ``~/.cache`` (or finds a real Hub token).
- ``hub``: one local Hub-compatible server per session, publishing tiny models.
- `require`: the one way a test skips for a missing prerequisite (root, iproute2, sshd,
  rsync, tmpfs); with ``MLXNODE_REQUIRE_TESTBED=1`` (set by ``.ci/run``) it fails instead,
  so CI cannot pass by silently skipping the multi-host, fault, secret and disk tests.
- `session_testbed`: a testbed name and subnet of this test session's own, so two sessions on
  one machine never tear down each other's testbed.
- ``local_cluster``: a tiny model and a hostfile of two ranks on 127.0.0.1 (no root).
- The multi-host (``e2e``) tests run first, and under pytest-xdist (`make test` runs two
  workers) all on one worker, where they share one testbed (`TestbedTogether`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REQUIRE_ENV = "MLXNODE_REQUIRE_TESTBED"
# The modules of the multi-host (`e2e`) tests: under pytest-xdist one worker runs them all.
TESTBED_MODULES = (
    "tests/test_e2e.py",
    "tests/test_reliability.py",
    "tests/test_serve_e2e.py",
    "tests/test_testbed.py",
)
_SSHD = "/usr/sbin/sshd"


def _missing(needs: tuple[str, ...]) -> list[str]:
    checks = {
        "root": lambda: os.geteuid() == 0,
        "iproute2": lambda: bool(shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")),
        "sshd": lambda: os.access(_SSHD, os.X_OK),
        "rsync": lambda: bool(shutil.which("rsync")),
    }
    return [need for need in needs if not checks[need]()]


def require(*needs: str, reason: str = "") -> None:
    """Skip the test unless every prerequisite is there; fail instead under CI.

    Args:
        needs: Any of "root", "iproute2", "sshd", "rsync".
        reason: Set instead of `needs` for a prerequisite found by trying (a tmpfs mount).
    """
    missing = _missing(needs)
    if reason:
        missing.append(reason)
    if not missing:
        return
    why = f"missing prerequisite: {', '.join(missing)}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{why} ({REQUIRE_ENV}=1 turns this skip into a failure)", pytrace=False)
    pytest.skip(why)


def requires(*needs: str) -> pytest.MarkDecorator:
    """`require` as a marker for a whole module: ``pytestmark = [requires("root")]``."""
    return pytest.mark.usefixtures(*(f"_needs_{need}" for need in needs))


@pytest.fixture
def _needs_root() -> None:
    require("root")


@pytest.fixture
def _needs_iproute2() -> None:
    require("iproute2")


@pytest.fixture
def _needs_sshd() -> None:
    require("sshd")


@pytest.fixture
def _needs_rsync() -> None:
    require("rsync")


def session_testbed(kind: str) -> tuple[str, str]:
    """A testbed name and subnet for this session: unique per process and per `kind`.

    The testbed names its bridge and links after the first four characters, so those
    carry the kind's letter and the pid; the subnet's second octet the kind, its third
    the pid.
    """
    kinds = "artd"  # the shared cluster, (r: free), testbed, down
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    n, token = os.getpid() % 36**3, ""
    for _ in range(3):
        n, d = divmod(n, 36)
        token = digits[d] + token
    return f"{kind}{token}-{kind}", f"10.{214 + kinds.index(kind)}.{os.getpid() % 250}.0/24"


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
    from tests.support.hubserver import GATED_MARKER, HubServer
    from tests.support.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("hub")
    make_tiny_model(root / TINY_LLAMA, arch="llama", num_layers=8, num_shards=4)
    make_tiny_model(root / TINY_QWEN2, arch="qwen2", num_layers=8, num_shards=4)
    make_tiny_model(root / TINY_SINGLE, arch="llama", num_layers=4, num_shards=1)
    make_tiny_model(root / TINY_GATED, arch="llama", num_layers=4, num_shards=2)
    (root / TINY_GATED / GATED_MARKER).touch()
    with HubServer(root, token=HUB_TOKEN) as server:
        yield server


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One provisioned 3-host testbed, shared by the e2e and reliability tests (see
    tests.support.cluster); site.yml has run on it once."""
    from tests.support.cluster import provisioned

    name, subnet = session_testbed("a")
    with provisioned(tmp_path_factory.mktemp("cluster"), name, subnet) as cluster:
        cluster.site.check()
        print(f"\nprovisioned: first site.yml {cluster.site.seconds:.1f} s")
        yield cluster


@dataclass(frozen=True)
class LocalCluster:
    """Two ranks on this machine: mlx.launch starts 127.0.0.1 ranks without SSH."""

    model: Path
    hostfile: Path
    venv_bin: Path

    def launch_argv(self, *args: str, run_args: tuple[str, ...] = ()) -> list[str]:
        """`mlxnode launch` of `run_args` on ring ports of its own (others may be in use)."""
        return [
            str(self.venv_bin / "mlxnode"), "launch", "--hostfile", str(self.hostfile),
            "--starting-port", str(free_ports(2)), *args,
            "--", "--model-path", str(self.model), "--no-chat-template", *run_args,
        ]  # fmt: skip


def free_ports(count: int) -> int:
    """The first of `count` consecutive TCP ports free on 127.0.0.1 right now."""
    import random
    import socket

    while True:
        first = random.randrange(20000, 60000)
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> LocalCluster:
    from tests.support.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("local-cluster")
    model = make_tiny_model(
        root / "model", arch="llama", num_layers=8, num_shards=4, max_position_embeddings=65536
    )
    hostfile = root / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    return LocalCluster(Path(model), hostfile, Path(sys.executable).parent)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The multi-host tests come first: they are the longest group (see `TestbedTogether`),
    and the other worker takes everything else meanwhile."""
    testbed = [item for item in items if item.get_closest_marker("e2e")]
    strays = {item.nodeid.split("::")[0] for item in testbed} - set(TESTBED_MODULES)
    if strays:
        raise pytest.UsageError(f"add {', '.join(sorted(strays))} to TESTBED_MODULES")
    items[:] = testbed + [item for item in items if not item.get_closest_marker("e2e")]


def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN201 - xdist's hook
    """pytest-xdist's scheduler for `make test`'s workers: the multi-host tests as one unit.

    They share the session's one provisioned testbed (the `cluster` fixture), so they must
    run on one worker; every other module goes, whole, wherever a worker is free (its
    module-scoped servers and models are made once, and its tests run in their order).
    xdist's own `--dist loadgroup` marks the group in a node id that pytest 9 no longer
    lets it change.
    """
    from xdist.scheduler import LoadScopeScheduling

    class TestbedTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return "testbed" if module in TESTBED_MODULES else module

    return TestbedTogether(config, log)
