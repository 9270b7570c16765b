"""The control-plane collectives with real ranks: ranks that fall out of step are named.

Two ranks under real `mlx.launch --backend ring` call different collectives on purpose;
each must stop with a DistributedSetupError ("ranks out of step while …"), never read the
other collective's bytes as its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_engine import MLX_LAUNCH, _free_ports


def _launch(script: Path, text: str, *args: str, env: dict | None = None):
    """`text` written to `script` and run as 2 real ring ranks on this machine."""
    script.write_text(text)
    return subprocess.run(
        [
            *MLX_LAUNCH,
            "--backend",
            "ring",
            "-n",
            "2",
            "--starting-port",
            str(_free_ports(2)),
            sys.executable,
            str(script),
            *args,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).parents[1],
    )


# Rank 0 gathers metrics while rank 1 shares prompts: the same kind of collective at a
# different step, and a different kind of collective of another length.
SCRIPT = textwrap.dedent(
    """
    import sys
    from mlxnode import distributed
    from mlxnode.errors import DistributedSetupError

    group = distributed.join_group("ring")
    try:
        if group.rank() == 0:
            distributed.all_gather_json(group, {"peak": 1}, what="gathering metrics")
        else:
            distributed.broadcast_json(group, None, what="sharing the prompts")
    except DistributedSetupError as e:
        print(f"rank {group.rank()}: {e}", flush=True)
        sys.exit(e.exit_code)
    print(f"rank {group.rank()}: no error", flush=True)
    """
)


@pytest.mark.slow
def test_ranks_out_of_step_stop_with_a_distributed_setup_error(tmp_path: Path):
    script = tmp_path / "out_of_step.py"
    result = _launch(script, SCRIPT)
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 2, result.stdout + result.stderr
    assert lines[0].startswith("rank 0: ranks out of step while gathering metrics: rank 1 is")
    assert lines[1].startswith("rank 1: ranks out of step while sharing the prompts: rank 0 is")
    assert "exited with code 6" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


# Rank 1 stalls in loading a cached model (its second build, after the fetch) until it is
# killed: rank 0 must stop at the barrier after loading within the load bound, not hang.
STALLED_LOAD = textwrap.dedent(
    """
    import os, sys, time
    from mlxnode import engine, loading
    from mlxnode.config import Config
    from mlxnode.errors import MlxnodeError
    from mlxnode.prompts import Prompt

    if os.environ["MLX_RANK"] == "1":
        real_build, builds = loading.build_model, []

        def stalled_build(*args, **kwargs):
            builds.append(1)
            if len(builds) == 2:  # the build from the fetched files
                time.sleep(600)
            return real_build(*args, **kwargs)

        loading.build_model = stalled_build
    config = Config()
    config.model.name = sys.argv[1]
    config.cache.dir = sys.argv[2]
    config.distributed.strategy = "pipeline"
    config.generation.max_tokens = 2
    config.generation.use_chat_template = False
    try:
        engine.run(config, [Prompt(0, "Hi")], load_timeout=3)
    except MlxnodeError as e:
        sys.exit(e.exit_code)
    """
)


@pytest.mark.slow
def test_a_rank_stalled_while_loading_from_the_cache_is_bounded(hub, tmp_path: Path):
    script = tmp_path / "stalled_load.py"
    repo = "mlxnode-test/tiny-llama"  # published by conftest's hub fixture
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint}
    started = time.monotonic()
    result = _launch(script, STALLED_LOAD, repo, str(tmp_path / "cache"), env=env)
    seconds = time.monotonic() - started
    assert "no progress for 3s while waiting for every rank to finish loading" in result.stderr
    assert "Node with rank 0 exited with code 6" in result.stderr
    assert seconds < 60, seconds  # not the launcher's --timeout (1800 s)
