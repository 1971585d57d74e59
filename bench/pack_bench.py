"""Packed vs padded classification steps on real data: the same model and optimizer, packed rows
(`--packed`, `data.examples_per_row` > 1) against one padded text per row (`--padded`), both
over the config, timed alternately in one process so both see the same machine load.

    .venv/bin/python bench/pack_bench.py configs/minilm_sentiment.yaml --steps 20 \\
        init.from=hf:DIR data.source=CSV

Prints the median step time of each, texts per step (the weights' sum) and texts per second, and
their ratios. The steps are the trainer's compiled train step on the loader's batches (already on
the devices when the clock starts), one after the other to completion.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax

from bigjax.config import load_config
from bigjax.data.stream_loader import make_train_loader
from bigjax.trainer import Trainer


def system(config: str, overrides: list[str]):
    cfg = load_config(config, [*overrides, f"run.dir={tempfile.mkdtemp(prefix='pack_bench_')}",
                               "train.progress=false"])
    trainer = Trainer(cfg)
    state = trainer.init_state()
    loader = make_train_loader(trainer.data.train, cfg.train.batch_size, seed=cfg.seed,
                               shuffle=True, sharding=trainer.parts.batch_sharding)
    return trainer, state, loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each system")
    # ~32 tweets per step either way (README "Packing short texts")
    p.add_argument("--packed", default="data.examples_per_row=8 data.max_example_len=48 "
                   "train.seq_len=128 train.batch_size=8",
                   help="overrides of the packed system (one string, space-separated)")
    p.add_argument("--padded", default="data.examples_per_row=1 data.max_example_len=0 "
                   "train.seq_len=48 train.batch_size=32",
                   help="overrides of the padded system (one string, space-separated)")
    p.add_argument("overrides", nargs="*", help="overrides of both, e.g. data.source=CSV")
    args = p.parse_intermixed_args()
    systems = {
        "packed": system(args.config, [*args.overrides, *args.packed.split()]),
        "padded": system(args.config, [*args.overrides, *args.padded.split()]),
    }
    times: dict[str, list[float]] = {k: [] for k in systems}
    texts: dict[str, list[float]] = {k: [] for k in systems}
    for i in range(args.steps + 1):  # step 0 compiles: untimed
        for name, (trainer, state, loader) in systems.items():
            batch = next(loader)
            t = time.perf_counter()
            state, metrics = trainer.parts.train_step(state, batch)
            jax.block_until_ready((state, metrics))
            systems[name] = (trainer, state, loader)
            if i:
                times[name].append(time.perf_counter() - t)
                texts[name].append(float(jax.device_get(metrics["weight"])))
    out = {}
    for name, (trainer, _, _) in systems.items():
        t = trainer.cfg.train
        step = statistics.median(times[name])
        per_step = statistics.mean(texts[name])
        out[name] = (step, per_step / step)
        print(f"{name}: {t.batch_size} rows x {t.seq_len} tokens, {per_step:.1f} texts/step, "
              f"median step {step * 1e3:.0f} ms (min {min(times[name]) * 1e3:.0f}, max "
              f"{max(times[name]) * 1e3:.0f}), {per_step / step:.1f} texts/s")
    print(f"packed / padded: step time x{out['packed'][0] / out['padded'][0]:.3f}, "
          f"texts/s x{out['packed'][1] / out['padded'][1]:.3f} ({args.steps} steps each, "
          "alternating)")


if __name__ == "__main__":
    main()
