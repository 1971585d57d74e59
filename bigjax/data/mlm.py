"""BERT-style inputs: the tokenizer a BERT task uses, and masked-LM examples.

Masking happens here, on the host, per example: a numpy Generator seeded with (seed, epoch,
example index) picks the positions, so a resumed run sees exactly the masks it would have seen,
and every epoch masks an example differently (the loader only knows flat indices, so the training
source presents `MASKING_EPOCHS` differently masked copies of the data, like BERT's dupe_factor).
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from bigjax.config import Config
from bigjax.data.tokenizer import load_tokenizer, publish
from bigjax.distributed import private_path
from bigjax.errors import DataError

log = logging.getLogger("bigjax")

Example = dict[str, np.ndarray]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] first: model.pad_token_id = 0
MASKING_EPOCHS = 10


def wordpiece_vocab(texts: Sequence[str], vocab_size: int) -> list[str]:
    """A deterministic WordPiece vocabulary: the special tokens, every character (alone and as a
    `##` continuation, most frequent first, at most half the vocabulary), then whole words by
    frequency. (The `tokenizers` WordPiece trainer breaks frequency ties differently from run to
    run, so two processes or two runs would get different token ids.)"""
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    chars: Counter = Counter()
    for w, n in words.items():
        chars[w[0]] += n
        chars.update({"##" + c: n for c in w[1:]})
    by_freq = lambda counter: [k for k, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]
    vocab = SPECIALS + by_freq(chars)[:max(vocab_size // 2 - len(SPECIALS), 0)]
    taken = set(vocab)
    for w in by_freq(words):
        if len(vocab) >= vocab_size:
            break
        if w not in taken:
            vocab.append(w)
            taken.add(w)
    return vocab


def train_wordpiece(texts: Sequence[str], vocab_size: int, out_dir: str):
    """An uncased WordPiece tokenizer with BERT's special tokens, saved under `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = wordpiece_vocab(texts, vocab_size)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab.index("[SEP]")),
                                                   ("[CLS]", vocab.index("[CLS]")))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tmp = private_path(out_dir)
    fast.save_pretrained(tmp)
    publish(tmp, out_dir)
    return load_tokenizer(out_dir)


def bert_tokenizer(cfg: Config, texts: Sequence[str], run_dir: str):
    """The tokenizer of a BERT task, in order: `data.tokenizer`; the run's own copy (resume);
    the `init.from` source's (hf:DIR, or the run it starts from); else a WordPiece trained on the
    texts. The run keeps a copy in `<run.dir>/tokenizer`, so eval, predict and export find it."""
    own = os.path.join(run_dir, "tokenizer")
    init = cfg.init.from_
    if cfg.data.tokenizer:
        tok = load_tokenizer(cfg.data.tokenizer)
    elif os.path.isdir(own):
        return load_tokenizer(own)
    elif init.startswith("hf:"):
        tok = load_tokenizer(init[3:])
    elif init:
        from bigjax.init_from import source_run_dir
        src = os.path.join(source_run_dir(init), "tokenizer")
        if not os.path.isdir(src):
            raise DataError(f"init.from={init}: that run has no tokenizer dir '{src}'; "
                            "set data.tokenizer to the tokenizer it was trained with")
        tok = load_tokenizer(src)
    else:
        return train_wordpiece(texts, cfg.data.vocab_size, own)
    if tok.mask_token_id is None or tok.pad_token_id is None or tok.cls_token_id is None:
        raise DataError(f"tokenizer of '{cfg.data.tokenizer or init}' has no [MASK]/[PAD]/[CLS] "
                        "token; a BERT task needs a BERT-style (WordPiece) tokenizer")
    tmp = private_path(own)
    tok.save_pretrained(tmp)
    publish(tmp, own)
    return tok


def encode(tok, texts: Sequence[str], seq_len: int) -> dict[str, np.ndarray]:
    """[CLS] text [SEP], truncated and padded to seq_len (as the seed's example does)."""
    enc = tok(list(texts), truncation=True, max_length=seq_len, padding="max_length",
              return_token_type_ids=True, return_attention_mask=True)
    return {k: np.asarray(enc[k], np.int32)
            for k in ("input_ids", "attention_mask", "token_type_ids")}


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


def num_predictions(maskable: int, probability: float) -> int:
    """How many positions a sequence with `maskable` tokens predicts, as in the original BERT's
    pretraining data: round(maskable × probability), at least 1 (0 when nothing is maskable)."""
    return min(maskable, max(1, int(round(maskable * probability))))


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


def build_mlm_data(cfg: Config, run_dir: str):
    """Train and eval sources for `task.name: masked_lm`, read by the pipeline's text reader."""
    from bigjax.data.pipeline import Data, read_texts, split_docs
    if cfg.data.source.startswith(("builtin:", "tfds:")):
        texts, _ = read_texts(cfg)
    else:  # files: with the data.on_bad_rows policy, counting skipped rows
        from bigjax.data.classification import read_rows
        rows, _, skipped = read_rows(cfg, cfg.data.source, (cfg.data.text_field,))
        texts = [str(r[cfg.data.text_field]) for r in rows]
        if skipped:
            log.warning("masked_lm data: skipped rows %s", skipped)
    texts = list(dict.fromkeys(texts))  # duplicates would leak into validation
    tok = bert_tokenizer(cfg, texts, run_dir)
    train_texts, val_texts = split_docs(texts, cfg.data.val_fraction, cfg.seed)
    if not train_texts or not val_texts:
        raise DataError(f"data.val_fraction={cfg.data.val_fraction} leaves {len(train_texts)} "
                        f"training and {len(val_texts)} validation texts; both need at least one")
    to_arrays = pack if cfg.data.pack else encode
    train_arr = to_arrays(tok, train_texts, cfg.train.seq_len)
    val_arr = to_arrays(tok, val_texts, cfg.train.seq_len)
    p = cfg.task.mlm_probability
    train = MaskedExamples(train_arr, tok, seed=cfg.seed, probability=p, epochs=MASKING_EPOCHS)
    # validation masks are fixed (epoch 0 of a different seed stream), so eval losses compare
    val = MaskedExamples(val_arr, tok, seed=cfg.seed + 1, probability=p, epochs=1)
    info = {"texts": len(texts), "train_sequences": train.n, "eval_sequences": val.n,
            "masking_epochs": MASKING_EPOCHS}
    log.info("masked_lm data: %s", info)
    return Data(train=train, eval=val, tokenizer=tok, info=info)
