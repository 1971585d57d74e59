"""The grain loader: seeded shuffle over epochs, each process reads only its own share, and local
batches become global sharded arrays. Its position is a small JSON-able dict for checkpoints.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

Example = dict[str, np.ndarray]


def _local_batch(global_batch: int, process_count: int) -> int:
    from bigjax.errors import ConfigError
    if global_batch % process_count:
        raise ConfigError(
            f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
    return global_batch // process_count


def _absl_flags_ready() -> None:
    # grain's worker processes read absl flags; bigjax is no absl app, so take their defaults
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def to_global(local: Example, sharding: NamedSharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


class TrainLoader:
    """Endless shuffled batches; `state()` / `restore(state)` make resume exact.

    Order: one global shuffle per epoch (the same on every process: same seed, epoch folded in),
    cut to a multiple of the process count, then process p takes elements p, p+P, ... of it. So
    the processes' shares are disjoint, together cover the epoch once, and are equally long (the
    at most P-1 examples cut per epoch are counted in `dropped_per_epoch`). Batches may span an
    epoch boundary; no example is ever lost to batching.
    """

    def __init__(self, source: Sequence[Example], global_batch: int, *, seed: int, shuffle: bool,
                 sharding: NamedSharding | None, process_index: int = 0, process_count: int = 1,
                 workers: int = 0, threads: int = 0):
        from bigjax.errors import DataError
        self.local_batch = _local_batch(global_batch, process_count)
        n = len(source)
        usable = n - n % process_count
        if usable < process_count:
            raise DataError(f"the training data holds {n} examples, fewer than the "
                            f"{process_count} processes that share it")
        ds = grain.MapDataset.source(source)
        if shuffle:
            ds = ds.shuffle(seed=seed)  # before repeat: each epoch is a fresh permutation of it
        ds = ds[:usable][process_index::process_count].repeat(None)
        ds = ds.batch(self.local_batch, drop_remainder=True)
        # threads: grain reads elements of a batch concurrently; 0 = grain's default
        opts = grain.ReadOptions(num_threads=threads) if threads else None
        it_ds = ds.to_iter_dataset(opts)
        if workers > 0:
            _absl_flags_ready()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        self.sharding = sharding
        self._it = iter(it_ds)
        self.examples_per_epoch = usable // process_count
        self.dropped_per_epoch = n - usable

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        local = next(self._it)
        return local if self.sharding is None else to_global(local, self.sharding)

    def state(self) -> dict:
        return self._it.get_state()

    def restore(self, state: dict) -> None:
        self._it.set_state(state)


def eval_batches(source: Sequence[Example], global_batch: int, *, sharding: NamedSharding | None,
                 process_index: int = 0, process_count: int = 1, limit: int = 0):
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
        yield local if sharding is None else to_global(local, sharding)
