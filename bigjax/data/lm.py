"""Language-model examples: documents concatenated into one token stream, cut into windows.

Each window carries segment ids (one per document) and positions that restart at each document,
so attention never crosses a document boundary; a target that belongs to the next document gets
weight 0. Every token of the stream is in exactly one window (the tail shorter than a window is
counted and dropped, not silently).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import jax
import numpy as np

from bigjax import distributed
from bigjax.config import Config
from bigjax.data.lm_stream import (MixtureSource, bounded_texts, check_shares, sample_shards,
                                   split_inputs, stream_source,
                                   tokenizer_sample, wants_stream)
from bigjax.data.prepared import check_tokenizer, is_prepared
from bigjax.data.records import read_texts, split_docs
from bigjax.data.tokenizer import load_tokenizer, train_bpe
from bigjax.data.types import Data
from bigjax.errors import DataError
from bigjax.paths import run_path
from bigjax.registry import register_data

log = logging.getLogger("bigjax")


@dataclass
class TokenStream:
    tokens: np.ndarray  # int32
    doc_ids: np.ndarray  # int32, nondecreasing

    @classmethod
    def from_docs(cls, docs_ids: list[list[int]], eos_id: int | None) -> "TokenStream":
        lens = [len(d) + (eos_id is not None) for d in docs_ids]
        flat = [t for d in docs_ids for t in (d + [eos_id] if eos_id is not None else d)]
        tokens = np.asarray(flat, np.int32)
        doc_ids = np.repeat(np.arange(len(lens), dtype=np.int32), lens)
        return cls(tokens, doc_ids)


class PackedWindows:
    """Random-access source of fixed-length LM examples (grain MapDataset source)."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        # windows overlap by one token, so inputs of window i+1 start where targets of window i end
        self.n = max((len(stream.tokens) - 1) // seq_len, 0)
        self.dropped_tokens = len(stream.tokens) - 1 - self.n * seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s = self.stream
        a, b = i * self.seq_len, (i + 1) * self.seq_len + 1
        tok, doc = s.tokens[a:b], s.doc_ids[a:b]
        seg = doc[:-1] - doc[0]
        # positions restart at each document start inside the window (a document continued from
        # the previous window starts at 0 too), so they never exceed seq_len
        idx = np.arange(self.seq_len, dtype=np.int32)
        starts = np.maximum.accumulate(np.where(np.diff(seg, prepend=-1) != 0, idx, 0))
        return {
            "inputs": tok[:-1],
            "targets": tok[1:],
            "weights": (doc[1:] == doc[:-1]).astype(np.float32),
            "segment_ids": seg,
            "positions": idx - starts,
        }


class PaddedDocs:
    """One example per document (`data.pack: false`): truncated to seq_len, padded with weight 0.

    Documents longer than a window are cut; `truncated_docs` / `truncated_tokens` count what was
    cut, so nothing is dropped without a number in the logs.
    """

    def __init__(self, docs_ids: list[list[int]], eos_id: int | None, seq_len: int, pad_id: int = 0):
        self.seq_len, self.pad_id = seq_len, pad_id
        docs = [d + [eos_id] if eos_id is not None else d for d in docs_ids]
        self.docs = [np.asarray(d, np.int32) for d in docs if len(d) >= 2]  # need one target
        self.truncated_docs = sum(len(d) > seq_len + 1 for d in self.docs)
        self.truncated_tokens = sum(max(len(d) - seq_len - 1, 0) for d in self.docs)

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        d = self.docs[i][: self.seq_len + 1]
        n, L = len(d) - 1, self.seq_len
        inputs = np.full(L, self.pad_id, np.int32)
        targets = np.full(L, self.pad_id, np.int32)
        inputs[:n], targets[:n] = d[:-1], d[1:]
        weights = np.zeros(L, np.float32)
        weights[:n] = 1.0
        # padding is its own segment, so real tokens never attend to it
        return {"inputs": inputs, "targets": targets, "weights": weights,
                "segment_ids": (weights == 0).astype(np.int32),
                "positions": np.arange(L, dtype=np.int32)}


def get_tokenizer(cfg: Config, texts: list[str] | Callable[[], Iterable[str]], run_dir: str):
    """`data.tokenizer`, else the run's own BPE (trained on `texts` the first time; a callable
    is called only then, so a process that does not train never reads them)."""
    if callable(texts):
        texts = _Lazy(texts)
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    cached = run_path(run_dir) / "tokenizer"
    if jax.process_count() > 1:  # the processes share run_dir: process 0 trains it
        index = jax.process_index()
        if index == 0 and not cached.is_dir():
            train_bpe(texts, cfg.data.vocab_size, cached)
        distributed.barrier("tokenizer", timeout_s=3600)  # a dead process 0 ends us sooner
        if not cached.is_dir():
            raise DataError(f"process {index} cannot see the tokenizer that process 0 "
                            f"wrote to {cached}; run.dir must be on storage all hosts share")
    if cached.is_dir():
        return load_tokenizer(cached)
    return train_bpe(texts, cfg.data.vocab_size, cached)


class _Lazy:
    """Texts read on first iteration (the streaming path's tokenizer sample)."""

    def __init__(self, read: Callable[[], Iterable[str]]):
        self.read = read

    def __iter__(self):
        return iter(self.read())


def lm_examples(cfg: Config, docs_ids: list[list[int]], tok: Any) -> PackedWindows | PaddedDocs:
    if cfg.data.pack:
        return PackedWindows(TokenStream.from_docs(docs_ids, tok.eos_token_id), cfg.train.seq_len)
    return PaddedDocs(docs_ids, tok.eos_token_id, cfg.train.seq_len, tok.pad_token_id or 0)


def build_lm_data(cfg: Config, run_dir: str) -> Data:
    """`task.name: causal_lm`: documents -> tokens -> packed (or padded) windows; large file
    globs and tfds splits stream instead (`data.stream`, bigjax.data.lm_stream)."""
    if wants_stream(cfg):
        return build_lm_stream(cfg, run_dir)
    texts, stats = read_texts(cfg, "train")
    val_texts, val_stats = read_texts(cfg, "eval")
    tok = get_tokenizer(cfg, texts, run_dir)
    if not val_texts:
        texts, val_texts = split_docs(texts, cfg.data.val_fraction, cfg.seed)
    ids = lambda ts: tok(list(ts), add_special_tokens=False)["input_ids"] if ts else []
    train, val = lm_examples(cfg, ids(texts), tok), lm_examples(cfg, ids(val_texts), tok)
    if len(train) == 0 or len(val) == 0:
        raise DataError(
            f"data.source: too little text for train.seq_len={cfg.train.seq_len} "
            f"({len(train)} training and {len(val)} validation examples; set data.eval_split "
            f"or a larger data.val_fraction)")
    info = {"documents": len(texts), "eval_documents": len(val_texts),
            "train_examples": len(train), "eval_examples": len(val),
            "skipped_rows": stats.skipped_total + val_stats.skipped_total}
    if isinstance(train, PackedWindows):
        info.update(train_tokens=int(len(train.stream.tokens)),
                    dropped_tail_tokens=train.dropped_tokens)
    else:
        info.update(truncated_docs=train.truncated_docs, truncated_tokens=train.truncated_tokens)
    # the packed tail (< one window) is normal and only logged at info level
    log.info("data: %s", info)
    for key in ("truncated_docs", "skipped_rows"):
        if info.get(key):
            log.warning("data: %s=%d (train.seq_len=%d)", key, info[key], cfg.train.seq_len)
    unit = "windows" if cfg.data.pack else "padded examples"
    return Data(train=train, eval=val, tokenizer=tok, info=info, sizes={"vocab": len(tok)},
                summary=f"{len(texts)} training documents in {len(train)} {unit} of "
                        f"{cfg.train.seq_len} tokens")


def _ids(tok: Any, texts: list) -> list[list[int]]:
    """Token ids of texts, or of a prepared dir's documents (ids already)."""
    ids = [t.tolist() if isinstance(t, np.ndarray) else None for t in texts]
    todo = [t for t, i in zip(texts, ids) if i is None]
    done = iter(tok(todo, add_special_tokens=False)["input_ids"] if todo else [])
    return [i if i is not None else next(done) for i in ids]


def build_lm_stream(cfg: Config, run_dir: str) -> Data:
    """The streaming path: the training text is read by the loader's pipeline, per process; here
    only the corpus is listed, the tokenizer prepared (from a bounded sample) and the held-out
    evaluation text (at most data.max_chars characters) read and packed. `data.sources`: the same
    for each corpus of the mixture."""
    d = cfg.data
    named = ([(f"data.sources[{i}]", p.source, p.weight) for i, p in enumerate(d.sources)]
             or [("data.source", d.source, 1.0)])
    parts = []
    for key, source, weight in named:  # every source listed and checked before any is read
        part = dataclasses.replace(cfg, data=dataclasses.replace(d, source=source))
        try:
            files, held, records, held_range = split_inputs(part)
            check_shares(source, files, records, jax.process_count(), d.workers)
        except DataError as e:
            if not d.sources:
                raise
            raise DataError(f"{key} ({source}): {str(e).removeprefix('data.source: ')}")
        parts.append((part, weight, files, held, records, held_range))
    total = sum(w for _, w, *_ in parts)
    prepared = [source for _, source, _ in named if is_prepared(source)]
    if prepared:  # token ids already: the tokenizer they were made with, checked for each
        tok_dir = check_tokenizer(prepared[0], d.tokenizer)
        for source in prepared[1:]:
            check_tokenizer(source, tok_dir)
        tok = load_tokenizer(tok_dir)
    else:
        samples = [tokenizer_sample(part, files, records,
                                    max(int(d.tokenizer_sample_chars * w / total), 1))
                   for part, w, files, _, records, _ in parts if w > 0]
        tok = get_tokenizer(cfg, lambda: [t for sample in samples for t in sample()], run_dir)
    sources = [stream_source(part, tok, files, records) for part, _, files, _, records, _ in parts]
    train = (MixtureSource(sources, [w for _, w, *_ in parts], [n[1] for n in named])
             if d.sources else sources[0])
    if d.eval_split:
        val_texts, _ = read_texts(cfg, "eval")
    else:
        val_texts = [t for part, _, _, held, _, held_range in parts
                     for t in bounded_texts(part, sample_shards(held, held_range),
                                            d.max_chars // len(parts), cfg.seed)]
    val = lm_examples(cfg, _ids(tok, val_texts), tok)
    if len(val) == 0:
        raise DataError(f"data.eval_split / held-out text: too little for "
                        f"train.seq_len={cfg.train.seq_len} (0 validation windows)")
    n_files = sum(len(p[2]) for p in parts)
    n_records = sum(p[4] for p in parts)
    size = sum(sum(s.sizes) for s in sources) / 1e6
    units = (f"{n_files} files ({size:.1f} MB)" if n_files else "") + \
        (" and " if n_files and n_records else "") + (f"{n_records} records" if n_records else "")
    info = {"stream": True, "train_files": n_files, "train_records": n_records,
            "eval_documents": len(val_texts), "eval_examples": len(val),
            "tokenizer_sample_chars": d.tokenizer_sample_chars}
    log.info("data: %s", info)
    mix = f" from {len(parts)} sources by weight" if d.sources else ""
    return Data(train=train, eval=val, tokenizer=tok, info=info, sizes={"vocab": len(tok)},
                summary=f"streaming {units}{mix} in windows of {cfg.train.seq_len} tokens, "
                        f"each process its share")


register_data("lm", build_lm_data)
