"""Tokenizers: load a Hugging Face tokenizer from a local dir, or train a byte-level BPE.

A trained tokenizer is saved with `save_pretrained`, so `AutoTokenizer.from_pretrained(dir)` loads
it like any other and it travels with the run (and with a Hugging Face export).
"""

from __future__ import annotations

from typing import Iterable

from bigjax.errors import DataError, first_line
from bigjax.paths import PathLike, local_dir, local_staging, publish_dir, run_path

EOS, PAD = "<|endoftext|>", "<pad>"
MIN_VOCAB = 258


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: PathLike):
    """Train a byte-level BPE tokenizer (GPT-2 style) and save it under `out_dir` (a new dir,
    local or on object storage)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab size {vocab_size} is below the {MIN_VOCAB} that a byte-level BPE "
                        "needs (256 bytes + 2 special tokens)")
    if run_path(out_dir).exists():
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
    save_tokenizer(fast, out_dir)
    return load_tokenizer(out_dir)


def save_tokenizer(tok, out_dir: PathLike) -> None:
    """`save_pretrained` (local files only) into a staging dir, then moved into place: a crash
    never leaves a half-written tokenizer; if another process got there first (same content: the
    tokenizers trained here are deterministic), theirs is kept."""
    staging = local_staging(out_dir)
    tok.save_pretrained(staging)
    publish_dir(staging, run_path(out_dir))


def load_tokenizer(path: PathLike):
    """A Hugging Face tokenizer dir, local or on object storage (read through a local copy)."""
    from transformers import AutoTokenizer

    if not run_path(path).is_dir():
        raise DataError(f"tokenizer dir '{path}' does not exist (data.tokenizer)")
    try:
        with local_dir(path) as local:
            return AutoTokenizer.from_pretrained(local)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from '{path}': {first_line(e)}")
