"""A trivially separable sentiment CSV for tests that train a classifier end to end."""

from __future__ import annotations

import csv

import numpy as np

POS, NEG, FILL = ["good", "great", "love", "nice"], ["bad", "awful", "hate", "poor"], ["the", "a", "it", "movie"]


def write_separable_csv(path: str, n: int, seed: int = 0) -> None:
    """Texts of three sentiment words (all from one class) and three filler words."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["review", "sentiment"])
        for i in range(n):
            label = ["neg", "pos"][i % 2]
            words = list(rng.choice(POS if label == "pos" else NEG, 3)) + list(rng.choice(FILL, 3))
            rng.shuffle(words)
            w.writerow([" ".join(words) + f" {i}", label])
