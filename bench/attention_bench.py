"""Attention implementations in the GPT train step: step time and the compiled step's temporary
memory for `model.attention=xla` (whole B×heads×T×S float32 scores) and `chunked` (flash-style
blocks, causal blocks above the diagonal skipped), on this machine's backend.

    .venv/bin/python bench/attention_bench.py                       # T = 128 and 2048
    .venv/bin/python bench/attention_bench.py --seq-len 512 --steps 2  # smoke run

The model is configs/gpt_tiny.yaml's (d_model 128, 4 layers, 4 heads, rotary, SwiGLU) with a
vocabulary of 4096; batches carry segment ids of packed documents (`--docs-per-row`, random
lengths), as LM batches do. The two implementations alternate step by step after a warm-up step
each; times are medians. Run it on a quiet machine: the load average is printed first and last.
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

IMPLEMENTATIONS = ("xla", "chunked")


def compiled_step(impl: str, seq_len: int, batch: int):
    cfg = load_config("configs/gpt_tiny.yaml", [
        f"model.attention={impl}", f"train.seq_len={seq_len}", f"model.max_seq_len={seq_len}",
        f"train.batch_size={batch}", "model.vocab_size=4096"])
    parts = one_device(cfg)
    B, T, sh = batch, seq_len, parts.batch_sharding
    spec = lambda dtype: jax.ShapeDtypeStruct((B, T), dtype, sharding=sh)
    abstract = {"inputs": spec(np.int32), "targets": spec(np.int32), "weights": spec(np.float32),
                "segment_ids": spec(np.int32), "positions": spec(np.int32)}
    compiled = parts.train_step.lower(abstract_with_shardings(parts.abstract, parts.shardings),
                                      abstract).compile()
    return parts, compiled


def batches(seq_len: int, batch: int, n: int, sh, docs: float):
    rng = np.random.default_rng(0)
    for _ in range(n):
        ids = rng.integers(0, 4096, (batch, seq_len + 1)).astype(np.int32)
        # about `docs` documents packed into each row, positions restarting per document
        seg = np.cumsum(rng.random((batch, seq_len)) < docs / seq_len, axis=1).astype(np.int32)
        starts = np.maximum.accumulate(np.where(np.diff(seg, prepend=-1, axis=1) != 0,
                                                np.arange(seq_len), 0), axis=1)
        yield jax.device_put({"inputs": ids[:, :-1], "targets": ids[:, 1:],
                              "weights": np.ones((batch, seq_len), np.float32),
                              "segment_ids": seg,
                              "positions": (np.arange(seq_len) - starts).astype(np.int32)}, sh)


def measure(seq_len: int, batch: int, steps: int, docs: float) -> dict[str, tuple[float, float]]:
    runs = {}
    for impl in IMPLEMENTATIONS:
        parts, compiled = compiled_step(impl, seq_len, batch)
        runs[impl] = [compiled, parts.init_state(), [],
                      compiled.memory_analysis().temp_size_in_bytes]
    for i, b in enumerate(batches(seq_len, batch, steps + 1, parts.batch_sharding, docs)):
        for impl in IMPLEMENTATIONS:  # alternate, so load changes hit both alike
            run = runs[impl]
            t0 = time.perf_counter()
            run[1], metrics = run[0](run[1], b)
            jax.block_until_ready(metrics)
            if i:
                run[2].append(time.perf_counter() - t0)
    return {impl: (statistics.median(r[2]), r[3]) for impl, r in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--docs-per-row", type=float, default=4.0)
    a = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; {jax.devices()[0].platform}; gpt_tiny model, "
          f"batch {a.batch}, ~{a.docs_per_row:g} documents per row; medians of {a.steps} steps")
    print(f"{'T':>6} {'xla step':>9} {'chunked step':>13} {'speedup':>8} {'xla temp':>10} "
          f"{'chunked temp':>13}")
    for T in a.seq_len:
        r = measure(T, a.batch, a.steps, a.docs_per_row)
        (tx, mx), (tc, mc) = r["xla"], r["chunked"]
        print(f"{T:>6} {tx:>8.3f}s {tc:>12.3f}s {tx / tc:>7.2f}x {mx / 2**20:>7.0f} MB "
              f"{mc / 2**20:>10.0f} MB", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
