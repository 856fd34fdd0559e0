#!/usr/bin/env bash
# The test command of the README: installs what it needs, lints (ruff, config in pyproject.toml),
# then runs the whole suite (the layer contract, tests/test_layers.py, is part of it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m ruff check nemo_neo tests tools examples benchmarks scripts
exec python -m pytest -q "$@"
