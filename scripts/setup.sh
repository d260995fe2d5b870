#!/usr/bin/env bash
# Installs transferkit and its dependencies into the current Python. Safe to run again:
# what is already installed is kept, so it also works without a network once done.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip --version >/dev/null
# torch 2.14.1 with torchvision 0.29.1 is the pair this machine's index serves (and pip's cap).
python3 -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Running pip as" || true
python3 -m pip install -q --no-build-isolation -e ".[test]" 2>&1 | grep -v "^WARNING: Running pip as" || true
