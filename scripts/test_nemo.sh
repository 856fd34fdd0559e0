#!/usr/bin/env bash
# NeMo 2.x integration tests (issue 8) in their own virtual environment, .venv-nemo.
#
# nemo-toolkit[llm] 2.7.3 (the last release with nemo.collections.llm) pins hydra-core<=1.3.2,
# transformers~=4.57, numpy<2 and lightning<=2.4, which conflict with the main .venv; hence a
# separate venv. Installation is skipped on reruns (stamp file) unless this script or
# pyproject.toml changed. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-nemo
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
stamp=$VENV/.nemo_neo-nemo-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
  start=$SECONDS
  python -m pip install -q --upgrade pip
  # torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
  python -m pip install -q "torch==2.13.0"
  # nemo_neo with the `nemo` extra: nemo-toolkit[llm]==2.7.3 plus the fix-ups without which
  # `from nemo.collections import llm` fails (pyarrow<26; nemo-run with leptonai<0.47,
  # protobuf~=5.29.5, packaging<25). torch stays pinned so nothing pulls a CUDA build.
  python -m pip install -q "torch==2.13.0" -e ".[nemo,test]"
  touch "$stamp"
  echo "test_nemo.sh: installed $VENV in $((SECONDS - start)) s"
fi
exec python -m pytest -q tests/nemo "$@"
