"""The HTML of every page transferkit writes: one style sheet, escaped text, tables and embedded images."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#222}
h1{font-size:1.6rem;margin-bottom:.3rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right;
vertical-align:top}th{background:#f4f6f7}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}figure img{margin:.5rem 0}pre{background:#f8f9f9;padding:.8rem;overflow:auto}
figure{margin:0}figcaption,.note{color:#444;max-width:48rem}
.headline{font-size:1.25rem;margin:.2rem 0 .4rem}.warning{color:#9a5b00;font-weight:bold}
.run{border-top:3px solid #2e86c1;margin-top:2.5rem}.muted{color:#777}.inflated,.bad{color:#b03a2e}
.inflated{font-weight:bold}.path{font-size:.75rem;color:#555;word-break:break-all;max-width:18rem;text-align:left}
.findings td,.findings th{text-align:left}.strip{display:flex;gap:2px}.strip img,td img{display:block}details{margin:.5rem 0}summary{cursor:pointer}
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


def html_image(path: Path, alt: str, caption: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    kind = "jpeg" if path.suffix == ".jpg" else "png"
    below = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/{kind};base64,{data}">{below}</figure>'


def html_page(title: str, body: str) -> str:
    """A whole self-contained page on the one style sheet."""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{STYLE}</style></head><body>{body}</body></html>")
