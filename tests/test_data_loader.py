"""The grain loader: exact resume from saved state, disjoint per-process shards, eval padding."""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from bigjax.data.loader import TrainLoader, eval_batches, process_rows
from bigjax.errors import DataError


class Rows:
    """n examples whose `id` says which one it is."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"id": np.asarray([i], np.int32), "weights": np.ones(1, np.float32)}


def ids(batch):
    return batch["id"][:, 0].tolist()


def take(loader, k):
    return [ids(next(loader)) for _ in range(k)]


def loader(n=20, batch=4, pi=0, pc=1, seed=3, shuffle=True):
    return TrainLoader(Rows(n), batch, seed=seed, shuffle=shuffle, sharding=None,
                       process_index=pi, process_count=pc)


def test_resume_from_saved_state_yields_exactly_the_next_batches(tmp_path):
    uninterrupted = take(loader(), 12)  # 48 examples: crosses two epoch boundaries
    first = loader()
    assert take(first, 5) == uninterrupted[:5]
    # the state goes through a real orbax JSON checkpoint, as in the trainer
    with ocp.CheckpointManager(tmp_path / "ck", item_names=("data",)) as mgr:
        mgr.save(5, args=ocp.args.Composite(data=ocp.args.JsonSave(first.state())))
        mgr.wait_until_finished()
        saved = mgr.restore(5, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    resumed = loader()
    resumed.restore(saved)
    assert take(resumed, 7) == uninterrupted[5:]
    assert json.loads(json.dumps(saved)) == saved


def test_prefetched_batches_are_on_the_devices_and_not_in_the_saved_position():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    ahead = TrainLoader(Rows(20), 8, seed=3, shuffle=True, sharding=sharding, prefetch=2)
    plain = TrainLoader(Rows(20), 8, seed=3, shuffle=True, sharding=None)
    first = next(ahead)
    ahead.prefetch()  # what the trainer does right after dispatching the step
    assert all(isinstance(v, jax.Array) and v.sharding == sharding for b in ahead._ahead
               for v in b.values())
    assert ahead.state()["batches_taken"] == 1  # the step consumed one; two more were read
    resumed = TrainLoader(Rows(20), 8, seed=3, shuffle=True, sharding=None)
    resumed.restore(ahead.state())
    expected = [np.asarray(next(plain)["id"]) for _ in range(4)]
    assert np.array_equal(np.asarray(first["id"]), expected[0])
    assert np.array_equal(np.asarray(next(resumed)["id"]), expected[1])
    for i in (1, 2, 3):
        assert np.array_equal(np.asarray(next(ahead)["id"]), expected[i])
        ahead.prefetch()
    assert ahead.state()["batches_taken"] == 4


def test_each_epoch_is_a_new_permutation_of_all_examples():
    batches = take(loader(n=20, batch=4), 10)
    epoch1 = sum(batches[:5], [])
    epoch2 = sum(batches[5:], [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(20))
    assert epoch1 != epoch2 and epoch1 != list(range(20))
    assert sum(take(loader(shuffle=False), 5), []) == list(range(20))


def test_processes_read_their_rows_of_one_process_global_batches():
    """Each of P processes reads its block of every global batch: side by side they are one
    process's batches, whatever P, so row-keyed draws (dropout) and resume on another P match."""
    single = take(loader(n=21, batch=6), 10)  # 60 examples: crosses two epoch boundaries
    for pc in (2, 3):
        shards = [loader(n=21, batch=6, pi=p, pc=pc) for p in range(pc)]
        assert [s.local_batch for s in shards] == [6 // pc] * pc
        per_process = [take(s, 10) for s in shards]
        assert [sum(rows, []) for rows in zip(*per_process)] == single
    seen = sum(single, [])
    assert sorted(seen[:21]) == sorted(seen[21:42]) == list(range(21))  # each epoch once


def test_no_training_examples_is_a_clear_error():
    with pytest.raises(DataError, match="^the training data holds no examples$"):
        loader(n=0, batch=2, pc=2)


def test_rows_follow_the_batch_sharding_of_this_process():
    from types import SimpleNamespace

    # a process whose devices hold rows 2-3 and 6-7 of a batch of 8 (a mesh ordered that way)
    shards = SimpleNamespace(addressable_devices_indices_map=lambda shape: {
        0: (slice(2, 4),), 1: (slice(6, 8),)})
    assert process_rows(8, shards, 0, 2) == [2, 3, 6, 7]
    assert process_rows(8, None, 1, 2) == [4, 5, 6, 7]


def test_resume_on_another_number_of_processes_continues_the_same_batches():
    two = [loader(n=21, batch=6, pi=p, pc=2) for p in range(2)]
    for s in two:
        take(s, 4)
    one = loader(n=21, batch=6)
    one.restore(two[0].state())
    assert take(one, 3) == take(loader(n=21, batch=6), 7)[4:]


def test_eval_covers_the_split_once_per_process_with_weightless_padding():
    rows = Rows(11)
    per_process = [list(eval_batches(rows, 4, sharding=None, process_index=p, process_count=2))
                   for p in range(2)]
    assert len(per_process[0]) == len(per_process[1]) == 3  # ceil(11 / 4): same on every process
    real = []
    for batches in per_process:
        for b in batches:
            real += [i for i, w in zip(ids(b), b["weights"][:, 0]) if w > 0]
    assert sorted(real) == list(range(11))
    pad_weights = np.concatenate([b["weights"][:, 0] for b in per_process[1]])
    assert pad_weights.tolist() == [1, 1, 1, 1, 1, 0]  # process 1 holds 5 rows, 1 pad row


def test_resume_is_exact_across_worker_process_counts():
    # the position does not depend on data.workers: stop with a worker process, resume without
    # one and with one; all three continue exactly as the uninterrupted run
    from bigjax.data.lm import PackedWindows, TokenStream
    src = PackedWindows(TokenStream.from_docs([list(range(i, i + 7)) for i in range(40)], 999), 4)

    def make(workers):
        return TrainLoader(src, 4, seed=1, shuffle=True, sharding=None, workers=workers)

    whole = make(0)
    reference = [next(whole)["inputs"].tolist() for _ in range(6)]
    stopped = make(1)
    assert [next(stopped)["inputs"].tolist() for _ in range(2)] == reference[:2]
    saved = json.loads(json.dumps(stopped.state()))
    stopped.restore(saved)  # restoring in place restarts its workers at the same position
    assert [next(stopped)["inputs"].tolist() for _ in range(4)] == reference[2:]
    resumed = make(0)
    resumed.restore(saved)
    assert [next(resumed)["inputs"].tolist() for _ in range(4)] == reference[2:]


def test_a_position_from_other_data_is_refused():
    state = loader(n=20).state()
    with pytest.raises(DataError) as e:
        loader(n=21).restore(state)
    assert str(e.value) == (
        "the checkpoint's data position belongs to other data or batching (examples 20 -> 21), "
        "so the run cannot continue with the exact next batch; restore the data.* and "
        "train.batch_size settings, or start a new run.dir")
    with pytest.raises(DataError, match=r"position \{'next_index': 3\} is not a bigjax loader"):
        loader().restore({"next_index": 3})


def test_local_batches_become_global_arrays_sharded_over_the_batch_axis():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    plain = take(loader(n=40, batch=8), 3)
    sharded = TrainLoader(Rows(40), 8, seed=3, shuffle=True, sharding=sharding)
    for want in plain:
        batch = next(sharded)
        assert batch["id"].sharding == sharding and batch["id"].shape == (8, 1)
        assert [s.data.shape for s in batch["id"].addressable_shards] == [(1, 1)] * 8
        assert np.asarray(batch["id"])[:, 0].tolist() == want
