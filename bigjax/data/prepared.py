"""Reading a prepared dir (`bigjax data prepare`): its manifest, its shards of token ids, and the
check that training uses the tokenizer the shards were made with. The dir is local or a URI
(`gs://`, `s3://`): everything goes through etils.epath, and a remote shard is read from a local
temporary copy (ArrayRecord reads only local files), one shard at a time."""

from __future__ import annotations

import hashlib
import json
from typing import Iterator

import numpy as np

from bigjax.errors import BigjaxError, DataError
from bigjax.paths import PathLike, local_file, run_path

MANIFEST = "manifest.json"
FORMAT = "bigjax-tokens-1"


def is_prepared(source: str) -> bool:
    if "*" in source or source.startswith(("builtin:", "sklearn:", "tfds:")):
        return False  # a glob or a named corpus: no dir to probe (on object storage: no request)
    try:
        return (run_path(source, absolute=False) / MANIFEST).is_file()
    except BigjaxError:  # file://host/x: no prepared dir; the source's own checks say why
        return False


def tokenizer_hash(path: PathLike) -> str:
    """Hash of a tokenizer dir's files that define the ids (not its README or config noise)."""
    h = hashlib.sha1()
    for child in sorted(run_path(path).iterdir(), key=lambda p: p.name):
        if child.name in ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt",
                          "special_tokens_map.json"):
            h.update(child.name.encode() + b"\0" + child.read_bytes())
    return h.hexdigest()[:16]


def read_manifest(source: str) -> dict:
    try:
        manifest = json.loads((run_path(source) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"data.source: {source}/{MANIFEST} is unreadable ({e})")
    if manifest.get("format") != FORMAT:
        raise DataError(f"data.source: {source} holds format {manifest.get('format')!r}, "
                        f"expected {FORMAT!r}; prepare it again with this bigjax")
    return manifest


def prepared_files(source: str) -> list[str]:
    root = run_path(source, absolute=False)
    return [str(root / s["file"]) for s in read_manifest(source)["shards"]]


def check_tokenizer(source: str, tokenizer_dir: str) -> str:
    """The tokenizer dir to train with: `tokenizer_dir` (data.tokenizer) if it is the one the
    shards were made with, else an error; "" = the prepared dir's own copy."""
    manifest = read_manifest(source)
    own = str(run_path(source, absolute=False) / "tokenizer")
    path = tokenizer_dir or own
    if not run_path(path).is_dir():
        raise DataError(f"data.tokenizer: '{path}' does not exist")
    if tokenizer_hash(path) != manifest["tokenizer"]:
        raise DataError(
            f"data.source: {source} was prepared with tokenizer {manifest['tokenizer']} "
            f"({manifest.get('tokenizer_dir', own)}), but data.tokenizer '{path}' is "
            f"{tokenizer_hash(path)}; leave data.tokenizer empty to use {own}, or prepare again")
    return path


def token_records(path: str, skip: int = 0) -> Iterator[np.ndarray]:
    """The documents of one prepared shard from the `skip`-th on, as int32 token ids (a remote
    shard is downloaded whole first, and its copy removed once read or abandoned)."""
    from array_record.python.array_record_module import ArrayRecordReader
    with local_file(path) as local:
        reader = ArrayRecordReader(local)
        try:
            for i in range(skip, reader.num_records()):
                yield np.frombuffer(reader.read([i])[0], np.int32)
        finally:
            reader.close()
