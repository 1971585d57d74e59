"""Task `smoothed_classification`: sequence classification trained against label-smoothed
targets, on the batches of bigjax's built-in `classification` data builder (input_ids,
attention_mask, token_type_ids, labels, weights).

The loss is softmax cross-entropy against (1 - s) * one_hot(label) + s / K (s =
`task.label_smoothing`, K = `task.num_labels`), in training and in evaluation, so `eval_loss` is
the smoothed loss too. Like every bigjax task it returns additive sums (`loss_sum`, `weight`,
`correct`), so gradient accumulation and whole-split evaluation are exact; `finalize` divides.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from bigjax.config import Config, TaskConfig, derived
from bigjax.errors import ConfigError
from bigjax.registry import register_task

NAME = "smoothed_classification"


@dataclass(frozen=True)
class SmoothedClassificationConfig(TaskConfig):
    """`task:` keys of `name: smoothed_classification`."""

    name: str = NAME
    num_labels: int = derived(0, "num_labels")  # 0 = the number of distinct labels in the data
    label_smoothing: float = 0.1  # share of the target mass spread evenly over all classes

    def check(self, cfg: Config) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"task.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.num_labels < 0 or self.num_labels == 1:
            raise ConfigError(f"task.num_labels must be 0 (count the labels in the data) or at "
                              f"least 2, got {self.num_labels}")


@dataclass(frozen=True)
class SmoothedClassification:
    num_labels: int
    label_smoothing: float
    name: str = NAME

    def stats(self, model, batch, rngs):
        logits = model(batch["input_ids"], token_type_ids=batch.get("token_type_ids"),
                       attention_mask=batch["attention_mask"], rngs=rngs)
        labels, w = batch["labels"], batch["weights"].astype(jnp.float32)
        logits = logits.astype(jnp.float32)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, self.num_labels), self.label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return {"loss_sum": (losses * w).sum(), "weight": w.sum(), "correct": (correct * w).sum()}

    def finalize(self, sums):
        w = max(sums["weight"], 1e-9)
        return {"loss": sums["loss_sum"] / w, "accuracy": sums["correct"] / w}


def create(cfg: Config) -> SmoothedClassification:
    if cfg.task.num_labels < 2:
        raise ConfigError(f"task.num_labels must be at least 2 for {NAME}, "
                          f"got {cfg.task.num_labels}")
    return SmoothedClassification(cfg.task.num_labels, cfg.task.label_smoothing)


register_task(NAME, SmoothedClassificationConfig, create, data="classification")
