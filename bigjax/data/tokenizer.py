"""Tokenizers: load a Hugging Face tokenizer from a local dir, or train a byte-level BPE.

A trained tokenizer is saved with `save_pretrained`, so `AutoTokenizer.from_pretrained(dir)` loads
it like any other and it travels with the run (and with a Hugging Face export). Loading reads
tokenizer.json with the `tokenizers` library (`Tokenizer`), without importing transformers.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from bigjax.errors import DataError, first_line
from bigjax.paths import PathLike, local_dir, local_staging, publish_dir, run_path

EOS, PAD = "<|endoftext|>", "<pad>"
MIN_VOCAB = 258


def bpe_backend(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style) trained on `texts`, as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab size {vocab_size} is below the {MIN_VOCAB} that a byte-level BPE "
                        "needs (256 bytes + 2 special tokens)")
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


BPE_SPECIALS = {"eos_token": EOS, "pad_token": PAD, "bos_token": EOS}


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: PathLike):
    """Train a byte-level BPE tokenizer and save it under `out_dir` (a new dir, local or on
    object storage)."""
    if run_path(out_dir).exists():
        raise DataError(f"tokenizer output '{out_dir}' already exists; choose a new directory")
    save_tokenizer(Tokenizer.new(bpe_backend(texts, vocab_size), BPE_SPECIALS), out_dir)
    return load_tokenizer(out_dir)


def save_tokenizer(tok, out_dir: PathLike) -> None:
    """`save_pretrained` (local files only) into a staging dir, then moved into place: a crash
    never leaves a half-written tokenizer; if another process got there first (same content: the
    tokenizers trained here are deterministic), theirs is kept."""
    staging = local_staging(out_dir)
    tok.save_pretrained(staging)
    publish_dir(staging, run_path(out_dir))


def load_tokenizer(path: PathLike):
    """A Hugging Face tokenizer dir, local or on object storage (read through a local copy): a
    `Tokenizer` when it has a tokenizer.json (every fast tokenizer, and all that bigjax writes),
    else transformers' `AutoTokenizer` (vocab.txt or sentencepiece only: it converts them)."""
    if not run_path(path).is_dir():
        raise DataError(f"tokenizer dir '{path}' does not exist (data.tokenizer)")
    root = run_path(path)
    try:
        if (root / "tokenizer.json").is_file():  # read in place, local or object storage
            return Tokenizer({f: (root / f).read_bytes() for f in FILES if (root / f).is_file()})
        with local_dir(path) as local:
            from transformers import AutoTokenizer
            return AutoTokenizer.from_pretrained(local)
    except Exception as e:  # tokenizers raises its own types, transformers OSError/ValueError
        raise DataError(f"cannot load a tokenizer from '{path}': {first_line(e)}")


FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
         "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


class Tokenizer:
    """What bigjax needs of a Hugging Face fast tokenizer, on the `tokenizers` library alone:
    tokenizer.json does the work and tokenizer_config.json / special_tokens_map.json name the
    special tokens, as transformers' PreTrainedTokenizerFast reads them (tests compare the two on
    real tokenizers). transformers would import itself and torch: ~4 s of every command."""

    def __init__(self, files: dict[str, bytes]):
        from tokenizers import Tokenizer as Backend

        self.files = files  # the dir's own files: saving copies them, byte for byte
        self.backend = Backend.from_str(files["tokenizer.json"].decode("utf-8"))
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
            if name in files:
                config.update(json.loads(files[name]))
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        self.special_tokens = {r: _content(config.get(f"{r}_token")) for r in ROLES}
        for role, token in self.special_tokens.items():  # eos_token, eos_token_id, ...
            setattr(self, f"{role}_token", token)
            setattr(self, f"{role}_token_id", None if token is None else
                    self.backend.token_to_id(token))
        ids = [getattr(self, f"{r}_token_id") for r in ROLES]
        ids += [self.backend.token_to_id(_content(t)) for t in extra]
        self.all_special_ids = sorted({i for i in ids if i is not None})
        self._configured: dict[tuple, Any] = {}

    @classmethod
    def new(cls, backend, specials: dict[str, str]) -> "Tokenizer":
        """A tokenizer made here, with the files transformers' `save_pretrained` would write of
        `PreTrainedTokenizerFast(tokenizer_object=backend, **specials)` (tested)."""
        backend.add_special_tokens(list(dict.fromkeys(specials.values())))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "model_max_length": int(1e30), **specials}
        return cls({"tokenizer.json": backend.to_str().encode("utf-8"),
                    "tokenizer_config.json": json.dumps(config, indent=1).encode("utf-8")})

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def _for(self, max_length: int | None, pad: bool):
        """A copy of the backend set to truncate / pad (setting the shared one would race)."""
        key = (max_length, pad)
        if key not in self._configured:
            from tokenizers import Tokenizer as Backend

            b = Backend.from_str(self.backend.to_str())
            b.no_truncation(), b.no_padding()
            if max_length is not None:
                b.enable_truncation(max_length, strategy="longest_first", direction="right")
            if pad:
                token = self.special_tokens["pad"]
                b.enable_padding(direction="right", pad_id=self.pad_token_id or 0, pad_type_id=0,
                                 pad_token=token or "[PAD]", length=max_length)
            self._configured[key] = b
        return self._configured[key]

    def __call__(self, texts, add_special_tokens: bool = True, truncation: bool = False,
                 max_length: int | None = None, padding: bool | str = False,
                 return_token_type_ids: bool = True, return_attention_mask: bool = True):
        """transformers' call for the uses here: a str or a list of them -> input_ids
        (attention_mask, token_type_ids), truncated to / padded to exactly `max_length`."""
        if padding not in (False, "max_length") or (padding and max_length is None):
            raise ValueError(f"padding={padding!r}: only 'max_length' with a max_length is supported")
        one = isinstance(texts, str)
        encs = self._for(max_length if truncation else None, bool(padding)).encode_batch(
            [texts] if one else list(texts), add_special_tokens=add_special_tokens)
        out = {"input_ids": [e.ids for e in encs]}
        if return_attention_mask:
            out["attention_mask"] = [e.attention_mask for e in encs]
        if return_token_type_ids:
            out["token_type_ids"] = [e.type_ids for e in encs]
        return {k: v[0] for k, v in out.items()} if one else out

    def convert_ids_to_tokens(self, ids) -> list[str | None]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean_up_spaces else text

    def save_pretrained(self, out: PathLike) -> None:
        root = run_path(out)
        root.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (root / name).write_bytes(data)

    def __getstate__(self):  # to grain's worker processes: the files, not the Rust objects
        return {"files": self.files}

    def __setstate__(self, state):
        self.__init__(state["files"])


def _content(token) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation and contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
