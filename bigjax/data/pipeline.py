"""From `data.*` config to train/eval example sources and the tokenizer."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from bigjax.config import Config
from bigjax.data.lm import PackedWindows, PaddedDocs, TokenStream
from bigjax.data.sources import ReadStats, RecordReader, files_for
from bigjax.data.tfds_source import tfds_records
from bigjax.data.tokenizer import load_tokenizer, train_bpe
from bigjax.errors import DataError

log = logging.getLogger("bigjax")


@dataclass
class Data:
    train: Sequence[dict[str, np.ndarray]]
    eval: Sequence[dict[str, np.ndarray]]
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)  # counts worth logging


def load_rows(cfg: Config, which: str, fields: Sequence[str]) -> tuple[Sequence[dict], ReadStats]:
    """All rows of the training (`which="train"`) or evaluation (`"eval"`) source.

    Files: `data.source` is a glob; for eval, `data.eval_split` is a second glob ("" = none).
    tfds: `data.split` / `data.eval_split` name splits (slicing such as `train[:90%]` works).
    Returns ([], stats) for eval when no eval source is set (the caller holds out a fraction).
    """
    src = cfg.data.source
    split = cfg.data.split if which == "train" else cfg.data.eval_split
    if which == "eval" and not split:
        return [], ReadStats()
    reader = RecordReader(cfg.data.on_bad_rows, fields)
    if src.startswith("tfds:"):
        rows = list(tfds_records(src, split, cfg.data.dir, fields).read(reader))
    else:
        pattern = src if which == "train" else split
        rows = [row for path in files_for(pattern) for row in reader.read(path)]
    if reader.stats.skipped:
        log.warning("data (%s): %s", which, reader.stats.summary())
    return rows, reader.stats


def read_texts(cfg: Config, which: str = "train") -> tuple[list[str], ReadStats]:
    src = cfg.data.source
    if src.startswith("builtin:"):
        from bigjax.data.corpus import python_docs
        if src != "builtin:pydocs":
            raise DataError(f"data.source: unknown builtin corpus '{src}' (known: builtin:pydocs)")
        if which == "eval":
            if cfg.data.eval_split:
                raise DataError(f"data.eval_split: {src} has no splits; leave it empty and set "
                                "data.val_fraction")
            return [], ReadStats()
        docs = python_docs(cfg.data.max_chars)
        return docs, ReadStats(rows=len(docs))
    field = cfg.data.text_field
    rows, stats = load_rows(cfg, which, (field,))
    texts = [str(row[field]) for row in rows]
    if which == "train" and not any(t.strip() for t in texts):
        raise DataError(f"data.source: '{src}' holds no text in field '{field}' (data.text_field)")
    return texts, stats


def get_tokenizer(cfg: Config, texts: list[str], run_dir: str):
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    cached = os.path.join(run_dir, "tokenizer")
    if _process_count() > 1:  # the processes share run_dir: process 0 trains it, the others load it
        from bigjax import distributed
        if _process_index() == 0 and not os.path.isdir(cached):
            train_bpe(texts, cfg.data.vocab_size, cached)
        distributed.barrier("tokenizer", timeout_s=3600)  # a dead process 0 ends us sooner
        if not os.path.isdir(cached):
            raise DataError(f"process {_process_index()} cannot see the tokenizer that process 0 "
                            f"wrote to {cached}; run.dir must be on storage all hosts share")
    if os.path.isdir(cached):
        return load_tokenizer(cached)
    return train_bpe(texts, cfg.data.vocab_size, cached)


def _process_count() -> int:
    import jax
    return jax.process_count()


def _process_index() -> int:
    import jax
    return jax.process_index()


def split_docs(docs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = max(1, int(round(len(docs) * val_fraction))) if val_fraction > 0 else 0
    val = [docs[i] for i in sorted(order[:n_val])]
    train = [docs[i] for i in sorted(order[n_val:])]
    return train, val


def lm_examples(cfg: Config, docs_ids: list[list[int]], tok: Any) -> PackedWindows | PaddedDocs:
    if cfg.data.pack:
        return PackedWindows(TokenStream.from_docs(docs_ids, tok.eos_token_id), cfg.train.seq_len)
    return PaddedDocs(docs_ids, tok.eos_token_id, cfg.train.seq_len, tok.pad_token_id or 0)


def build_lm_data(cfg: Config, run_dir: str) -> Data:
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
    return Data(train=train, eval=val, tokenizer=tok, info=info)


def build_data(cfg: Config, run_dir: str) -> Data:
    if cfg.task.name == "causal_lm":
        return build_lm_data(cfg, run_dir)
    if cfg.task.name == "masked_lm":
        from bigjax.data.mlm import build_mlm_data
        return build_mlm_data(cfg, run_dir)
    if cfg.task.name == "classification":
        from bigjax.data.classification import build_classification_data
        return build_classification_data(cfg, run_dir)
    raise DataError(f"task.name={cfg.task.name}: no input pipeline for this task yet")
