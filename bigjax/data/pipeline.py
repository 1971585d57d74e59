"""From `data.*` config to train/eval example sources and the tokenizer."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from bigjax.config import Config
from bigjax.data.sources import files_for, read_records
from bigjax.data.lm import PackedWindows, TokenStream
from bigjax.data.tokenizer import load_tokenizer, train_bpe
from bigjax.errors import DataError

log = logging.getLogger("bigjax")


@dataclass
class Data:
    train: Sequence[dict[str, np.ndarray]]
    eval: Sequence[dict[str, np.ndarray]]
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)  # counts worth logging


def read_texts(cfg: Config) -> list[str]:
    src = cfg.data.source
    if src.startswith("builtin:"):
        from bigjax.data.corpus import python_docs
        if src != "builtin:pydocs":
            raise DataError(f"data.source: unknown builtin corpus '{src}' (known: builtin:pydocs)")
        return python_docs(cfg.data.max_chars)
    field = cfg.data.text_field
    texts = []
    for path in files_for(src):
        for i, row in enumerate(read_records(path, field)):
            if field not in row:
                raise DataError(f"{path}: row {i + 1} has no field '{field}' (data.text_field)")
            texts.append(str(row[field]))
    if not texts:
        raise DataError(f"data.source: the files matching '{src}' hold no text")
    return texts


def get_tokenizer(cfg: Config, texts: list[str], run_dir: str):
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    cached = os.path.join(run_dir, "tokenizer")
    if os.path.isdir(cached):
        return load_tokenizer(cached)
    return train_bpe(texts, cfg.data.vocab_size, cached)


def split_docs(docs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = max(1, int(round(len(docs) * val_fraction))) if val_fraction > 0 else 0
    val = [docs[i] for i in sorted(order[:n_val])]
    train = [docs[i] for i in sorted(order[n_val:])]
    return train, val


def build_lm_data(cfg: Config, run_dir: str) -> Data:
    texts = read_texts(cfg)
    tok = get_tokenizer(cfg, texts, run_dir)
    train_texts, val_texts = split_docs(texts, cfg.data.val_fraction, cfg.seed)
    ids = lambda ts: tok(ts, add_special_tokens=False)["input_ids"] if ts else []
    eos = tok.eos_token_id
    train = PackedWindows(TokenStream.from_docs(ids(train_texts), eos), cfg.train.seq_len)
    val = PackedWindows(TokenStream.from_docs(ids(val_texts), eos), cfg.train.seq_len)
    if len(train) == 0 or len(val) == 0:
        raise DataError(
            f"data.source: too little text for train.seq_len={cfg.train.seq_len} "
            f"({len(train)} training and {len(val)} validation windows)")
    info = {"documents": len(texts), "train_windows": len(train), "eval_windows": len(val),
            "train_tokens": int(len(train.stream.tokens)), "dropped_tail_tokens": train.dropped_tokens}
    return Data(train=train, eval=val, tokenizer=tok, info=info)


def build_data(cfg: Config, run_dir: str) -> Data:
    if cfg.task.name == "causal_lm":
        return build_lm_data(cfg, run_dir)
    raise DataError(f"task.name={cfg.task.name}: no input pipeline for this task yet")
