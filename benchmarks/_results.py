"""RESULTS.md holds one section per benchmark between markers; each script rewrites only its own."""

from __future__ import annotations

import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

UNRECORDED_CPU = "not recorded"
"""The CPU of rows measured before rows named theirs."""


def cpu_name() -> str:
    """This machine's CPU as /proc/cpuinfo names it, with the bf16 instructions it has (what
    --precision auto looks for). Rows keep it, so rows from different machines, which differ by
    up to 2x here, are never averaged or divided together."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    bf16 = [flag for flag in ("amx_bf16", "avx512_bf16") if flag in fields.get("flags", "").split()]
    return fields.get("model name", platform.machine()) + (f" ({', '.join(bf16)})" if bf16 else "")


def write_section(name: str, heading: str, table: str) -> None:
    """Replace the section between ``<!-- name:begin -->`` and ``<!-- name:end -->``, or append it
    under ``heading`` the first time."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{table}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + section + "\n"
    RESULTS.write_text(text)
