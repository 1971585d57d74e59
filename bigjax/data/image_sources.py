"""Image sources that decode lazily, so decoding runs in the grain workers: an image folder
(`root/<class>/*.png|jpg|jpeg`, classes in sorted order) and prepared tensorflow-datasets image
splits (`tfds:cifar10`, `tfds:mnist`, ...). `ImageExamples` turns either into normalised float32
examples, augmented per (example, epoch) when the loader asks for `example_at_epoch`.

A folder is checked when the run starts, without decoding every pixel: each file's header is
opened and verified with PIL; one that fails is skipped and counted, or with
`data.on_bad_rows: error` is a one-line error naming it.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from bigjax.data.augment import Augment
from bigjax.errors import DataError, first_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def decode(path: str, mode: str, size: int) -> np.ndarray:
    """H x W x C uint8 of an image file in PIL `mode` ("L" or "RGB"), resized to size x size."""
    from PIL import Image
    with Image.open(path) as img:
        img = img.convert(mode)
        if size:
            img = img.resize((size, size), Image.BILINEAR)
        arr = np.asarray(img, np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def resize_array(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    squeeze = image.shape[-1] == 1
    img = Image.fromarray(image[..., 0] if squeeze else image)
    arr = np.asarray(img.resize((size, size), Image.BILINEAR), np.uint8)
    return arr[..., None] if squeeze else arr


@dataclass
class FolderImages:
    """Files and labels of a class-per-subfolder tree (a grain source of raw uint8 images)."""

    root: str
    files: list[str]
    labels: np.ndarray
    class_names: list[str]
    mode: str  # "L" (1 channel) when every image is greyscale, else "RGB"
    size: int  # resize target (0 = the images' own, all equal)
    shape: tuple[int, int, int]
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.files)

    def raw(self, i: int) -> tuple[np.ndarray, int]:
        return decode(self.files[i], self.mode, self.size), int(self.labels[i])


def is_folder(source: str) -> bool:
    """Whether `source` names an image folder (a local or mounted directory)."""
    return os.path.isdir(source)


def scan_folder(root: str, *, size: int, on_bad_rows: str,
                class_names: Sequence[str] | None = None) -> FolderImages:
    """`class_names`: the training folder's classes, for a validation folder (same names)."""
    from PIL import Image
    if not os.path.isdir(root):
        raise DataError(f"data.source: '{root}' is not a directory (an image folder is "
                        f"ROOT/<class>/*{'|'.join(IMAGE_EXTENSIONS)}), nor tfds:NAME or sklearn:digits")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not found:
        raise DataError(f"image folder '{root}' has no class subfolders (expected "
                        f"{root}/<class>/*.png|jpg)")
    names = list(class_names) if class_names is not None else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(f"image folder '{root}': class folders {', '.join(unknown)} are not "
                        f"classes of the training folder ({', '.join(names)})")
    files, labels, modes, sizes, skipped = [], [], set(), {}, Counter()
    for label, name in enumerate(names):
        d = os.path.join(root, name)
        if not os.path.isdir(d):
            continue
        kept = 0
        for f in sorted(os.listdir(d)):
            path = os.path.join(d, f)
            if not f.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(path):
                continue
            try:
                with Image.open(path) as img:
                    mode, wh = img.mode, img.size
                    img.verify()  # checks the file's structure without decoding the pixels
            except Exception as e:
                if on_bad_rows == "error":
                    raise DataError(f"image folder: cannot decode {path}: {first_line(e, 100)} "
                                    "(remove it, or set data.on_bad_rows=skip to skip and count)")
                skipped["undecodable images"] += 1
                continue
            modes.add("L" if mode in ("L", "1", "I;16") else "RGB")
            sizes.setdefault(wh, path)
            files.append(path)
            labels.append(label)
            kept += 1
        if class_names is None and kept == 0:
            raise DataError(f"image folder: class folder '{d}' holds no readable "
                            f"{'/'.join(IMAGE_EXTENSIONS)} image; add images or remove it")
    if not files:
        raise DataError(f"image folder '{root}' holds no readable image")
    if len(sizes) > 1 and not size:
        (a, pa), (b, pb) = list(sizes.items())[:2]
        raise DataError(f"image folder '{root}': images of different sizes ({a[0]}x{a[1]} "
                        f"{pa}, {b[0]}x{b[1]} {pb}); set data.image_size to resize them")
    mode = "L" if modes == {"L"} else "RGB"
    w, h = (size, size) if size else next(iter(sizes))
    return FolderImages(root, files, np.asarray(labels, np.int32), names, mode, size,
                        (h, w, 1 if mode == "L" else 3), skipped)


@dataclass
class TfdsImages:
    """A prepared tfds image split (features `image`, `label`) as raw uint8 images."""

    records: Any  # bigjax.data.tfds_source.TfdsRecords
    size: int
    shape: tuple[int, int, int]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.records)

    def raw(self, i: int) -> tuple[np.ndarray, int]:
        row = self.records.source[i]
        image = np.asarray(row["image"], np.uint8)
        image = image[..., None] if image.ndim == 2 else image
        if self.size:
            image = resize_array(image, self.size)
        elif image.shape != self.shape:
            raise DataError(f"tfds:{self.records.name} row {i + 1}: image {image.shape} but the "
                            f"first is {self.shape}; set data.image_size to resize")
        return image, int(row["label"])


def tfds_images(spec: str, split: str, data_dir: str, size: int) -> TfdsImages:
    from bigjax.data.tfds_source import tfds_records
    records = tfds_records(spec, split, data_dir, fields=("image", "label"))
    first = np.asarray(records.source[0]["image"])
    first = first[..., None] if first.ndim == 2 else first
    shape = (size, size, first.shape[-1]) if size else tuple(first.shape)
    try:
        import tensorflow_datasets as tfds
        names = list(tfds.builder(records.name, data_dir=data_dir or None)
                     .info.features["label"].names)
    except Exception:  # a label feature without names: classes are their ids
        names = []
    return TfdsImages(records, size, shape, names)


class ImageExamples:
    """Raw images -> {images: H x W x C float32 normalised, labels, weights}; a grain source.

    `[i]` is the plain example (evaluation); `example_at_epoch(i, epoch)` is augmented for that
    epoch (the training loader calls it when the source has it)."""

    def __init__(self, source: Any, indices: np.ndarray, mean: np.ndarray, std: np.ndarray,
                 augment: Augment | None = None):
        self.source, self.indices = source, np.asarray(indices)
        self.mean = np.asarray(mean, np.float32)
        self.scale = 1.0 / np.maximum(np.asarray(std, np.float32), 1e-6)
        self.augment = augment if augment is not None and augment.active else None

    def __len__(self) -> int:
        return len(self.indices)

    def _example(self, i: int, epoch: int | None) -> dict[str, np.ndarray]:
        image, label = self.source.raw(int(self.indices[int(i)]))
        if epoch is not None and self.augment is not None:
            image = self.augment(image, int(i), epoch)
        x = (image.astype(np.float32) / 255.0 - self.mean) * self.scale
        return {"images": x, "labels": np.int32(label), "weights": np.float32(1.0)}

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self._example(i, None)

    def example_at_epoch(self, i: int, epoch: int) -> dict[str, np.ndarray]:
        return self._example(i, epoch)
