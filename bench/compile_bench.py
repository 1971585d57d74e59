"""Compile time of the train step as the decoder deepens, with unrolled blocks and with
`model.scan_layers` (one block applied by lax.scan), and the step time of each, alternated.

    .venv/bin/python bench/compile_bench.py                     # 4, 16 and 48 layers
    .venv/bin/python bench/compile_bench.py --layers 2 --steps 2  # smoke run

Compilation runs on abstract inputs (ShapeDtypeStructs with shardings): nothing is allocated for
it. Step times are medians over `--steps` steps on random tokens after one warm-up step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bigjax.build import one_device  # noqa: E402
from bigjax.checkpoint import abstract_with_shardings  # noqa: E402
from bigjax.config import load_config  # noqa: E402


def measure(layers: int, scan: bool, steps: int, d_model: int) -> tuple[float, float]:
    cfg = load_config(None, [f"model.n_layers={layers}", f"model.d_model={d_model}",
                             f"model.n_heads={max(1, d_model // 64)}", f"model.d_ff={4 * d_model}",
                             "model.vocab_size=8192", "model.max_seq_len=128", "train.seq_len=128",
                             "train.batch_size=8", f"model.scan_layers={str(scan).lower()}"])
    parts = one_device(cfg)  # the trainer's wiring, on one device
    sh, batch_sh = parts.shardings, parts.batch_sharding
    B, T = cfg.train.batch_size, cfg.train.seq_len
    tokens = jax.ShapeDtypeStruct((B, T), np.int32, sharding=batch_sh)
    abstract_batch = {"inputs": tokens, "targets": tokens,
                      "weights": jax.ShapeDtypeStruct((B, T), np.float32, sharding=batch_sh)}
    t0 = time.perf_counter()
    compiled = parts.train_step.lower(abstract_with_shardings(parts.abstract, sh),
                                      abstract_batch).compile()
    compile_s = time.perf_counter() - t0
    state = parts.init_state()
    rng = np.random.default_rng(0)
    times = []
    for i in range(steps + 1):
        ids = rng.integers(0, cfg.model.vocab_size, (B, T + 1)).astype(np.int32)
        batch = jax.device_put({"inputs": ids[:, :-1], "targets": ids[:, 1:],
                                "weights": np.ones((B, T), np.float32)}, batch_sh)
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i:
            times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 16, 48])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    print(f"GPT d_model {a.d_model}, batch 8 x 128 tokens, {jax.devices()[0].platform}, "
          f"{jax.device_count()} device(s) (one used)")
    print(f"{'layers':>6} {'compile unrolled':>17} {'compile scan':>13} {'ratio':>6} "
          f"{'step unrolled':>14} {'step scan':>10}")
    for layers in a.layers:
        cu, su = measure(layers, False, a.steps, a.d_model)
        cs, ss = measure(layers, True, a.steps, a.d_model)
        print(f"{layers:>6} {cu:>16.1f}s {cs:>12.1f}s {cu / cs:>6.1f} {su:>13.3f}s {ss:>9.3f}s",
              flush=True)


if __name__ == "__main__":
    main()
