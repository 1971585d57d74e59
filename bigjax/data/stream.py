"""Streaming LM windows: each process reads only its shards, tokenizes and packs as it goes.

A pipeline of grain IterDatasets, one per process (and per `data.workers` worker, which take
every W-th shard of their process):

    Documents (shard order shuffled per epoch, tokenized in chunks) -> PackWindows
        -> ShuffleBlocks -> batch

`PackWindows` cuts the concatenated token stream into `seq_len + 1` windows that overlap by one
token, exactly as the in-memory `PackedWindows` does, so the examples (segment ids, positions,
weights) are the same. Every stage's state is a few integers plus the state of the stage before it,
re-read from a known point on restore (at most one shard's rows or one block of windows), so the
JSON state stays small and resume is exact.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from bigjax.data.prepared import token_records
from bigjax.data.sources import RecordReader
from bigjax.errors import DataError

Example = dict[str, np.ndarray]


@dataclass(frozen=True)
class Shard:
    """A unit of reading: a whole file (`stop = -1`), or records [start, stop) of a tfds split."""
    name: str
    start: int = 0
    stop: int = -1


@dataclass(frozen=True)
class Reading:
    """How rows of a shard become texts (picklable: it travels to the worker processes)."""
    text_field: str = "text"
    on_bad_rows: str = "skip"
    tfds: tuple[str, str, str] | None = None  # (tfds:NAME, split, data dir) for record shards
    prepared: bool = False  # shards of `bigjax data prepare`: documents already token ids

    def texts(self, shard: Shard, skip: int = 0) -> Iterator[str | np.ndarray | None]:
        """The shard's documents from the `skip`-th on. A file's rows are skipped by reading
        them (its bad rows are never counted); a record shard (tfds, prepared) seeks, and yields
        None for a bad record it skips under data.on_bad_rows=skip, so positions stay indices."""
        if self.prepared:
            yield from token_records(shard.name, skip)
            return
        reader = RecordReader(self.on_bad_rows, (self.text_field,))
        if self.tfds is None:
            rows = reader.read(shard.name)
            for _ in range(skip):
                next(rows)
            for row in rows:
                yield str(row[self.text_field])
            return
        records = _open_tfds(self.tfds, self.text_field)
        for i in range(shard.start + skip, shard.stop):
            try:
                yield str(records[i][self.text_field])
            except DataError:  # not valid UTF-8
                reader._bad(f"{self.tfds[0]} split '{self.tfds[1]}'", i + 1, "not valid UTF-8")
                yield None


_OPEN: dict = {}  # tfds splits opened in this process (opening one builds its builder)


def _open_tfds(spec: tuple[str, str, str], field: str):
    from bigjax.data.tfds_source import tfds_records
    if (spec, field) not in _OPEN:
        _OPEN[spec, field] = tfds_records(*spec, fields=(field,))
    return _OPEN[spec, field]


def window_example(tokens: np.ndarray, docs: np.ndarray, source: int | None = None) -> Example:
    """A training example from `seq_len + 1` tokens and their document numbers (nondecreasing):
    inputs/targets shifted by one, segment ids per document, positions restarting at each
    document start, and weight 0 on a target from the next document. A mixture's windows also
    carry `source_id` (the loader counts and removes it before the step sees the batch)."""
    seg = docs[:-1] - docs[0]
    n = len(seg)
    idx = np.arange(n, dtype=np.int32)
    # a document continued from the previous window starts at position 0 too (this is
    # `np.diff(seg, prepend=-1) != 0` without diff's concatenate: it runs once per window)
    first = np.empty(n, bool)
    first[0] = True
    np.not_equal(seg[1:], seg[:-1], out=first[1:])
    starts = np.maximum.accumulate(np.where(first, idx, 0))
    out = {"inputs": tokens[:-1], "targets": tokens[1:],
           "weights": (docs[1:] == docs[:-1]).astype(np.float32),
           "segment_ids": seg.astype(np.int32), "positions": idx - starts}
    if source is not None:
        out["source_id"] = np.int32(source)
    return out


def epoch_order(n: int, seed: int, salt: Sequence[int], epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, *salt, epoch]).permutation(n)


# documents read and tokenized together: one batched tokenizer call gets ~1.3x the tokens per CPU
# second of one call per document (and lets a fast tokenizer use its threads); a restore re-reads
# at most this many documents
TOKENIZE_CHUNK = 64


class Documents(grain.IterDataset):
    """Documents of `shards` (token ids when `tokenize` is given, else texts), shard after shard,
    epoch after epoch (`epochs=None`: endless); the shard order is a fresh seeded permutation each
    epoch. grain's worker slicing takes every W-th shard."""

    def __init__(self, shards: Sequence[Shard], reading: Reading, *, seed: int, shuffle: bool,
                 salt: Sequence[int] = (), epochs: int | None = None,
                 tokenize: "Tokenize | None" = None):
        super().__init__()
        self.shards, self.reading, self.seed, self.shuffle = list(shards), reading, seed, shuffle
        self.salt, self.epochs, self.tokenize = tuple(salt), epochs, tokenize

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        # called by grain in each worker process: a worker reads its own shards only
        self.shards = self.shards[sl]
        self.salt = self.salt + (sl.start or 0,)

    def __iter__(self) -> "DocumentsIterator":
        return DocumentsIterator(self)


class DocumentsIterator(grain.DatasetIterator):
    def __init__(self, ds: Documents):
        super().__init__()
        self.ds = ds
        self._set(0, 0, 0)

    def _set(self, epoch: int, shard: int, row: int) -> None:
        self.epoch, self.shard, self.row = epoch, shard, row
        self._order = epoch_order(len(self.ds.shards), self.ds.seed, self.ds.salt, epoch,
                                  self.ds.shuffle)
        self._texts: Iterator[str] | None = None
        # documents of the current shard read (and tokenized) but not yet returned; `row` counts
        # the returned ones only, so the state never includes what is read ahead here
        self._ready: list = []

    def _read_chunk(self) -> None:
        ds = self.ds
        if self._texts is None:  # restored mid-shard: from the row after the last one returned
            self._texts = ds.reading.texts(ds.shards[self._order[self.shard]], self.row)
        chunk = list(itertools.islice(self._texts, TOKENIZE_CHUNK if ds.tokenize else 1))
        self._ready = ds.tokenize.many(chunk) if ds.tokenize else chunk
        self._ready.reverse()  # popped from the end

    def __next__(self) -> str | np.ndarray:
        ds = self.ds
        if not ds.shards:
            raise StopIteration
        while True:
            if ds.epochs is not None and self.epoch >= ds.epochs:
                raise StopIteration
            if not self._ready:
                self._read_chunk()
            if self._ready:
                doc = self._ready.pop()
                self.row += 1
                if doc is None:  # a bad record, skipped and counted by the policy
                    continue
                return doc
            if self.shard + 1 < len(ds.shards):  # the shard is read to its end
                self.shard, self.row, self._texts = self.shard + 1, 0, None
            else:
                self._set(self.epoch + 1, 0, 0)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "row": self.row}

    def set_state(self, state: dict) -> None:
        self._set(state["epoch"], state["shard"], state["row"])


class Tokenize:
    """text -> int32 token ids, with the end-of-document token appended (when there is one)."""

    def __init__(self, tokenizer: Any, eos_id: int | None):
        self.tokenizer, self.eos_id = tokenizer, eos_id

    def many(self, texts: Sequence[str | np.ndarray | None]) -> list[np.ndarray | None]:
        """Each document's ids (None stays None: a skipped bad record); the texts go to the
        tokenizer in one batched call, which gives the same ids as one call each."""
        strs = [t for t in texts if isinstance(t, str)]
        encoded = iter(self.tokenizer(strs, add_special_tokens=False)["input_ids"] if strs else [])
        eos = [] if self.eos_id is None else [self.eos_id]
        out: list[np.ndarray | None] = []
        for text in texts:
            if text is None:
                out.append(None)
            elif isinstance(text, np.ndarray):  # a prepared document: token ids already
                out.append(np.append(text, eos).astype(np.int32) if eos else text)
            else:
                ids = next(encoded)
                out.append(np.asarray(ids + eos if isinstance(ids, list) else [*ids, *eos],
                                      np.int32))
        return out


class PackWindows(grain.IterDataset):
    """Documents' tokens -> (tokens, doc numbers) of `seq_len + 1`, consecutive windows sharing
    one token. At the end of a finite parent the tail shorter than a window is dropped."""

    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self.seq_len = seq_len

    def __iter__(self) -> "PackIterator":
        return PackIterator(self._parent.__iter__(), self.seq_len)


class PackIterator(grain.DatasetIterator):
    """State: the parent's state before the document holding the next window's first token, and
    that token's offset in it (re-read on restore: one document)."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self.seq_len = seq_len
        self._doc: np.ndarray | None = None
        self._doc_state: Any = None
        self._off = 0

    def _next_doc(self) -> None:
        self._doc_state = self._parent.get_state()
        self._doc = next(self._parent)

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        need = self.seq_len + 1
        if self._doc is None:
            self._next_doc()
            self._off = 0
        tokens, lens, n, k = [], [], 0, 0
        doc, off, doc_state = self._doc, self._off, self._doc_state
        while True:
            take = min(len(doc) - off, need - n)
            tokens.append(doc[off:off + take])
            lens.append(take)
            n += take
            if n == need:
                break
            k += 1
            doc_state = self._parent.get_state()
            doc, off = next(self._parent), 0  # StopIteration: the tail is dropped
        # the next window starts at this window's last token
        self._doc, self._off, self._doc_state = doc, off + take - 1, doc_state
        return np.concatenate(tokens), np.repeat(np.arange(len(lens), dtype=np.int32), lens)

    def get_state(self) -> dict:
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": -1}
        return {"parent": self._doc_state, "offset": int(self._off)}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._doc = None
        if state["offset"] >= 0:
            self._next_doc()
            self._off = state["offset"]


class ShuffleBlocks(grain.IterDataset):
    """Reads `block` windows, emits them in a seeded random order (a new one per block), and
    turns them into examples. `block=1`: no shuffling."""

    def __init__(self, parent: grain.IterDataset, block: int, seed: int, salt: Sequence[int] = ()):
        super().__init__(parent)
        self.block, self.seed, self.salt = block, seed, tuple(salt)

    def __iter__(self) -> "ShuffleIterator":
        return ShuffleIterator(self._parent.__iter__(), self.block, self.seed, self.salt)


class ShuffleIterator(grain.DatasetIterator):
    """State: the parent's state at the start of the current block, the block's number and how
    many of its windows were emitted (restore re-reads one block)."""

    def __init__(self, parent: grain.DatasetIterator, block: int, seed: int, salt: tuple):
        super().__init__(parent)
        self.block, self.seed, self.salt = block, seed, salt
        self._windows: list = []
        self._index, self._number, self._start = 0, 0, None

    def _fill(self) -> None:
        self._start = self._parent.get_state()
        self._windows = []
        for _ in range(self.block):
            try:
                self._windows.append(next(self._parent))
            except StopIteration:
                break
        if not self._windows:
            raise StopIteration
        self._order = (np.arange(len(self._windows)) if self.block == 1 else
                       np.random.default_rng([self.seed, *self.salt, self._number])
                       .permutation(len(self._windows)))
        self._index = 0

    def __next__(self) -> Example:
        if self._index >= len(self._windows):
            if self._start is not None:
                self._number += 1
            self._fill()
        window = self._windows[self._order[self._index]]
        self._index += 1
        return window_example(*window)

    def get_state(self) -> dict:
        if self._start is None or self._index >= len(self._windows):
            started = self._start is not None
            return {"parent": self._parent.get_state(), "block": self._number + started,
                    "index": 0}
        return {"parent": self._start, "block": self._number, "index": self._index}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._number, self._start, self._windows = state["block"], None, []
        self._fill()
        self._index = state["index"]


class Tag:
    """Adds a mixture's source number to each window."""

    def __init__(self, source: int):
        self.source = source

    def __call__(self, window: tuple) -> tuple:
        return (*window, self.source)


def windows(shards: Sequence[Shard], reading: Reading, tokenize: "Tokenize", *, seq_len: int,
            seed: int, shuffle: bool, salt: Sequence[int] = (),
            epochs: int | None = None) -> grain.IterDataset:
    """One process's packed windows of one corpus, from its own shards."""
    docs = Documents(shards, reading, seed=seed, shuffle=shuffle, salt=salt, epochs=epochs,
                     tokenize=tokenize)
    return PackWindows(docs, seq_len)


def local_pipeline(shards: Sequence[Shard], reading: Reading, tokenize: "Tokenize", *,
                   seq_len: int, seed: int, shuffle: bool, shuffle_windows: int,
                   salt: Sequence[int] = (), epochs: int | None = None) -> grain.IterDataset:
    """One process's examples (before batching), from its own shards."""
    packed = windows(shards, reading, tokenize, seq_len=seq_len, seed=seed, shuffle=shuffle,
                     salt=salt, epochs=epochs)
    return ShuffleBlocks(packed, shuffle_windows if shuffle else 1, seed, salt)


def mixed_pipeline(parts: Sequence[grain.IterDataset], weights: Sequence[float], *,
                   tags: Sequence[int], seed: int, shuffle: bool, shuffle_windows: int,
                   salt: Sequence[int] = ()):
    """Windows of several corpora (from `windows`), drawn in the proportions of `weights` (grain's
    deterministic mix, so its state is one counter) and tagged with their source's number."""
    tagged = [part.map(Tag(tag)) for tag, part in zip(tags, parts)]
    mixed = grain.IterDataset.mix(tagged, [float(w) for w in weights])
    return ShuffleBlocks(mixed, shuffle_windows if shuffle else 1, seed, salt)
