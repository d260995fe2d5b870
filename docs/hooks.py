"""MkDocs hook: writes reference/cli.md from the real parsers at every build, so it cannot go stale.

Every command's ``--help`` is what ``transferkit COMMAND --help`` prints (options generated from
the config dataclasses' help), and the table of ``TrainConfig.from_options`` keys is read off the
same ``train`` parser, whose option destinations are those keys.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

PAGE = "reference/cli.md"
# argparse wraps to the terminal's width; a fixed one makes the page the same on every machine.
HELP_COLUMNS = "80"


def on_files(files: Files, config: Any) -> Files:
    # The checkout's own sources, not whichever transferkit the interpreter has installed.
    sys.path.insert(0, str(Path(config.config_file_path).parent / "src"))
    files.append(File.generated(config, PAGE, content=cli_page()))
    return files


def cli_page() -> str:
    from transferkit.cli.handlers import COMMANDS

    top = help_of([])
    # In the order the top-level help lists them; any command it does not list still gets its section.
    listed = re.search(r"\{([\w,-]+)\}", top)
    order = listed.group(1).split(",") if listed else []
    commands = [*order, *(name for name in COMMANDS if name not in order)]
    parts = [
        "# Command line",
        "",
        "Generated at every docs build from the parsers `transferkit` runs: each block is exactly what "
        "`transferkit COMMAND --help` prints. The options of `train`, `compare` and `audit` are generated "
        "from the config dataclasses, so this page, `--help` and the [Python API](api/commands.md) cannot "
        "drift apart.",
        "",
        "```text",
        top.rstrip(),
        "```",
    ]
    for name in commands:
        parts += ["", f"## {name}", "", "```text", help_of([name]).rstrip(), "```"]
    parts += ["", "## Flat keys of TrainConfig.from_options", "", FLAT_KEYS_INTRO, "", *flat_key_table()]
    return "\n".join(parts) + "\n"


FLAT_KEYS_INTRO = (
    "`TrainConfig.from_options` takes the flags of `train` as flat keys: `--finetune-epochs 5` is "
    '`{"finetune.epochs": 5}`. Every unknown key and invalid value is reported at once.'
)


def help_of(argv: list[str]) -> str:
    """What ``transferkit ARGV --help`` prints."""
    from transferkit.cli import main

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([*argv, "--help"])
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return out.getvalue()


def flat_key_table() -> list[str]:
    from transferkit.cli.options import train_parser

    parser = argparse.ArgumentParser(prog="transferkit")
    train = train_parser(parser.add_subparsers())
    rows = ["| key | flag | what it sets |", "|---|---|---|"]
    for action in train._actions:
        # The config's fields are the options with no default of the parser's own (the config has it).
        if action.default is not argparse.SUPPRESS or action.dest == "help":
            continue
        flags = " / ".join(f"`{flag}`" for flag in action.option_strings)
        text = (action.help or "").replace("%%", "%").replace("|", "\\|")
        rows.append(f"| `{action.dest}` | {flags} | {text} |")
    return rows
