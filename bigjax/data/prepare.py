"""`bigjax data prepare`: tokenize a file corpus once into ArrayRecord shards plus a manifest, so
training reads token ids (`data.source: DIR`) and tokenizes nothing.

One shard per input file (`shard-00012.array_record`, records = int32 token ids of one document,
raw bytes, no end-of-document token), written under a temporary name and renamed, with a small
`shard-00012.json` beside it (its input file, documents, tokens) written last: a shard whose JSON
exists is finished and skipped by a rerun, so an interrupted prepare resumes. Process p of P takes
input files p, p+P, ...; process 0 writes `manifest.json` (tokenizer hash, documents and tokens per
shard) once every shard is there.

`--out` is a local path or a URI (`gs://`, `s3://`) through etils.epath: a shard is written to a
local file first (ArrayRecord writes only local files), then renamed into place or uploaded as one
object, and its JSON is written after it, so "JSON there = shard finished" holds on both.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from etils import epath

from bigjax.config import Config
from bigjax.data.prepared import FORMAT, MANIFEST, is_prepared, tokenizer_hash
from bigjax.errors import DataError
from bigjax.paths import copy_tree, local_target, put_file, run_path, run_str, write_text


def _write_shard(out: epath.Path, index: int, path: str, cfg: Config, tok: Any) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    from bigjax.data.sources import RecordReader
    name = f"shard-{index:05d}.array_record"
    tmp = local_target(out / name)
    reader = RecordReader(cfg.data.on_bad_rows, (cfg.data.text_field,))
    writer = ArrayRecordWriter(tmp, "group_size:1")
    docs = tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal docs, tokens
        for ids in tok(batch, add_special_tokens=False)["input_ids"] if batch else []:
            writer.write(np.asarray(ids, np.int32).tobytes())
            docs, tokens = docs + 1, tokens + len(ids)
        batch.clear()

    for row in reader.read(path):
        batch.append(str(row[cfg.data.text_field]))
        if len(batch) == 256:  # tokenized in batches: the fast tokenizer's batch path
            flush()
    flush()
    writer.close()
    put_file(tmp, out / name)
    info = {"file": name, "input": path, "input_bytes": os.path.getsize(path), "docs": docs,
            "tokens": tokens, "skipped_rows": reader.stats.skipped_total}
    write_text(out / f"shard-{index:05d}.json", json.dumps(info))  # last: the shard is done
    return info


def prepare(cfg: Config, out: str, process_index: int = 0, process_count: int = 1,
            wait_s: float = 3600) -> dict:
    """Tokenize this process's share of `data.source`'s files into `out`; returns what it did
    (`written`, `skipped` shards, `tokens`, `seconds`), and the manifest on process 0."""
    from bigjax.data.lm import get_tokenizer
    from bigjax.data.lm_stream import tokenizer_sample
    from bigjax.data.sources import files_for

    src = cfg.data.source
    if src.startswith(("tfds:", "builtin:", "sklearn:")) or is_prepared(src):
        raise DataError(f"data.source: data prepare reads a file glob, got '{src}'")
    files = files_for(src)
    out_dir = run_path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the tokenizer: data.tokenizer, else a BPE trained on the bounded sample, kept in out/
    tok = get_tokenizer(cfg, tokenizer_sample(cfg, files, 0), run_str(out))
    tok_dir = cfg.data.tokenizer or str(out_dir / "tokenizer")
    if cfg.data.tokenizer and process_index == 0:  # the same files, so the same hash
        copy_tree(run_path(cfg.data.tokenizer), out_dir / "tokenizer")
    t0 = time.perf_counter()
    written = skipped = tokens = 0
    for i in range(process_index, len(files), process_count):
        if (out_dir / f"shard-{i:05d}.json").is_file():
            skipped += 1  # finished by an earlier run
            continue
        tokens += _write_shard(out_dir, i, files[i], cfg, tok)["tokens"]
        written += 1
    done = {"written": written, "skipped": skipped, "tokens": tokens,
            "seconds": time.perf_counter() - t0}
    if process_index != 0:
        return done
    deadline = time.time() + wait_s  # the other processes' shards
    infos_paths = [out_dir / f"shard-{i:05d}.json" for i in range(len(files))]
    while not all(p.is_file() for p in infos_paths):
        if time.time() > deadline:
            raise DataError(f"data prepare: shards of other processes missing in {out} after "
                            f"{wait_s:.0f} s; run the same command again to finish them")
        time.sleep(1)
    shards = [json.loads(p.read_text(encoding="utf-8")) for p in infos_paths]
    manifest = {"format": FORMAT, "source": src, "tokenizer": tokenizer_hash(tok_dir),
                "tokenizer_dir": tok_dir, "eos_token_id": tok.eos_token_id,
                "vocab": len(tok), "docs": sum(s["docs"] for s in shards),
                "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1))
    return {**done, "manifest": manifest}
