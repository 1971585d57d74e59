"""Reading a prepared dir (`bigjax data prepare`): its manifest, its shards of token ids, and the
check that training uses the tokenizer the shards were made with."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator

import numpy as np

from bigjax.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "bigjax-tokens-1"


def is_prepared(source: str) -> bool:
    return os.path.isfile(os.path.join(source, MANIFEST))


def tokenizer_hash(path: str) -> str:
    """Hash of a tokenizer dir's files that define the ids (not its README or config noise)."""
    h = hashlib.sha1()
    for name in sorted(os.listdir(path)):
        if name in ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt",
                    "special_tokens_map.json"):
            with open(os.path.join(path, name), "rb") as fh:
                h.update(name.encode() + b"\0" + fh.read())
    return h.hexdigest()[:16]


def read_manifest(source: str) -> dict:
    try:
        with open(os.path.join(source, MANIFEST), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as e:
        raise DataError(f"data.source: {source}/{MANIFEST} is unreadable ({e})")
    if manifest.get("format") != FORMAT:
        raise DataError(f"data.source: {source} holds format {manifest.get('format')!r}, "
                        f"expected {FORMAT!r}; prepare it again with this bigjax")
    return manifest


def prepared_files(source: str) -> list[str]:
    return [os.path.join(source, s["file"]) for s in read_manifest(source)["shards"]]


def check_tokenizer(source: str, tokenizer_dir: str) -> str:
    """The tokenizer dir to train with: `tokenizer_dir` (data.tokenizer) if it is the one the
    shards were made with, else an error; "" = the prepared dir's own copy."""
    manifest = read_manifest(source)
    own = os.path.join(source, "tokenizer")
    path = tokenizer_dir or own
    if not os.path.isdir(path):
        raise DataError(f"data.tokenizer: '{path}' does not exist")
    if tokenizer_hash(path) != manifest["tokenizer"]:
        raise DataError(
            f"data.source: {source} was prepared with tokenizer {manifest['tokenizer']} "
            f"({manifest.get('tokenizer_dir', own)}), but data.tokenizer '{path}' is "
            f"{tokenizer_hash(path)}; leave data.tokenizer empty to use {own}, or prepare again")
    return path


def token_records(path: str, skip: int = 0) -> Iterator[np.ndarray]:
    """The documents of one prepared shard from the `skip`-th on, as int32 token ids."""
    from array_record.python.array_record_module import ArrayRecordReader
    reader = ArrayRecordReader(path)
    try:
        for i in range(skip, reader.num_records()):
            yield np.frombuffer(reader.read([i])[0], np.int32)
    finally:
        reader.close()
