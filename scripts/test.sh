#!/usr/bin/env bash
# Set up, then run every test: fast ones on tiny models and generated images, slow ones on the
# real datasets in ../shared/datasets with the embedded backbone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser tests drive Debian's chromium. CI installs it here; elsewhere they skip, naming the
# apt command, rather than change the system unasked.
if [ "${CI:-}" = "true" ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
        || echo "could not install chromium; the browser tests will skip" >&2
fi
exec python3 -m pytest -q -p no:cacheprovider "$@"
