"""`image_classification`: cross-entropy (optional label smoothing), accuracy, top-5 accuracy and
macro F1 of a model's logits on `images` batches (bigjax/data/images.py), all as additive sums so
that a whole split's metrics are exact however it was batched (like tasks.Classification)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from bigjax.config import Config, TaskConfig, derived
from bigjax.errors import ConfigError
from bigjax.registry import register_task
from bigjax.tasks import class_counts, macro_f1

TOP_K = 5


@dataclass(frozen=True)
class ImageClassificationConfig(TaskConfig):
    name: str = "image_classification"
    num_labels: int = derived(0, "num_labels")  # 0 = the number of classes of the data
    label_smoothing: float = 0.0  # targets (1 - a) one-hot + a / num_labels; metrics unaffected

    def check(self, cfg: Config) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"task.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class ImageClassification:
    """Batch: images (B x H x W x C float32), labels (B int32), weights (B; 0 = padding).

    The model is called with `train=rngs is not None`: BatchNorm uses batch statistics (and
    updates its running averages) in the train step, the running averages in evaluation."""

    num_labels: int
    label_smoothing: float = 0.0
    name: str = "image_classification"

    def stats(self, model, batch, rngs):
        logits = model(batch["images"], rngs=rngs, train=rngs is not None)
        labels, w = batch["labels"], batch["weights"].astype(jnp.float32)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, self.num_labels), self.label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
        pred = jnp.argmax(logits, -1)
        out = {"loss_sum": (losses * w).sum(), "weight": w.sum(),
               "correct": ((pred == labels) * w).sum(),
               **class_counts(pred, labels, w, self.num_labels)}
        if self.num_labels >= TOP_K:
            _, top = jax.lax.top_k(logits, TOP_K)
            out["correct_top5"] = ((top == labels[:, None]).any(-1) * w).sum()
        return out

    def finalize(self, sums):
        w = max(sums["weight"], 1e-9)
        out = {"loss": sums["loss_sum"] / w, "accuracy": sums["correct"] / w}
        if "correct_top5" in sums:
            out["top5_accuracy"] = sums["correct_top5"] / w
        out["macro_f1"] = macro_f1(sums, self.num_labels)
        return out


def _image_classification(cfg: Config) -> ImageClassification:
    if cfg.task.num_labels < 2:
        raise ConfigError(f"task.num_labels must be at least 2 for image_classification, "
                          f"got {cfg.task.num_labels}")
    return ImageClassification(cfg.task.num_labels, cfg.task.label_smoothing)


register_task("image_classification", ImageClassificationConfig, _image_classification,
              data="images")
