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


# ---- images ------------------------------------------------------------------------------------
def image_probs_fn(spec: ModelSpec) -> Callable:
    """(params, model_state, batch) -> class probabilities of `images` batches, eval mode (BatchNorm
    with its running statistics)."""
    def probs(params, model_state, batch):
        model = nnx.merge(spec.graphdef, params, model_state, copy=True)
        logits = model(batch["images"], rngs=None, train=False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return probs


def prepare_image(item: Any, meta: dict) -> np.ndarray:
    """An image path or an H x W (x C) array of raw pixel values (0..255; 0..16 for
    sklearn:digits) -> the normalised H x W x C float32 the model was trained on."""
    from bigjax.data.image_sources import decode, resize_array
    from bigjax.errors import DataError
    H, W, C = meta["image_shape"]
    if isinstance(item, (str, bytes)) or hasattr(item, "__fspath__"):
        try:
            image = decode(str(item), "L" if C == 1 else "RGB", meta["image_size"])
        except Exception as e:
            raise DataError(f"predict: cannot read image {item}: {str(e).splitlines()[0][:100]}")
    else:
        image = np.asarray(item)
        image = image[..., None] if image.ndim == 2 else image
        if meta["image_size"] and image.shape[:2] != (H, W):
            image = resize_array(image.astype(np.uint8), meta["image_size"])
    if tuple(image.shape) != (H, W, C):
        raise DataError(f"predict: an image of shape {tuple(image.shape)}, but the run was trained "
                        f"on {H}x{W}x{C} images (data.image_size resizes only at training)")
    x = image.astype(np.float32) / meta["scale"]
    std = np.maximum(np.asarray(meta["pixel_std"], np.float32), 1e-6)
    return (x - np.asarray(meta["pixel_mean"], np.float32)) / std


def predict_images(probs_fn: Callable, params: Any, model_state: Any, items: Sequence[Any],
                   meta: dict, *, batch_size: int, multiple: int,
                   batch_sharding: NamedSharding) -> list[Prediction]:
    names = meta["class_names"]
    out: list[Prediction] = []
    for start in range(0, len(items), batch_size):
        x = np.stack([prepare_image(it, meta) for it in items[start:start + batch_size]])
        n, pad = len(x), -len(x) % multiple
        batch = {"images": jax.device_put(np.pad(x, ((0, pad),) + ((0, 0),) * 3), batch_sharding)}
        p = np.asarray(jax.device_get(probs_fn(params, model_state, batch)))[:n]
        for row in p:
            k = int(row.argmax())
            out.append((names[k] if k < len(names) else str(k), float(row[k])))
    return out
