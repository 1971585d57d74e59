"""The grain loader: seeded shuffle over epochs, each process reads only its own share, and local
batches become global sharded arrays. Its position is a small JSON-able dict for checkpoints.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from bigjax.errors import ConfigError, DataError

Example = dict[str, np.ndarray]


def _local_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ConfigError(
            f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
    return global_batch // process_count


def _absl_flags_ready() -> None:
    # grain's worker processes read absl flags; bigjax is no absl app, so take their defaults
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def unchanged(batch: Example) -> Example:
    """The default host-side batch edit (a task's optional `host_batch`, tasks.Task): none."""
    return batch


def to_global(local: Example, sharding: NamedSharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


class _EpochReader:
    """(position, index) -> source.example_at_epoch(index, epoch); a class so workers can pickle it."""

    def __init__(self, source, per_epoch: int):
        self.source, self.per_epoch = source, per_epoch

    def __call__(self, position: int, index: int) -> Example:
        return self.source.example_at_epoch(int(index), position // self.per_epoch)


class TrainLoader:
    """Endless shuffled batches; `state()` / `restore(state)` make resume exact.

    Order: one global shuffle per epoch (the same on every process: same seed, epoch folded in),
    cut to a multiple of the process count, then process p takes elements p, p+P, ... of it. So
    the processes' shares are disjoint, together cover the epoch once, and are equally long (the
    at most P-1 examples cut per epoch are counted in `dropped_per_epoch`). Batches may span an
    epoch boundary; no example is ever lost to batching.

    The pipeline is index-based (a grain MapDataset end to end), so its position is just the
    number of batches taken: the same on every process, independent of `workers` (a run may
    resume with more or fewer), and restored by starting the dataset at that batch.

    `prefetch()` reads up to `prefetch` batches ahead and puts them on the devices, so the step
    that needs one finds it there; the trainer calls it right after dispatching a step, while the
    device computes. `state()` is the position of the next batch `next()` returns, not of what
    was read ahead: a checkpoint resumes at the batch the step would have consumed.
    """

    def __init__(self, source: Sequence[Example], global_batch: int, *, seed: int, shuffle: bool,
                 sharding: NamedSharding | None, process_index: int = 0, process_count: int = 1,
                 workers: int = 0, threads: int = 0, prefetch: int = 0,
                 host_batch: Callable[[Example], Example] | None = None):
        self.local_batch = _local_batch(global_batch, process_count)
        self._host_batch = host_batch or unchanged
        n = len(source)
        usable = n - n % process_count
        if usable < process_count:
            raise DataError(f"the training data holds {n} examples, fewer than the "
                            f"{process_count} processes that share it")
        per_epoch = usable // process_count
        # a source with `example_at_epoch(i, epoch)` (augmented images) is read by index, so the
        # element knows its epoch: position // examples per process and epoch
        by_epoch = hasattr(source, "example_at_epoch")
        if hasattr(source, "packed_rows"):
            # several texts per row (bigjax/data/pack_cls.py): it shuffles each epoch, takes this
            # process's share as below and packs it; batches are rows
            ds = source.packed_rows(seed=seed, shuffle=shuffle, process_index=process_index,
                                    process_count=process_count)
        else:
            ds = grain.MapDataset.range(n) if by_epoch else grain.MapDataset.source(source)
            if shuffle:
                ds = ds.shuffle(seed=seed)  # before repeat: each epoch is a fresh permutation of it
            ds = ds[:usable][process_index::process_count].repeat(None)
        if by_epoch:
            ds = ds.map_with_index(_EpochReader(source, per_epoch))
        self._batches = ds.batch(self.local_batch, drop_remainder=True)
        self._workers, self._threads = workers, threads
        # what a saved position is only valid for
        self._identity = {"examples": n, "global_batch": global_batch, "seed": seed,
                          "shuffle": shuffle, "process_count": process_count,
                          **getattr(source, "identity", {})}
        self.sharding = sharding
        self.examples_per_epoch = per_epoch
        self.dropped_per_epoch = n - usable
        self._depth = prefetch
        self._ahead: collections.deque = collections.deque()  # read, on the devices, not consumed
        self._start(0)

    def _start(self, taken: int) -> None:
        ds = self._batches[taken:] if taken else self._batches
        # threads: grain reads the elements of a batch concurrently; 0 = grain's default
        opts = grain.ReadOptions(num_threads=self._threads) if self._threads else None
        it_ds = ds.to_iter_dataset(opts)
        if self._workers > 0:
            _absl_flags_ready()
            # a deeper per-worker buffer than grain's 1 hides the hand-over latency: 190 -> 280
            # batches/s of 16x128 with one worker on a loaded 2-core machine
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self._workers, per_worker_buffer_size=8))
        self._it, self._taken = iter(it_ds), taken

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def _read(self) -> dict[str, Any]:
        local = self._host_batch(next(self._it))
        self._taken += 1
        return local if self.sharding is None else to_global(local, self.sharding)

    def __next__(self) -> dict[str, Any]:
        return self._ahead.popleft() if self._ahead else self._read()

    def prefetch(self) -> None:
        """Read batches ahead (and start their transfer to the devices) up to the depth."""
        while len(self._ahead) < self._depth:
            self._ahead.append(self._read())

    def close(self) -> None:
        """Stops worker processes and frees their shared memory (a no-op without workers)."""
        self._ahead.clear()
        self._it.close()

    def metrics(self) -> dict[str, int]:
        """Counts for the logged rows (none here; a streamed mixture's tokens per source)."""
        return {}

    def state(self) -> dict:
        """JSON-able position of the next batch `next()` returns (batches read ahead are not
        counted), stored in checkpoints with orbax JsonSave."""
        return {"batches_taken": self._taken - len(self._ahead), **self._identity}

    def restore(self, state: dict) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("batches_taken"), int):
            raise DataError(f"the checkpoint's data position {str(state)[:80]} is not a bigjax "
                            "loader state (expected batches_taken and the data it belongs to)")
        changed = [f"{k} {state.get(k)!r} -> {v!r}" for k, v in self._identity.items()
                   if state.get(k) != v]
        if changed:
            raise DataError(
                "the checkpoint's data position belongs to other data or batching ("
                + ", ".join(changed) + "), so the run cannot continue with the exact next batch; "
                "restore the data.* and train.batch_size settings, or start a new run.dir")
        self._it.close()  # stops the old worker processes, if any
        self._ahead.clear()
        self._start(state["batches_taken"])


def eval_batches(source: Sequence[Example], global_batch: int, *, sharding: NamedSharding | None,
                 process_index: int = 0, process_count: int = 1, limit: int = 0,
                 host_batch: Callable[[Example], Example] | None = None):
    """The whole split once, in order; the last batch is padded with weight-0 rows.

    Every process yields the same number of batches (collectives need it), each holding its share.
    """
    local_batch = _local_batch(global_batch, process_count)
    n_batches = math.ceil(len(source) / global_batch)
    if limit:
        n_batches = min(n_batches, limit)
    mine = range(process_index, len(source), process_count)
    template = source[0]
    for b in range(n_batches):
        rows = [source[i] for i in mine[b * local_batch:(b + 1) * local_batch]]
        pad = local_batch - len(rows)
        rows += [{k: np.zeros_like(v) for k, v in template.items()}] * pad
        local = {k: np.stack([r[k] for r in rows]) for k in template}
        local = (host_batch or unchanged)(local)
        yield local if sharding is None else to_global(local, sharding)
