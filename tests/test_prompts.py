"""Prompt files: plain text and JSONL, and refusing a malformed file by line number."""

from __future__ import annotations

import io

import pytest

from mlxnode.errors import UsageError
from mlxnode.prompts import (
    Prompt,
    prompts_from_args,
    prompts_from_json,
    prompts_to_json,
    read_prompts_file,
)


def test_plain_text_is_one_prompt_per_line_with_line_numbers_as_ids(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\n  second one  \r\nthird\n")
    assert read_prompts_file(str(path)) == [
        Prompt(1, "first prompt"),
        Prompt(3, "  second one  "),
        Prompt(4, "third"),
    ]


def test_jsonl_keeps_ids_and_defaults_missing_ones_to_the_line_number(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "prompt": "one"}\n\n{"prompt": "two"}\n{"id": 7, "prompt": "x"}\n')
    assert read_prompts_file(str(path)) == [Prompt("a", "one"), Prompt(3, "two"), Prompt(7, "x")]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"id": 2, "prompt": "unterminated}', "line 2: invalid JSON"),
        ('["not", "an object"]', "line 2: expected an object"),
        ('{"id": 2}', 'line 2: "prompt" must be a string'),
        ('{"id": 2, "prompt": "   "}', "line 2: the prompt is empty"),
        ('{"id": 1, "prompt": "again"}', "line 2: id 1 was already used on line 1"),
        ('{"id": [1], "prompt": "x"}', 'line 2: "id" must be a string or an integer'),
    ],
)
def test_a_malformed_jsonl_line_refuses_the_whole_file(tmp_path, bad_line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(f'{{"id": 1, "prompt": "fine"}}\n{bad_line}\n{{"prompt": "fine too"}}\n')
    with pytest.raises(UsageError, match=message) as e:
        read_prompts_file(str(path))
    assert str(path) in str(e.value)


def test_empty_and_missing_files_are_usage_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UsageError, match="holds no prompt"):
        read_prompts_file(str(empty))
    with pytest.raises(UsageError, match="not found"):
        read_prompts_file(str(tmp_path / "missing.txt"))


def test_stdin_is_read_with_dash():
    assert read_prompts_file("-", stdin=io.StringIO("a\nb\n")) == [Prompt(1, "a"), Prompt(2, "b")]


def test_words_form_one_prompt_and_blank_words_are_refused():
    assert prompts_from_args(["tell", "me", "a", "joke"]) == [Prompt(1, "tell me a joke")]
    with pytest.raises(UsageError, match="empty"):
        prompts_from_args(["  "])


def test_prompts_survive_the_trip_to_other_ranks():
    prompts = [Prompt(1, "héllo\nworld"), Prompt("x", "{json}")]
    assert prompts_from_json(prompts_to_json(prompts)) == prompts
