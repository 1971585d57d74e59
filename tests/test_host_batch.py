"""Causal-LM batches leave their segment ids on the host when no weighted position follows a
change of document (`CausalLM.host_batch`): the step then runs plain causal attention, with the
same loss and gradients as with the ids; the loaders and the evaluator apply it, one process only."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bigjax.build import one_device
from bigjax.data.lm import PackedWindows, PaddedDocs, TokenStream
from bigjax.data.loader import TrainLoader, eval_batches
from bigjax.tasks import CausalLM, crosses_documents
from spine import tiny_config

T = 16


def stack(rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def padded_docs(seed=0):
    """`data.pack: false`: one document per row, padded as its own segment with weight 0."""
    rng = np.random.default_rng(seed)
    docs = [list(rng.integers(1, 64, n)) for n in rng.integers(4, T, 16)]
    return stack([PaddedDocs(docs, eos_id=None, seq_len=T)[i] for i in range(16)])


def packed_windows(doc_len, seed=0):
    rng = np.random.default_rng(seed)
    docs = [list(rng.integers(1, 64, doc_len)) for _ in range(16 * T // doc_len + 2)]
    windows = PackedWindows(TokenStream.from_docs(docs, eos_id=None), T)
    return stack([windows[i] for i in range(16)])


def test_segment_ids_stay_only_where_a_weighted_position_follows_a_document_change():
    drop = lambda b: "segment_ids" not in CausalLM().host_batch(b)
    assert drop(padded_docs())
    # documents of exactly 10 windows: each window inside one (its last target, the next
    # document's first token, has weight 0)
    assert drop(packed_windows(doc_len=10 * T))
    assert not drop(packed_windows(doc_len=10 * T + 3))  # a window across a boundary
    assert not drop(packed_windows(doc_len=5))
    # the change at position 2 carries weight 0, a later position does not: kept
    seg, w = np.array([[0, 0, 1, 1, 1]]), np.array([[1, 1, 0, 0, 1]], np.float32)
    assert crosses_documents(seg, w) and not crosses_documents(seg, w * (np.arange(5) < 2))
    # one row of a batch is enough to keep them
    both = {"segment_ids": np.array([[0, 0, 0], [0, 1, 1]]), "weights": np.ones((2, 3))}
    assert not drop(both) and drop({k: v[:1] for k, v in both.items()})
    plain = {"weights": np.ones((1, 3))}
    assert CausalLM().host_batch(plain) is plain  # no ids: nothing to decide


@pytest.mark.parametrize("attention", ["xla", "chunked"])
def test_dropping_them_leaves_loss_accuracy_and_gradients_as_they_were(attention):
    """Against the same batch with its segment ids, through the real train step (one step of
    plain SGD at rate 1: the parameters moved by the gradients). On packed rows, where the ids
    must stay, dropping them moves a parameter by 1.1e-2 (checked below), so 1e-6 is the
    round-off of two attention programs, not a blur over a wrong mask."""
    cfg = tiny_config(f"model.attention={attention}", "optimizer.name=sgd", "optimizer.lr=1",
                      "optimizer.weight_decay=0", "optimizer.clip_norm=0")
    parts = one_device(cfg)

    def step(batch):
        state, m = parts.train_step(parts.init_state(), jax.device_put(batch))
        return {k: float(m[k]) for k in ("loss_sum", "correct", "grad_norm")}, state.params

    for batch, same in ((padded_docs(), True), (packed_windows(doc_len=5), False)):
        (ref, p_ref), (got, p_got) = step(batch), step(
            {k: v for k, v in batch.items() if k != "segment_ids"})
        if same:
            assert got["correct"] == ref["correct"]
            assert got["loss_sum"] == pytest.approx(ref["loss_sum"], rel=1e-6)
            assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6)
            for a, b in zip(jax.tree.leaves(p_got), jax.tree.leaves(p_ref)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
        else:
            moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                        for a, b in zip(jax.tree.leaves(p_got), jax.tree.leaves(p_ref)))
            assert moved > 1e-3


def test_the_loader_and_evaluator_apply_the_tasks_edit():
    docs = padded_docs()
    source = [{k: v[i] for k, v in docs.items()} for i in range(16)]
    task = CausalLM()
    loader = TrainLoader(source, 8, seed=0, shuffle=False, sharding=None, host_batch=task.host_batch)
    assert "segment_ids" not in next(loader)
    assert "segment_ids" in next(TrainLoader(source, 8, seed=0, shuffle=False, sharding=None))
    evaluated = list(eval_batches(source, 12, sharding=None, host_batch=task.host_batch))
    assert len(evaluated) == 2 and all("segment_ids" not in b for b in evaluated)
