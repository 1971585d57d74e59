"""Input-pipeline throughput next to what the train step of configs/gpt_tiny.yaml consumes.

    .venv/bin/python bench/data_bench.py                      # defaults: the gpt_tiny shapes
    .venv/bin/python bench/data_bench.py --max-chars 200000 --seconds 1 --steps 3   # a smoke run

Rows: LM packing (tokenize + pack once, then the grain loader in steady state) and classification
(tokenize + truncate/pad once, then the loader), each with 0 and 1 grain worker processes; then the
tokens/s that the jitted train step consumes on random tokens of the same shape. The goal is
loader tokens/s >= 10x the step's. Figures are for the lead to take on a quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bigjax.config import load_config, updated  # noqa: E402
from bigjax.data.inspect import measure_throughput  # noqa: E402
from bigjax.data.types import Data  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "gpt_tiny.yaml")


def lm_rows(args, tmp: str) -> tuple[list[dict], Data]:
    from bigjax.data.lm import build_lm_data, get_tokenizer
    from bigjax.data.records import read_texts
    cfg = load_config(CONFIG, [f"data.max_chars={args.max_chars}", f"train.seq_len={args.seq_len}",
                               f"train.batch_size={args.batch}"])
    get_tokenizer(cfg, read_texts(cfg)[0], tmp)  # trained once and cached: not pipeline work
    t0 = time.perf_counter()
    data = build_lm_data(cfg, tmp)  # read the corpus, tokenize, split, pack
    prep_s = time.perf_counter() - t0
    return loader_rows("lm packing", data, data.info["train_tokens"] / prep_s, cfg, args), data


def loader_rows(name: str, data: Data, prepare_tok_s: float, cfg, args) -> list[dict]:
    """One row per `--workers` value: the loader's steady-state speed over `data.train`."""
    rows = []
    for workers in args.workers:
        speed = measure_throughput(data.train, args.batch, updated(cfg, {"data.workers": workers}),
                                   args.seconds)
        rows.append({"pipeline": name, "workers": workers, "prepare_tok_s": prepare_tok_s,
                     "loader_tok_s": speed["tokens_per_s"], "examples_s": speed["examples_per_s"]})
    return rows


def classification_rows(args, tmp: str, texts: list[str]) -> list[dict]:
    from bigjax.data.classification import build_classification_data
    path = os.path.join(tmp, "cls.csv")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i, t in enumerate(texts):
            w.writerow([t[:2000], "long" if len(t) > 400 else "short"])
    # a BERT config (gpt_tiny's model keys are GPT-only) with gpt_tiny's data settings
    lm = load_config(CONFIG).data
    cfg = load_config(None, [f"data.source={path}", "task.name=classification",
                             "model.name=bert", f"data.val_fraction={lm.val_fraction}",
                             f"data.vocab_size={lm.vocab_size}", f"train.seq_len={args.seq_len}",
                             f"train.batch_size={args.batch}", f"run.dir={tmp}/cls_run"])
    os.makedirs(cfg.run.dir, exist_ok=True)
    t0 = time.perf_counter()
    data = build_classification_data(cfg, cfg.run.dir)
    prep_s = time.perf_counter() - t0
    tokens = int(sum(data.train[i]["attention_mask"].sum() for i in range(len(data.train))))
    return loader_rows("classification", data, tokens / prep_s, cfg, args)


def step_tokens_per_s(args, vocab: int) -> float:
    """The jitted train step of gpt_tiny on random tokens: what the trainer's loop consumes."""
    from bigjax import mesh as mesh_lib
    from bigjax.build import build

    cfg = load_config(CONFIG, [f"train.seq_len={args.seq_len}", f"train.batch_size={args.batch}",
                               f"model.vocab_size={vocab}"])
    parts = build(cfg, mesh_lib.make_mesh(cfg.mesh))  # what the trainer builds
    step, batch_sharding = parts.train_step, parts.batch_sharding
    state = parts.init_state()
    rng = np.random.default_rng(0)
    B, T = args.batch, args.seq_len
    tokens = rng.integers(0, vocab, (B, T + 1), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((B, T), np.float32),
             "segment_ids": np.zeros((B, T), np.int32),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}
    batch = jax.device_put(batch, batch_sharding)
    state, m = step(state, batch)  # compile
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return B * T * args.steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-chars", type=int, default=3_000_000, help="builtin corpus size")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="grain worker processes")
    p.add_argument("--seconds", type=float, default=5.0, help="loader measuring time per row")
    p.add_argument("--steps", type=int, default=20, help="timed train steps")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows, lm = lm_rows(args, tmp)
        texts = [lm.tokenizer.decode(lm.train[i]["inputs"]) for i in range(min(len(lm.train), 4000))]
        rows += classification_rows(args, tmp, texts)
        step_tok_s = step_tokens_per_s(args, vocab=4096)
    print(f"\ninput pipeline vs gpt_tiny train step (batch {args.batch}, seq_len {args.seq_len}, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} cores)")
    print(f"{'pipeline':<15} {'workers':>7} {'prepare tok/s':>14} {'loader tok/s':>13} "
          f"{'examples/s':>11} {'x step':>7}")
    for r in rows:
        print(f"{r['pipeline']:<15} {r['workers']:>7} {r['prepare_tok_s']:>14,.0f} "
              f"{r['loader_tok_s']:>13,.0f} {r['examples_s']:>11,.0f} "
              f"{r['loader_tok_s'] / step_tok_s:>7.1f}")
    print(f"{'train step':<15} {'':>7} {'':>14} {step_tok_s:>13,.0f} {'':>11} {1.0:>7.1f}")


if __name__ == "__main__":
    main()
