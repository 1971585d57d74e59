"""Tasks: the loss and metrics of model outputs and a batch. The only place where pretraining and
finetuning differ; the train step calls `task.stats` and never looks inside.

A task returns sums, not means: `loss_sum` and its `weight` (e.g. the number of target tokens), plus
other additive counts. Sums make gradient accumulation and whole-split evaluation exact: the step
and the evaluator add them up and `finalize` divides once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bigjax.config import Config
from bigjax.errors import ConfigError

Batch = dict[str, jax.Array]
Stats = dict[str, jax.Array]


class Task(Protocol):
    name: str

    def stats(self, model: nnx.Module, batch: Batch, rngs: nnx.Rngs | None) -> Stats:
        """Additive statistics; must contain 'loss_sum' and 'weight'."""

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Host-side metrics from summed statistics."""


def token_stats(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array) -> Stats:
    """Cross-entropy and accuracy sums over weighted positions."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    correct = (jnp.argmax(logits_BTV, -1) == targets_BT).astype(jnp.float32)
    w = weights_BT.astype(jnp.float32)
    return {"loss_sum": (losses * w).sum(), "weight": w.sum(), "correct": (correct * w).sum()}


def finalize_token_stats(sums: dict[str, float]) -> dict[str, float]:
    import math
    w = max(sums["weight"], 1e-9)
    loss = sums["loss_sum"] / w
    return {"loss": loss, "accuracy": sums["correct"] / w, "perplexity": math.exp(min(loss, 50.0))}


@dataclass(frozen=True)
class CausalLM:
    """Next-token prediction; batch: inputs, targets, weights, optional segment_ids, positions."""

    name: str = "causal_lm"

    def stats(self, model, batch, rngs):
        logits = model(batch["inputs"], segment_ids=batch.get("segment_ids"),
                       positions=batch.get("positions"), rngs=rngs)
        return token_stats(logits, batch["targets"], batch["weights"])

    def finalize(self, sums):
        return finalize_token_stats(sums)


_TASKS: dict[str, Callable[[Config], Task]] = {"causal_lm": lambda cfg: CausalLM()}


def register_task(name: str, factory: Callable[[Config], Task]) -> None:
    _TASKS[name] = factory


def make_task(cfg: Config) -> Task:
    if cfg.task.name not in _TASKS:
        raise ConfigError(f"task.name: unknown task '{cfg.task.name}' (known: {', '.join(sorted(_TASKS))})")
    return _TASKS[cfg.task.name](cfg)
