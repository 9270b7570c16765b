"""The one byte format, table layout and atomic write that every part of mlxnode uses."""

from __future__ import annotations

import pytest

from mlxnode.files import write_atomic
from mlxnode.formatting import format_byte_pair, format_bytes, format_table


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (None, "0 B"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        ("2048", "2.0 KiB"),
        (10**9, "953.7 MiB"),
        (3 * 2**40, "3.0 TiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_bytes_are_binary_units(n, text):
    assert format_bytes(n) == text


def test_progress_pairs_share_the_totals_unit():
    assert format_byte_pair(2**30, 3 * 2**30) == "1.0/3.0 GiB"
    assert format_byte_pair(5, 900) == "5/900 B"


def test_table_pads_columns_and_takes_mappings_or_sequences():
    lines = format_table([("x", 10), ("long", None)], ["a", "b"])
    assert lines == ["a     b", "----  --", "x     10", "long"]
    assert format_table([{"b": 1}], ["a", "b"]) == ["a  b", "-  -", "   1"]


def test_atomic_write_replaces_whole_and_leaves_nothing_behind(tmp_path):
    target = write_atomic(tmp_path / "sub" / "f.json", "new\n", mode=0o600)
    assert target.read_text() == "new\n" and target.stat().st_mode & 0o777 == 0o600
    with pytest.raises(IsADirectoryError):
        write_atomic(tmp_path / "sub", "x")
    # The temporary file beside the target (here in tmp_path) is gone too.
    assert [p.name for p in tmp_path.iterdir()] == ["sub"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["f.json"]
