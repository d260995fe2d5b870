#!/usr/bin/env bash
# The main job: set up, then train on hymenoptera with the embedded EfficientNet-Lite0 weights.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRANSFERKIT_DATA_MIRROR="${TRANSFERKIT_DATA_MIRROR:-$(cd .. && pwd)/shared/datasets}"
exec transferkit train hymenoptera "$@"
