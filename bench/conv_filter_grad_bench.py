"""Filter gradients of ResNet-18's CIFAR 3x3 convolutions (batch 64, float32, one CPU device):
bigjax's stride-1 shifted copies, its patch matrix, and XLA's own, timed alternately in one process.

    .venv/bin/python bench/conv_filter_grad_bench.py              # the four stride-1 shapes
    .venv/bin/python bench/conv_filter_grad_bench.py --sizes 32 --repeats 9

Each method is one jitted function of (x, dy) for a shape; after a warm-up call each, the methods
run in turn `--repeats` times; the script prints the median milliseconds and GFLOP/s of each
(2 x B x H x W x 9 x C x O FLOPs) and the ratio patches / shifted. XLA's filter gradient is the
vjp of `lax.conv_general_dilated` (skipped at 32x32 unless `--xla-at-32`, where YNNPACK's took
~1 s a call). Every method is compiled with the train step's XLA:CPU options
(`bigjax.xla_cpu.compiler_options`), so the figures are those of the programs a step runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bigjax import xla_cpu  # noqa: E402
from bigjax.models import conv  # noqa: E402

CHANNELS = {32: 64, 16: 128, 8: 256, 4: 512}  # ResNet-18's stages on 32x32 images


def xla_filter_grad(x, dy):
    w = jnp.zeros((3, 3, x.shape[-1], dy.shape[-1]), x.dtype)
    return jax.vjp(lambda w: conv._xla_conv(x, w, 1), w)[1](dy)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 16, 8, 4], choices=list(CHANNELS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--xla-at-32", action="store_true")
    args = p.parse_args()
    opts = xla_cpu.compiler_options("float32")  # as the train step compiles
    print(f"jax {jax.__version__}; load average {os.getloadavg()[0]:.1f}", flush=True)
    for size in args.sizes:
        c = CHANNELS[size]
        kx, kd = jax.random.split(jax.random.key(size))
        x = jax.random.normal(kx, (args.batch, size, size, c))
        dy = jax.random.normal(kd, (args.batch, size, size, c))
        methods = {"shifted": lambda x, dy: conv._filter_grad_shifted(x, dy, 3),
                   "patches": lambda x, dy: conv._filter_grad_patches(x, dy, 3, 1)}
        if size < 32 or args.xla_at_32:
            methods["xla"] = xla_filter_grad
        fns = {k: jax.jit(f, compiler_options=opts) for k, f in methods.items()}
        for f in fns.values():
            jax.block_until_ready(f(x, dy))
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                jax.block_until_ready(f(x, dy))
                times[k].append(time.perf_counter() - t)
        gflop = 2 * args.batch * size * size * 9 * c * c / 1e9
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{size}x{size} {c}->{c}: " + ", ".join(
            f"{k} {m * 1e3:.1f} ms ({gflop / m:.0f} GFLOP/s)" for k, m in med.items())
            + f"; patches / shifted {med['patches'] / med['shifted']:.2f}"
            + f"; load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
