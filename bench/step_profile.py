"""Where a compiled train step's time goes, per XLA op, grouped by the part of the model it serves.

Compiles the train step of CONFIG (with overrides; by default the compute issue's decoder, as in
bench/maxtext_side_by_side.py), traces a few steps with `jax.profiler`, and sums each op's time
over the trace, grouped as matmul or elementwise work of the LM head and loss, attention, the MLP,
the rest of the forward and backward passes, and the optimizer update (from each op's `op_name`
in the optimized HLO). Op times overlap where XLA runs ops side by side, so the sum can exceed the
step; the shares are what to read.

    .venv/bin/python bench/step_profile.py                       # the issue's decoder, no remat
    .venv/bin/python bench/step_profile.py configs/gpt_tiny.yaml model.remat=full --top 30
    .venv/bin/python bench/step_profile.py --resnet --keep-host-memory   # ResNet-18, CIFAR, b 64

Image tasks (`image_classification`) get a random batch of the model's image shape, and their ops
are grouped by layer kind instead: convolution forward / input gradient / filter gradient per
stage, BatchNorm forward and backward, ReLU and residual sums, pooling and classifier, the
optimizer update, copies and transposes (second table: summed over stages). XLA:CPU runs Eigen's
dots (the filter gradients' products) asynchronously: the trace times their launch, not their
work, which shows up in whatever runs next; read the filter-gradient share as a lower bound.

On a GPU the device's kernels are summed (cuBLAS products and cuDNN attention by their custom
calls); run it with `XLA_FLAGS=--xla_gpu_enable_command_buffer=`, or CUDA graphs hide them.
`--save DIR` keeps the trace and the optimized HLO, so a trace taken on a lent GPU machine can be
read again elsewhere with `--load DIR`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if "--keep-host-memory" in sys.argv:  # before jax starts its threads (see host_memory.py)
    from bigjax.host_memory import keep_freed_host_memory
    keep_freed_host_memory()

import jax  # noqa: E402

from bigjax.build import build  # noqa: E402
from bigjax.config import load_config  # noqa: E402
from bigjax.mesh import make_mesh  # noqa: E402
from bigjax.plan import random_batch  # noqa: E402
from bigjax.resolve import resolve  # noqa: E402

DECODER = ["model.vocab_size=32000", "model.d_model=256", "model.n_layers=4", "model.n_heads=4",
           "model.head_dim=64", "model.d_ff=1024", "model.mlp=swiglu",
           "model.tie_embeddings=false", "model.max_seq_len=256", "train.seq_len=256",
           "train.batch_size=4", "model.dtype=float32", "mesh.data=1", "mesh.fsdp=1",
           "mesh.tensor=1", "model.remat=none"]
# bench/resnet_vs_torchvision.py's network: ResNet-18, CIFAR stem, batch 64, one device
RESNET = ["model.image_height=32", "model.image_width=32", "model.image_channels=3",
          "task.num_labels=10", "train.batch_size=64", "mesh.data=1",
          "optimizer.schedule=constant", "optimizer.warmup_steps=0"]
RUNTIME = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction",  # not ops
           "CommonPjRt")


def part_of(name: str, op_name: str, target: str = "") -> str:
    """The model part an op serves, from its HLO metadata (jvp: forward, transpose: backward);
    `target`: a custom call's (GPU: cuBLAS products, cuDNN attention)."""
    fused_attention = "fmha" in target or "dot_product_attention" in name
    kind = ("matmul" if name.startswith(("ynn", "dot", "xnn", "onednn")) or fused_attention
            or "matmul" in target or "gemm" in target else "elementwise")
    if "chunked_token_stats" in op_name:
        part = "LM head + loss"
    elif fused_attention or "checkpoint" in op_name or "bnts" in op_name or "bsnh" in op_name:
        part = "attention"
    elif "while/body" in op_name:  # the chunked loss's loop
        part = "LM head + loss"
    elif "silu" in op_name or "gelu" in op_name:
        part = "MLP activation"
    elif "transpose(" in op_name:
        part = "backward, other"
    elif "jvp(" in op_name:
        part = "forward, other"
    else:
        part = "optimizer, other"
    return f"{part} ({kind})"


def image_part_of(name: str, op_name: str, opcode: str) -> str:
    """For the image families (named scopes in resnet.py, conv.py, batchnorm.py): the layer kind
    an op serves, and the stage where the op has one (`stem`, `layer1` ... `layer4`)."""
    stage = re.search(r"\((stem|layer\d|head)", op_name)
    where = f" [{stage.group(1)}]" if stage and "conv" in op_name else ""
    backward = "transpose(" in op_name
    if opcode in ("copy", "transpose"):
        kind = "copies and transposes"
    elif "conv_dw" in op_name:
        kind = "conv filter gradient"
    elif "conv_dx" in op_name:
        kind = "conv input gradient"
    elif re.search(r"[/(]conv[/)]", op_name):  # forward convolutions, 1x1 ones (einsums)
        kind = "conv 1x1 backward" if backward else "conv forward"
    elif "batchnorm" in op_name:
        kind = "BatchNorm backward" if backward else "BatchNorm forward"
    elif "(head" in op_name or "one_hot" in op_name or "log_softmax" in op_name:
        kind = "pool, classifier, loss"
    elif stage:
        kind = "ReLU, residual " + ("backward" if backward else "forward")
    elif "jvp(" in op_name:  # unscoped model and loss ops (the cnn family has no stages)
        kind = "other " + ("backward" if backward else "forward") + " (activations, pool, loss)"
    elif "jit(" in op_name:
        kind = "optimizer update"
    else:
        kind = "other (unnamed)"
    return kind + where


def trace(args) -> tuple[list, str, dict]:
    """Compile the step, run it, trace `args.steps` steps: (trace events, optimized HLO, meta)."""
    if args.resnet:
        args.config, args.overrides = "configs/resnet18_cifar10.yaml", RESNET + args.overrides
    overrides = args.overrides if args.overrides or args.config != "configs/gpt_tiny.yaml" else DECODER
    cfg = load_config(args.config, overrides)
    images = cfg.task.name == "image_classification"
    if not images:
        cfg = resolve(cfg)  # image shapes come from the data, so image configs give them instead
    parts = build(cfg, make_mesh(cfg.mesh))
    state = parts.init_state()
    batch = jax.device_put(random_batch(cfg, 0), parts.batch_sharding)
    step = parts.train_step.lower(state, batch).compile()
    for _ in range(2):
        state, _ = step(state, batch)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, _ = step(state, batch)
            jax.block_until_ready(state)
        wall = (time.perf_counter() - t0) / args.steps
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
        meta = {"steps": args.steps, "wall_s": wall, "images": images,
                "load_average": os.getloadavg()[0]}
        hlo = step.as_text()
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            shutil.copy(path, os.path.join(args.save, "trace.json.gz"))
            with open(os.path.join(args.save, "step.hlo.txt"), "w") as fh:
                fh.write(hlo)
            with open(os.path.join(args.save, "meta.json"), "w") as fh:
                json.dump(meta, fh)
        with gzip.open(path) as fh:
            return json.load(fh)["traceEvents"], hlo, meta


def load(folder: str) -> tuple[list, str, dict]:
    with gzip.open(os.path.join(folder, "trace.json.gz")) as fh:
        events = json.load(fh)["traceEvents"]
    with open(os.path.join(folder, "step.hlo.txt")) as fh, \
            open(os.path.join(folder, "meta.json")) as meta:
        return events, fh.read(), json.load(meta)


def report(events: list, hlo_text: str, meta: dict, top_n: int) -> None:
    # op name, opcode and metadata of every HLO instruction (tuple-typed ones too: custom calls)
    hlo = re.findall(r'^\s*(?:ROOT )?%([\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w\-]+)\(.*?op_name="([^"]*)"',
                     hlo_text, re.M)
    op_names = {name: op for name, _, op in hlo}
    opcodes = {name: code for name, code, _ in hlo}
    targets = dict(re.findall(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?custom_call_target="([^"]+)"',
                              hlo_text, re.M))
    images, steps = meta["images"], meta["steps"]
    classify = ((lambda n: image_part_of(n, op_names.get(n, ""), opcodes.get(n, ""))) if images
                else (lambda n: part_of(n, op_names.get(n, ""), targets.get(n, ""))))
    # on GPUs and TPUs, the kernels on the device's streams, each by the HLO op it runs (the host
    # threads only launch them); on CPU the ops run on host threads
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and re.search(r"/device:(GPU|TPU)", str(e.get("args", {}).get("name", "")))}
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or (devices and e.get("pid") not in devices):
            continue
        name = e.get("args", {}).get("hlo_op", e["name"]) if devices else e["name"]
        if not name.startswith(RUNTIME):
            per_op[name] += e["dur"] / 1e3 / steps  # ms per step
    total = sum(per_op.values())
    by_part: collections.Counter = collections.Counter()
    for name, ms in per_op.items():
        by_part[classify(name)] += ms
    print(f"step {meta['wall_s'] * 1e3:.1f} ms (traced, load average "
          f"{meta.get('load_average', float('nan')):.1f}); op times sum to {total:.1f} ms")
    print("| part | ms per step | share |\n|---|---|---|")
    for part, ms in by_part.most_common():
        print(f"| {part} | {ms:.1f} | {ms / total:.0%} |")
    if images:  # the same, summed over stages
        by_kind: collections.Counter = collections.Counter()
        for part, ms in by_part.items():
            by_kind[part.split(" [")[0]] += ms
        print("\n| kind | ms per step | share |\n|---|---|---|")
        for kind, ms in by_kind.most_common():
            print(f"| {kind} | {ms:.1f} | {ms / total:.0%} |")
    for kind in ("",) if images else ("matmul", "elementwise"):
        top = [(n, ms) for n, ms in per_op.most_common()
               if images or classify(n).endswith(f"({kind})")][:top_n]
        print(f"\ntop {top_n} {kind or 'all'} ops:")
        for name, ms in top:
            print(f"  {ms:8.2f} ms  {name:28s} {opcodes.get(name, ''):12s} "
                  f"{op_names.get(name, '')[:100]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default="configs/gpt_tiny.yaml")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--resnet", action="store_true",
                    help="configs/resnet18_cifar10.yaml as bench/resnet_vs_torchvision.py runs it")
    ap.add_argument("--save", metavar="DIR",
                    help="also write the trace, the optimized HLO and the step time there")
    ap.add_argument("--load", metavar="DIR",
                    help="report on what --save wrote (say, on a GPU machine) instead of tracing")
    ap.add_argument("--keep-host-memory", action="store_true",
                    help="bigjax/host_memory.py's malloc settings (as `bigjax` commands on CPU)")
    args = ap.parse_args()
    report(*(load(args.load) if args.load else trace(args)), args.top)


if __name__ == "__main__":
    main()
