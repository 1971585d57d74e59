"""Checkpoint speed on one train state: how long an async save blocks the loop, a synchronous save,
a restore, next to the raw disk write/read speed of the same number of bytes with plain numpy.

    .venv/bin/python bench/checkpoint_bench.py                       # ~100M-parameter GPT
    .venv/bin/python bench/checkpoint_bench.py --d-model 64 --n-layers 1 --repeats 1   # smoke run

Goals (README "Performance"): async blocking < 10% of a synchronous save; restore > 50% of raw read.
The raw figures go through the page cache exactly like orbax does (no fsync on either side).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bigjax import mesh as mesh_lib  # noqa: E402
from bigjax.build import build  # noqa: E402
from bigjax.checkpoint import Checkpointer, abstract_with_shardings  # noqa: E402
from bigjax.config import load_config, to_dict, updated  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=3, help="median of this many of each")
    p.add_argument("--dir", default="", help="where to write (default: a temp dir on this disk)")
    p.add_argument("--cold", action="store_true",
                   help="evict the files from the page cache before every read (raw and restore)")
    return p.parse_args()


def evict(path: str) -> None:
    """Drop a tree's files from the page cache (no root needed): the next read hits the disk."""
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _median_time(fn, repeats: int, before=None) -> float:
    times = []
    for i in range(repeats):
        if before is not None:
            before(i)
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    a = _args()
    cfg = load_config(None, [f"model.d_model={a.d_model}", f"model.n_layers={a.n_layers}",
                             f"model.n_heads={max(1, a.d_model // 64)}", f"model.d_ff={4 * a.d_model}",
                             f"model.vocab_size={a.vocab}", "train.steps=10"])
    parts = build(cfg, mesh_lib.make_mesh(cfg.mesh))  # the trainer's state and shardings
    abstract, shardings = parts.abstract, parts.shardings
    state = jax.block_until_ready(parts.init_state())
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    mb = n_bytes / 1e6
    meta = {"step": 0, "config": to_dict(cfg)}
    root = tempfile.mkdtemp(prefix="bigjax_ckpt_bench_", dir=a.dir or None)
    try:
        cfg = updated(cfg, {"checkpoint.keep": a.repeats + 1})
        asy = Checkpointer(os.path.join(root, "async"), cfg.checkpoint)
        asy.save(1000, state, {}, meta, force=True)  # warm-up: handlers, thread pools, first dirs
        asy.wait()
        total: list[float] = []

        def async_save(i: int) -> None:
            t0 = time.perf_counter()
            asy.save(i + 1, state, {}, meta, force=True)
            blocked = time.perf_counter() - t0
            asy.wait()
            total.append(time.perf_counter() - t0)
            blocked_times.append(blocked)

        blocked_times: list[float] = []
        _median_time(async_save, a.repeats)
        t_block, t_async_total = statistics.median(blocked_times), statistics.median(total)

        syn = Checkpointer(os.path.join(root, "sync"),
                           updated(cfg, {"checkpoint.async_save": False}).checkpoint)
        syn.save(1000, state, {}, meta, force=True)
        t_sync = _median_time(lambda i: syn.save(i + 1, state, {}, meta, force=True), a.repeats)

        target = abstract_with_shardings(abstract, shardings)
        cold = (lambda i: evict(syn.directory)) if a.cold else None
        t_restore = _median_time(
            lambda i: jax.block_until_ready(syn.restore(i + 1, target).state), a.repeats, cold)
        asy.close()
        syn.close()

        # Raw disk: the same bytes as one numpy file per array, written then read back.
        host = [np.asarray(x) for x in jax.tree.leaves(state)]
        raw_dir = os.path.join(root, "raw")

        def raw_write(i: int) -> None:
            d = os.path.join(raw_dir, str(i))
            os.makedirs(d)
            for j, x in enumerate(host):
                x.tofile(os.path.join(d, f"{j}.bin"))

        def raw_read(i: int) -> None:
            d = os.path.join(raw_dir, str(i))
            for j, x in enumerate(host):
                np.fromfile(os.path.join(d, f"{j}.bin"), dtype=x.dtype)

        t_raw_w = _median_time(raw_write, a.repeats)
        t_raw_r = _median_time(raw_read, a.repeats, (lambda i: evict(raw_dir)) if a.cold else None)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = [("async save: loop blocked", t_block, None),
            ("async save: until complete", t_async_total, mb / t_async_total),
            ("sync save", t_sync, mb / t_sync),
            ("restore (sharded)", t_restore, mb / t_restore),
            ("raw numpy write", t_raw_w, mb / t_raw_w),
            ("raw numpy read", t_raw_r, mb / t_raw_r)]
    print(f"state: {n_bytes / 1e6:.1f} MB ({sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.1f}M "
          f"params + optimizer), {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"median of {a.repeats}, {'cold' if a.cold else 'page-cached'} reads")
    print(f"{'what':<28}{'seconds':>10}{'MB/s':>10}")
    for name, t, rate in rows:
        print(f"{name:<28}{t:>10.3f}{(f'{rate:.0f}' if rate else '-'):>10}")
    print(f"async blocking / sync save: {t_block / t_sync:.1%} (goal < 10%)")
    print(f"restore / raw read speed:   {t_raw_r / t_restore:.1%} (goal > 50%)")


if __name__ == "__main__":
    main()
