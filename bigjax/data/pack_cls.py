"""Packed classification rows: several short texts share one training row, so a step computes on
texts instead of padding (`data.examples_per_row` > 1).

A row of `train.seq_len` tokens holds up to K = `data.examples_per_row` texts, each `[CLS] text
[SEP]` as the tokenizer made it (truncated to `data.max_example_len`), one after the other:

    input_ids, attention_mask, token_type_ids  L   the texts' tokens, then padding
    segment_ids                                L   k + 1 for the k-th text, 0 for padding
    position_ids                               L   0, 1, ... restarting at each text
    example_starts                             K   where each text's [CLS] is (0: empty slot)
    labels, weights                            K   one per text; weight 0 for an empty slot

The encoder attends within a segment only and pools each text on its own (bigjax/models/bert.py),
so a text's logits are those it gets alone in a padded row. Which texts share a row: the epoch's
shuffled order (one seeded permutation per epoch, the same on every process, which then takes
its own share as the unpacked loader does) goes through first fit with a window of open rows:
each text takes the first open row with room for its tokens and a free slot, else opens a new
row; a full row closes at once, and opening one more than `WINDOW` closes the oldest. It depends
on the texts' lengths only, so row i of the stream is a pure function of (seed, epoch, process):
the loader's position stays "batches taken" and resume is exact whatever the worker count.
"""

from __future__ import annotations

import bisect
import sys
import threading
from typing import Sequence

import grain
import numpy as np

from bigjax.data.types import ArrayExamples, Example

WINDOW = 64  # open rows first fit chooses from: 98% of the tokens real at 8 x 128 tweets
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def first_fit(lengths: Sequence[int], row_len: int, per_row: int,
              window: int = WINDOW) -> list[list[int]]:
    """Rows of indices into `lengths` (each at most `row_len` tokens, `per_row` texts), every
    index once, in the order the rows close."""
    shortest = int(min(lengths)) if len(lengths) else 1
    done: list[list[int]] = []
    rows: list[list[int]] = []  # open rows, oldest first
    room: list[int] = []  # tokens left in each open row
    for i, n in enumerate(lengths):
        n = int(n)
        j = next((j for j, r in enumerate(room) if n <= r), -1)
        if j < 0:
            if len(rows) == window:
                done.append(rows.pop(0))
                room.pop(0)
            rows.append([])
            room.append(row_len)
            j = len(rows) - 1
        rows[j].append(i)
        room[j] -= n
        if len(rows[j]) == per_row or room[j] < shortest:  # nothing more fits
            done.append(rows.pop(j))
            room.pop(j)
    return done + rows


class PackedExamples:
    """The training texts (padded to `data.max_example_len`) and how they are packed; the loader
    reads them as rows through `packed_rows`. `len` and `[i]` are the single texts, unpacked."""

    def __init__(self, texts: ArrayExamples, row_len: int, per_row: int, pad_id: int):
        self.texts, self.row_len, self.per_row, self.pad_id = texts, row_len, per_row, pad_id
        self.lengths = texts.arrays["attention_mask"].sum(1).astype(np.int64)
        # what a saved loader position is only valid for, besides the loader's own
        self.identity = {"packed_row_len": row_len, "examples_per_row": per_row}

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> Example:
        return self.texts[i]

    def packed_rows(self, *, seed: int, shuffle: bool, process_index: int,
                    process_count: int) -> grain.MapDataset:
        """The endless stream of this process's rows, epoch after epoch (index = row number)."""
        reader = _RowReader(self, seed, shuffle, process_index, process_count)
        return grain.MapDataset.range(sys.maxsize).map(reader)

    def row(self, members: Sequence[int]) -> Example:
        """One packed row of these texts (indices), in this order."""
        L, K, a = self.row_len, self.per_row, self.texts.arrays
        out = {"input_ids": np.full(L, self.pad_id, np.int32),
               "attention_mask": np.zeros(L, np.int32), "token_type_ids": np.zeros(L, np.int32),
               "segment_ids": np.zeros(L, np.int32), "position_ids": np.zeros(L, np.int32),
               "example_starts": np.zeros(K, np.int32), "labels": np.zeros(K, np.int32),
               "weights": np.zeros(K, np.float32)}
        at = 0
        for k, j in enumerate(members):
            n = int(self.lengths[j])
            for key in TOKEN_KEYS:
                out[key][at:at + n] = a[key][j, :n]
            out["segment_ids"][at:at + n] = k + 1
            out["position_ids"][at:at + n] = np.arange(n)
            out["example_starts"][k] = at
            out["labels"][k], out["weights"][k] = a["labels"][j], a["weights"][j]
            at += n
        return out

    def fill(self, seed: int) -> tuple[float, float]:
        """(texts per row, share of row tokens that are text) of epoch 0 on one process: what
        `train.batch_size` rows of `train.seq_len` hold on average."""
        rows = _RowReader(self, seed, True, 0, 1).epoch(0)
        return len(self) / len(rows), float(self.lengths.sum()) / (len(rows) * self.row_len)


class _RowReader:
    """Row number -> packed row of one process's stream; each epoch's packing is computed when
    first needed and the last two are kept (grain reads rows from several threads, and a worker
    process gets a copy without them)."""

    def __init__(self, source: PackedExamples, seed: int, shuffle: bool, process_index: int,
                 process_count: int):
        self.source, self.seed, self.shuffle = source, seed, shuffle
        self.index, self.count = process_index, process_count
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._first_row = [0]  # epoch e holds rows first_row[e] .. first_row[e + 1] - 1
        self._epochs: dict[int, list[np.ndarray]] = {}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k in
                ("source", "seed", "shuffle", "index", "count")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def epoch(self, e: int) -> list[np.ndarray]:
        """Epoch e's rows as arrays of text indices: the same permutation on every process, cut
        to a multiple of the process count, this process's every count-th text, first fit."""
        n = len(self.source)
        order = (np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle
                 else np.arange(n))
        mine = order[:n - n % self.count][self.index::self.count]
        rows = first_fit(self.source.lengths[mine], self.source.row_len, self.source.per_row)
        return [mine[r] for r in rows]

    def _rows_of(self, e: int) -> list[np.ndarray]:
        if e not in self._epochs:
            self._epochs[e] = self.epoch(e)
            for old in [k for k in self._epochs if k < e - 1]:
                del self._epochs[old]
        return self._epochs[e]

    def __call__(self, i: int) -> Example:
        i = int(i)
        with self._lock:
            while self._first_row[-1] <= i:  # count the rows of epochs up to the one holding i
                e = len(self._first_row) - 1
                self._first_row.append(self._first_row[-1] + len(self._rows_of(e)))
            e = bisect.bisect_right(self._first_row, i) - 1
            members = self._rows_of(e)[i - self._first_row[e]]
        return self.source.row(members)
