"""The CLI as a new user meets it: help with examples and defaults, short flags, one-line
mistakes, each command offering only the settings it reads. Real `mlxnode` processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlxnode.commands.cache import ACTION_KEYS, ACTIONS
from mlxnode.commands.common import CONFIG_FLAGS
from mlxnode.config import DEFAULT_MAX_TOKENS, DEFAULT_STEP_TIMEOUT
from mlxnode.launcher import DEFAULT_LOCK_FILE, DEFAULT_TIMEOUT
from mlxnode.preflight import DEFAULT_STARTING_PORT

COMMANDS = [
    ["run"],
    ["serve"],
    ["launch"],
    ["health"],
    ["config", "show"],
    ["cache"],
    *(["cache", action] for action in ACTIONS),
]


def mlxnode(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX", "HF_"))}
    return subprocess.run(
        [sys.executable, "-m", "mlxnode", *args],
        capture_output=True, text=True, timeout=60, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """Every command's --help, read once."""
    texts = {}
    for command in COMMANDS:
        result = mlxnode(*command, "--help")
        assert result.returncode == 0, result.stderr
        texts[" ".join(command)] = result.stdout
    return texts


def test_every_command_shows_examples_of_itself(helps):
    for command, text in helps.items():
        examples = text.split("\nexamples:\n", 1)
        assert len(examples) == 2, command
        assert f"  mlxnode {command}" in examples[1], (command, examples[1])
        assert "flag > MLXNODE_" in examples[1], command  # how settings resolve


def test_launch_help_shows_its_hostfile_format_port_timeout_and_the_separator(helps):
    text = " ".join(helps["launch"].split())
    assert '[{"ssh": "mac1.local", "ips": ["10.0.0.1"]},' in text
    assert f"(default: {DEFAULT_STARTING_PORT})" in text
    assert f"(default: {DEFAULT_TIMEOUT:g} for run, none for serve)" in text
    assert f"(default: {DEFAULT_LOCK_FILE})" in text
    assert "-- [serve] [mlxnode run arguments]" in text
    assert "its format: `mlxnode launch --help`" in " ".join(helps["health"].split())


def test_defaults_in_help_come_from_the_config_model(helps):
    run = " ".join(helps["run"].split())
    assert f"-n N, --max-tokens N Most tokens to generate (default: {DEFAULT_MAX_TOKENS})." in run
    assert f"(default: {DEFAULT_STEP_TIMEOUT})" in run
    assert "-m REPO, --model REPO" in run and "-t T, --temperature T" in run
    assert "-f FILE, --prompts-file FILE" in run and "-o FILE, --output FILE" in run


def test_each_cache_action_offers_only_the_settings_it_reads(helps):
    for action, keys in ACTION_KEYS.items():
        text = helps[f"cache {action}"]
        for flag in CONFIG_FLAGS:
            offered = re.search(rf"(?<![\w-]){flag.flags[0]}(?![\w-])", text) is not None
            assert offered == (flag.key in keys), (action, flag.key)
    assert "--step-timeout" not in helps["cache size"] and "--step-timeout" in helps["run"]
    refused = mlxnode("cache", "size", "--step-timeout", "5")
    assert refused.returncode == 2
    assert "unrecognized arguments: --step-timeout" in refused.stderr.splitlines()[-1]


def test_short_flags_set_the_same_settings_as_the_long_ones(tmp_path):
    result = mlxnode(
        "config", "show", "--no-config", "-m", "org/name", "-n", "64", "-t", "0.5", "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["model.name"] == {"value": "org/name", "source": "cli:--model"}
    assert shown["generation.max_tokens"] == {"value": 64, "source": "cli:--max-tokens"}
    assert shown["generation.temperature"] == {"value": 0.5, "source": "cli:--temperature"}
    config = tmp_path / "c.yaml"
    config.write_text("generation:\n  seed: 7\n")
    by_c = mlxnode("config", "show", "-c", str(config), "--json", cwd=tmp_path)
    assert json.loads(by_c.stdout)["generation.seed"]["source"] == str(config)


def test_launch_without_the_separator_is_one_line_saying_to_add_it(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('[{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]')
    missing = mlxnode("launch", "--hostfile", str(hostfile), "--max-tokens", "8", "Hi")
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1, missing.stderr  # no usage block
    assert missing.stderr.startswith("mlxnode launch: error: unrecognized arguments: --max-tokens")
    assert "put `--` before the `mlxnode run` arguments" in missing.stderr

    # A launch option after `--` is a flag `mlxnode run` does not know: also one line.
    late = mlxnode("launch", "--hostfile", str(hostfile), "--", "--no-preflight", "Hi")
    assert late.returncode == 2 and late.stderr.count("\n") == 1, late.stderr
    assert "--no-preflight" in late.stderr and "options go before `--`" in late.stderr
    both = mlxnode("launch", "--hostfile", str(hostfile), "--", "-f", "p.txt", "Hi")
    assert both.returncode == 2 and "not both" in both.stderr


def test_run_list_cached_and_clear_cache_still_work_with_a_deprecation_note(tmp_path):
    cache = tmp_path / "cache"
    listed = mlxnode("run", "--no-config", "--cache-dir", str(cache), "--list-cached")
    assert listed.returncode == 0 and "no models cached" in listed.stdout, listed.stderr
    (note,) = listed.stderr.splitlines()
    assert "deprecated" in note and "use `mlxnode cache list`" in note
    cleared = mlxnode(
        "run", "--no-config", "--cache-dir", str(cache), "--clear-cache", "-m", "org/x", "--yes"
    )
    assert "use `mlxnode cache clear MODEL --yes`" in cleared.stderr.splitlines()[0]
