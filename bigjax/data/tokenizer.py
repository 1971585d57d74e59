"""Tokenizers: load a Hugging Face tokenizer from a local dir, or train a byte-level BPE.

A trained tokenizer is saved with `save_pretrained`, so `AutoTokenizer.from_pretrained(dir)` loads
it like any other and it travels with the run (and with a Hugging Face export).
"""

from __future__ import annotations

import os
from typing import Iterable

from bigjax.errors import DataError

EOS, PAD = "<|endoftext|>", "<pad>"


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str):
    """Train a byte-level BPE tokenizer (GPT-2 style) and save it under `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   bos_token=EOS, unk_token=None)
    tmp = out_dir + ".tmp"
    fast.save_pretrained(tmp)
    os.replace(tmp, out_dir) if not os.path.exists(out_dir) else None
    return load_tokenizer(out_dir)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise DataError(f"tokenizer dir '{path}' does not exist (data.tokenizer)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from '{path}': {str(e).splitlines()[0]}")
