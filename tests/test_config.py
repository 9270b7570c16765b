"""Configuration: four-level precedence, discovery, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxnode.config import ConfigError, env_var_name, iter_fields, load_config

SEED_EXAMPLE = """\
model:
  name: "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
generation:
  max_tokens: 128
logging:
  level: "INFO"
"""


def mlxnode(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLXNODE_")}
    return subprocess.run(
        [sys.executable, "-m", "mlxnode", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def show(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    result = mlxnode("config", "show", "--json", *args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_seed_example_works_verbatim(tmp_path):
    (tmp_path / "config.yaml").write_text(SEED_EXAMPLE)
    shown = show(tmp_path)
    assert shown["model.name"] == {
        "value": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "source": str(tmp_path / "config.yaml"),
    }
    assert shown["generation.max_tokens"]["value"] == 128
    assert shown["generation.temperature"] == {"value": 0.0, "source": "default"}


@pytest.mark.parametrize(
    ("in_file", "in_env", "in_cli", "expected", "source"),
    [
        (False, False, False, 256, "default"),
        (True, False, False, 128, "file"),
        (True, True, False, 64, "env:MLXNODE_GENERATION_MAX_TOKENS"),
        (False, True, False, 64, "env:MLXNODE_GENERATION_MAX_TOKENS"),
        (True, True, True, 7, "cli:--max-tokens"),
        (True, False, True, 7, "cli:--max-tokens"),
        (False, True, True, 7, "cli:--max-tokens"),
    ],
)
def test_precedence_cli_over_env_over_file_over_default(
    tmp_path, in_file, in_env, in_cli, expected, source
):
    if in_file:
        (tmp_path / "config.yaml").write_text(SEED_EXAMPLE)
    env = {"MLXNODE_GENERATION_MAX_TOKENS": "64"} if in_env else {}
    args = ["--max-tokens", "7"] if in_cli else []
    shown = show(tmp_path, *args, env=env)["generation.max_tokens"]
    if source == "file":
        source = str(tmp_path / "config.yaml")
    assert shown == {"value": expected, "source": source}


def test_every_setting_has_an_env_var_that_overrides_the_file(tmp_path):
    overrides = {
        int: ("3", 3),
        float: ("0.5", 0.5),
        bool: ("true", True),
        str: (None, None),
    }
    for key, _field, tp in iter_fields():
        base = next(
            (t for t in (bool, int, float, str) if t is tp or t in getattr(tp, "__args__", ())),
            None,
        )
        raw, value = overrides.get(base, (None, None))
        if raw is None:
            continue
        resolved = load_config(cwd=tmp_path, environ={env_var_name(key): raw})
        section, name = key.split(".")
        assert getattr(getattr(resolved.config, section), name) == value, key
        assert resolved.sources[key] == f"env:{env_var_name(key)}"


def test_list_settings_parse_from_env_and_file(tmp_path):
    (tmp_path / "config.yml").write_text("distributed:\n  split: [5, 3]\n")
    resolved = load_config(cwd=tmp_path, environ={"MLXNODE_DISTRIBUTED_WEIGHTS": "192,64"})
    assert resolved.config.distributed.split == [5, 3]
    assert resolved.config.distributed.weights == [192.0, 64.0]


def test_discovery_order_first_found_wins(tmp_path):
    (tmp_path / ".mlx-config.yaml").write_text("generation: {max_tokens: 3}\n")
    assert load_config(cwd=tmp_path, environ={}).config.generation.max_tokens == 3
    (tmp_path / "config.yml").write_text("generation: {max_tokens: 2}\n")
    assert load_config(cwd=tmp_path, environ={}).config.generation.max_tokens == 2
    (tmp_path / "config.yaml").write_text("generation: {max_tokens: 1}\n")
    assert load_config(cwd=tmp_path, environ={}).config.generation.max_tokens == 1


def test_explicit_config_beats_discovery(tmp_path):
    (tmp_path / "config.yaml").write_text("generation: {max_tokens: 1}\n")
    other = tmp_path / "other.yaml"
    other.write_text("generation: {max_tokens: 9}\n")
    shown = show(tmp_path, "--config", str(other))
    assert shown["generation.max_tokens"] == {"value": 9, "source": str(other)}


def test_no_config_reads_no_file_and_no_offline_beats_the_file(tmp_path):
    # Another tool's config.yaml where mlxnode happens to run (Ansible runs in $HOME).
    (tmp_path / "config.yaml").write_text("server:\n  port: 8080\n")
    assert mlxnode("config", "show", cwd=tmp_path).returncode == 2
    shown = show(tmp_path, "--no-config")
    assert shown["model.name"] == {"value": None, "source": "default"}
    both = mlxnode("config", "show", "--no-config", "--config", "x.yaml", cwd=tmp_path)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr

    rendered = tmp_path / "rendered.yaml"
    rendered.write_text("cache:\n  offline: true\n")
    assert show(tmp_path, "--config", str(rendered))["cache.offline"]["value"] is True
    online = show(tmp_path, "--config", str(rendered), "--no-offline")["cache.offline"]
    assert online == {"value": False, "source": "cli:--offline"}


def test_log_level_is_case_insensitive(tmp_path):
    (tmp_path / "config.yaml").write_text("logging: {level: debug}\n")
    assert load_config(cwd=tmp_path, environ={}).config.logging.level == "DEBUG"


BAD_FILES = [
    ("generation:\n  max_tokns: 5\n", ["generation.max_tokns", "did you mean 'max_tokens'"]),
    ("generaton:\n  max_tokens: 5\n", ["generaton", "did you mean 'generation'"]),
    (
        "generation:\n  max_tokens: lots\n",
        ["generation.max_tokens", "expected an integer", "'lots'"],
    ),
    ("generation:\n  max_tokens: -5\n", ["generation.max_tokens", ">= 1", "-5"]),
    ("generation:\n  temperature: hot\n", ["generation.temperature", "expected a number"]),
    ("generation:\n  max_tokens: [1\n", ["invalid YAML", "line 3"]),
    ("model: [1, 2]\n", ["model", "expected a mapping of settings"]),
    ("- just\n- a list\n", ["expected a mapping of sections"]),
    ("logging:\n  level: LOUD\n", ["logging.level", "DEBUG, INFO, WARNING, ERROR", "'LOUD'"]),
    ("distributed:\n  split: [3, zero]\n", ["distributed.split", "expected a list of integers"]),
    ("distributed:\n  strategy: pipline\n", ["distributed.strategy", "did you mean 'pipeline'"]),
    ("cache:\n  offline: maybe\n", ["cache.offline", "expected a boolean"]),
    ("generation:\n  top_p: 1.5\n", ["generation.top_p", "(0, 1]"]),
]


@pytest.mark.parametrize(("text", "fragments"), BAD_FILES)
def test_bad_config_file_gives_one_line_exit_2(tmp_path, text, fragments):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    result = mlxnode("config", "show", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert str(path) in lines[0]
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("args", "env", "fragments"),
    [
        (["--config", "missing.yaml"], {}, ["missing.yaml", "file not found"]),
        (["--config", "."], {}, ["is not a file"]),
        (["--max-tokens", "-1"], {}, ["--max-tokens", ">= 1"]),
        (["--temperature", "warm"], {}, ["--temperature", "expected a number"]),
        ([], {"MLXNODE_GENERATION_MAX_TOKENS": "many"}, ["MLXNODE_GENERATION_MAX_TOKENS"]),
        (
            [],
            {"MLXNODE_GENERATION_MAX_TOKNS": "3"},
            ["did you mean 'MLXNODE_GENERATION_MAX_TOKENS'"],
        ),
    ],
)
def test_bad_flags_and_env_give_one_line_exit_2(tmp_path, args, env, fragments):
    result = mlxnode("config", "show", *args, cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_undecodable_file_is_reported_not_raised(tmp_path):
    (tmp_path / "config.yaml").write_bytes(b"model:\n  name: \xff\xfe\n")
    result = mlxnode("config", "show", cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot read file" in result.stderr


def test_debug_level_adds_the_traceback(tmp_path):
    (tmp_path / "config.yaml").write_text("generation:\n  max_tokens: -5\n")
    result = mlxnode("config", "show", "--log-level", "DEBUG", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("mlxnode: error:")


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=3)
    ),
    max_leaves=8,
)
section_names = st.sampled_from(["model", "generation", "cache", "logging", "distributed", "x"])
key_names = st.sampled_from(
    ["name", "max_tokens", "temperature", "level", "split", "weights", "dir", "offline", "seed"]
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    doc=st.one_of(
        yaml_values,
        st.dictionaries(
            section_names, st.dictionaries(key_names, yaml_values, max_size=3), max_size=3
        ),
    )
)
def test_any_yaml_document_loads_or_raises_config_error(tmp_path, doc):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_config(config_path=path, environ={})
    except ConfigError as e:
        assert str(path) in str(e)
        assert "\n" not in str(e)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=60))
def test_any_text_file_loads_or_raises_config_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(config_path=path, environ={})
    except ConfigError as e:
        assert "\n" not in str(e)
