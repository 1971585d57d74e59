"""What every data builder returns, and the random-access example source most of them use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

Example = dict[str, np.ndarray]


@dataclass
class Data:
    """Train and eval example sources (grain MapDataset sources: `len` and `[i]`), the tokenizer,
    counts worth logging, and the sizes `resolve` may fill into the config (`vocab`: tokens of
    the tokenizer; `num_labels`: classes in the data)."""

    train: Sequence[Example]
    eval: Sequence[Example]
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    # what a user calls examples (texts, rows), when the loader's units (windows, masked copies)
    # differ from it: for the start-up line
    summary: str = ""


class ArrayExamples:
    """Random-access examples from equal-length arrays (a grain MapDataset source)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Example:
        return {k: v[int(i)] for k, v in self.arrays.items()}
