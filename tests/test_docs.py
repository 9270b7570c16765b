"""The README's reference sections match the code, and its two commands exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mlxnode.reference import exit_codes_table, settings_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_settings_table_is_generated_from_the_config_model():
    assert settings_table() in README, "run `python -m mlxnode.reference` and paste the table"


def test_readme_exit_codes_match_errors_module():
    assert exit_codes_table() in README


def test_first_screen_has_the_two_commands_and_ci_calls_make_test():
    first_screen = "\n".join(README.splitlines()[:40])
    assert "make demo" in first_screen and "make test" in first_screen
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_every_cli_flag_is_documented_in_help():
    for verb in (["run"], ["serve"], ["config", "show"], ["cache", "prewarm"]):
        result = subprocess.run(
            [sys.executable, "-m", "mlxnode", *verb, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        for line in result.stdout.splitlines():
            stripped = line.strip()
            # An option line with no help text would end right after the flag names.
            if stripped.startswith("--") and "  " not in stripped:
                continued = result.stdout.split(line, 1)[1].splitlines()[1:2]
                assert continued and continued[0].startswith(" " * 20), f"{verb}: {line}"
