"""Model FLOPs per token and the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.config import Config


def flops_per_token(cfg: Config, n_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 * matmul params + attention scores.

    Lookup tables (token and position embeddings) do no matmul, but a tied output head does,
    so vocab*d_model is counted once either way.
    """
    m = cfg.model
    lookup = m.vocab_size * m.d_model + (m.max_seq_len * m.d_model if m.positions == "learned" else 0)
    # an untied head is already among the parameters; a tied one reuses the embedding table
    matmul_params = n_params - lookup + (m.vocab_size * m.d_model if m.tie_embeddings else 0)
    head_dim = m.head_dim or m.d_model // m.n_heads
    attention = 12 * m.n_layers * cfg.train.seq_len * m.n_heads * head_dim
    return 6.0 * matmul_params + attention


def measure_peak_flops(n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of a float32 n×n matmul on the host CPU (shared by all simulated CPU devices)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / float(np.median(times))


def peak_flops(cfg: Config) -> float:
    """Peak FLOP/s of all devices together."""
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops * 1e12 * jax.device_count()
    if jax.devices()[0].platform == "cpu":
        return measure_peak_flops()
    return 0.0  # unknown accelerator and no config value: MFU is not reported
