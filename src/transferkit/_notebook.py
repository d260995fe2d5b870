"""How the objects the public functions return show themselves in Jupyter (``_repr_html_``): a
title, a table of facts, a table of rows cut at a readable length, and a picture, the same way
for every result."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any


def tqdm_bar() -> Any:
    """tqdm's notebook bar where ipywidgets can draw it, else its text bar: ``tqdm.auto`` without
    ipywidgets warns "IProgress not found" in every cell (Lightning's progress bar chooses the same way)."""
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm


ROWS_SHOWN = 20
"""Rows of a table shown before "and N more": to_pandas() has them all."""


def cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else escape(str(value))


def facts_table(facts: Sequence[tuple[str, Any]]) -> str:
    """One row per fact, its name as the row's heading."""
    rows = "".join(f"<tr><th>{escape(name)}</th><td>{cell(value)}</td></tr>" for name, value in facts)
    return f"<table>{rows}</table>"


def rows_table(header: Sequence[str], rows: Sequence[Sequence[Any]], shown: int = ROWS_SHOWN) -> str:
    """A header and the first ``shown`` rows, then how many more there are."""
    head = "".join(f"<th>{escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(value)}</td>" for value in row) + "</tr>" for row in rows[:shown])
    more = f"<p>and {len(rows) - shown} more</p>" if len(rows) > shown else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def png(path: Path, alt: str) -> str:
    """The PNG at ``path`` embedded in the page; nothing where it was not drawn."""
    if not path.is_file():
        return ""
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def view(title: str, *parts: str) -> str:
    return f"<b>{escape(title)}</b>" + "".join(parts)
