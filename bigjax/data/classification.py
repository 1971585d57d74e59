"""Text classification data: CSV/JSONL rows with a text and a label column -> padded examples
(training ones packed several to a row with `data.examples_per_row` > 1: bigjax/data/pack_cls.py).

Labels may be strings (names sorted alphabetically become ids 0..K-1) or integers (used as ids).
The names are stored in `<run.dir>/labels.json`, so a resumed run, `bigjax eval` and
`bigjax predict` use the same mapping as training. Texts are deduplicated before the split, so no
validation text is seen in training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from bigjax.config import Config, example_len, packs_examples
from bigjax.data.pack_cls import PackedExamples
from bigjax.data.records import read_rows, split_docs
from bigjax.data.types import ArrayExamples, Data, LazyExamples
from bigjax.data.wordpiece import bert_tokenizer, encode
from bigjax.errors import DataError
from bigjax.paths import PathLike, run_path, write_text
from bigjax.registry import register_data

log = logging.getLogger("bigjax")

LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class Row:
    text: str
    label: Any  # as read: str or int
    where: str  # "file: row N", for error messages


def _rows(cfg: Config, which: str) -> tuple[list[Row], dict]:
    d = cfg.data
    read = read_rows(cfg, which, (d.text_field, d.label_field))
    rows = []
    for r, w in zip(read.rows, read.where):
        label = r[d.label_field]
        if isinstance(label, str):
            label = label.strip()
        if label is None or label == "" or isinstance(label, (bool, float, list, dict)):
            raise DataError(f"{w}: label {label!r} in '{d.label_field}' (data.label_field) is not "
                            "a class name or an integer class id")
        rows.append(Row(str(r[d.text_field]), label, w))
    return rows, dict(read.stats.skipped)


def _dedupe(rows: list[Row]) -> tuple[list[Row], int]:
    seen: dict[str, Row] = {}
    for r in rows:
        seen.setdefault(r.text, r)  # the first occurrence wins
    return list(seen.values()), len(rows) - len(seen)


def _is_int(label: Any) -> bool:
    return isinstance(label, int) or (isinstance(label, str) and label.isdigit())


def label_names(labels: Sequence[Any]) -> list[str]:
    """Names of class ids 0..K-1: integer labels name themselves; strings sort alphabetically."""
    if all(_is_int(x) for x in labels):
        return [str(i) for i in range(max(int(x) for x in labels) + 1)]
    return sorted({str(x) for x in labels})


def load_label_names(run_dir: PathLike) -> list[str] | None:
    path = run_path(run_dir) / LABELS_FILE
    if not path.is_file():
        return None
    names = json.loads(path.read_text(encoding="utf-8")).get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: expected {{\"names\": [label, ...]}}")
    return names


def save_label_names(run_dir: PathLike, names: list[str]) -> None:
    write_text(run_path(run_dir) / LABELS_FILE, json.dumps({"names": names}, indent=1))


def label_ids(rows: Sequence[Row], names: list[str], what: str) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    integer_ids = names == [str(i) for i in range(len(names))]
    out = np.empty(len(rows), np.int32)
    for j, r in enumerate(rows):
        # integer ids given as 3 or "3" are the same class; string names match exactly
        key = str(int(r.label)) if _is_int(r.label) and integer_ids else str(r.label)
        if key not in index:
            raise DataError(f"{r.where}: label {r.label!r} does not occur in {what} "
                            f"(known labels: {', '.join(names)})")
        out[j] = index[key]
    return out


def examples(tok, rows: Sequence[Row], ids: np.ndarray, seq_len: int) -> ArrayExamples:
    arrays = encode(tok, [r.text for r in rows], seq_len)
    return ArrayExamples({**arrays, "labels": ids, "weights": np.ones(len(rows), np.float32)})


def split_rows(cfg: Config) -> tuple[list[Row], list[Row], dict[str, Any]]:
    """Deduplicated training and validation rows (as read) and what was removed on the way.

    Also what the scikit-learn baseline reads, so that it scores on exactly bigjax's split.
    """
    d = cfg.data
    rows, skipped = _rows(cfg, "train")
    rows, duplicates = _dedupe(rows)
    if d.eval_split:
        train_rows = rows
        val_rows, val_skipped = _rows(cfg, "eval")
        train_texts = {r.text for r in train_rows}
        val_rows = [r for r in _dedupe(val_rows)[0] if r.text not in train_texts]
        for reason, n in val_skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    else:
        train_rows, val_rows = split_docs(rows, d.val_fraction, cfg.seed)
        # files are often sorted by label: a shuffled order makes `train.eval_batches` (a prefix of
        # the split) a fair sample instead of one class
        order = np.random.default_rng([cfg.seed, 1]).permutation(len(val_rows))
        val_rows = [val_rows[i] for i in order]
    if not train_rows or not val_rows:
        raise DataError(f"{len(train_rows)} training and {len(val_rows)} validation rows; both "
                        "need at least one (data.val_fraction or data.eval_split)")
    return train_rows, val_rows, {"duplicates_removed": duplicates, "skipped_by_reason": skipped}


def build_classification_data(cfg: Config, run_dir: str) -> Data:
    """Train and eval sources for `task.name: classification`; reports the label count (sizes)."""
    train_rows, val_rows, removed = split_rows(cfg)
    duplicates, skipped = removed["duplicates_removed"], removed["skipped_by_reason"]
    saved = load_label_names(run_dir)
    names = saved or label_names([r.label for r in train_rows])
    train_ids = label_ids(train_rows, names, f"the run's {LABELS_FILE}" if saved else "the training data")
    val_ids = label_ids(val_rows, names, "the training data")
    num_labels = getattr(cfg.task, "num_labels", 0)
    if 0 < num_labels < len(names):
        raise DataError(f"task.num_labels={num_labels} but the data has {len(names)} "
                        f"labels ({', '.join(names)}); set task.num_labels={len(names)} or 0")
    tok = bert_tokenizer(cfg, [r.text for r in train_rows], run_dir)
    if saved is None:
        save_label_names(run_dir, names)
    # packing: each text is truncated to data.max_example_len, and evaluation reads them unpacked
    make_train = lambda: examples(tok, train_rows, train_ids, example_len(cfg))  # noqa: E731
    train = LazyExamples(make_train, len(train_rows))
    val = examples(tok, val_rows, val_ids, example_len(cfg))
    summary = f"{len(train_rows)} training rows, {len(names)} labels"
    if packs_examples(cfg):  # its summary counts the texts per row: packed now
        train = PackedExamples(make_train(), cfg.train.seq_len, cfg.data.examples_per_row,
                               tok.pad_token_id)
        per_row, filled = train.fill(cfg.seed)
        summary += (f"; packed {per_row:.2f} texts per row of {cfg.train.seq_len} tokens "
                    f"({filled:.0%} of them text), about {per_row * cfg.train.batch_size:.0f} "
                    "texts per step")
    info = {"train_rows": len(train_rows), "eval_rows": len(val_rows),
            "duplicates_removed": duplicates, "rows_skipped": sum(skipped.values()),
            "skipped_by_reason": skipped, "label_names": names,
            "train_label_counts": np.bincount(train_ids, minlength=len(names)).tolist()}
    log.info(f"classification data: {len(train_rows)} training and {len(val_rows)} validation "
             f"rows, {duplicates} duplicate texts removed, {sum(skipped.values())} rows skipped "
             f"{skipped or ''}, labels {names}")
    return Data(train=train, eval=val, tokenizer=tok, info=info,
                sizes={"vocab": len(tok), "num_labels": len(names)},
                summary=summary)


register_data("classification", build_classification_data)
