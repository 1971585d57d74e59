"""The grain loader: seeded shuffle over epochs, each process reads only its own share, and local
batches become global sharded arrays. Its position is a small JSON-able dict for checkpoints.
"""

from __future__ import annotations

import collections
import math
import sys
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


class _ProcessRows:
    """Local element j -> the global stream's element at global batch j // L, row rows[j % L]:
    this process's rows of each global batch (a class so grain's workers can pickle it). With
    `source` (augmented images, `example_at_epoch`) the stream holds indices, read with their
    epoch."""

    def __init__(self, stream: grain.MapDataset, global_batch: int, rows: Sequence[int],
                 source=None):
        self.stream, self.global_batch, self.rows, self.source = stream, global_batch, rows, source

    def __call__(self, j: int) -> Example:
        g = j // len(self.rows) * self.global_batch + self.rows[j % len(self.rows)]
        item = self.stream[g]
        return item if self.source is None else \
            self.source.example_at_epoch(int(item), g // len(self.source))


def process_rows(global_batch: int, sharding: NamedSharding | None, process_index: int,
                 process_count: int) -> list[int]:
    """The rows of a global batch this process holds, in order: those of its devices' shards
    (what `make_array_from_process_local_data` fills from its local batch), else the p-th block."""
    local = _local_batch(global_batch, process_count)
    if sharding is not None:
        shards = sharding.addressable_devices_indices_map((global_batch,)).values()
        rows = sorted({r for idx in shards for r in range(global_batch)[idx[0]]})
        if len(rows) == local:
            return rows
    return list(range(process_index * local, (process_index + 1) * local))


class TrainLoader:
    """Endless shuffled batches; `state()` / `restore(state)` make resume exact.

    Order: one global shuffle per epoch (the same on every process: same seed, epoch folded in),
    cut into global batches of `global_batch` consecutive examples; batches may span an epoch
    boundary, so no example is ever lost to batching. Each process reads only its rows of each
    global batch, those its devices hold: the global batches, and so a step's every row-keyed
    draw (dropout masks), are those of one process, whatever the number of processes, and a run
    may resume on another number of processes with the exact next batch.

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
        if not n:
            raise DataError("the training data holds no examples")
        packed = hasattr(source, "packed_rows")
        if packed:
            # several texts per row (bigjax/data/pack_cls.py): it shuffles each epoch, takes this
            # process's share of the texts and packs it; batches are rows
            ds = source.packed_rows(seed=seed, shuffle=shuffle, process_index=process_index,
                                    process_count=process_count)
        else:
            # a source with `example_at_epoch(i, epoch)` (augmented images) is read by index, so
            # the element knows its epoch
            by_epoch = hasattr(source, "example_at_epoch")
            stream = grain.MapDataset.range(n) if by_epoch else grain.MapDataset.source(source)
            if shuffle:
                stream = stream.shuffle(seed=seed)  # before repeat: each epoch a new permutation
            rows = process_rows(global_batch, sharding, process_index, process_count)
            ds = grain.MapDataset.range(sys.maxsize).map(_ProcessRows(
                stream.repeat(None), global_batch, rows, source if by_epoch else None))
        self._batches = ds.batch(self.local_batch, drop_remainder=True)
        self._workers, self._threads = workers, threads
        # what a saved position is only valid for
        self._identity = {"examples": n, "global_batch": global_batch, "seed": seed,
                          "shuffle": shuffle, **getattr(source, "identity", {}),
                          **({"process_count": process_count} if packed else {})}  # packed per process
        self.sharding = sharding
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
