"""cuDNN attention on a GPU: the same outputs and gradients as the plain XLA computation, and the
time of one forward and backward pass of each implementation at the decoder bench's shape.

    python bench/gpu_attention.py            # on a machine with an NVIDIA GPU
    python bench/gpu_attention.py --json

Check: bfloat16 inputs (causal, packed documents through cuDNN's packed layout, which bigjax keeps
off by default and this script turns on with a bound of 16 documents, and, past the bound or with
padding, through the mask; trailing padding, grouped-query heads, queries gathered at
some positions). A float32 `xla` run of the same inputs is the reference; `cudnn` in
bfloat16 passes when its largest error against it is at most twice `xla`'s own in bfloat16 plus
1e-3 (a wrong mask moves outputs by O(1), so it fails by orders of magnitude). Exit 1 on a
failure.

Timing: B x T x 32 heads x 64 over 8 kv heads (bench/gpu.sh's decoder), bfloat16; each
implementation's jitted forward and backward pass, alternated round by round, median of the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bigjax.models import attention  # noqa: E402
from bigjax.models.attention import AttentionMask  # noqa: E402

CASES = {
    "causal": dict(causal=True),
    "causal+packed (packed layout)": dict(causal=True, docs=4),
    "causal+packed+gqa (packed layout)": dict(causal=True, docs=6, K=2),
    "causal+packed, 40 documents (mask)": dict(causal=True, docs=40),
    "causal+packed+padding+gqa": dict(causal=True, docs=3, padding=True, K=2),
    "bidirectional+padding": dict(padding=True),
    "bidirectional+packed+gathered": dict(docs=2, gathered=32),
}


def inputs(seed, *, B=4, T=256, N=8, K=8, H=64, causal=False, docs=0, padding=False,
           gathered=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H), np.float32)
    k, v = (rng.standard_normal((B, T, K, H), np.float32) for _ in range(2))
    seg = (np.sort(rng.integers(0, docs, (B, T)), 1).astype(np.int32) if docs else None)
    valid = (np.arange(T)[None] < rng.integers(T // 2, T, (B, 1))) if padding else None
    mask = AttentionMask(causal, None if seg is None else jnp.asarray(seg),
                         None if valid is None else jnp.asarray(valid))
    if gathered:
        mask = mask.at(jnp.asarray(np.sort(rng.integers(0, T, (B, gathered)), 1), jnp.int32))
        q = q[:, :gathered]
    return q, k, v, mask


def out_and_grads(impl, dtype, q, k, v, mask):
    cot = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), dtype)
    f = lambda q, k, v: attention.attend(q, k, v, mask, implementation=impl)
    run = jax.jit(lambda q, k, v: (f(q, k, v),) + jax.grad(
        lambda *a: (f(*a).astype(jnp.float32) * cot).sum(), (0, 1, 2))(q, k, v))
    return [np.asarray(x, np.float32) for x in run(*(jnp.asarray(a, dtype) for a in (q, k, v)))]


PACKED_DOCS = 16  # the bound on documents per row for cuDNN's packed layout, while measured


@contextlib.contextmanager
def packed_docs(bound: int):
    """bigjax's bound for cuDNN's packed layout (read when a call is traced), restored after."""
    saved, attention._CUDNN_PACKED_DOCS = attention._CUDNN_PACKED_DOCS, bound
    try:
        yield
    finally:
        attention._CUDNN_PACKED_DOCS = saved


@packed_docs(PACKED_DOCS)
def check() -> dict:
    results, ok = {}, True
    for name, case in CASES.items():
        q, k, v, mask = inputs(0, **case)
        ref = out_and_grads("xla", jnp.float32, q, k, v, mask)
        err = lambda got: max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
        e_xla = err(out_and_grads("xla", jnp.bfloat16, q, k, v, mask))
        e_cudnn = err(out_and_grads("cudnn", jnp.bfloat16, q, k, v, mask))
        passed = e_cudnn <= 2 * e_xla + 1e-3
        ok &= passed
        results[name] = {"xla_bf16_err": e_xla, "cudnn_bf16_err": e_cudnn, "pass": passed}
        print(f"{name:36s} max error vs float32 xla: xla bf16 {e_xla:.4f}, cudnn bf16 "
              f"{e_cudnn:.4f}  {'ok' if passed else 'FAIL'}", flush=True)
    return {"ok": ok, "cases": results}


def timing(B: int, T: int, rounds: int) -> dict:
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((B, T, 32, 64)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((B, T, 8, 64)), jnp.bfloat16) for _ in range(2))
    docs = jnp.asarray(np.sort(rng.integers(0, 4, (B, T)), 1), jnp.int32)
    one = jnp.zeros((B, T), jnp.int32)
    bound = PACKED_DOCS
    variants = {  # name: implementation, mask, bound on documents for cuDNN's packed layout
        "cudnn causal (no segment ids)": ("cudnn", AttentionMask(True), bound),
        "cudnn causal + 1 document, packed": ("cudnn", AttentionMask(True, one), bound),
        "cudnn causal + 4 documents, packed": ("cudnn", AttentionMask(True, docs), bound),
        "cudnn causal + 1 document, mask": ("cudnn", AttentionMask(True, one), 0),
        "cudnn causal + 4 documents, mask": ("cudnn", AttentionMask(True, docs), 0),
        "chunked causal + 4 documents": ("chunked", AttentionMask(True, docs), bound),
        "xla causal + 4 documents": ("xla", AttentionMask(True, docs), bound),
    }
    fns = {}
    for name, (impl, mask, docs_bound) in variants.items():
        f = lambda q, k, v, impl=impl, mask=mask: attention.attend(q, k, v, mask,
                                                                     implementation=impl)
        step = jax.jit(jax.value_and_grad(lambda *a, f=f: f(*a).astype(jnp.float32).sum(),
                                          (0, 1, 2)))
        try:
            with packed_docs(docs_bound):
                compiled = step.lower(q, k, v).compile()
            jax.block_until_ready(compiled(q, k, v))
            fns[name] = compiled
        except Exception as e:  # noqa: BLE001 - report a kernel the GPU refuses, time the rest
            print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            times[name].append(time.perf_counter() - t)
    # causal attention: half of the 4*B*T*T*N*H forward FLOPs, backward 2.5x the forward
    flops = 0.5 * 4 * B * T * T * 32 * 64 * 3.5
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"ms": med * 1e3, "tflops_per_s": flops / med / 1e12}
        print(f"{name:36s} fwd+bwd {med * 1e3:8.2f} ms  {flops / med / 1e12:7.1f} TFLOP/s",
              flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if jax.default_backend() != "gpu":
        print(f"gpu_attention.py: needs an NVIDIA GPU; this JAX backend is {jax.default_backend()}",
              file=sys.stderr)
        return 2
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    result = {"check": check(), "timing": timing(args.batch, args.seq_len, args.rounds)}
    if args.json:
        print(json.dumps(result))
    return 0 if result["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
