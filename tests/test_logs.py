"""Rank-aware logging: the line format, one file per rank, quiet non-zero ranks, redaction."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlxnode.logs import rank_log_path, redact

LINE = re.compile(
    r"^\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\] \[Rank (\d+)/(\d+)\] (DEBUG|INFO|WARNING|ERROR) "
    r"[\w.]+: .+$"
)

SNIPPET = """
import logging, sys
from mlxnode.logs import setup_logging
path = setup_logging(sys.argv[1], sys.argv[2])
log = logging.getLogger("mlxnode.test")
log.info("hello from the test")
log.debug("a debug detail")
log.warning("token is hf_abcdefghijklmnop and header Authorization: Bearer hf_zzzzzzzzzzzz")
try:
    raise RuntimeError("failed with HF_TOKEN=hf_secretsecretsecret")
except RuntimeError:
    log.exception("boom")
"""


def run_rank(rank: int, size: int, level: str, log_file: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "MLXNODE_"))}
    env.update(MLX_RANK=str(rank), MLX_WORLD_SIZE=str(size))
    return subprocess.run(
        [sys.executable, "-c", SNIPPET, level, str(log_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def two_ranks(tmp_path):
    log_file = tmp_path / "logs" / "inference.log"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SNIPPET, "INFO", str(log_file)],
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "MLXNODE_"))},
                "MLX_RANK": str(rank),
                "MLX_WORLD_SIZE": "2",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    return log_file, outputs


def test_two_real_processes_write_one_file_each_in_the_documented_format(two_ranks):
    log_file, _ = two_ranks
    for rank in (0, 1):
        path = log_file.parent / f"inference.rank{rank}.log"
        lines = [ln for ln in path.read_text().splitlines() if ln.startswith("[")]
        assert lines, path
        for line in lines:
            match = LINE.match(line)
            assert match, line
            assert match.groups()[:2] == (str(rank), "2")
        assert "hello from the test" in path.read_text()
    assert not (log_file.parent / "inference.log").exists()


def test_non_zero_rank_keeps_the_console_quiet(two_ranks):
    _, ((out0, err0), (out1, err1)) = two_ranks
    assert "hello from the test" in err0
    assert err1 == ""
    assert out0 == out1 == ""


def test_debug_level_lets_every_rank_talk(tmp_path):
    result = run_rank(1, 2, "DEBUG", tmp_path / "x.log")
    assert "a debug detail" in result.stderr
    assert "[Rank 1/2]" in result.stderr


def test_secrets_never_reach_console_or_file(tmp_path):
    result = run_rank(0, 1, "INFO", tmp_path / "x.log")
    written = (tmp_path / "x.rank0.log").read_text()
    for text in (result.stderr, written):
        assert "hf_abcdefghijklmnop" not in text
        assert "hf_zzzzzzzzzzzz" not in text
        assert "hf_secretsecretsecret" not in text
        assert "hf_***" in text or "***" in text
    assert "RuntimeError" in written  # the traceback is kept, only the secret is gone


def test_log_file_mode_is_not_world_readable(tmp_path):
    run_rank(0, 1, "INFO", tmp_path / "x.log")
    assert (tmp_path / "x.rank0.log").stat().st_mode & 0o007 == 0


@pytest.mark.parametrize(
    ("given", "rank", "expected"),
    [
        ("logs/inference.log", 1, "logs/inference.rank1.log"),
        ("logs/run", 0, "logs/run.rank0.log"),
        ("a.b.txt", 2, "a.b.rank2.txt"),
    ],
)
def test_rank_log_path(given, rank, expected):
    assert rank_log_path(given, rank) == Path(expected)


@pytest.mark.parametrize(
    "secret_line",
    [
        "Authorization: Bearer abc.def.ghi",
        "authorization=Bearer xyz",
        "token=hf_1234567890abcdef",
        "HF_TOKEN: 'hf_1234567890abcdef'",
        "{'Authorization': 'Bearer secretvalue'}",
    ],
)
def test_redact_patterns(secret_line):
    cleaned = redact(secret_line)
    assert "***" in cleaned
    for secret in ("abc.def.ghi", "xyz", "1234567890abcdef", "secretvalue"):
        assert secret not in cleaned


def test_a_process_that_is_no_rank_names_itself(tmp_path):
    snippet = (
        "import logging, sys\n"
        "from mlxnode.logs import setup_logging\n"
        "setup_logging('INFO', sys.argv[1], label='launcher')\n"
        "logging.getLogger('mlxnode.launcher').info('pre-flight passed')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "MLXNODE_"))}
    result = subprocess.run(
        [sys.executable, "-c", snippet, str(tmp_path / "launch.log")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    line = re.compile(r"^\[[\d: -]+\] \[launcher\] INFO mlxnode.launcher: pre-flight passed$")
    for text in (result.stderr, (tmp_path / "launch.rank0.log").read_text()):
        assert line.match(text.strip()), text


def test_a_failed_runs_error_is_one_console_line_with_or_without_a_log_file(tmp_path):
    # The engine logs its error for the file; the CLI prints it as its one line.
    missing = tmp_path / "no-model"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "MLXNODE_"))}
    for log_file in (tmp_path / "logs" / "run.log", None):
        extra = ["--log-file", str(log_file)] if log_file else []
        result = subprocess.run(
            [sys.executable, "-m", "mlxnode", "run", "--model-path", str(missing), *extra, "Hi"],
            env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 5, result.stderr
        lines = [line for line in result.stderr.splitlines() if str(missing) in line]
        assert len(lines) == 1, result.stderr  # with or without a file: the CLI's line only
        assert lines[-1] == result.stderr.splitlines()[-1]
        assert lines[-1].startswith(f"mlxnode: error: {missing} is not a model directory")
    written = (tmp_path / "logs" / "run.rank0.log").read_text()
    assert f"ERROR mlxnode.engine: {missing} is not a model directory" in written
