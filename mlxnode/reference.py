"""The README's reference tables, generated from the code so the docs cannot drift.

`python -m mlxnode.reference` prints them; tests/test_docs.py checks the README holds
them verbatim.
"""

from __future__ import annotations

import dataclasses
import json

from .commands.common import CONFIG_FLAGS, ConfigFlag
from .config import env_var_name, iter_fields
from .errors import EXIT_CODES


def settings_table() -> str:
    flags = {f.key: " / ".join(f"`{name}`" for name in _names(f)) for f in CONFIG_FLAGS}
    rows = ["| key | env var | flag | default | meaning |", "|---|---|---|---|---|"]
    for key, field, _type in iter_fields():
        default = field.default if field.default is not dataclasses.MISSING else None
        choices = field.metadata.get("choices")
        meaning = field.metadata.get("help", "")
        if choices:
            meaning += f" One of {', '.join(choices)}."
        rows.append(
            f"| `{key}` | `{env_var_name(key)}` | {flags.get(key, '')} "
            f"| `{json.dumps(default)}` | {meaning} |"
        )
    return "\n".join(rows)


def _names(flag: ConfigFlag) -> list[str]:
    """A flag's spellings, with the `--no-` form argparse adds to a "bool" flag."""
    names = list(flag.names)
    if flag.kind == "bool":
        names += [f"--no-{name.removeprefix('--')}" for name in flag.flags]
    return names


def exit_codes_table() -> str:
    rows = ["| code | meaning |", "|---|---|"]
    rows += [f"| {code} | {meaning} |" for code, meaning in EXIT_CODES]
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table(), end="\n\n")
    print(exit_codes_table())
