"""`bigjax data inspect`: the first examples after each transform, and the pipeline's throughput.

Stages: source records (raw text), tokenization (token ids per document), model examples (decoded
back to text, with their token counts), then the loader's speed in examples/s and tokens/s.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bigjax.config import Config
from bigjax.data.lm import PaddedDocs
from bigjax.data.lm_stream import StreamSource, wants_stream
from bigjax.data.pipeline import build_data
from bigjax.data.prepared import is_prepared, prepared_files
from bigjax.data.records import read_texts
from bigjax.data.sources import ReadStats, files_for
from bigjax.data.stream import Reading, Shard
from bigjax.data.stream_loader import make_train_loader


def _short(text: str, width: int) -> str:
    text = repr(text)
    return text if len(text) <= width else text[: width - 3] + "..."


def example_tokens(example: dict[str, np.ndarray], source: Any) -> int:
    """Real (non-padding) tokens of one model example."""
    if "attention_mask" in example:
        return int(example["attention_mask"].sum())
    if isinstance(source, PaddedDocs):
        return int(example["weights"].sum())
    return int(example["inputs"].shape[-1])  # packed windows hold no padding


def _token_ids(example: dict[str, np.ndarray], n: int) -> np.ndarray:
    ids = example["inputs"] if "inputs" in example else example["input_ids"]
    return ids[:n]


def measure_throughput(source: Any, batch: int, cfg: Config, seconds: float) -> dict[str, float]:
    """Examples/s and tokens/s of the loader (one process, no device transfer) over `seconds`."""
    loader = make_train_loader(source, batch, seed=cfg.seed, shuffle=cfg.data.shuffle, sharding=None,
                         workers=cfg.data.workers, threads=cfg.data.threads)
    next(loader)  # waits for start-up (threads, worker processes), which is not throughput
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds / 5:  # then fill the prefetch buffers
        next(loader)
    examples = tokens = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(loader)
        examples += len(b["weights"])
        if "attention_mask" in b:
            tokens += int(b["attention_mask"].sum())
        elif isinstance(source, PaddedDocs):
            tokens += int(b["weights"].sum())
        else:
            tokens += int(np.prod(b["inputs"].shape))
    dt = time.perf_counter() - t0
    loader.close()
    return {"examples_per_s": examples / dt, "tokens_per_s": tokens / dt, "seconds": dt}


def inspect(cfg: Config, run_dir: str, n: int = 3, seconds: float = 2.0, width: int = 300) -> str:
    lines: list[str] = []
    out = lines.append
    streamed = cfg.task.name == "causal_lm" and wants_stream(cfg)
    if streamed:  # the first records of the first shard, not the whole corpus
        d = cfg.data
        tfds = (d.source, d.split, d.dir) if d.source.startswith("tfds:") else None
        prepared = is_prepared(d.source)
        first = prepared_files(d.source)[0] if prepared else files_for(d.source)[0]
        shard = Shard(first) if tfds is None else Shard("", 0, n)
        reading = Reading(d.text_field, d.on_bad_rows, tfds, prepared)
        texts = [t for t, _ in zip((t for t in reading.texts(shard) if t is not None), range(n))]
        stats = ReadStats(rows=len(texts))
    else:
        texts, stats = read_texts(cfg, "train")
    out(f"== source: {cfg.data.source} ({'streamed; ' if streamed else ''}{stats.summary()})")
    for i, t in enumerate(texts[:n]):
        out(f"[{i}] {_short(t, width)}")
    t0 = time.perf_counter()
    data = build_data(cfg, run_dir)
    build_s = time.perf_counter() - t0
    tok = data.tokenizer
    out(f"== tokenized ({type(tok).__name__}, {len(tok)} tokens in the vocabulary)")
    ids_of = [t.tolist() if isinstance(t, np.ndarray) else None for t in texts[:n]]
    if any(i is None for i in ids_of):
        ids_of = tok(texts[:n], add_special_tokens=False)["input_ids"]
    for i, ids in enumerate(ids_of):  # a prepared dir's documents are token ids already
        out(f"[{i}] {len(ids)} tokens: {ids[:16]}{' ...' if len(ids) > 16 else ''}")
    train = data.train
    if isinstance(train, StreamSource):  # the first windows of process 0's stream
        it = iter(train.pipeline(0, 1, seed=cfg.seed, shuffle=cfg.data.shuffle))
        train = [next(it) for _ in range(max(n, 1))]
    count = "streamed" if isinstance(data.train, StreamSource) else str(len(data.train))
    out(f"== examples: {count} train, {len(data.eval)} eval "
        f"(built in {build_s:.1f}s; {', '.join(f'{k}={v}' for k, v in data.info.items())})")
    for i in range(min(n, len(train))):
        ex = train[i]
        k = example_tokens(ex, data.train)
        keys = ", ".join(f"{name}{list(v.shape)}" for name, v in ex.items())
        out(f"[{i}] {k} tokens, {float(ex['weights'].sum()):g} weighted ({keys})")
        out(f"    {_short(tok.decode(_token_ids(ex, k)), width)}")
    batch = (cfg.train.batch_size if isinstance(data.train, StreamSource)
             else min(cfg.train.batch_size, len(data.train)))
    speed = measure_throughput(data.train, batch, cfg, seconds)
    out(f"== throughput (batch {batch}, workers={cfg.data.workers}, {speed['seconds']:.1f}s): "
        f"{speed['examples_per_s']:.0f} examples/s, {speed['tokens_per_s']:.0f} tokens/s")
    return "\n".join(lines)
