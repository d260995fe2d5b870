"""The HTML of every page transferkit writes: one style sheet, escaped text, tables and embedded images."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#222}
h1{font-size:1.6rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}
th{background:#f4f6f7}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5rem 0}pre{background:#f8f9f9;padding:.8rem;overflow:auto}
.run{border-top:3px solid #2e86c1;margin-top:2.5rem}.muted{color:#777}.inflated{color:#b03a2e;font-weight:bold}
"""


class Markup(str):
    """A table cell that is HTML already (a link), shown as is."""


def format_cell(value: Any) -> str:
    if isinstance(value, Markup):
        return value
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{format_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    kind = "jpeg" if path.suffix == ".jpg" else "png"
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/{kind};base64,{data}"></figure>'
