"""playbooks/run.yml on this machine: the launcher is localhost, two ranks on 127.0.0.1.

No testbed and no root: Ansible reaches the launcher with the local connection, and
mlx.launch starts 127.0.0.1 ranks without SSH. What the user types with -e must reach
the model byte for byte, and nothing in it may ever be evaluated on the controller.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import LocalCluster, free_ports

from mlxnode.launcher import DEFAULT_LOCK_FILE, cluster_lock

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _play(cluster: LocalCluster, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    inventory = tmp_path / "hosts.yml"
    if not inventory.exists():
        venv = cluster.venv_bin.parent
        (tmp_path / "config.yaml").write_text(
            yaml.safe_dump({"model": {"path": str(cluster.model)},
                            "generation": {"max_tokens": 2, "use_chat_template": False}})
        )  # fmt: skip
        group_vars = {
            "mlxnode_run_venv_dir": str(venv),
            "mlxnode_run_hostfile": str(cluster.hostfile),
            "mlxnode_run_config_file": str(tmp_path / "config.yaml"),
            "mlxnode_run_dir": str(tmp_path / "runs"),
            "mlxnode_run_logs_dir": str(tmp_path / "logs"),
            "mlxnode_run_launch_args": ["--starting-port", str(free_ports(2))],
        }
        host = {
            "ansible_connection": "local",
            "ansible_python_interpreter": str(venv / "bin/python"),
        }
        inventory.write_text(
            yaml.safe_dump({"mlx_cluster": {"hosts": {"h1": host}, "vars": group_vars}})
        )
    (tmp_path / "home").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX")}
    env.update(
        HOME=str(tmp_path / "home"),
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
        ANSIBLE_ASYNC_DIR=str(tmp_path / "ansible-async"),
    )
    return subprocess.run(
        [str(cluster.venv_bin / "ansible-playbook"), "-i", str(inventory),
         str(ROOT / "playbooks" / "run.yml"), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL,  # Ansible 2.19 refuses a non-blocking stdin
    )  # fmt: skip


def _result(tmp_path: Path, run_id: str) -> dict:
    text = (tmp_path / "logs" / run_id / "h1" / "results.jsonl").read_text(encoding="utf-8")
    (record,) = [json.loads(line) for line in text.split("\n") if line]  # not at U+2028
    return record


def test_a_prompt_from_e_reaches_the_model_byte_for_byte_and_runs_nothing(local_cluster, tmp_path):
    canary = tmp_path / "evaluated"
    prompt = (
        f"{{{{ lookup('pipe', 'touch {canary}; id -un') }}}} and {{{{ 7*7 }}}} "
        f"{{% if true %}}x{{% endif %}} {{# c #}} \"dq\" 'sq' back\\slash\n"
        "second line\ttab é 中文 \u2028 {{ undefined_var }}"
    )
    extra = {"prompt": prompt, "run_id": "raw-prompt"}
    play = _play(local_cluster, tmp_path, "-e", json.dumps(extra))
    assert play.returncode == 0, (play.stdout + play.stderr)[-6000:]
    assert _result(tmp_path, "raw-prompt")["prompt"] == prompt
    assert not canary.exists()
    prompts = tmp_path / "runs" / "raw-prompt" / "prompts.jsonl"
    assert prompts.stat().st_mode & 0o777 == 0o600


def test_a_prompt_from_an_extra_vars_file_is_data_too(local_cluster, tmp_path):
    canary = tmp_path / "evaluated"
    prompt = f"it's {{{{ lookup('pipe', 'touch {canary}') }}}} " * 20
    path = tmp_path / "vars.json"
    path.write_text(json.dumps({"prompt": prompt, "run_id": "file-prompt", "seed": 7}))
    # Generation settings as plain variables beside it (config.yaml says max_tokens 2).
    play = _play(local_cluster, tmp_path, "-e", f"@{path}", "-e", "max_tokens=3")
    assert play.returncode == 0, (play.stdout + play.stderr)[-6000:]
    record = _result(tmp_path, "file-prompt")
    assert record["prompt"] == prompt
    assert not canary.exists()
    assert record["generation_tokens"] == 3 or record["finish_reason"] == "stop", record


def test_an_empty_prompt_is_one_clear_error(local_cluster, tmp_path):
    play = _play(local_cluster, tmp_path, "-e", json.dumps({"prompt": ""}))
    assert play.returncode != 0
    assert "Give exactly one of" in play.stdout + play.stderr


def test_run_yml_and_a_manual_launch_share_one_cluster_lock(local_cluster, tmp_path):
    lock = Path(DEFAULT_LOCK_FILE.replace("~", str(tmp_path / "home")))
    canary = tmp_path / "evaluated"
    # A setting is data like the prompt: the launch's command line is built with it here.
    extra = {"prompt": "Hi", "temperature": f"{{{{ lookup('pipe', 'touch {canary}') }}}}"}
    with cluster_lock(lock, "manual"):  # a manual `mlxnode launch` with its default lock
        play = _play(local_cluster, tmp_path, "-e", json.dumps(extra))
    output = " ".join((play.stdout + play.stderr).split())
    assert play.returncode != 0
    assert "(exit 8): cluster busy: run manual started" in output, output[-3000:]
    assert not canary.exists()
