"""Image data for `task.name: image_classification`: `data.source: sklearn:digits` (scikit-learn's
bundled 8x8 handwritten digits, 1,797 images, no download) -> H x W x C float32 examples, scaled to
[0, 1] and normalised with the training split's per-channel mean and standard deviation.

The validation split is a seeded random `data.val_fraction` of the images (not stratified).
"""

from __future__ import annotations

import logging

import numpy as np

from bigjax.config import Config
from bigjax.data.types import ArrayExamples, Data
from bigjax.errors import DataError
from bigjax.registry import register_data

log = logging.getLogger("bigjax")

SOURCES = ("sklearn:digits",)


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images N x 8 x 8 x 1 float32 in [0, 1], labels N int32)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: offline
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[..., None]
    return images, digits.target.astype(np.int32)


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): a seeded permutation, the first round(n x fraction)
    held out."""
    order = np.random.default_rng([seed, 12]).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(order[n_val:]), order[:n_val]


def build_image_data(cfg: Config, run_dir: str) -> Data:
    d = cfg.data
    if d.source not in SOURCES:
        raise DataError(f"data.source '{d.source}': the images builder reads {', '.join(SOURCES)}")
    if d.eval_split:
        raise DataError(f"data.eval_split='{d.eval_split}': {d.source} has one split; hold out "
                        "data.val_fraction of it instead")
    images, labels = load_sklearn_digits()
    train_idx, val_idx = split(len(images), d.val_fraction, cfg.seed)
    if len(val_idx) == 0:
        raise DataError(f"data.val_fraction={d.val_fraction} holds out no image of {len(images)}; "
                        "evaluation needs at least one")
    mean = images[train_idx].mean((0, 1, 2))
    std = images[train_idx].std((0, 1, 2))
    norm = ((images - mean) / np.maximum(std, 1e-6)).astype(np.float32)
    H, W, C = images.shape[1:]
    sizes = {"num_labels": int(labels.max()) + 1, "image_height": H, "image_width": W,
             "image_channels": C}
    for key in ("image_height", "image_width", "image_channels"):  # a model written for others
        written = getattr(cfg.model, key, 0)
        if written and written != sizes[key]:
            raise DataError(f"model.{key}={written} but {d.source} has {sizes[key]}; set it to "
                            f"{sizes[key]} or 0 (from the data)")
    written = getattr(cfg.task, "num_labels", 0)
    if 0 < written < sizes["num_labels"]:
        raise DataError(f"task.num_labels={written} but {d.source} has {sizes['num_labels']} "
                        "classes; set it or 0 (from the data)")

    def examples(idx: np.ndarray) -> ArrayExamples:
        return ArrayExamples({"images": norm[idx], "labels": labels[idx],
                              "weights": np.ones(len(idx), np.float32)})

    info = {"train_images": len(train_idx), "eval_images": len(val_idx), "image_shape": [H, W, C],
            "pixel_mean": mean.tolist(), "pixel_std": std.tolist(),
            "train_label_counts": np.bincount(labels[train_idx], minlength=sizes["num_labels"]).tolist()}
    log.info(f"image data {d.source}: {len(train_idx)} training and {len(val_idx)} validation "
             f"images of {H}x{W}x{C}, {sizes['num_labels']} classes")
    return Data(train=examples(train_idx), eval=examples(val_idx), tokenizer=None, info=info,
                sizes=sizes, summary=f"{len(train_idx)} training images {H}x{W}x{C}, "
                                     f"{sizes['num_labels']} classes ({d.source})")


register_data("images", build_image_data)
