"""The one way records come in: rows of the training or evaluation source (file globs through
`RecordReader`, tfds splits, the builtin corpus) with the `data.on_bad_rows` policy and one count
of what was read and skipped; and the seeded hold-out split."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from bigjax.config import Config
from bigjax.data.sources import ReadStats, RecordReader, files_for
from bigjax.data.tfds_source import tfds_records
from bigjax.errors import DataError

log = logging.getLogger("bigjax")


@dataclass
class Rows:
    rows: list[dict] = field(default_factory=list)
    where: list[str] = field(default_factory=list)  # "file: row N" of each row, for errors
    stats: ReadStats = field(default_factory=ReadStats)


def read_rows(cfg: Config, which: str, fields: Sequence[str]) -> Rows:
    """Every row of the training (`which="train"`) or evaluation (`"eval"`) source.

    Files: `data.source` is a glob; for eval, `data.eval_split` is a second glob.
    tfds: `data.split` / `data.eval_split` name splits (slicing such as `train[:90%]` works).
    Eval without `data.eval_split` is empty (the builder holds out `data.val_fraction`).
    """
    src = cfg.data.source
    split = cfg.data.split if which == "train" else cfg.data.eval_split
    out = Rows()
    if which == "eval" and not split:
        return out
    reader = RecordReader(cfg.data.on_bad_rows, fields)
    if src.startswith("tfds:"):
        place = f"{src} split '{split}'"
        rows = tfds_records(src, split, cfg.data.dir, fields).read(reader)
        pairs = ((row, place) for row in rows)
    else:
        pattern = src if which == "train" else split
        pairs = ((row, path) for path in files_for(pattern) for row in reader.read(path))
    for row, place in pairs:
        out.rows.append(row)
        out.where.append(f"{place}: row {reader.row}")  # numbered as in the reader's own errors
    out.stats = reader.stats
    if reader.stats.skipped:
        log.warning("data (%s): %s", which, reader.stats.summary())
    return out


def read_texts(cfg: Config, which: str = "train") -> tuple[list[str], ReadStats]:
    """The `data.text_field` of every row (or the builtin corpus's documents)."""
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
    name = cfg.data.text_field
    rows = read_rows(cfg, which, (name,))
    texts = [str(row[name]) for row in rows.rows]
    if which == "train" and not any(t.strip() for t in texts):
        raise DataError(f"data.source: '{src}' holds no text in field '{name}' (data.text_field)")
    return texts, rows.stats


def split_docs(docs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded `val_fraction` of the documents, each part in source order."""
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = max(1, int(round(len(docs) * val_fraction))) if val_fraction > 0 else 0
    val = [docs[i] for i in sorted(order[:n_val])]
    train = [docs[i] for i in sorted(order[n_val:])]
    return train, val
