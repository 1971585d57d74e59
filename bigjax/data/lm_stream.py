"""The streaming LM data path (`data.stream`): which sources take it, how the input is cut into
per-process shards, the tokenizer's bounded sample and the held-out evaluation text.

Nothing here reads more than a bounded amount: the corpus is listed (file sizes, tfds record
counts), the tokenizer trains on at most `data.tokenizer_sample_chars` characters and the held-out
evaluation text is capped at `data.max_chars`; the training text is read by the loader's pipeline.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from bigjax.config import Config
from bigjax.data.prepared import is_prepared, prepared_files
from bigjax.data.sources import files_for
from bigjax.data.stream import Reading, Shard, Tokenize, local_pipeline, mixed_pipeline, windows
from bigjax.errors import ConfigError, DataError
from bigjax.paths import file_size

# `data.stream: auto` streams file globs above this many bytes and tfds splits above this many
# records; below, reading everything up front is faster and the memory it takes is small
AUTO_BYTES = 64 << 20
AUTO_RECORDS = 100_000
TFDS_CHUNKS = 16  # record ranges per process (and worker): the units shuffled each epoch


def _tfds_size(cfg: Config, split: str) -> int:
    from bigjax.data.tfds_source import tfds_records
    return len(tfds_records(cfg.data.source, split, cfg.data.dir, (cfg.data.text_field,)))


def wants_stream(cfg: Config) -> bool:
    """Whether `cfg` takes the streaming path (README: "Which path a source takes")."""
    d = cfg.data
    src = d.source
    if d.sources:  # a mixture always streams (config.py refuses data.stream=false with one)
        return True
    if is_prepared(src):
        if d.stream is False:
            raise ConfigError(f"data.stream=false: {src} is a prepared dir (token ids), which "
                              "is streamed; set data.stream=auto")
        return True
    if d.stream is False:
        return False
    if src.startswith(("builtin:", "sklearn:")) or not d.pack:
        if d.stream is True:
            why = ("data.pack=false pads each document, which needs all of them up front"
                   if not d.pack else f"{src} is an in-memory corpus")
            raise ConfigError(f"data.stream=true: {why}; set data.stream=auto or false")
        return False
    if d.stream is True:
        return True
    if src.startswith("tfds:"):
        return _tfds_size(cfg, d.split) > AUTO_RECORDS
    files = sorted(p for p in glob.glob(src, recursive=True) if os.path.isfile(p))
    return sum(os.path.getsize(p) for p in files) > AUTO_BYTES


@dataclass
class StreamSource:
    """The training side of a streamed corpus (`Data.train` on this path): what the loader needs
    to build each process's pipeline. `files` and `sizes` (bytes) or `records` (a tfds split)."""

    reading: Reading
    tokenize: Tokenize
    seq_len: int
    shuffle_windows: int
    files: list[str]
    sizes: list[int]
    records: int = 0

    @property
    def fingerprint(self) -> str:
        """Names the corpus a loader state belongs to (its files and their sizes, or the split)."""
        parts = ([f"{f}:{s}" for f, s in zip(self.files, self.sizes)] if self.reading.tfds is None
                 else [*self.reading.tfds[:2], str(self.records)])
        return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]

    def process_shards(self, index: int, count: int, workers: int = 0) -> list[Shard]:
        """Process `index`'s share: whole files balanced by bytes (largest first to the least
        loaded process), or a contiguous range of the split's records cut into chunks."""
        if self.reading.tfds is not None:
            lo, hi = index * self.records // count, (index + 1) * self.records // count
            n = min(TFDS_CHUNKS * max(workers, 1), hi - lo)
            edges = [lo + (hi - lo) * i // n for i in range(n + 1)]
            return [Shard("", a, b) for a, b in zip(edges, edges[1:]) if b > a]
        mine = file_shares(self.sizes, count, max(workers, 1))[index]
        return [Shard(self.files[i]) for i in mine]

    def pipeline(self, index: int, count: int, *, seed: int, shuffle: bool, workers: int = 0,
                 epochs: int | None = None):
        """Process `index`'s examples: a grain IterDataset (endless unless `epochs`)."""
        return local_pipeline(self.process_shards(index, count, workers), self.reading,
                              self.tokenize, seq_len=self.seq_len, seed=seed, shuffle=shuffle,
                              shuffle_windows=self.shuffle_windows, salt=(index,), epochs=epochs)

    def check_shares(self, source: str, count: int, workers: int) -> None:
        check_shares(source, self.files, self.records, count, workers)


@dataclass
class MixtureSource:
    """`data.sources`: several streamed corpora drawn by weight (`Data.train` of a mixture)."""

    parts: list[StreamSource]
    weights: list[float]
    names: list[str]

    @property
    def seq_len(self) -> int:
        return self.parts[0].seq_len

    @property
    def shuffle_windows(self) -> int:
        return self.parts[0].shuffle_windows

    @property
    def fingerprint(self) -> str:
        text = "\n".join(f"{p.fingerprint}:{w}" for p, w in zip(self.parts, self.weights))
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def check_shares(self, source: str, count: int, workers: int) -> None:
        for name, part in zip(self.names, self.parts):
            part.check_shares(name, count, workers)

    def pipeline(self, index: int, count: int, *, seed: int, shuffle: bool, workers: int = 0,
                 epochs: int | None = None):
        used = [i for i, w in enumerate(self.weights) if w > 0]  # grain's mix needs weights > 0
        parts = [windows(self.parts[i].process_shards(index, count, workers),
                         self.parts[i].reading, self.parts[i].tokenize, seq_len=self.seq_len,
                         seed=seed, shuffle=shuffle, salt=(index, i), epochs=epochs)
                 for i in used]
        # tagged with their positions in data.sources, also when a weight-0 source is left out
        return mixed_pipeline(parts, [self.weights[i] for i in used], tags=used, seed=seed,
                              shuffle=shuffle, shuffle_windows=self.shuffle_windows,
                              salt=(index,))


def file_shares(sizes: list[int], count: int, need: int = 1) -> list[list[int]]:
    """Files (indices) of each of `count` processes: balanced by bytes, largest first to the least
    loaded process, except that every process gets at least `need` files (one per worker)."""
    load, shares = [0] * count, [[] for _ in range(count)]
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    for k, i in enumerate(order):
        short = [q for q in range(count) if len(shares[q]) < need]
        missing = sum(need - len(shares[q]) for q in short)
        pool = short if short and len(order) - k <= missing else range(count)
        p = min(pool, key=lambda q: (load[q], q))
        load[p] += sizes[i]
        shares[p].append(i)
    return [sorted(s) for s in shares]


def check_shares(source: str, files: list[str], records: int, count: int, workers: int) -> None:
    """Each process, and each of its workers, needs a file (or record) of its own."""
    units = len(files) or records
    need = count * max(workers, 1)
    if units < need:
        what = "files" if files else "records"
        raise DataError(
            f"data.source: '{source}' has {units} training {what}, but streaming gives each of "
            f"the {count} processes x {max(workers, 1)} data.workers at least one; split the "
            f"corpus into more files, use fewer data.workers, or set data.stream=false")


def stream_source(cfg: Config, tokenizer: Any, files: list[str], records: int) -> StreamSource:
    d = cfg.data
    tfds = (d.source, d.split, d.dir) if d.source.startswith("tfds:") else None
    return StreamSource(Reading(d.text_field, d.on_bad_rows, tfds, is_prepared(d.source)),
                        Tokenize(tokenizer, tokenizer.eos_token_id), cfg.train.seq_len,
                        d.shuffle_windows, files, [file_size(f) for f in files], records)


def split_inputs(cfg: Config) -> tuple[list[str], list[str], int, tuple[int, int]]:
    """(training files, held-out files, training records, held-out record range): without
    `data.eval_split`, a seeded `data.val_fraction` of the files (at least one) or the split's
    last records are held out for evaluation."""
    d = cfg.data
    hold = not d.eval_split
    if hold and d.val_fraction <= 0:
        raise ConfigError("data.val_fraction=0 needs data.eval_split (a glob or tfds split) "
                          "for the evaluation text")
    if d.source.startswith("tfds:"):
        n = _tfds_size(cfg, d.split)
        n_val = max(1, int(round(n * d.val_fraction))) if hold else 0
        return [], [], n - n_val, (n - n_val, n)
    files = prepared_files(d.source) if is_prepared(d.source) else files_for(d.source)
    for f in files:
        if file_size(f) == 0:
            raise DataError(f"data.source: {f}: file is empty")
    if not hold:
        return files, [], 0, (0, 0)
    n_val = max(1, int(round(len(files) * d.val_fraction)))
    if len(files) - n_val < 1:
        raise DataError(f"data.source: '{d.source}' has {len(files)} file(s); holding out "
                        f"data.val_fraction={d.val_fraction} of them leaves none to train on; "
                        "set data.eval_split or give more files")
    held = set(np.random.default_rng(cfg.seed).permutation(len(files))[:n_val].tolist())
    return ([f for i, f in enumerate(files) if i not in held],
            [f for i, f in enumerate(files) if i in held], 0, (0, 0))


def bounded_texts(cfg: Config, shards: list[Shard], chars: int, seed: int,
                  per_shard: int | None = None) -> list[str]:
    """Documents from `shards` in a seeded order until `chars` characters: at most `per_shard`
    from one shard on a first pass (so a sample spans many files), the rest on a second."""
    d = cfg.data
    tfds = (d.source, d.split, d.dir) if d.source.startswith("tfds:") else None
    reading = Reading(d.text_field, d.on_bad_rows, tfds, is_prepared(d.source))
    out, total = [], 0
    order = np.random.default_rng(seed).permutation(len(shards))
    started = {}
    for cap in ([per_shard, None] if per_shard else [None]):
        for i in order:
            texts = started.setdefault(i, reading.texts(shards[i]))
            taken = 0
            for text in texts:
                if text is None:  # a bad record, skipped
                    continue
                out.append(text)
                total += len(text)
                taken += len(text)
                if total >= chars:
                    return out
                if cap and taken >= cap:
                    break
    return out


def sample_shards(files: list[str], records: tuple[int, int], chunks: int = 64) -> list[Shard]:
    if files:
        return [Shard(f) for f in files]
    lo, hi = records
    n = max(min(chunks, hi - lo), 1)
    edges = [lo + (hi - lo) * i // n for i in range(n + 1)]
    return [Shard("", a, b) for a, b in zip(edges, edges[1:]) if b > a]


def tokenizer_sample(cfg: Config, files: list[str], records: int,
                     chars: int = 0) -> Callable[[], Iterator[str]]:
    """The seeded, bounded sample (`chars`, default data.tokenizer_sample_chars) a tokenizer that
    bigjax trains learns from (read only when it is needed: by process 0, the first time)."""
    chars = chars or cfg.data.tokenizer_sample_chars
    shards = sample_shards(files, (0, records))
    return lambda: bounded_texts(cfg, shards, chars, cfg.seed, per_shard=max(chars // 16, 1))
