"""Model FLOPs per token, the peak FLOP/s and memory of each device type, and MFU.

On accelerators the peak comes from a table of vendor figures (dense, no sparsity); on a CPU it is
measured: the best of several timed matmuls, cached per machine under ~/.cache/bigjax so that one
busy moment does not set the peak for every later run (a low peak inflates MFU). MFU is never
reported above 1.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from bigjax import registry
from bigjax.config import Config, compute_dtype
from bigjax.errors import ConfigError


def flops_per_token(cfg: Config, n_params: int) -> float:
    """Training FLOPs per token of the configured model: its family's count
    (`register_model(..., flops_per_token=...)`), else 6 x parameters (every parameter in a matmul)."""
    count = registry.model(cfg.model.name).flops_per_token
    return count(cfg, n_params) if count else 6.0 * n_params


@dataclass(frozen=True)
class DeviceType:
    """Per device: dense peak FLOP/s of matmuls in bfloat16 and in float32 (as XLA runs float32
    matmuls by default: TF32 tensor cores on NVIDIA since Ampere, one bfloat16 pass on TPU), and
    memory (HBM; on a CPU the host's RAM, shared by its simulated devices)."""

    name: str
    bf16_flops: float
    fp32_flops: float
    memory_bytes: float
    kinds: tuple[str, ...] = ()  # lower-case substrings of jax's device_kind that identify it

    def peak(self, dtype: str) -> float:
        return self.bf16_flops if dtype == "bfloat16" else self.fp32_flops


T, GB, GiB = 1e12, 1e9, 2 ** 30
DEVICE_TYPES = {d.name: d for d in [
    DeviceType("h100", 989 * T, 495 * T, 80 * GB, ("h100",)),        # SXM
    DeviceType("h200", 989 * T, 495 * T, 141 * GB, ("h200",)),
    DeviceType("a100", 312 * T, 156 * T, 80 * GB, ("a100",)),        # 80 GB SXM
    DeviceType("b200", 2250 * T, 1100 * T, 180 * GB, ("b200",)),
    DeviceType("v4", 275 * T, 275 * T, 32 * GiB, ("tpu v4",)),
    DeviceType("v5e", 197 * T, 197 * T, 16 * GiB, ("tpu v5 lite", "tpu v5e")),
    DeviceType("v5p", 459 * T, 459 * T, 95 * GiB, ("tpu v5p", "tpu v5")),
    DeviceType("v6e", 918 * T, 918 * T, 32 * GiB, ("tpu v6 lite", "tpu v6e", "tpu v6")),
]}
NAMES = (*DEVICE_TYPES, "cpu")


def host_memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0.0


def device_type(name: str, dtype: str = "float32") -> DeviceType:
    """The table's entry; `cpu`: this host's measured (cached) matmul peak in `dtype` and its RAM.
    Raises ConfigError for a name not in the table."""
    if name == "cpu":
        flops = cpu_peak_flops(dtype).flops
        return DeviceType("cpu", flops, flops, host_memory_bytes())
    if name not in DEVICE_TYPES:
        raise ConfigError(f"unknown device type '{name}'; one of {', '.join(NAMES)}")
    return DEVICE_TYPES[name]


def detect_device_type(device: jax.Device | None = None) -> str | None:
    """The table name of a JAX device (`cpu` for the host), None for one the table lacks."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return "cpu"
    kind = getattr(device, "device_kind", "").lower()
    for d in DEVICE_TYPES.values():  # longer, more specific names first ("tpu v5 lite" < "tpu v5")
        if any(k in kind for k in d.kinds):
            return d.name
    return None


# ---- the CPU's measured peak, cached --------------------------------------------------------

@dataclass(frozen=True)
class MeasuredPeak:
    flops: float  # FLOP/s of the host (all its simulated devices share it)
    source: str  # how it was obtained, for the log


def cache_dir() -> str:
    """$BIGJAX_CACHE_DIR, else $XDG_CACHE_HOME/bigjax, else ~/.cache/bigjax."""
    if os.environ.get("BIGJAX_CACHE_DIR"):
        return os.environ["BIGJAX_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bigjax")


def _cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo, keys lower-cased ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    return fields


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The host CPU as benches print it: model, family/model numbers and widest vector unit.
    Ratios to other systems move with it (a virtual machine's "AMD EPYC" can be one of several
    generations; README "Performance")."""
    fields = _cpuinfo(cpuinfo)
    flags = (fields.get("flags") or fields.get("features", "")).split()  # x86 / Arm
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"),
                                        ("asimd", "NEON")) if flag in flags), "")
    numbers = (f"family {fields['cpu family']} model {fields['model']}"
               if "cpu family" in fields and "model" in fields else "")
    name = fields.get("model name") or platform.processor() or platform.machine()
    return ", ".join(x for x in (name, numbers, isa, f"{_cpus()} cpus") if x)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_peak_key(dtype: str) -> str:
    """The peak cache's key: the CPU down to its family, model and vector unit, since a home
    directory shared by a cluster's nodes may hold the peaks of several kinds of "AMD EPYC"."""
    return f"{cpu_description()} | {jax.device_count()} devices | {dtype}"


def measure_matmul_flops(dtype: str = "float32", sizes: tuple[int, ...] = (512, 1024),
                         runs: int = 8) -> float:
    """The best FLOP/s of `runs` timed square matmuls of each size: the best run is the one least
    disturbed by other processes (a median over a busy moment set MFU 0.95 for a step that ran
    at 65% of the quiet peak)."""
    best = 0.0
    f = jax.jit(lambda x: x @ x)
    for n in sizes:
        a = jnp.ones((n, n), jnp.dtype(dtype))
        f(a).block_until_ready()
        for _ in range(runs):
            t = time.perf_counter()
            f(a).block_until_ready()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def _read_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cpu_peak_flops(dtype: str = "float32", remeasure: bool = False) -> MeasuredPeak:
    """This host's matmul peak in `dtype`: cached per CPU model, CPU count, device count and dtype
    in <cache_dir>/peak_flops.json. `remeasure` (bench does) measures again and keeps the higher of
    the two, so the cache moves toward the quiet machine's peak, never down to a busy moment's."""
    path = os.path.join(cache_dir(), "peak_flops.json")
    key = cpu_peak_key(dtype)
    cache = _read_cache(path)
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("flops", 0) > 0 and not remeasure:
        return MeasuredPeak(float(entry["flops"]),
                            f"cached measurement of {entry.get('measured_at', '?')} ({path})")
    flops = measure_matmul_flops(dtype)
    old = float(entry["flops"]) if isinstance(entry, dict) and entry.get("flops", 0) > 0 else 0.0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else -1.0
    if flops > old:
        cache[key] = {"flops": flops, "measured_at": datetime.datetime.now().isoformat(
            timespec="seconds"), "load_average": round(load, 2)}
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(cache, fh, indent=1)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: the measurement still serves this run
        return MeasuredPeak(flops, f"measured now, best of 16 matmuls (load average {load:.1f}; "
                                   f"cached in {path})")
    return MeasuredPeak(old, f"cached measurement of {entry.get('measured_at', '?')}, higher "
                             f"than now ({flops / T:.3f} TFLOP/s at load average {load:.1f})")


# ---- MFU -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Peak:
    total: float  # FLOP/s of all devices together; 0 = unknown (MFU is not reported)
    source: str


def peak(cfg: Config) -> Peak:
    """The peak of all devices: `train.peak_tflops` per device when set, else the table's entry
    for the device type in the model's compute dtype, else (CPU) the measured host peak."""
    n = jax.device_count()
    dtype = compute_dtype(cfg)
    if cfg.train.peak_tflops > 0:
        return Peak(cfg.train.peak_tflops * T * n,
                    f"train.peak_tflops={cfg.train.peak_tflops} x {n} devices")
    name = detect_device_type()
    if name == "cpu":
        m = cpu_peak_flops(dtype)
        return Peak(m.flops, f"{m.flops / T:.3f} TFLOP/s {dtype} matmul peak of this host "
                             f"({m.source})")
    if name is None:
        return Peak(0.0, f"unknown device {jax.devices()[0].device_kind!r}: set train.peak_tflops")
    d = DEVICE_TYPES[name]
    return Peak(d.peak(dtype) * n, f"{d.peak(dtype) / T:.0f} TFLOP/s {dtype} per {name} x {n}")


def peak_flops(cfg: Config) -> float:
    """Peak FLOP/s of all devices together (0: unknown)."""
    return peak(cfg).total


def mfu(flops_per_s: float, peak_total: float) -> float:
    """Model FLOPs utilisation, at most 1: a higher ratio means the peak was measured low (on a
    CPU: while the machine was busy), not that the step beat the hardware."""
    return min(1.0, flops_per_s / peak_total) if peak_total > 0 else 0.0
