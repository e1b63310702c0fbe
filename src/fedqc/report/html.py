"""One self-contained HTML file: text, tables and PNG figures embedded as base64 data URIs."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from fedqc.report.tables import Columns, html_table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; margin: 0.5em 0; } pre { background: #f7f7f7; padding: 1em; overflow: auto; }
.note { color: #555; font-size: 0.9em; }
"""


def heading(text: str, level: int = 2) -> str:
    return f"<h{level}>{html.escape(text)}</h{level}>"


def paragraph(text: str, note: bool = False) -> str:
    cls = ' class="note"' if note else ""
    return f"<p{cls}>{html.escape(text)}</p>"


def bullets(items: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


def preformatted(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def table(rows: Sequence[dict], columns: Columns) -> str:
    return html_table(rows, columns)


def image(png: Path, alt: str) -> str:
    """The PNG embedded in the page, so the report is one file."""
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_report(path: Path, title: str, parts: Sequence[str]) -> Path:
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        f"{heading(title, 1)}\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path
