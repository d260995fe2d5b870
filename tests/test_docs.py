"""The documentation: the site builds strictly, and the README stays a short front door whose two
commands are the scripts the repository has."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 160


def build_site(site: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    # The hook and mkdocstrings read the checkout's own src/; the variable quiets Material's banner.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def page_text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_the_site_builds_strictly_with_every_command_and_the_public_api(tmp_path: Path) -> None:
    built = build_site(tmp_path / "site")
    assert built.returncode == 0, built.stdout + built.stderr  # a broken link, anchor or missing page fails here

    from transferkit.cli.handlers import COMMANDS

    cli = page_text((tmp_path / "site/reference/cli/index.html").read_text(encoding="utf-8"))
    for command in COMMANDS:
        assert f"usage: transferkit {command} " in cli, f"the CLI reference lacks `{command} --help`"
    assert "--finetune-epochs" in cli and "finetune.epochs" in cli  # an option, and its flat key
    api = page_text((tmp_path / "site/reference/api/commands/index.html").read_text(encoding="utf-8"))
    for name in ("train", "resume", "lr_find", "evaluate", "predict", "calibrate", "compare", "audit", "export", "summarize"):
        assert re.search(rf"\b{name} \(", api), f"the API reference lacks {name}'s signature"
    config = page_text((tmp_path / "site/reference/api/config/index.html").read_text(encoding="utf-8"))
    assert "seed for the split, initialisation and shuffling" in config  # a field's --help is its docstring


def test_a_link_to_a_missing_heading_fails_the_build(tmp_path: Path) -> None:
    # The same build on a copy of the docs in which one link names a heading no page has.
    copy = tmp_path / "repo"
    for path in [ROOT / "mkdocs.yml", *(ROOT / "docs").rglob("*.*"), *(ROOT / "benchmarks").glob("*.md")]:
        target = copy / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (copy / "src").symlink_to(ROOT / "src")
    for api_page in (copy / "docs/reference/api").glob("*.md"):  # not what this test is about, and most of a build
        api_page.write_text("# API\n", encoding="utf-8")
    index = copy / "docs/index.md"
    index.write_text(index.read_text(encoding="utf-8") + "\nSee [resuming](guide/training.md#no-such-heading).\n",
                     encoding="utf-8")
    built = build_site(tmp_path / "site", cwd=copy)
    assert built.returncode != 0
    assert "#no-such-heading" in built.stdout + built.stderr


def test_the_readme_is_short_and_its_two_commands_are_the_repositorys_scripts() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < README_LIMIT
    commands = re.findall(r"^    (bash scripts/\S+)", readme, flags=re.MULTILINE)
    assert commands[:2] == ["bash scripts/train-demo.sh", "bash scripts/test.sh"]
    for command in commands[:2]:
        assert (ROOT / command.split()[1]).is_file(), f"README names {command}, which scripts/ does not have"
    # They come first: before any other section's content.
    assert readme.index("bash scripts/train-demo.sh") < readme.index("## Install")
