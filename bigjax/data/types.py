"""What every data builder returns, and the random-access example source most of them use."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

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


class LazyExamples:
    """Examples made on first use (`make()`), with their count known before: `eval`, `predict`
    and `compress` of a classification run never tokenize its training split (~2 s of 30k tweets
    per command). Made once under a lock: the loader's threads ask for examples all at once."""

    def __init__(self, make: Callable[[], Sequence[Example]], n: int):
        self._make, self._n, self._examples = make, n, None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._n

    def _made(self) -> Sequence[Example]:
        with self._lock:
            if self._examples is None:
                self._examples, self._make = self._make(), None
        return self._examples

    def __getitem__(self, i: int) -> Example:
        return (self._examples or self._made())[i]

    def __getstate__(self) -> dict:  # to grain's worker processes: the examples, not the maker
        return {"n": self._n, "examples": self._made()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(None, state["n"])
        self._examples = state["examples"]
