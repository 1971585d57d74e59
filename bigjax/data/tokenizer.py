"""Tokenizers: load a Hugging Face tokenizer from a local dir, or train a byte-level BPE.

A trained tokenizer is saved with `save_pretrained`, so `AutoTokenizer.from_pretrained(dir)` loads
it like any other and it travels with the run (and with a Hugging Face export).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable

from bigjax.errors import DataError, first_line

EOS, PAD = "<|endoftext|>", "<pad>"
MIN_VOCAB = 258


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str):
    """Train a byte-level BPE tokenizer (GPT-2 style) and save it under `out_dir` (a new dir)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab size {vocab_size} is below the {MIN_VOCAB} that a byte-level BPE "
                        "needs (256 bytes + 2 special tokens)")
    if os.path.exists(out_dir):
        raise DataError(f"tokenizer output '{out_dir}' already exists; choose a new directory")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   bos_token=EOS, unk_token=None)
    # write next to the target, then rename: a crash never leaves a half-written tokenizer
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    fast.save_pretrained(tmp)
    publish(tmp, out_dir)
    return load_tokenizer(out_dir)


def publish(tmp: str, final: str) -> None:
    """Move a finished dir into place; if another process got there first (same content: the
    tokenizers trained here are deterministic), keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise DataError(f"tokenizer dir '{path}' does not exist (data.tokenizer)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from '{path}': {first_line(e)}")
