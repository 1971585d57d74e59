#!/usr/bin/env bash
# The accelerator benchmark: a 1B LLaMA-3.2-shaped decoder (d_model 2048, 16 layers, 32 query
# heads of 64 over 8 kv heads, SwiGLU 8192, vocabulary 32k) in bfloat16 at sequence 2048, FSDP over
# every GPU present, model.attention=auto (ATTENTION=... to choose), the least remat that
# `bigjax plan` says fits; prints `bigjax bench`'s table (`--json` with JSON=1). Sized for one
# H200 (batch 16 per GPU: 0.545 MFU there, 0.531 at 8); runs on any CUDA GPU (DEVICE_TYPE=h100
# ...). Layers unrolled (model.scan_layers=false): on the H200 at batch 8 the scanned step took
# 258 ms and 48 GB of temporaries, the unrolled one 220 ms and 23 GB (README "On a GPU");
# SCAN=true scans them.
#
#   bash bench/gpu.sh                 # installs jax[cuda12] into .venv-gpu when jax sees no GPU
#   BATCH_PER_GPU=4 STEPS=20 bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
if ! "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  PY=.venv-gpu/bin/python
  if [ ! -x "$PY" ]; then
    python3 -m venv .venv-gpu
    .venv-gpu/bin/pip install -q -e . 'jax[cuda12]'
  fi
fi
N=$("$PY" -c 'import jax; print(jax.device_count())')
DEVICE_TYPE=${DEVICE_TYPE:-h200}
BATCH=$(( ${BATCH_PER_GPU:-16} * N ))
MODEL=(model.vocab_size=32000 model.d_model=2048 model.n_layers=16 model.n_heads=32
       model.n_kv_heads=8 model.d_ff=8192 model.max_seq_len=2048 train.seq_len=2048
       model.dtype=bfloat16 model.attention="${ATTENTION:-auto}" model.scan_layers="${SCAN:-false}"
       train.batch_size="$BATCH" mesh.data=1 mesh.fsdp="$N" mesh.tensor=1)

remat=""
for r in none dots full; do
  fits=$("$PY" -m bigjax.cli plan configs/gpt_tiny.yaml "${MODEL[@]}" model.remat=$r \
         --devices "$N" --device-type "$DEVICE_TYPE" --json |
         "$PY" -c 'import json, sys; print(json.load(sys.stdin)["fits"])')
  if [ "$fits" = "True" ]; then remat=$r; break; fi
done
if [ -z "$remat" ]; then
  echo "gpu.sh: the plan fits no remat setting at batch $BATCH on $N x $DEVICE_TYPE;" \
       "lower BATCH_PER_GPU" >&2
  exit 2
fi
echo "gpu.sh: $N x $DEVICE_TYPE, batch $BATCH x 2048, model.remat=$remat (the least that fits)"
"$PY" -m bigjax.cli plan configs/gpt_tiny.yaml "${MODEL[@]}" model.remat=$remat \
  --devices "$N" --device-type "$DEVICE_TYPE"
exec "$PY" -m bigjax.cli bench configs/gpt_tiny.yaml "${MODEL[@]}" model.remat=$remat \
  --steps "${STEPS:-10}" ${JSON:+--json}
