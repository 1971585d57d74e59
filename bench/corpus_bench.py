"""Streaming LM data at two corpus sizes: is memory and start-up flat in corpus size, and does the
loader outrun the train step?

    .venv/bin/python bench/corpus_bench.py --dir /data/cache --repeat 2   # 10 MB and 2 GB
    .venv/bin/python bench/corpus_bench.py --large-mb 200        # what fits a shared machine
    .venv/bin/python bench/corpus_bench.py --large-mb 20 --steps 5 --seconds 2   # a smoke run

Writes deterministic synthetic corpora (JSONL files of `--file-mb` each, documents of seeded
word salad drawn from a Zipf-like vocabulary; every CPU writes files, ~2 min for 2 GB on 2 cores)
under `--dir`, reused by later runs (`--dir` is the cache; delete it when done), trains one
tokenizer on a sample of
the small one (shared, so the rows differ only in the data path), then for each corpus runs
`configs/gpt_tiny.yaml` in a fresh process: data.stream=true for both sizes, and the in-memory
path for the small one. Per row: the training process's peak RSS (grain workers not included;
their peak is its own column), seconds from process start to the end of the first train step
(compiling included, the same for every row), the step's tokens/s (median over the logged steps)
and the streaming loader's tokens/s with data.workers=1 (steady state, measured after training in
the same process). `--repeat 2` runs the rows in two alternating rounds (on a busy machine:
quote medians). Goals (issue 10): peak RSS and first step at the large size within 1.25x of
the small one; loader >= 10x the step. Last, the tokens/s of `bigjax data prepare` (one process)
on the small corpus (`--prepare-only`: that row alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

T_START = time.time()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "gpt_tiny.yaml")


VOCAB = 20_000  # synthetic words w0..w19999, drawn Zipf-like (p ~ 1/rank)


def _write_file(job: tuple) -> None:
    """One JSONL file of ~`file_mb` MB: its bytes depend only on (seed, index, file_mb), so a
    corpus is the same whichever process writes which file."""
    import numpy as np

    path, seed, index, file_mb = job
    rng = np.random.default_rng([seed, index])
    words = np.array([f"w{i}" for i in range(VOCAB)])
    cdf = np.cumsum(1.0 / np.arange(1, VOCAB + 1))
    cdf /= cdf[-1]
    target = int(file_mb * 1e6)
    # ~5 bytes per word with its space: documents of 50..800 words to spare, cut at target
    lengths = rng.integers(50, 800, size=max(4, int(target / 5 / 425 * 1.5) + 4))
    ids = np.minimum(np.searchsorted(cdf, rng.random(int(lengths.sum()))), VOCAB - 1)
    drawn = words[ids].tolist()
    lines, size, start = [], 0, 0
    for n in lengths.tolist():  # plain words: the JSON needs no escaping
        line = '{"text": "' + " ".join(drawn[start:start + n]) + '"}\n'
        start += n
        lines.append(line)
        size += len(line)
        if size >= target:
            break
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)


def write_corpus(root: str, total_mb: int, file_mb: float, seed: int = 0) -> str:
    """JSONL files of ~file_mb each until total_mb, written by all CPUs; the same bytes for the
    same arguments. Reused when `root` holds a finished one (its `.complete` marker)."""
    from multiprocessing import Pool

    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    os.makedirs(root, exist_ok=True)
    n_files = max(1, int(round(total_mb / file_mb)))
    jobs = [(os.path.join(root, f"part{f:05d}.jsonl"), seed, f, file_mb) for f in range(n_files)]
    with Pool(os.cpu_count()) as pool:
        for _ in pool.imap_unordered(_write_file, jobs, chunksize=8):
            pass
    open(done, "w").close()
    return root


def overrides(args, corpus: str, tokenizer: str, stream: bool, run_dir: str) -> list[str]:
    return [f"data.source={corpus}/*.jsonl", f"data.tokenizer={tokenizer}",
            f"data.stream={'true' if stream else 'false'}", "data.workers=1",
            f"data.max_chars={args.eval_chars}", f"train.steps={args.steps}",
            "train.log_every=1", "train.eval_every=0", "train.eval_batches=2",
            "train.progress=false", "train.peak_tflops=1", "checkpoint.every=0",
            f"run.dir={run_dir}"]


def child(args) -> None:
    """One training process: prints one JSON line of its figures."""
    import resource

    import jax
    import numpy as np

    from bigjax.trainer import Trainer

    trainer = Trainer(CONFIG, args.overrides)
    step, first = trainer.parts.train_step, {}

    def timed(state, batch):
        out = step(state, batch)
        if not first:
            jax.block_until_ready(out)
            first["s"] = time.time() - T_START
        return out

    object.__setattr__(trainer.parts, "train_step", timed)  # frozen dataclass, bench only
    trainer.train()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with open(os.path.join(trainer.run_dir, "metrics.jsonl")) as fh:
        speeds = [r["tokens_per_s"] for r in map(json.loads, fh) if "tokens_per_s" in r]
    cfg = trainer.cfg
    loader_tok_s = float("nan")
    if cfg.data.stream is True:
        from bigjax.data.stream_loader import StreamLoader
        loader = StreamLoader(trainer.data.train, cfg.train.batch_size, seed=cfg.seed,
                              shuffle=True, sharding=None, workers=1)
        next(loader)  # workers started, first block read
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            next(loader)
            n += 1
        loader_tok_s = n * cfg.train.batch_size * cfg.train.seq_len / (time.perf_counter() - t0)
        loader.close()
    print(json.dumps({"peak_rss_mb": peak_mb, "worker_peak_rss_mb": workers_mb,
                      "first_step_s": first["s"],
                      "step_tok_s": float(np.median(speeds[1:] or speeds)),
                      "loader_tok_s": loader_tok_s}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/bigjax-corpus-bench")
    ap.add_argument("--small-mb", type=int, default=10)
    ap.add_argument("--large-mb", type=int, default=2000)
    ap.add_argument("--file-mb", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=10.0, help="loader measurement time")
    ap.add_argument("--eval-chars", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all rows, alternating")
    ap.add_argument("--prepare-only", action="store_true",
                    help="only time `data prepare` (one process) on the small corpus")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    if args.child:
        return child(args)

    t0 = time.time()
    name = lambda mb: os.path.join(args.dir, f"{mb}mb-files{args.file_mb:g}mb-v2")
    small = write_corpus(name(args.small_mb), args.small_mb, args.file_mb)
    large = write_corpus(name(args.large_mb), args.large_mb, args.file_mb)
    print(f"corpora ready in {time.time() - t0:.0f} s", flush=True)
    tokenizer = os.path.join(args.dir, "tokenizer")
    if not os.path.isdir(tokenizer):
        from bigjax.config import load_config
        from bigjax.data.lm import get_tokenizer
        from bigjax.data.lm_stream import split_inputs, tokenizer_sample
        cfg = load_config(CONFIG, [f"data.source={small}/*.jsonl", "data.stream=true",
                                   "data.tokenizer_sample_chars=5000000"])
        files, _, records, _ = split_inputs(cfg)
        get_tokenizer(cfg, tokenizer_sample(cfg, files, records), args.dir)
    if args.prepare_only:
        return prepare_row(args, small, tokenizer)
    rows = [("stream", args.small_mb, small, True), ("stream", args.large_mb, large, True),
            ("in-memory", args.small_mb, small, False)]
    print("| path | corpus | peak RSS (MB) | workers' peak RSS (MB) | first step (s) | "
          "step tok/s | loader tok/s (workers=1) | loader / step |")
    print("|---|---|---|---|---|---|---|---|")
    for path, mb, corpus, stream in rows * args.repeat:
        run_dir = os.path.join(args.dir, "runs", f"{path}-{mb}")
        subprocess.run(["rm", "-rf", run_dir], check=True)
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                              f"--seconds={args.seconds}", "--",
                              *overrides(args, corpus, tokenizer, stream, run_dir)],
                             capture_output=True, text=True, env=env, cwd=ROOT)
        if out.returncode:
            sys.exit(f"{path} {mb} MB failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = r["loader_tok_s"] / r["step_tok_s"]
        print(f"| {path} | {mb} MB | {r['peak_rss_mb']:.0f} | {r['worker_peak_rss_mb']:.0f} | "
              f"{r['first_step_s']:.1f} | {r['step_tok_s']:.0f} | {r['loader_tok_s']:.0f} | "
              f"{ratio:.1f} |", flush=True)
    prepare_row(args, small, tokenizer)


def prepare_row(args, corpus: str, tokenizer: str) -> None:
    """`bigjax data prepare` throughput: tokens/s of one process, batch-tokenizing each file."""
    import shutil

    from bigjax.config import load_config
    from bigjax.data.prepare import prepare
    out = os.path.join(args.dir, "prepared")
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(CONFIG, [f"data.source={corpus}/*.jsonl", f"data.tokenizer={tokenizer}"])
    done = prepare(cfg, out)
    print("\n| step | corpus | shards | tokens | seconds | throughput |\n|---|---|---|---|---|---|")
    print(f"| data prepare | {args.small_mb} MB | {done['written']} shards | "
          f"{done['tokens']} tokens | {done['seconds']:.1f} s | "
          f"{done['tokens'] / done['seconds']:.0f} tokens/s per process |", flush=True)


if __name__ == "__main__":
    main()
