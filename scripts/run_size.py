"""Parameters and weight bytes of a bigjax run, for the seed workflow's table:

    .venv/bin/python scripts/run_size.py RUN_DIR   ->   `params=N weights_bytes=B`

An int8 run (`bigjax compress`) reports its int8.safetensors file, and the metrics `compress`
measured of it on the validation split (`eval_accuracy=...`: the table needs no second `eval`);
a float run its parameters as float32 (what `bigjax convert bigjax-to-hf` writes; its checkpoint
also holds the optimizer's state).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from bigjax.checkpoint import flat_shapes, read_tree_metadata
from bigjax.compress import MARKER


def main(run_dir: str) -> None:
    marker = os.path.join(run_dir, MARKER)
    if os.path.isfile(marker):
        report = json.load(open(marker))
        params, size = report["params"], report["weights_bytes"]
        metrics = " ".join(f"{k}={v:.4f}" for k, v in report["metrics_after"].items())
    else:
        ckpts = os.path.join(run_dir, "checkpoints")
        step = max(int(n) for n in os.listdir(ckpts) if n.isdigit())
        shapes = flat_shapes(read_tree_metadata(os.path.join(ckpts, str(step), "state")))
        params = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("params/"))
        size, metrics = 4 * params, ""
    print(f"params={params} weights_bytes={size} {metrics}".strip())


if __name__ == "__main__":
    main(sys.argv[1])
