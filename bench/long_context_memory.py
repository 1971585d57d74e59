"""Does the 1B decoder train at long context? XLA's memory analysis of its train step compiled on
abstract inputs (nothing allocated) with plain attention and all logits at once
(`model.attention=xla model.loss_chunk=0`, the code before the compute issue) against the defaults
(`chunked` flash-style attention, the loss in chunks of 512 positions), next to `bigjax plan`'s
figure and an H200's 141 GB.

    .venv/bin/python bench/long_context_memory.py                  # sequence 8,192, batch 1
    .venv/bin/python bench/long_context_memory.py --seq-len 4096 --batch 2

The decoder is bench/gpu.sh's (LLaMA-3.2-1B shape, bfloat16, scanned layers, remat full); one
device. On XLA:CPU the figures are the CPU compiler's buffer assignment: GPU compilers fuse more,
so they are an upper bound there, and the comparison between the two settings is what counts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bigjax.config import load_config  # noqa: E402
from bigjax.plan import make_plan  # noqa: E402

GB = 1e9
H200 = 141e9
MODEL = ["model.vocab_size=32000", "model.d_model=2048", "model.n_layers=16", "model.n_heads=32",
         "model.n_kv_heads=8", "model.d_ff=8192", "model.dtype=bfloat16",
         "model.scan_layers=true", "model.remat=full", "mesh.data=1", "mesh.fsdp=1",
         "mesh.tensor=1"]
SETTINGS = {"before (xla, all logits)": ["model.attention=xla", "model.loss_chunk=0"],
            "now (chunked, loss chunks of 512)": ["model.attention=chunked",
                                                  "model.loss_chunk=512"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    shape = [f"train.seq_len={args.seq_len}", f"model.max_seq_len={args.seq_len}",
             f"train.batch_size={args.batch}"]
    print(f"1B decoder, batch {args.batch} x {args.seq_len}, bfloat16, remat full, one device")
    print("| setting | plan | compiled argument + temp | fits an H200 (90%) | compile |")
    print("|---|---|---|---|---|")
    for name, over in SETTINGS.items():
        cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                       "gpt_tiny.yaml"), MODEL + shape + over)
        t = time.perf_counter()
        plan = make_plan(cfg, 1, "h200", compile=True)
        took = time.perf_counter() - t
        compiled = plan.compiled["argument"] + plan.compiled["temp"]
        fits = "yes" if compiled <= 0.9 * H200 else "no"
        print(f"| {name} | {plan.memory_bytes_per_device['total'] / GB:.1f} GB | "
              f"{plan.compiled['argument'] / GB:.1f} + {plan.compiled['temp'] / GB:.1f} GB | "
              f"{fits} | {took:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
