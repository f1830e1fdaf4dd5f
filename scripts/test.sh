#!/usr/bin/env bash
# The whole test suite, ours and the one shipped in the openrlhf 0.11.2 wheel (run under the import hook).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
# The models and compiled ops that many tests share, built before them (minutes on a fresh machine, seconds after).
python scripts/prepare_tests.py
# The slowest tests are listed at the end, so a CI log shows where its time went.
python -m pytest -q --durations=30 tests "$@"
