"""`bigjax bench`: the compiled train step of a config timed on random batches of its shape (no
data needed): compile time, step times, tokens/s, achieved TFLOP/s and MFU, per-device memory.

Steps are timed one by one to completion (the state and metrics ready), after one untimed step;
the batches are on the devices before timing starts, so the figures are the device's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import jax
import numpy as np

from bigjax import perf
from bigjax.build import build
from bigjax.config import Config, compute_dtype
from bigjax.data.loader import unchanged
from bigjax.errors import ConfigError
from bigjax.mesh import make_mesh
from bigjax.plan import check_sizes, compiled_memory, fmt_bytes, fmt_count, random_batch


@dataclass
class BenchResult:
    model: str
    params: int
    devices: int
    device_type: str
    mesh: dict[str, int]
    dtype: str
    batch_size: int
    seq_len: int
    steps: int
    compile_s: float
    step_time_s: float  # median
    step_time_min_s: float
    step_time_max_s: float
    tokens_per_s: float
    tokens_per_s_per_device: float
    flops_per_token: float
    tflops_per_s: float  # achieved, all devices
    tflops_per_s_per_device: float
    peak_tflops_per_s: float  # all devices; 0 = unknown
    peak_source: str
    mfu: float | None
    memory_bytes_per_device: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def live_memory() -> dict[str, float] | None:
    """Peak and current bytes of device 0's allocator (GPU, TPU); None where it keeps none
    (CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator statistics raise
        return None
    if not stats:
        return None
    return {k: float(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
            if k in stats}


def run_bench(cfg: Config, steps: int = 10) -> BenchResult:
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    check_sizes(cfg)
    mesh = make_mesh(cfg.mesh)
    parts = build(cfg, mesh)
    dtype = compute_dtype(cfg)
    state = parts.init_state()
    host_batch = getattr(parts.task, "host_batch", unchanged)  # as the trainer's
    batches = [jax.device_put(host_batch(random_batch(cfg, seed)), parts.batch_sharding)
               for seed in range(2)]
    t0 = time.perf_counter()
    step = parts.train_step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    memory: dict[str, Any] = {"compiled": compiled_memory(step)}
    state, metrics = step(state, batches[1])  # untimed: first-run work
    jax.block_until_ready((state, metrics))
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, metrics = step(state, batches[i % 2])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    live = live_memory()
    if live is not None:
        memory["live"] = live
    memory["total"] = (live or {}).get("peak_bytes_in_use", memory["compiled"]["total"])
    n = jax.device_count()
    median = float(np.median(times))
    tokens = cfg.train.batch_size * cfg.train.seq_len / median
    flops_tok = perf.flops_per_token(cfg, parts.n_params)
    achieved = flops_tok * tokens
    name = perf.detect_device_type() or jax.devices()[0].device_kind
    if cfg.train.peak_tflops <= 0 and name == "cpu":
        measured = perf.cpu_peak_flops(dtype, remeasure=True)  # keeps the best ever measured
        peak = perf.Peak(measured.flops, f"{dtype} matmul peak of this host, {measured.source}")
    else:
        peak = perf.peak(cfg)
    return BenchResult(
        model=cfg.model.name, params=parts.n_params, devices=n, device_type=name,
        mesh=dict(mesh.shape), dtype=dtype, batch_size=cfg.train.batch_size,
        seq_len=cfg.train.seq_len, steps=steps, compile_s=compile_s, step_time_s=median,
        step_time_min_s=min(times), step_time_max_s=max(times), tokens_per_s=tokens,
        tokens_per_s_per_device=tokens / n, flops_per_token=flops_tok,
        tflops_per_s=achieved / 1e12, tflops_per_s_per_device=achieved / 1e12 / n,
        peak_tflops_per_s=peak.total / 1e12, peak_source=peak.source,
        mfu=perf.mfu(achieved, peak.total) if peak.total > 0 else None,
        memory_bytes_per_device=memory)


def format_bench(r: BenchResult) -> str:
    mem = r.memory_bytes_per_device
    c = mem["compiled"]
    mesh = " ".join(f"{k}={v}" for k, v in r.mesh.items())
    lines = [
        f"model: {r.model}, {fmt_count(r.params)} parameters, {r.dtype}; batch {r.batch_size} x "
        f"{r.seq_len} tokens on {r.devices} x {r.device_type} (mesh {mesh})",
        f"compile: {r.compile_s:.2f} s",
        f"step time over {r.steps} steps: median {r.step_time_s * 1e3:.1f} ms (min "
        f"{r.step_time_min_s * 1e3:.1f}, max {r.step_time_max_s * 1e3:.1f})",
        f"tokens/s: {r.tokens_per_s:,.0f} ({r.tokens_per_s_per_device:,.0f} per device)",
        f"achieved: {r.tflops_per_s:.4g} TFLOP/s ({r.tflops_per_s_per_device:.4g} per device, "
        f"{fmt_count(r.flops_per_token)} FLOPs per token)",
        (f"MFU: {r.mfu:.3f} of {r.peak_tflops_per_s:.4g} TFLOP/s ({r.peak_source})"
         if r.mfu is not None else f"MFU: unknown ({r.peak_source})"),
        f"memory per device (compiled): argument {fmt_bytes(c['argument'])}, temp "
        f"{fmt_bytes(c['temp'])}, total {fmt_bytes(c['total'])}",
    ]
    if "live" in mem and "peak_bytes_in_use" in mem["live"]:
        peak_in_use = mem["live"]["peak_bytes_in_use"]
        lines.append(f"memory per device (allocator peak): {fmt_bytes(peak_in_use)}")
    return "\n".join(lines)
