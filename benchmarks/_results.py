"""RESULTS.md holds one section per benchmark between markers; each script rewrites only its own."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

UNRECORDED_CPU = "not recorded"
"""The CPU of rows measured before rows named theirs."""


def row_cpu(row: dict) -> str:
    """The CPU a stored row or entry was measured on."""
    return row.get("cpu", UNRECORDED_CPU)


def run_key(row: dict) -> tuple:
    """What one measurement is of: its dataset, seed, variant and CPU."""
    return row["dataset"], row["seed"], row["variant"], row_cpu(row)


def recorded(rows: list[dict], row: dict, raw: Path) -> list[dict]:
    """``rows`` with ``row`` in place of an earlier measurement of the same run, written to ``raw``."""
    rows = [r for r in rows if run_key(r) != run_key(row)] + [row]
    raw.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def cpu_name() -> str:
    """This machine's CPU as /proc/cpuinfo names it, with its family and model numbers (a VM may
    name only "AMD EPYC", for Zen 4 and Zen 5 alike), the bf16 instructions it has (what
    --precision auto looks for) and the cores this process sees. Rows keep it, so rows from
    different machines, which differ by up to 2x here, are never averaged or divided together."""
    cores = f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.processor() or platform.machine()}, {cores}"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    details = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields and "model" in fields else []
    details += [flag for flag in ("amx_bf16", "avx512_bf16") if flag in fields.get("flags", "").split()]
    name = fields.get("model name", platform.machine()) + (f" ({', '.join(details)})" if details else "")
    return f"{name}, {cores}"


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
