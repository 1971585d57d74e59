"""The tokenizer of the BERT-style tasks (WordPiece, [CLS]/[SEP]/[MASK]) and their plain encoding."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bigjax.config import Config, init_run_dir
from bigjax.data.tokenizer import Tokenizer, load_tokenizer, save_tokenizer
from bigjax.errors import DataError
from bigjax.paths import PathLike, run_path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] first: model.pad_token_id = 0


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


def wordpiece_backend(texts: Sequence[str], vocab_size: int):
    """An uncased WordPiece with BERT's special tokens, as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    vocab = wordpiece_vocab(texts, vocab_size)
    tok = Backend(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab.index("[SEP]")),
                                                   ("[CLS]", vocab.index("[CLS]")))
    return tok


WORDPIECE_SPECIALS = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                      "sep_token": "[SEP]", "mask_token": "[MASK]"}


def train_wordpiece(texts: Sequence[str], vocab_size: int, out_dir: str):
    """An uncased WordPiece tokenizer with BERT's special tokens, saved under `out_dir`."""
    save_tokenizer(Tokenizer.new(wordpiece_backend(texts, vocab_size), WORDPIECE_SPECIALS), out_dir)
    return load_tokenizer(out_dir)


def bert_tokenizer(cfg: Config, texts: Sequence[str], run_dir: PathLike):
    """The tokenizer of a BERT task, in order: `data.tokenizer`; the run's own copy (resume);
    the `init.from` source's (hf:DIR, or the run it starts from); else a WordPiece trained on the
    texts. The run keeps a copy in `<run.dir>/tokenizer`, so eval, predict and export find it."""
    own = run_path(run_dir) / "tokenizer"
    init = cfg.init.from_
    if cfg.data.tokenizer:
        tok = load_tokenizer(cfg.data.tokenizer)
    elif own.is_dir():
        return load_tokenizer(own)
    elif init.startswith("hf:"):
        tok = load_tokenizer(init[3:])
    elif init:
        src = run_path(init_run_dir(init)) / "tokenizer"
        if not src.is_dir():
            raise DataError(f"init.from={init}: that run has no tokenizer dir '{src}'; "
                            "set data.tokenizer to the tokenizer it was trained with")
        tok = load_tokenizer(src)
    else:
        return train_wordpiece(texts, cfg.data.vocab_size, own)
    if tok.mask_token_id is None or tok.pad_token_id is None or tok.cls_token_id is None:
        raise DataError(f"tokenizer of '{cfg.data.tokenizer or init}' has no [MASK]/[PAD]/[CLS] "
                        "token; a BERT task needs a BERT-style (WordPiece) tokenizer")
    save_tokenizer(tok, own)
    return tok


def encode(tok, texts: Sequence[str], seq_len: int) -> dict[str, np.ndarray]:
    """[CLS] text [SEP], truncated and padded to seq_len (as the seed's example does)."""
    enc = tok(list(texts), truncation=True, max_length=seq_len, padding="max_length",
              return_token_type_ids=True, return_attention_mask=True)
    return {k: np.asarray(enc[k], np.int32)
            for k in ("input_ids", "attention_mask", "token_type_ids")}
