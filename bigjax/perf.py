"""Model FLOPs per token and the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from bigjax import registry
from bigjax.config import Config


def flops_per_token(cfg: Config, n_params: int) -> float:
    """Training FLOPs per token of the configured model: its family's count
    (`register_model(..., flops_per_token=...)`), else 6 x parameters (every parameter in a matmul)."""
    count = registry.model(cfg.model.name).flops_per_token
    return count(cfg, n_params) if count else 6.0 * n_params


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
