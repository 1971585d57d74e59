"""What a person sees of a run: progress bar, metrics.jsonl, TensorBoard events, the loss plot.

Only process 0 reports; the others get a Reporter whose methods do nothing.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax


def stage(text: str, enabled: bool = True) -> None:
    """One line (process 0, stdout: stderr keeps errors to one line) for a start-up stage before
    the progress bar exists."""
    if enabled and jax.process_index() == 0:
        print(f"bigjax: {text}...", flush=True)


class Reporter:
    def __init__(self, run_dir: str, total_steps: int, start_step: int, progress: bool):
        self.active = jax.process_index() == 0
        self.run_dir = run_dir
        self.bar = None
        self.tb = None
        if not self.active:
            return
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self.tb = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, row: dict[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in row.items()}
        self.jsonl.write(json.dumps(clean) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, clean["step"])

    def progress(self, step: int, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def stage(self, text: str) -> None:
        """What the run is doing while the bar stands still (compiling, evaluating)."""
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=True)

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_losses(run_dir: str) -> str | None:
    """PNG of train and validation loss against step; returns its path."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not val:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(run_dir, "loss.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
