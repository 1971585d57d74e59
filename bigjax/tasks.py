"""Tasks: the loss and metrics of model outputs and a batch. The only place where pretraining and
finetuning differ; the train step calls `task.stats` and never looks inside.

A task returns sums, not means: `loss_sum` and its `weight` (e.g. the number of target tokens), plus
other additive counts. Sums make gradient accumulation and whole-split evaluation exact: the step
and the evaluator add them up and `finalize` divides once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bigjax import registry
from bigjax.config import Config, TaskConfig, derived
from bigjax.errors import ConfigError
from bigjax.models.lm_head import chunked_token_stats

Batch = dict[str, jax.Array]
Stats = dict[str, jax.Array]


class Task(Protocol):
    name: str

    def stats(self, model: nnx.Module, batch: Batch, rngs: nnx.Rngs | None) -> Stats:
        """Additive statistics; must contain 'loss_sum' and 'weight'."""

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Host-side metrics from summed statistics."""

    # Optional: `host_batch(batch) -> batch`, a process-local batch of numpy arrays as the step
    # should get it, applied on the host before it goes to the devices (single-process runs
    # only: every process must run the same program). See CausalLM.host_batch.


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
    """Next-token prediction; batch: inputs, targets, weights, optional segment_ids, positions.

    A model that offers `hidden(inputs, ...)` (the final hidden states) and `output_head()` (a
    `bigjax.models.lm_head.OutputHead` with a `loss_chunk`) gets its loss computed in chunks of
    positions, without B×T×V logits; any other model is called for its logits.
    """

    name: str = "causal_lm"

    def stats(self, model, batch, rngs):
        kw = dict(segment_ids=batch.get("segment_ids"), positions=batch.get("positions"), rngs=rngs)
        head = model.output_head() if hasattr(model, "output_head") else None
        if head is not None and head.loss_chunk > 0:
            h = model.hidden(batch["inputs"], **kw)
            return chunked_token_stats(h, head, batch["targets"], batch["weights"])
        return token_stats(model(batch["inputs"], **kw), batch["targets"], batch["weights"])

    def host_batch(self, batch):
        """Without `segment_ids` when no row needs them, so that attention runs as plain causal:
        no T x S document mask (cuDNN's fastest kernel on a GPU: 1.92 against 2.92 ms per layer
        forward and backward on an H200 at 8 x 2,048, 32 heads over 8). A second compiled step,
        made the first time such a batch comes."""
        seg = batch.get("segment_ids")
        if seg is None or crosses_documents(seg, batch["weights"]):
            return batch
        return {k: v for k, v in batch.items() if k != "segment_ids"}

    def finalize(self, sums):
        return finalize_token_stats(sums)


def crosses_documents(segment_ids_BT: np.ndarray, weights_BT: np.ndarray) -> bool:
    """Whether a weighted position lies at or after a change of segment in its row. Under a
    causal mask position t sees only positions <= t, so if none does, every weighted position
    sees exactly what the segment ids would let it see, and the loss and its gradients are the
    same without them: one document per row, or one followed by weight-0 padding (`data.pack:
    false` pads each document as its own segment)."""
    seg = np.asarray(segment_ids_BT)
    after = np.cumsum(seg[:, 1:] != seg[:, :-1], axis=1) > 0  # B x T-1: positions 1..T-1
    return bool(np.any(np.asarray(weights_BT)[:, 1:][after] != 0))


@dataclass(frozen=True)
class MaskedLM:
    """BERT masked-LM; batch: input_ids, attention_mask, optional token_type_ids, targets, weights,
    and optionally masked_positions.

    The masking itself happens in the data pipeline (bigjax/data/mlm.py). With `masked_positions`
    (B×P, as the pipeline makes them) targets and weights are B×P and the model is asked for
    logits at those positions only (`model(..., masked_positions=...)`); without them, targets and
    weights are B×T and weights are 1 only at the selected positions.
    """

    name: str = "masked_lm"

    def stats(self, model, batch, rngs):
        at = {"masked_positions": batch["masked_positions"]} if "masked_positions" in batch else {}
        logits = model(batch["input_ids"], token_type_ids=batch.get("token_type_ids"),
                       attention_mask=batch["attention_mask"], rngs=rngs, **at)
        return token_stats(logits, batch["targets"], batch["weights"])

    def finalize(self, sums):
        return finalize_token_stats(sums)


PACKED_KEYS = ("segment_ids", "position_ids", "example_starts")  # bigjax/data/pack_cls.py


def classifier_logits(model, batch: Batch, rngs) -> jax.Array:
    """B×C logits of a classification batch, or R×K×C of packed rows (several texts per row:
    the keys of PACKED_KEYS, and labels and weights R×K), which only a family that
    `reads_packed_rows` is given (config validation)."""
    packed = {k: batch[k] for k in PACKED_KEYS if k in batch}
    return model(batch["input_ids"], token_type_ids=batch.get("token_type_ids"),
                 attention_mask=batch["attention_mask"], rngs=rngs, **packed)


@dataclass(frozen=True)
class Classification:
    """Sequence classification; batch: input_ids, attention_mask, token_type_ids, labels, weights,
    or packed rows (`classifier_logits`): the same sums over every text slot, the empty ones
    weighing 0, so the loss is the mean over the step's real texts however they were packed.

    Besides the loss it sums per-class true/false positives and false negatives as scalars
    (`tp_3`, ...), so macro F1 over a whole split is exact however it was batched.
    """

    num_labels: int
    name: str = "classification"

    def stats(self, model, batch, rngs):
        logits = classifier_logits(model, batch, rngs)
        labels, w = batch["labels"], batch["weights"].astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        pred = jnp.argmax(logits, -1)
        return {"loss_sum": (losses * w).sum(), "weight": w.sum(),
                "correct": ((pred == labels) * w).sum(),
                **class_counts(pred, labels, w, self.num_labels)}

    def finalize(self, sums):
        w = max(sums["weight"], 1e-9)
        return {"loss": sums["loss_sum"] / w, "accuracy": sums["correct"] / w,
                "macro_f1": macro_f1(sums, self.num_labels)}


def class_counts(pred: jax.Array, labels: jax.Array, w: jax.Array, num_labels: int) -> Stats:
    """Weighted per-class true/false positives and false negatives as scalars (`tp_3`, ...):
    additive, so macro F1 over a whole split is exact however it was batched."""
    out = {}
    for k in range(num_labels):
        is_pred, is_label = (pred == k) * w, (labels == k) * w
        out[f"tp_{k}"] = (is_pred * (labels == k)).sum()
        out[f"fp_{k}"] = (is_pred * (labels != k)).sum()
        out[f"fn_{k}"] = (is_label * (pred != k)).sum()
    return out


def macro_f1(sums: dict[str, float], num_labels: int) -> float:
    """Like scikit-learn's macro F1: averaged over the classes present in labels or predictions."""
    f1s = []
    for k in range(num_labels):
        tp, fp, fn = sums[f"tp_{k}"], sums[f"fp_{k}"], sums[f"fn_{k}"]
        if tp + fp + fn > 0:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else 0.0


@dataclass(frozen=True)
class CausalLMConfig(TaskConfig):
    name: str = "causal_lm"


@dataclass(frozen=True)
class MaskedLMConfig(TaskConfig):
    name: str = "masked_lm"
    mlm_probability: float = 0.15  # share of the maskable tokens each sequence predicts

    def check(self, cfg: Config) -> None:
        if not 0 < self.mlm_probability < 1:
            raise ConfigError(f"task.mlm_probability must be in (0, 1), got {self.mlm_probability}")


@dataclass(frozen=True)
class ClassificationConfig(TaskConfig):
    name: str = "classification"
    num_labels: int = derived(0, "num_labels")  # 0 = the number of distinct labels in the data


def num_predictions(maskable: int, probability: float) -> int:
    """How many positions a masked-LM sequence with `maskable` tokens predicts, as in the original
    BERT's pretraining data: round(maskable x probability), at least 1 (0 when nothing is
    maskable)."""
    return min(maskable, max(1, int(round(maskable * probability))))


def _classification(cfg: Config) -> Task:
    if cfg.task.num_labels < 2:
        raise ConfigError(f"task.num_labels must be at least 2 for classification, "
                          f"got {cfg.task.num_labels}")
    return Classification(cfg.task.num_labels)


def head(cfg: Config) -> str | None:
    """The kind of output head the task's batches need: "masked_lm" (token logits at masked
    positions), "classification" (logits per sequence) or None (the model's own output). Read
    from the task's data builder, so a plug-in task on classification batches gets a classifier."""
    name = registry.task(cfg.task.name).data_name(cfg)
    try:
        batches = registry.data_builder(name).batches
    except ConfigError:  # an unknown builder fails where the data is built, with its own message
        batches = name
    return {"mlm": "masked_lm", "classification": "classification"}.get(batches)


def make_task(cfg: Config) -> Task:
    return registry.task(cfg.task.name).create(cfg)


register_task = registry.register_task
register_task("causal_lm", CausalLMConfig, lambda cfg: CausalLM(), data="lm")
register_task("masked_lm", MaskedLMConfig, lambda cfg: MaskedLM(), data="mlm")
register_task("classification", ClassificationConfig, _classification, data="classification")
