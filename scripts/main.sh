#!/usr/bin/env bash
# The main job, end to end on the embedded default: pretrain configs/gpt_tiny.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/bigjax train configs/gpt_tiny.yaml "$@"
