"""ResNet-18 training throughput on CPU, bigjax vs torchvision on PyTorch, in one process.

    .venv/bin/python bench/resnet_vs_torchvision.py                    # batch 64, 32x32, cifar stem
    .venv/bin/python bench/resnet_vs_torchvision.py --rounds 1 --chunk 1 --batch 8   # smoke run
    .venv/bin/python bench/resnet_vs_torchvision.py --conv-impl im2col xla   # bigjax before/after
    .venv/bin/python bench/resnet_vs_torchvision.py --conv-impl im2col im2col-patches
    .venv/bin/python bench/resnet_vs_torchvision.py --keep-host-memory   # as `bigjax train` runs

Both train the same network (ResNet-18, float32, the 3x3 CIFAR stem unless `--stem imagenet`;
torchvision's model with conv1 replaced and the max-pool removed) with SGD (momentum 0.9, Nesterov,
weight decay 5e-4) and cross-entropy on the same random batch of `--batch` 32x32 images. The
measurements alternate, `--chunk` steps of one then of the other, `--rounds` times, after one
untimed warm-up chunk each (compilation), so both see the same machine load; the script prints
the median seconds per step of each, images/s and the ratio bigjax / PyTorch. `--conv-impl A B`
times one bigjax per `model.conv_impl` (bigjax/models/conv.py) in the same alternation;
`im2col-patches` is `im2col` with the stride-1 filter gradients from a patch matrix (the first
version, `conv.STRIDE1_FILTER_GRAD = "patches"`) instead of shifted copies; a `-bn-autodiff`
suffix (`auto-bn-autodiff`) takes BatchNorm's gradient as JAX derives it instead of the custom
VJP (`batchnorm.TRAIN_BACKWARD`). Besides wall seconds
the script prints CPU seconds (user + system, all threads) per step: less sensitive to other
processes on a shared machine than wall time. `--keep-host-memory` applies
bigjax/host_memory.py's malloc settings (what `bigjax` commands do) to the whole process, both
systems included, before jax starts; the settings cannot be undone in a process, so compare
runs with and without it by their CPU seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # torchvision_ref: torchvision on a CPU torch

if "--keep-host-memory" in sys.argv:  # before jax starts its threads (see host_memory.py)
    from bigjax.host_memory import keep_freed_host_memory
    keep_freed_host_memory()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bigjax.perf import cpu_description  # noqa: E402


def torch_side(args, x, y):
    import torch
    from torchvision_ref import import_torchvision
    model = import_torchvision().models.resnet18(num_classes=10)
    if args.stem == "cifar":
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    xt, yt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y.astype(np.int64))
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


# variant suffixes of --conv-impl: (module, switch read while tracing, value)
SUFFIXES = {"-patches": ("conv", "STRIDE1_FILTER_GRAD", "patches"),
            "-bn-autodiff": ("batchnorm", "TRAIN_BACKWARD", "autodiff")}


def parse_variant(variant: str) -> tuple[str, list[tuple[str, str, str]]]:
    """`--conv-impl` value -> (model.conv_impl, the (module, switch, value) of its suffixes)."""
    conv_impl, switches = variant, []
    for suffix, switch in SUFFIXES.items():
        if suffix in conv_impl:
            conv_impl = conv_impl.replace(suffix, "")
            switches.append(switch)
    return conv_impl, switches


def bigjax_side(args, x, y, variant: str):
    import importlib

    from bigjax.build import one_device
    from bigjax.config import load_config
    conv_impl, named = parse_variant(variant)
    switches = [(importlib.import_module(f"bigjax.models.{module}"), name, value)
                for module, name, value in named]
    cfg = load_config(os.path.join(ROOT, "configs/resnet18_cifar10.yaml"), [
        f"model.stem={args.stem}", "model.image_height=32", "model.image_width=32",
        "model.image_channels=3", "task.num_labels=10", f"train.batch_size={args.batch}",
        "mesh.data=1", "optimizer.schedule=constant", "optimizer.warmup_steps=0",
        f"model.conv_impl={conv_impl}"])
    parts = one_device(cfg)
    state = [parts.init_state()]
    batch = jax.device_put({"images": x, "labels": y, "weights": np.ones(len(y), np.float32)},
                           parts.batch_sharding)
    defaults = [(module, name, getattr(module, name)) for module, name, _ in switches]
    t = time.perf_counter()
    try:
        for module, name, value in switches:
            setattr(module, name, value)
        train_step = parts.train_step.lower(state[0], batch).compile()
        print(f"bigjax[{variant}] compiled in {time.perf_counter() - t:.1f} s", flush=True)
    finally:
        for module, name, value in defaults:
            setattr(module, name, value)

    def step():
        state[0], metrics = train_step(state[0], batch)
        return float(metrics["loss_sum"]) / float(metrics["weight"])  # waits for the step
    return step


def timed(step, n: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (process_time: user + system of all threads) seconds of each of n steps."""
    wall, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--stem", choices=["cifar", "imagenet"], default="cifar")
    p.add_argument("--chunk", type=int, default=3, help="steps of one system before switching")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--conv-impl", nargs="+", default=["auto"],
                   help="model.conv_impl of each bigjax timed (one system per value: auto, xla "
                        "or im2col, each optionally followed by -patches and/or -bn-autodiff)")
    p.add_argument("--keep-host-memory", action="store_true",
                   help="bigjax/host_memory.py's malloc settings for the whole process")
    args = p.parse_args()
    for variant in args.conv_impl:
        if parse_variant(variant)[0] not in ("auto", "xla", "im2col", "onednn"):
            p.error(f"--conv-impl {variant}: expected auto, xla, im2col or onednn, optionally followed "
                    f"by {' and/or '.join(SUFFIXES)}")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, args.batch).astype(np.int32)
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; jax {jax.__version__} "
          f"on {jax.devices()[0].platform}; load average {os.getloadavg()[0]:.1f}; "
          f"keep-host-memory {args.keep_host_memory}", flush=True)
    print(f"CPU: {cpu_description()}", flush=True)
    steps = {"pytorch": torch_side(args, x, y)}
    for impl in args.conv_impl:
        steps["bigjax" if len(args.conv_impl) == 1 else f"bigjax[{impl}]"] = bigjax_side(
            args, x, y, impl)
    t = time.perf_counter()
    first = {k: s() for k, s in steps.items()}  # warm-up: bigjax compiles here
    print(f"first losses {first} (warm-up {time.perf_counter() - t:.1f} s)", flush=True)
    times: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, s in steps.items():
            wall, c = timed(s, args.chunk)
            times[k] += wall
            cpu[k] += c
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in steps:
        print(f"{k}: median {med[k]:.3f} s/step over {len(times[k])} steps, "
              f"{args.batch / med[k]:.1f} images/s; CPU {statistics.median(cpu[k]):.3f} s/step",
              flush=True)
    for k in list(steps)[1:]:
        print(f"ratio {k}/pytorch images/s: {med['pytorch'] / med[k]:.2f}", flush=True)
    if len(args.conv_impl) == 2:  # the first against the second
        a, b = (f"bigjax[{i}]" for i in args.conv_impl)
        print(f"ratio {a}/{b} images/s: {med[b] / med[a]:.2f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)


if __name__ == "__main__":
    main()
