#!/usr/bin/env bash
# Installs transferkit and its dependencies into the current Python. Safe to run again:
# what is already installed is kept, so it also works without a network once done.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip --version >/dev/null
# pip's output minus the root warning, keeping pip's own exit status so a failed install stops here.
quiet_pip() {
    python3 -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Running pip as" || true; }
}
# torch 2.14.1 with torchvision 0.29.1 is the pair this machine's index serves (and pip's cap).
quiet_pip "torch==2.14.1" "torchvision==0.29.1"
# The install below builds without isolation (no download of a build environment), so the
# installed setuptools must read pyproject.toml's SPDX license string: 77 or newer (68 to 76
# refuse it). A no-op where it already is.
quiet_pip "setuptools>=77"
quiet_pip --no-build-isolation -e ".[test]"
