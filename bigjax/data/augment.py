"""Training-time image augmentation: random crop with zero padding and horizontal flip, seeded by
(seed, example index, epoch), so an example's augmentation is the same in every run, on every
process and in any worker, and changes from epoch to epoch. It runs where the example is read:
in the grain workers when `data.workers > 0` (TrainLoader passes the epoch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def flip(image_HWC: np.ndarray) -> np.ndarray:
    """Mirror left-right."""
    return image_HWC[:, ::-1]


def crop(image_HWC: np.ndarray, pad: int, dy: int, dx: int) -> np.ndarray:
    """The H x W window at (dy, dx) of the image zero-padded by `pad` on every side
    (0 <= dy, dx <= 2 pad; dy = dx = pad is the image itself)."""
    H, W = image_HWC.shape[:2]
    padded = np.pad(image_HWC, ((pad, pad), (pad, pad), (0, 0)))
    return padded[dy:dy + H, dx:dx + W]


@dataclass(frozen=True)
class Augment:
    """`crop_padding` pixels of random-crop padding (0 = no crop), `flip` a coin-flip mirror."""

    crop_padding: int = 0
    flip: bool = False
    seed: int = 0

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def __call__(self, image_HWC: np.ndarray, index: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0xA06, int(index), int(epoch)])
        p = self.crop_padding
        if p:
            dy, dx = rng.integers(0, 2 * p + 1, size=2)
            image_HWC = crop(image_HWC, p, int(dy), int(dx))
        if self.flip and rng.random() < 0.5:
            image_HWC = flip(image_HWC)
        return np.ascontiguousarray(image_HWC)
