"""Image data for `task.name: image_classification` -> H x W x C float32 examples, scaled to
[0, 1] and normalised per channel (`data.pixel_mean/std`, or the training split's statistics):

- `sklearn:digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download);
- `tfds:NAME`: a prepared tensorflow-datasets image split (features image, label);
- a directory: an image folder ROOT/<class>/*.png|jpg (image_sources.py).

Without `data.eval_split` the validation split is a seeded random `data.val_fraction` of the
training images (not stratified). Folders and tfds decode in the loader (grain workers), with the
training augmentation of augment.py. The run dir keeps `image_data.json` (class names, size,
normalisation) so `predict` prepares new images as training did.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from bigjax.config import Config
from bigjax.data.augment import Augment
from bigjax.data.image_sources import ImageExamples, is_folder, scan_folder, tfds_images
from bigjax.data.types import ArrayExamples, Data
from bigjax.errors import DataError
from bigjax.paths import run_path, write_text
from bigjax.registry import register_data

log = logging.getLogger("bigjax")

SOURCES = ("sklearn:digits",)
META_FILE = "image_data.json"
STATS_SAMPLE = 2048  # training images that estimate the pixel mean and std (seeded sample)


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


def _check_sizes(cfg: Config, source: str, sizes: dict[str, int]) -> None:
    for key in ("image_height", "image_width", "image_channels"):  # a model written for others
        written = getattr(cfg.model, key, 0)
        if written and written != sizes[key]:
            raise DataError(f"model.{key}={written} but {source} has {sizes[key]}; set it to "
                            f"{sizes[key]} or 0 (from the data)")
    written = getattr(cfg.task, "num_labels", 0)
    if 0 < written < sizes["num_labels"]:
        raise DataError(f"task.num_labels={written} but {source} has {sizes['num_labels']} "
                        "classes; set it or 0 (from the data)")


def _digits(cfg: Config) -> Data:
    d = cfg.data
    if d.eval_split:
        raise DataError(f"data.eval_split='{d.eval_split}': {d.source} has one split; hold out "
                        "data.val_fraction of it instead")
    if d.crop_padding or d.flip or d.image_size:
        raise DataError("data.crop_padding/flip/image_size apply to image folders and tfds images, "
                        f"not {d.source} (8x8 digits); set them to 0/false")
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
    _check_sizes(cfg, d.source, sizes)

    def examples(idx: np.ndarray) -> ArrayExamples:
        return ArrayExamples({"images": norm[idx], "labels": labels[idx],
                              "weights": np.ones(len(idx), np.float32)})

    info = {"train_images": len(train_idx), "eval_images": len(val_idx), "image_shape": [H, W, C],
            "pixel_mean": mean.tolist(), "pixel_std": std.tolist(),
            "train_label_counts": np.bincount(labels[train_idx], minlength=sizes["num_labels"]).tolist()}
    return Data(train=examples(train_idx), eval=examples(val_idx), tokenizer=None, info=info,
                sizes=sizes)


def _pixel_stats(cfg: Config, source, train_idx: np.ndarray, channels: int):
    d = cfg.data
    if d.pixel_mean:
        if len(d.pixel_mean) != channels:
            raise DataError(f"data.pixel_mean has {len(d.pixel_mean)} values but the images have "
                            f"{channels} channels")
        return np.asarray(d.pixel_mean, np.float32), np.asarray(d.pixel_std, np.float32)
    rng = np.random.default_rng([cfg.seed, 13])
    sample = train_idx if len(train_idx) <= STATS_SAMPLE else rng.choice(train_idx, STATS_SAMPLE,
                                                                          replace=False)
    x = np.stack([source.raw(int(i))[0] for i in sample]).astype(np.float32) / 255.0
    return x.mean((0, 1, 2)), x.std((0, 1, 2))


def _decoded(cfg: Config) -> Data:
    """tfds image splits and image folders: decoded lazily, in the loader."""
    d = cfg.data
    if d.source.startswith("tfds:"):
        train_src = tfds_images(d.source, d.split, d.dir, d.image_size)
        eval_src = tfds_images(d.source, d.eval_split, d.dir, d.image_size) if d.eval_split else None
        labels = None
    else:
        train_src = scan_folder(d.source, size=d.image_size, on_bad_rows=d.on_bad_rows)
        eval_src = scan_folder(d.eval_split, size=d.image_size, on_bad_rows=d.on_bad_rows,
                               class_names=train_src.class_names) if d.eval_split else None
        labels = train_src.labels
        if eval_src is not None and eval_src.shape != train_src.shape:
            raise DataError(f"data.eval_split '{d.eval_split}' holds {eval_src.shape} images but "
                            f"the training folder {train_src.shape}; set data.image_size")
    n = len(train_src)
    if eval_src is None:
        train_idx, val_idx = split(n, d.val_fraction, cfg.seed)
        if len(val_idx) == 0:
            raise DataError(f"data.val_fraction={d.val_fraction} holds out no image of {n}; set "
                            "it or data.eval_split")
    else:
        train_idx, val_idx = np.arange(n), np.arange(len(eval_src))
    H, W, C = train_src.shape
    mean, std = _pixel_stats(cfg, train_src, train_idx, C)
    names = list(train_src.class_names)
    num_labels = len(names) if names else int(getattr(cfg.task, "num_labels", 0))
    if num_labels < 2:  # tfds labels without names and no task.num_labels
        raise DataError(f"{d.source}: the label feature names no classes; set task.num_labels")
    sizes = {"num_labels": num_labels, "image_height": H, "image_width": W, "image_channels": C}
    _check_sizes(cfg, d.source, sizes)
    augment = Augment(d.crop_padding, d.flip, cfg.seed)
    train = ImageExamples(train_src, train_idx, mean, std, augment)
    val = ImageExamples(eval_src if eval_src is not None else train_src, val_idx, mean, std)
    skipped = sum(sum(getattr(src, "skipped", {}).values()) for src in (train_src, eval_src)
                  if src is not None)
    info = {"train_images": len(train_idx), "eval_images": len(val_idx), "image_shape": [H, W, C],
            "pixel_mean": mean.tolist(), "pixel_std": std.tolist(), "images_skipped": skipped,
            "class_names": names, "augment": {"crop_padding": d.crop_padding, "flip": d.flip}}
    if labels is not None:
        info["train_label_counts"] = np.bincount(labels[train_idx], minlength=num_labels).tolist()
    if skipped:
        log.warning(f"image data: {skipped} undecodable images skipped (data.on_bad_rows=skip)")
    return Data(train=train, eval=val, tokenizer=None, info=info, sizes=sizes)


def save_meta(run_dir: str, data: Data, cfg: Config) -> None:
    """What predict needs to prepare a new image as training did (written by process 0)."""
    import jax
    if not run_dir or jax.process_index() != 0:
        return
    i = data.info
    meta = {"class_names": i.get("class_names") or [str(k) for k in range(data.sizes["num_labels"])],
            "image_shape": i["image_shape"], "image_size": cfg.data.image_size,
            "pixel_mean": i["pixel_mean"], "pixel_std": i["pixel_std"],
            "scale": 16.0 if cfg.data.source == "sklearn:digits" else 255.0}
    run = run_path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    write_text(run / META_FILE, json.dumps(meta, indent=1))


def load_meta(run_dir: str) -> dict | None:
    path = run_path(run_dir) / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def build_image_data(cfg: Config, run_dir: str) -> Data:
    d = cfg.data
    if d.source == "sklearn:digits":
        data = _digits(cfg)
    elif d.source.startswith("tfds:") or is_folder(d.source):
        data = _decoded(cfg)
    else:
        raise DataError(f"data.source '{d.source}': the images builder reads sklearn:digits, "
                        "tfds:NAME (a prepared image dataset) or an image folder ROOT/<class>/*.png")
    H, W, C = data.info["image_shape"]
    n_train, n_val, K = data.info["train_images"], data.info["eval_images"], data.sizes["num_labels"]
    log.info(f"image data {d.source}: {n_train} training and {n_val} validation images of "
             f"{H}x{W}x{C}, {K} classes")
    data.summary = f"{n_train} training images {H}x{W}x{C}, {K} classes ({d.source})"
    save_meta(run_dir, data, cfg)
    return data


register_data("images", build_image_data)
