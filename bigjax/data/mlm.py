"""Masked-LM examples (`task.name: masked_lm`).

Masking happens here, on the host, per example: a numpy Generator seeded with (seed, epoch,
example index) picks the positions, so a resumed run sees exactly the masks it would have seen,
and every epoch masks an example differently (the loader only knows flat indices, so the training
source presents `MASKING_EPOCHS` differently masked copies of the data, like BERT's dupe_factor).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from bigjax.config import Config
from bigjax.data.records import read_texts, split_docs
from bigjax.data.types import Data, Example
from bigjax.data.wordpiece import bert_tokenizer, encode
from bigjax.errors import DataError
from bigjax.registry import register_data
from bigjax.tasks import num_predictions

log = logging.getLogger("bigjax")

MASKING_EPOCHS = 10


def pack(tok, texts: Sequence[str], seq_len: int) -> dict[str, np.ndarray]:
    """Texts joined by [SEP] into full windows `[CLS] ... [SEP]`: no compute is spent on padding
    (tweets average ~30 tokens); the tail shorter than a window is dropped."""
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    stream = np.asarray([t for doc in ids for t in (*doc, tok.sep_token_id)], np.int32)
    body = seq_len - 2
    n = len(stream) // body
    if n == 0:
        raise DataError(f"data.source: too little text for one window of train.seq_len={seq_len}")
    windows = stream[:n * body].reshape(n, body)
    cls = np.full((n, 1), tok.cls_token_id, np.int32)
    sep = np.full((n, 1), tok.sep_token_id, np.int32)
    input_ids = np.concatenate([cls, windows, sep], axis=1)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
            "token_type_ids": np.zeros_like(input_ids)}


def mask_tokens(input_ids: np.ndarray, maskable: np.ndarray, rng: np.random.Generator, *,
                probability: float, mask_id: int, random_ids: np.ndarray,
                max_predictions: int) -> Example:
    """BERT masking of one sequence: select `num_predictions` maskable positions uniformly; of the
    selected, 80% become [MASK], 10% a random token, 10% stay. Returns the selected positions
    (ascending, padded with 0 and weight 0 up to `max_predictions`) with their original tokens as
    targets: the model predicts those P positions only, not all T (the output layer over the
    vocabulary is most of a small BERT's compute)."""
    candidates = np.flatnonzero(maskable)
    n = num_predictions(len(candidates), probability)
    picked = np.sort(rng.choice(candidates, n, replace=False)) if n else candidates[:0]
    kind = rng.random(n)
    masked = input_ids.copy()
    masked[picked[kind < 0.8]] = mask_id
    swap = picked[(kind >= 0.8) & (kind < 0.9)]
    masked[swap] = random_ids[rng.integers(0, len(random_ids), len(swap))]
    positions = np.zeros(max_predictions, np.int32)
    positions[:n] = picked
    weights = (np.arange(max_predictions) < n).astype(np.float32)
    return {"input_ids": masked.astype(np.int32), "masked_positions": positions,
            "targets": np.where(weights > 0, input_ids[positions], 0).astype(np.int32),
            "weights": weights}


class MaskedExamples:
    """Random-access masked-LM examples (a grain MapDataset source).

    Index k is example k % n in masking epoch k // n; the same (seed, epoch, example) always gives
    the same masks.
    """

    def __init__(self, arrays: dict[str, np.ndarray], tok, *, seed: int, probability: float,
                 epochs: int):
        self.arrays, self.seed, self.probability, self.epochs = arrays, seed, probability, epochs
        self.n = len(arrays["input_ids"])
        self.mask_id = tok.mask_token_id
        self.special = np.asarray(sorted(set(tok.all_special_ids)), np.int32)
        self.random_ids = np.setdiff1d(np.arange(len(tok), dtype=np.int32), self.special)
        self.max_predictions = num_predictions(arrays["input_ids"].shape[1], probability)
        # once for all examples and epochs: real tokens that are not special
        self.maskable = (arrays["attention_mask"] > 0) & ~np.isin(arrays["input_ids"], self.special)

    def __len__(self) -> int:
        return self.n * self.epochs

    def __getitem__(self, k: int) -> Example:
        epoch, i = divmod(int(k), self.n)
        ids, attn = self.arrays["input_ids"][i], self.arrays["attention_mask"][i]
        rng = np.random.default_rng([self.seed, epoch, i])
        out = mask_tokens(ids, self.maskable[i], rng, probability=self.probability,
                          mask_id=self.mask_id, random_ids=self.random_ids,
                          max_predictions=self.max_predictions)
        return {**out, "attention_mask": attn, "token_type_ids": self.arrays["token_type_ids"][i]}


def build_mlm_data(cfg: Config, run_dir: str) -> Data:
    """Train and eval sources for `task.name: masked_lm`: texts (deduplicated), packed into
    windows (or one padded example per text), masked per example and epoch. Validation is
    `data.eval_split` when set (minus texts also in training), else a held-out `data.val_fraction`."""
    texts = list(dict.fromkeys(read_texts(cfg, "train")[0]))  # duplicates would leak into validation
    tok = bert_tokenizer(cfg, texts, run_dir)
    if cfg.data.eval_split:
        seen = set(texts)
        train_texts = texts
        val_texts = [t for t in dict.fromkeys(read_texts(cfg, "eval")[0]) if t not in seen]
    else:
        train_texts, val_texts = split_docs(texts, cfg.data.val_fraction, cfg.seed)
    if not train_texts or not val_texts:
        where = (f"data.eval_split={cfg.data.eval_split}" if cfg.data.eval_split
                 else f"data.val_fraction={cfg.data.val_fraction}")
        raise DataError(f"{where} leaves {len(train_texts)} training and {len(val_texts)} "
                        "validation texts; both need at least one")
    to_arrays = pack if cfg.data.pack else encode
    train_arr = to_arrays(tok, train_texts, cfg.train.seq_len)
    val_arr = to_arrays(tok, val_texts, cfg.train.seq_len)
    p = cfg.task.mlm_probability
    train = MaskedExamples(train_arr, tok, seed=cfg.seed, probability=p, epochs=MASKING_EPOCHS)
    # validation masks are fixed (epoch 0 of a different seed stream), so eval losses compare
    val = MaskedExamples(val_arr, tok, seed=cfg.seed + 1, probability=p, epochs=1)
    info = {"texts": len(texts), "train_texts": len(train_texts), "eval_texts": len(val_texts),
            "train_sequences": train.n, "eval_sequences": val.n, "masking_epochs": MASKING_EPOCHS}
    log.info("masked_lm data: %s", info)
    unit = "windows" if cfg.data.pack else "padded sequences"
    return Data(train=train, eval=val, tokenizer=tok, info=info, sizes={"vocab": len(tok)},
                summary=f"{len(train_texts)} training texts in {train.n} {unit} of "
                        f"{cfg.train.seq_len} tokens, each masked {MASKING_EPOCHS} ways")


register_data("mlm", build_mlm_data)
