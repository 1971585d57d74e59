"""The loader of a streamed corpus: each process batches its own pipeline (bigjax.data.stream),
and its position is the grain iterator state of every process, gathered into one JSON dict for
the checkpoint (orbax writes it from process 0)."""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from bigjax.data.lm_stream import MixtureSource, StreamSource
from bigjax.data.loader import (Example, TrainLoader, _absl_flags_ready, _local_batch, to_global,
                                unchanged)
from bigjax.errors import DataError


def gather_json(value: Any, process_count: int) -> list:
    """Every process's `value` (JSON-able), in process order; a collective on several processes."""
    if process_count == 1:
        return [value]
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([len(raw)], np.int32)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(raw)] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(process_count, -1)
    return [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes)]


class StreamLoader(TrainLoader):
    """Endless batches of process `process_index`'s share of a streamed corpus.

    `state()` holds every process's iterator state, taken before the next batch `next()` returns
    (batches read ahead are not counted), and what it is only valid for (corpus, seq_len, batch,
    seed, shuffling, process count, workers: each worker packs its own shards, so another worker
    count is another stream). `restore` puts each process back at its own state.
    """

    def __init__(self, source: StreamSource | MixtureSource, global_batch: int, *, seed: int, shuffle: bool,
                 sharding: NamedSharding | None, process_index: int = 0, process_count: int = 1,
                 workers: int = 0, threads: int = 0, prefetch: int = 0,
                 host_batch: Callable[[dict], dict] | None = None):
        import collections
        self._host_batch = host_batch or unchanged
        self.local_batch = _local_batch(global_batch, process_count)
        source.check_shares("(stream)", process_count, workers)
        self._ds = source.pipeline(process_index, process_count, seed=seed, shuffle=shuffle,
                                   workers=workers).batch(self.local_batch, drop_remainder=True)
        self._workers, self._threads = workers, threads
        self._index, self._count = process_index, process_count
        self._identity = {"stream": source.fingerprint, "seq_len": source.seq_len,
                          "global_batch": global_batch, "seed": seed, "shuffle": shuffle,
                          "shuffle_windows": source.shuffle_windows,
                          "process_count": process_count, "workers": workers}
        self.sharding = sharding
        self._depth = prefetch
        # (iterator state before, batch, tokens per source) of batches read ahead
        self._ahead: collections.deque = collections.deque()
        # a mixture's tokens supplied by each source to consumed batches, this process
        self._names = getattr(source, "names", [])
        self.source_tokens = [0] * len(self._names)
        self._start(None)

    def _start(self, state: dict | None) -> None:
        ds = self._ds
        if self._workers > 0:
            _absl_flags_ready()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self._workers, per_worker_buffer_size=8))
        self._it = iter(ds)
        if state is not None:
            self._it.set_state(state)

    def _read(self) -> tuple[Any, dict, list[int]]:
        before = {"iterator": self._it.get_state(), "source_tokens": list(self.source_tokens)}
        local = next(self._it)
        counts = []
        if "source_id" in local:  # a mixture: counted here, never seen by the step
            ids = local.pop("source_id")
            counts = (np.bincount(ids, minlength=len(self._names)) * local["inputs"].shape[1]).tolist()
        local = self._host_batch(local)
        return before, (local if self.sharding is None else to_global(local, self.sharding)), counts

    def __next__(self) -> dict[str, Any]:
        _, batch, counts = self._ahead.popleft() if self._ahead else self._read()
        self.source_tokens = [a + b for a, b in zip(self.source_tokens, counts)] or self.source_tokens
        return batch

    def local_state(self) -> Any:
        """This process's iterator state at the next batch `next()` returns (and the tokens its
        mixture sources supplied before it)."""
        if self._ahead:
            return {**self._ahead[0][0], "source_tokens": list(self.source_tokens)}
        return {"iterator": self._it.get_state(), "source_tokens": list(self.source_tokens)}

    def metrics(self) -> dict[str, int]:
        """For the logged row: training tokens each mixture source has supplied, all processes
        together (a collective on several processes: every process logs the same steps)."""
        if not self._names:
            return {}
        counts = np.sum(gather_json(self.source_tokens, self._count), axis=0)
        return {f"source_tokens_{i}": int(n) for i, n in enumerate(counts)}

    def state(self) -> dict:
        """A collective on several processes: every process calls it at the same step."""
        return {"processes": gather_json(self.local_state(), self._count), **self._identity}

    def restore(self, state: dict) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("processes"), list):
            kind = ("an in-memory loader's position (batches_taken)" if isinstance(state, dict)
                    and "batches_taken" in state else f"{str(state)[:80]}")
            raise DataError(
                f"the checkpoint's data position is {kind}, not a streaming one; the run was "
                f"saved with data.stream off: set data.stream=false, or start a new run.dir")
        changed = [f"{k} {state.get(k)!r} -> {v!r}" for k, v in self._identity.items()
                   if state.get(k) != v]
        if changed or len(state["processes"]) != self._count:
            raise DataError(
                "the checkpoint's streaming position belongs to other data or batching ("
                + ", ".join(changed or [f"{len(state['processes'])} processes"]) + "), so the "
                "run cannot continue with the exact next batch; restore the data.*, train.seq_len "
                "and train.batch_size settings and the process count, or start a new run.dir")
        self._it.close()
        self._ahead.clear()
        mine = state["processes"][self._index]
        self.source_tokens = list(mine["source_tokens"]) or self.source_tokens
        self._start(mine["iterator"])

    def close(self) -> None:
        self._ahead.clear()
        close = getattr(self._it, "close", None)
        if close:
            close()


def make_train_loader(source: Sequence[Example] | StreamSource | MixtureSource,
                      global_batch: int, **kw) -> TrainLoader:
    """The loader for a builder's training source: streamed, or random access (in memory)."""
    cls = StreamLoader if isinstance(source, (StreamSource, MixtureSource)) else TrainLoader
    return cls(source, global_batch, **kw)
