#!/usr/bin/env bash
# The benchmark suite behind BENCHMARKS.md (about 15 minutes on a 2-core CPU machine). Results and plots land in
# bench/results/. Run it on an otherwise idle machine: every figure is a ratio or median measured in this run.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python bench/feature_overhead.py "$@"
python bench/controller_scaling.py
python bench/answer_search.py
python bench/reward_throughput.py
python bench/data_iteration.py
