"""Packed classification rows (bigjax/data/pack_cls.py): each text's logits, the train step's loss
and gradients equal those of the same texts one per padded row; the packed loader resumes
bitwise; a distillation step reads packed rows; packing where it cannot work is one line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from bigjax.cli import run as cli_run
from bigjax.config import load_config
from bigjax.data.loader import TrainLoader
from bigjax.data.pack_cls import PackedExamples, first_fit
from bigjax.data.types import ArrayExamples
from bigjax.errors import ConfigError
from bigjax.models import create_model
from bigjax.state import TrainState, model_spec
from bigjax.step import make_train_step
from bigjax.tasks import classifier_logits, make_task

ROW, K, TEXT = 40, 4, 16  # row tokens, texts per row, tokens per text at most
TINY = ["model.name=bert", "model.vocab_size=64", "model.d_model=32", "model.n_heads=4",
        "model.d_ff=64", "model.n_layers=2", f"model.max_seq_len={TEXT}", "model.dropout=0",
        # init_std 0.3: logits of ~2 (0.02 gives ~0.01, against which 1e-5 would say little)
        "model.norm_eps=1e-12", "model.init_std=0.3", "task.name=classification",
        "task.num_labels=3",
        f"train.seq_len={ROW}", f"data.examples_per_row={K}", f"data.max_example_len={TEXT}"]


def texts(n: int, seed: int = 0) -> ArrayExamples:
    """n tokenized texts of 3..TEXT tokens ([CLS] 2 ... [SEP] 3), padded with 0 to TEXT."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, TEXT + 1, n)
    ids = np.zeros((n, TEXT), np.int32)
    mask = np.zeros((n, TEXT), np.int32)
    for i, m in enumerate(lengths):
        ids[i, :m] = [2, *rng.integers(5, 64, m - 2), 3]
        mask[i, :m] = 1
    types = mask * (np.arange(TEXT) >= 5)  # a second segment type in some texts
    return ArrayExamples({"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
                          "labels": rng.integers(0, 3, n).astype(np.int32),
                          "weights": np.ones(n, np.float32)})


def packed(source: ArrayExamples) -> tuple[dict, list[np.ndarray]]:
    """Every text once, in first-fit rows; and which texts each row holds."""
    pack = PackedExamples(source, ROW, K, pad_id=0)
    rows = [np.asarray(r) for r in first_fit(pack.lengths, ROW, K)]
    batch = {k: np.stack([pack.row(r)[k] for r in rows]) for k in pack.row(rows[0])}
    return batch, rows


def unpacked(source: ArrayExamples) -> dict:
    return {k: v for k, v in source.arrays.items()}


@nnx.jit
def _logits(model, batch: dict):
    return classifier_logits(model, batch, None)


def logits(model, batch: dict) -> np.ndarray:
    return np.asarray(_logits(model, jax.tree.map(jnp.asarray, batch)))


def test_first_fit_places_each_text_once_within_the_row_and_slot_limits():
    lengths = [30, 20, 15, 10, 25, 5, 5, 5, 5, 5]
    rows = first_fit(lengths, 40, 3, window=2)
    # 30 opens a row, 20 a second, 15 joins the second (35), 10 fills the first (40: closed),
    # 25 opens one (window 2: the second stays open), 5 joins the second (40: closed), ...
    assert rows == [[0, 3], [1, 2, 5], [4, 6, 7], [8, 9]]
    many = np.random.default_rng(1).integers(3, 49, 2000)
    rows = first_fit(many, 128, 8)
    assert sorted(np.concatenate(rows).tolist()) == list(range(2000))
    assert max(len(r) for r in rows) <= 8 and max(many[r].sum() for r in rows) <= 128
    # tweets-like lengths pack densely: 31 of 48 tokens padded is 65% text, packed > 95%
    assert many.sum() / (len(rows) * 128) > 0.95


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_each_packed_text_gets_the_logits_it_gets_alone(pooling):
    cfg = load_config(None, TINY + [f"model.pooling={pooling}"])
    model = create_model(cfg, nnx.Rngs(params=0))
    source = texts(24)
    batch, rows = packed(source)
    assert min(len(r) for r in rows[:-1]) >= 2  # rows really share: the test could fail
    alone = logits(model, unpacked(source))  # 24 x 3, one padded text per row
    got = logits(model, batch)  # R x K x 3
    assert got.shape == (len(rows), K, 3)
    want = np.zeros_like(got)
    for r, members in enumerate(rows):
        want[r, :len(members)] = alone[members]
        assert batch["weights"][r].tolist() == [1.0] * len(members) + [0.0] * (K - len(members))
    real = batch["weights"] > 0
    # float32: the same arithmetic but for sums over 16 vs 40 keys (the masked ones add exact
    # zeros) and the mean's order: ~1e-7 per op, ~1e-6 after two layers. A text that sees its
    # neighbours moves logits of ~2 by > 0.1 (below; init_std 0.3 makes them ~2, not ~0.01)
    np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)
    leaky = logits(model, {**batch, "segment_ids": (batch["segment_ids"] > 0).astype(np.int32)})
    assert np.abs(leaky[real] - want[real]).max() > 0.1


def step_outputs(cfg, batch: dict):
    """(metrics, parameters after one SGD step of learning rate 1) of the real train step."""
    spec = model_spec(cfg)
    _, params, rest = nnx.split(create_model(cfg, nnx.Rngs(params=0)), nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tx = optax.sgd(1.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       model_state=nnx.to_pure_dict(rest))
    step = jax.jit(make_train_step(spec, make_task(cfg), tx, optax.constant_schedule(1.0),
                                   grad_accum=1, seed=0, train=False))
    new, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    return jax.device_get(metrics), jax.device_get(new.params), params


def test_packed_train_step_has_the_unpacked_loss_and_gradients():
    cfg = load_config(None, TINY + ["model.pooling=mean"])
    source = texts(24, seed=3)
    batch, _ = packed(source)
    assert (batch["weights"] == 0).sum() == 4  # empty slots, weighing nothing
    m_packed, p_packed, before = step_outputs(cfg, batch)
    m_plain, p_plain, _ = step_outputs(cfg, unpacked(source))
    assert m_packed["weight"] == m_plain["weight"] == 24  # the mean is over real texts only
    # the same sums of 24 float32 losses in another order: 1e-5 relative (a wrong weight on an
    # empty slot adds ~1/24 of a loss, an unmasked neighbour ~1e-2)
    assert m_packed["loss_sum"] == pytest.approx(m_plain["loss_sum"], rel=1e-5)
    for k in ("correct", "tp_0", "fp_1", "fn_2"):
        assert m_packed[k] == m_plain[k]
    # params - grads: the gradients agree within 1e-5 of the largest (the loss's sums again)
    g_packed = jax.tree.map(np.subtract, before, p_packed)
    g_plain = jax.tree.map(np.subtract, before, p_plain)
    scale = max(np.abs(g).max() for g in jax.tree.leaves(g_plain))
    for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=0)


def loader(source, rows_per_step=3, workers=0):
    return TrainLoader(PackedExamples(source, ROW, K, pad_id=0), rows_per_step, seed=5,
                       shuffle=True, sharding=None, workers=workers)


def test_packed_loader_resumes_bitwise_and_covers_each_epoch_once(tmp_path):
    source = texts(30, seed=4)
    whole = loader(source)
    run = [next(whole) for _ in range(12)]  # ~36 rows: several epochs of ~10 rows
    # each epoch: every text once (fingerprint a text by its tokens)
    key = lambda ids, n: tuple(ids[:n])
    everyone = sorted(key(source.arrays["input_ids"][i], source.arrays["attention_mask"][i].sum())
                      for i in range(30))
    seen = []
    for b in run:
        for r in range(3):
            for k, start in enumerate(b["example_starts"][r][:int(b["weights"][r].sum())]):
                n = int((b["segment_ids"][r] == k + 1).sum())
                seen.append(key(b["input_ids"][r][start:], n))
    assert sorted(seen[:30]) == everyone and sorted(seen[30:60]) == everyone
    first = loader(source)
    for _ in range(5):
        next(first)
    with ocp.CheckpointManager(tmp_path / "ck", item_names=("data",)) as mgr:
        mgr.save(5, args=ocp.args.Composite(data=ocp.args.JsonSave(first.state())))
        mgr.wait_until_finished()
        saved = mgr.restore(5, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    resumed = loader(source)
    resumed.restore(saved)
    for want in run[5:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    # another packing of the same texts is other batches: its position is refused
    other = TrainLoader(PackedExamples(source, ROW, 2, pad_id=0), 3, seed=5, shuffle=True,
                        sharding=None)
    with pytest.raises(Exception, match="examples_per_row 4 -> 2"):
        other.restore(saved)


def test_packing_where_it_cannot_work_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"model.name=rnn cannot read apart .* packing works "
                                          r"with model.name bert, or set data.examples_per_row=1"):
        load_config(None, ["model.name=rnn", "task.name=classification",
                           "data.examples_per_row=4", "data.max_example_len=16"])
    with pytest.raises(ConfigError, match="task.name=causal_lm reads lm batches"):
        load_config(None, ["model.name=gpt", "data.examples_per_row=4"])
    with pytest.raises(ConfigError, match="data.max_example_len=16 applies to packed rows only"):
        load_config(None, TINY + ["data.examples_per_row=1"])
    with pytest.raises(ConfigError, match="data.max_example_len=48 exceeds train.seq_len=40"):
        load_config(None, TINY + ["data.max_example_len=48"])
    config = tmp_path / "cnn.yaml"
    config.write_text("model: {name: cnn}\ntask: {name: classification}\n")
    rc = cli_run(["train", str(config), f"run.dir={tmp_path}/r", "data.examples_per_row=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "model.name=cnn cannot read apart" in err[0]
    assert not (tmp_path / "r").exists()


def test_a_distillation_step_on_packed_rows_is_the_tempered_kl_of_each_text():
    from types import SimpleNamespace

    from bigjax.distill import Distill
    # the student (seed 0) learns from another model of the same shape (seed 7) on packed rows
    cfg = load_config(None, TINY + ["task.name=distill", "task.teacher=unused", "task.alpha=0.5",
                                    "task.temperature=2.0"])
    t_cfg = load_config(None, TINY + ["seed=7"])
    _, t_params, _ = nnx.split(create_model(t_cfg, nnx.Rngs(params=7)), nnx.Param, ...)
    task = Distill("classification", 3, 2.0, 0.5,
                   teacher=SimpleNamespace(spec=model_spec(t_cfg), rest={}))
    source = texts(24, seed=6)  # 7 rows, 4 empty slots
    batch, rows = packed(source)
    spec = model_spec(cfg)
    student = create_model(cfg, nnx.Rngs(params=0))
    _, params, _ = nnx.split(student, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tx = optax.sgd(1.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       model_state={})
    step = jax.jit(make_train_step(spec, task, tx, optax.constant_schedule(1.0), grad_accum=1,
                                   seed=0, train=False))
    _, m = step(state, jax.tree.map(jnp.asarray, batch), nnx.to_pure_dict(t_params))
    # the reference: each text alone, one padded text per row, through both models
    order = np.concatenate(rows)
    st = logits(student, unpacked(source)).astype(np.float64)[order]
    te = logits(nnx.merge(*nnx.split(create_model(t_cfg, nnx.Rngs(params=7)))),
                unpacked(source)).astype(np.float64)[order]

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lt, ls = log_softmax(te / 2), log_softmax(st / 2)
    soft = 4 * (np.exp(lt) * (lt - ls)).sum()
    hard = -log_softmax(st)[np.arange(24), source.arrays["labels"][order]].sum()
    # float32 step against float64 numpy over 24 texts: 1e-5 relative; an empty slot counted,
    # or the teacher reading the rows as one text, moves them by more than a text's share (~4%)
    assert float(m["weight"]) == 24 and (batch["weights"] == 0).any()
    assert float(m["soft_loss_sum"]) == pytest.approx(soft, rel=1e-5) and soft > 1.0
    assert float(m["hard_loss_sum"]) == pytest.approx(hard, rel=1e-5)
    assert float(m["loss_sum"]) == pytest.approx(0.5 * soft + 0.5 * hard, rel=1e-5)
