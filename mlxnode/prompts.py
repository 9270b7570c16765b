"""Prompts for `mlxnode run`: from the command line, a file, or stdin.

A prompts file is read whole and checked before any model is loaded, so a bad line
costs nothing. Two formats, told apart by the first non-blank line:

- plain text: every non-blank line is one prompt; blank lines are skipped; a prompt's
  id is its line number;
- JSONL (first non-blank line starts with ``{``): every non-blank line is an object
  ``{"id": ..., "prompt": "..."}``; ``id`` (a string or integer) is optional and
  defaults to the line number. Any malformed line (bad JSON, not an object, no or
  empty ``prompt``, duplicate id) refuses the whole file with `UsageError` naming
  the line, because a batch silently missing some prompts is worse than none.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .errors import UsageError

STDIN = "-"
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Prompt:
    """One prompt and the id its result is reported under."""

    id: str | int
    text: str


def prompts_from_args(words: Sequence[str]) -> list[Prompt]:
    """The prompt given as positional words, joined by spaces (`mlxnode run tell me a joke`).

    Raises:
        UsageError: the words are all blank.
    """
    text = " ".join(words)
    _check_utf8(text, "the prompt")
    if not text.strip():
        raise UsageError("the prompt is empty; give some text, '-' for stdin or --prompts-file")
    return [Prompt(id=1, text=text)]


def read_prompts_file(path: str, *, stdin: TextIO | None = None) -> list[Prompt]:
    """Every prompt of a plain-text or JSONL file (``-``: stdin), checked line by line.

    Raises:
        UsageError: the file cannot be read, holds no prompt, or has a malformed line.
    """
    name = "stdin" if path == STDIN else path
    try:
        if path == STDIN:
            stream = stdin or sys.stdin
            # Bytes, decoded strictly: the text layer may hide bad bytes as lone surrogates.
            raw = getattr(stream, "buffer", None)
            text = raw.read().decode("utf-8-sig") if raw is not None else stream.read()
        else:
            # utf-8-sig: a BOM would otherwise hide the JSONL "{" and make it plain text.
            text = Path(path).expanduser().read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"prompts file {name} not found; check the --prompts-file path") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UsageError(f"cannot read prompts file {name} ({reason})") from e
    text = text.removeprefix("\ufeff")
    _check_utf8(text, f"prompts file {name}")
    # Only real line endings: str.splitlines() also breaks at U+2028, \x1c..., which JSON
    # strings may hold raw, and would cut a valid record in two.
    return parse_prompts(_LINE_END.split(text), source=name)


def _check_utf8(text: str, what: str) -> None:
    """Refuse text holding lone surrogates (undecodable bytes from argv or a text stream)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(
            f"{what} is not valid UTF-8 (bad byte at character {e.start}); save it as UTF-8"
        ) from None


def parse_prompts(lines: Iterable[str], *, source: str) -> list[Prompt]:
    """Parse prompt lines (see the module docstring for the two formats)."""
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise UsageError(f"{source} holds no prompt; write one prompt per line")
    if not numbered[0][1].lstrip().startswith("{"):
        return [Prompt(id=n, text=line.rstrip("\r")) for n, line in numbered]

    prompts: list[Prompt] = []
    seen: dict[str | int, int] = {}
    for n, line in numbered:
        where = f"{source} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(
                f"{where}: invalid JSON ({e.msg}, column {e.colno}); the file is JSONL because "
                'its first line is an object, so every line must be {"id": ..., "prompt": ...}'
            ) from None
        if not isinstance(record, dict):
            raise UsageError(f'{where}: expected an object {{"id": ..., "prompt": ...}}')
        text = record.get("prompt")
        if not isinstance(text, str):
            raise UsageError(f'{where}: "prompt" must be a string')
        if not text.strip():
            raise UsageError(f"{where}: the prompt is empty")
        prompt_id = record.get("id", n)
        if isinstance(prompt_id, bool) or not isinstance(prompt_id, str | int):
            raise UsageError(f'{where}: "id" must be a string or an integer')
        if prompt_id in seen:
            raise UsageError(
                f"{where}: id {prompt_id!r} was already used on line {seen[prompt_id]}"
            )
        seen[prompt_id] = n
        prompts.append(Prompt(id=prompt_id, text=text))
    return prompts


def prompts_to_json(prompts: Sequence[Prompt]) -> list[list[str | int]]:
    """Prompts as JSON-ready lists, to send from rank 0 to the other ranks."""
    return [[p.id, p.text] for p in prompts]


def prompts_from_json(data: Sequence[Sequence[str | int]]) -> list[Prompt]:
    return [Prompt(id=i, text=str(t)) for i, t in data]


def prompts_to_jsonl(prompts: Sequence[Prompt]) -> str:
    """Prompts as a JSONL prompts file that `read_prompts_file` reads back exactly.

    Every character outside ASCII is escaped, so no line ending, U+2028 or byte-order
    mark inside a prompt can split or alter a record.
    """
    return "".join(json.dumps({"id": p.id, "prompt": p.text}) + "\n" for p in prompts)
