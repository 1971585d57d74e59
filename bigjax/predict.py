"""Predictions of a classification run on new texts: tokenize like training, one jitted forward
pass in eval mode, softmax, and the label names the run saved."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from bigjax.data.wordpiece import encode
from bigjax.state import ModelSpec

Prediction = tuple[str, float]  # (label name, its probability)


def probs_fn(spec: ModelSpec) -> Callable:
    """(params, model_state, batch) -> class probabilities (B, K); pure, jitted like the eval step
    (`step.jit_eval_step`)."""
    def probs(params, model_state, batch):
        model = nnx.merge(spec.graphdef, params, model_state, copy=True)
        logits = model(batch["input_ids"], token_type_ids=batch["token_type_ids"],
                       attention_mask=batch["attention_mask"], rngs=None)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return probs


def predict_texts(probs_fn: Callable, params: Any, model_state: Any, tok, texts: Sequence[str],
                  names: Sequence[str], *, seq_len: int, batch_size: int, multiple: int,
                  batch_sharding: NamedSharding) -> list[Prediction]:
    """Batches of `batch_size` rows (the last padded to a multiple of the batch-sharded axes)."""
    out: list[Prediction] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        arrays = encode(tok, chunk, seq_len)
        pad = -len(chunk) % multiple
        batch = {k: jax.device_put(np.pad(v, ((0, pad), (0, 0))), batch_sharding)
                 for k, v in arrays.items()}
        p = np.asarray(jax.device_get(probs_fn(params, model_state, batch)))[:len(chunk)]
        for row in p:
            k = int(row.argmax())
            out.append((names[k] if k < len(names) else str(k), float(row[k])))
    return out


def format_predictions(texts: Sequence[str], preds: Sequence[Prediction]) -> list[str]:
    """One line per text: label, probability, the text (tab-separated, so easy to cut)."""
    return [f"{label}\t{prob:.4f}\t{text}" for text, (label, prob) in zip(texts, preds)]
