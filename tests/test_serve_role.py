"""The mlxnode_serve role's service definitions, rendered by Ansible and checked by their
own parsers: the launchd plist with plistlib, the systemd unit with `systemd-analyze verify`
(where installed) and by reading ExecStart back. No testbed; tests/test_serve_e2e.py runs
the role for real.
"""

from __future__ import annotations

import json
import plistlib
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_ansible import ROOT, _solo_inventory, render_playbook

VENV = Path(sys.executable).parent.parent
# An argument that needs quoting in a unit: spaces, quotes, a specifier and a variable.
ODD = 'say "hi" to 100% of $USER'


def _render(tmp_path: Path, **extra_vars: object) -> Path:
    """The role's templates with `extra_vars` (given with -e: include_vars outranks the
    inventory)."""
    out = tmp_path / "out"
    out.mkdir()
    role = ROOT / "roles" / "mlxnode_serve"
    playbook = tmp_path / "render.yml"
    playbook.write_text(
        textwrap.dedent(
            f"""\
            ---
            - name: Render the server's service definitions.
              hosts: mlx_cluster
              gather_facts: true
              tasks:
                - name: Load the role's defaults and vars as the role would.
                  ansible.builtin.include_vars:
                    file: "{{{{ item }}}}"
                  loop:
                    - {role}/defaults/main.yml
                    - {role}/vars/main.yml
                - name: Render them.
                  ansible.builtin.template:
                    src: "{role}/templates/{{{{ item }}}}.j2"
                    dest: "{out}/{{{{ item }}}}"
                    mode: "0600"
                  loop:
                    - mlxnode-serve.plist
                    - mlxnode-serve.service
            """
        )
    )
    inventory = _solo_inventory(tmp_path, mlxnode_venv_dir=str(VENV))
    render_playbook(inventory, playbook, tmp_path, "-e", json.dumps(extra_vars))
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    return _render(
        tmp_path_factory.mktemp("serve-role"),
        mlxnode_serve_host="0.0.0.0",
        mlxnode_serve_port=8123,
        mlxnode_serve_api_key="sk-roleTestKey",
        mlxnode_serve_args=["--max-batch", "8", ODD],
    )


def _expected_argv() -> list[str]:
    base, run = VENV.parent, f"{VENV.parent}/runs/serve"
    return [
        f"{VENV}/bin/mlxnode", "launch", "--hostfile", f"{base}/hosts.json",
        "--backend", "ring", "--python", f"{VENV}/bin/python", "--run-id", "serve",
        "--connect-timeout", "5", "--log-dir", run,
        "--", "serve", "--config", f"{base}/serve.yaml", "--log-file", f"{run}/serve.log",
        "--host", "0.0.0.0", "--port", "8123", "--max-batch", "8", ODD,
    ]  # fmt: skip


def test_the_launchd_plist_keeps_the_server_alive_with_its_logs_in_the_run_dir(rendered):
    with (rendered / "mlxnode-serve.plist").open("rb") as f:
        plist = plistlib.load(f)
    run = f"{VENV.parent}/runs/serve"
    assert plist["Label"] == "io.mlxnode.serve"
    assert plist["ProgramArguments"] == _expected_argv()
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # restart after a failure only
    assert plist["RunAtLoad"] is True
    assert plist["ThrottleInterval"] == 10
    assert plist["WorkingDirectory"] == run
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == f"{run}/service.log"
    assert "sk-roleTestKey" not in (rendered / "mlxnode-serve.plist").read_text()  # serve.yaml
    assert plist["ProcessType"] == "Interactive"
    plutil = shutil.which("plutil")
    if plutil:  # macOS
        subprocess.run([plutil, "-lint", str(rendered / "mlxnode-serve.plist")], check=True)


def test_the_systemd_unit_restarts_on_failure_and_verifies(rendered, tmp_path):
    unit = (rendered / "mlxnode-serve.service").read_text()
    lines = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0] != "#")
    assert lines["Restart"] == "on-failure"
    assert lines["RestartSec"] == "10"
    assert lines["WorkingDirectory"] == f"{VENV.parent}/runs/serve"
    assert "sk-roleTestKey" not in unit  # it lives in serve.yaml (0600), on every host
    # Every argument double-quoted, specifiers and variables escaped: undo that, and split.
    exec_start = lines["ExecStart"].replace("%%", "%").replace("$$", "$")
    assert shlex.split(exec_start) == _expected_argv()
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # verify wants the file under a unit name, and the unit's command to exist.
    target = tmp_path / "mlxnode-serve.service"
    shutil.copy(rendered / "mlxnode-serve.service", target)
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(target)], capture_output=True, text=True
    )
    errors = [
        line for line in (proc.stdout + proc.stderr).splitlines() if "mlxnode-serve.service" in line
    ]
    assert proc.returncode == 0 and not errors, proc.stdout + proc.stderr
