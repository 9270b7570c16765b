"""How sizes and tables read on a terminal and in logs: one convention everywhere.

Byte sizes are binary (KiB, MiB, GiB: powers of 1024), the unit in which memory is
reported, so a rank's weight files, its free memory and a download read alike.
The Ansible filters (plugins/filter/mlxnode_cluster.py) use these same functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: float | int | str | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; whole bytes below 1 KiB (``"512 B"``); None counts as 0."""
    size = float(n or 0)
    scale, unit = _scale(size)
    return f"{size:.0f} B" if unit == "B" else f"{size / scale:.1f} {unit}"


def format_byte_pair(done: float, total: float) -> str:
    """``"1.2/3.4 GiB"``: progress with both numbers in the total's unit."""
    scale, unit = _scale(total)
    if unit == "B":
        return f"{done:.0f}/{total:.0f} B"
    return f"{done / scale:.1f}/{total / scale:.1f} {unit}"


def _scale(size: float) -> tuple[int, str]:
    """The largest unit that `size` reaches (bytes below 1 KiB), and its size in bytes."""
    exponent = 0
    while exponent + 1 < len(_UNITS) and abs(size) >= 1024 ** (exponent + 1):
        exponent += 1
    return 1024**exponent, _UNITS[exponent]


def format_table(
    rows: Sequence[Mapping[str, Any] | Sequence[Any]], columns: Sequence[str]
) -> list[str]:
    """Rows as aligned text lines: the header, a rule, then one line per row.

    Args:
        rows: Each a mapping from column name to value, or a sequence in column order;
            None prints as an empty cell.
        columns: The header, which is also the keys of mapping rows.

    Returns:
        The lines, without trailing spaces (join them with newlines to print).
    """
    cells = [[str(c) for c in columns]]
    for row in rows:
        values = [row.get(c) for c in columns] if isinstance(row, Mapping) else list(row)
        cells.append(["" if v is None else str(v) for v in values])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    return [line(cells[0]), line(["-" * w for w in widths])] + [line(c) for c in cells[1:]]
