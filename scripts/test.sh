#!/usr/bin/env bash
# Set up, then run every test: fast ones on tiny models and generated images, slow ones on the
# real datasets in ../shared/datasets with the embedded backbone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m pytest -q -p no:cacheprovider "$@"
