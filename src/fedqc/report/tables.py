"""Rows (dicts) as markdown, HTML and CSV tables, with one way of formatting numbers."""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Sequence
from pathlib import Path

Columns = Sequence[tuple[str, str]]  # (row key, header)


def fmt(value, digits: int = 3) -> str:
    """None or NaN: "–"; floats with ``digits`` decimals (4 significant digits if large, or if
    so small that the decimals would be all zeros)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if abs(value) >= 1000 or 0 < abs(value) < 10**-digits:
            return f"{value:.4g}"  # large, or so small that the decimals would show 0.000
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Columns) -> str:
    lines = [
        "| " + " | ".join(h for _, h in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def html_table(rows: Sequence[dict], columns: Columns) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(row.get(k)))}</td>" for k, _ in columns) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """Every key of every row becomes a column (first-seen order); missing values stay empty."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in keys})


def _csv_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return "" if value is None else value
