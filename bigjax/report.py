"""What a person sees of a run: progress bar, metrics.jsonl, TensorBoard events, the loss plot.

Only process 0 reports; the others get a Reporter whose methods do nothing.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from typing import Any

import jax

from bigjax.paths import PathLike, is_remote, run_path, write_text

log = logging.getLogger("bigjax")


def stage(text: str, enabled: bool = True) -> None:
    """One line (process 0, stdout: stderr keeps errors to one line) for a start-up stage before
    the progress bar exists."""
    if enabled and jax.process_index() == 0:
        print(f"bigjax: {text}...", flush=True)


class MetricsFile:
    """`metrics.jsonl`, appended row by row. Object storage has no append: there the file's text
    is kept and the whole object rewritten at most every `upload_every_s` and on close, so a
    killed run loses at most that much of the log (its rows after the last checkpoint are logged
    again on resume anyway)."""

    def __init__(self, path: PathLike, upload_every_s: float = 30.0):
        self.path = run_path(path)
        self.remote = is_remote(path)
        self.upload_every_s = upload_every_s
        if self.remote:
            self.text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
            self.uploaded = time.monotonic()
            self.dirty = False
        else:
            self.fh = self.path.open("a", encoding="utf-8")

    def write(self, line: str) -> None:
        if not self.remote:
            self.fh.write(line)
            self.fh.flush()
            return
        self.text += line
        self.dirty = True
        if time.monotonic() - self.uploaded >= self.upload_every_s:
            self.flush()

    def flush(self) -> None:
        if self.remote and self.dirty:
            write_text(self.path, self.text)
            self.uploaded, self.dirty = time.monotonic(), False

    def close(self) -> None:
        if self.remote:
            self.flush()
        else:
            self.fh.close()


def _summary_writer(logdir: str):
    """tensorboardX writes gs:// (with google-cloud-storage) and s3:// (with boto3) itself; without
    them the run goes on without TensorBoard events (metrics.jsonl has every row)."""
    try:
        from tensorboardX import SummaryWriter
        return SummaryWriter(logdir)
    except ImportError as e:
        log.warning("warning: no TensorBoard events in %s (%s); metrics.jsonl has every row",
                    logdir, e)
        return None


class Reporter:
    def __init__(self, run_dir: PathLike, total_steps: int, start_step: int, progress: bool):
        self.active = jax.process_index() == 0
        self.run_dir = run_dir
        self.bar = None
        self.tb = None
        if not self.active:
            return
        self.jsonl = MetricsFile(run_path(run_dir) / "metrics.jsonl")
        self.tb = _summary_writer(str(run_path(run_dir) / "tb"))
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, row: dict[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in row.items()}
        self.jsonl.write(json.dumps(clean) + "\n")
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


def read_metrics(run_dir: PathLike) -> list[dict]:
    path = run_path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def plot_losses(run_dir: PathLike) -> str | None:
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
    path = run_path(run_dir) / "loss.png"
    fig.tight_layout()
    png = io.BytesIO()  # matplotlib writes local files only
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    path.write_bytes(png.getvalue())
    return str(path)
