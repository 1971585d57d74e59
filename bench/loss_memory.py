"""Temporary memory of the causal-LM loss with all logits at once (`model.loss_chunk=0`) and in
chunks of positions, from XLA's `memory_analysis()` of the compiled programs, at vocabularies of
32k and 128k (batch 8 x 4,096, d_model 2,048 by default; one device).

    .venv/bin/python bench/loss_memory.py                       # 32k and 128k, chunk 512
    .venv/bin/python bench/loss_memory.py --no-step --vocabs 32768  # the loss head alone, quick

Everything is compiled on abstract inputs (ShapeDtypeStructs): nothing is allocated, so the
128k case, whose full logits alone are 16 GiB, runs on a laptop. Two programs per setting:
- `head`: the loss and its gradients with respect to the final hidden states and the output
  weight (the part `loss_chunk` changes), as the train step runs it;
- `step`: the whole train step (AdamW update included) of a `--n-layers` decoder with
  `model.remat=full`, through bigjax.build.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bigjax.config import load_config  # noqa: E402
from bigjax.models.lm_head import OutputHead, chunked_token_stats  # noqa: E402
from bigjax.plan import compile_memory_here  # noqa: E402
from bigjax.tasks import token_stats  # noqa: E402

GiB = 2.0 ** 30


def head_temp_bytes(B: int, T: int, D: int, V: int, chunk: int, dtype: str) -> int:
    """Temporary bytes of value-and-grad of the loss over (hidden states, tied output weight)."""
    def loss(h, weight, targets, weights):
        head = OutputHead(weight, 0, ("vocab", "embed"), jnp.dtype(dtype), chunk)
        if chunk:
            return chunked_token_stats(h, head, targets, weights)["loss_sum"]
        return token_stats(head.logits(h), targets, weights)["loss_sum"]

    args = (jax.ShapeDtypeStruct((B, T, D), jnp.dtype(dtype)),
            jax.ShapeDtypeStruct((V, D), jnp.float32),
            jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, T), jnp.float32))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def step_temp_bytes(B: int, T: int, D: int, V: int, chunk: int, dtype: str, layers: int) -> int:
    cfg = load_config(None, [f"model.vocab_size={V}", f"model.d_model={D}",
                             f"model.n_heads={max(1, D // 128)}", f"model.d_ff={4 * D}",
                             f"model.n_layers={layers}", f"model.max_seq_len={T}",
                             f"train.seq_len={T}", f"train.batch_size={B}", "model.remat=full",
                             f"model.dtype={dtype}", f"model.loss_chunk={chunk}"])
    # XLA:CPU's default schedule, as the README's figures were taken
    return int(compile_memory_here(cfg, 1, memory_aware=False)["temp"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocabs", default="32768,131072", help="comma-separated vocabulary sizes")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=512, help="model.loss_chunk of the chunked runs")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay float32)")
    p.add_argument("--n-layers", type=int, default=2, help="decoder layers of the `step` program")
    p.add_argument("--no-step", action="store_true", help="the loss head only")
    a = p.parse_args()
    B, T, D = a.batch, a.seq_len, a.d_model
    print(f"batch {B} x {T}, d_model {D}, compute {a.dtype}, chunk {a.chunk} positions, "
          f"{jax.devices()[0].platform} (temporary GiB from memory_analysis)")
    print(f"{'vocab':>7} {'program':>8} {'logits f32':>10} {'full':>7} {'chunked':>7} "
          f"{'saved':>7} {'ratio':>6}")
    for V in [int(v) for v in a.vocabs.split(",")]:
        programs = [("head", lambda c: head_temp_bytes(B, T, D, V, c, a.dtype))]
        if not a.no_step:
            programs.append((f"step/{a.n_layers}L",
                             lambda c: step_temp_bytes(B, T, D, V, c, a.dtype, a.n_layers)))
        for name, fn in programs:
            t0 = time.perf_counter()
            full, chunked = fn(0), fn(a.chunk)
            print(f"{V:>7} {name:>8} {B * T * V * 4 / GiB:>10.2f} {full / GiB:>7.2f} "
                  f"{chunked / GiB:>7.2f} {(full - chunked) / GiB:>7.2f} {full / chunked:>5.1f}x"
                  f"   ({time.perf_counter() - t0:.0f} s to compile both)", flush=True)


if __name__ == "__main__":
    main()
