#!/usr/bin/env bash
# The demo command of the README: installs what it needs, then runs the recipe on the embedded
# default (real SmolLM2-135M-Instruct teacher, real offline text, CPU). Extra args go to hydra.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
exec torchrun --standalone --nproc_per_node "${NPROC:-1}" examples/prune_distill.py "$@"
