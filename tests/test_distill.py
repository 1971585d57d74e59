"""Distillation (`task.name: distill`): the soft loss against a numpy KL, zero when the student is
the teacher, the teacher never in the student's checkpoints, classification and causal LM, and a
teacher that reads other tokens or scores other classes as one-line errors."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from bigjax.checkpoint import flat_shapes, read_tree_metadata
from bigjax.cli import run as cli_run
from bigjax.config import load_config
from bigjax.data.loader import eval_batches
from bigjax.errors import ConfigError
from bigjax.trainer import Trainer
from separable import write_separable_csv

TINY_BERT = ["model.name=bert", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
             "model.n_layers=1", "model.max_seq_len=16", "data.text_field=review",
             "data.label_field=sentiment", "data.vocab_size=120", "data.val_fraction=0.25",
             "train.batch_size=16", "train.seq_len=16", "train.eval_every=0",
             "train.peak_tflops=1", "train.progress=false", "optimizer.lr=0.01",
             "checkpoint.async_save=false"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    write_separable_csv(str(d / "reviews.csv"), 160)
    Trainer(load_config(None, TINY_BERT + [f"run.dir={d}/teacher", f"data.source={d}/reviews.csv",
                                           "task.name=classification", "train.steps=12"])).train()
    return d


def student(d, name: str, *extra: str) -> Trainer:
    return Trainer(load_config(None, TINY_BERT + [
        f"run.dir={d}/{name}", f"data.source={d}/reviews.csv", "task.name=distill",
        f"task.teacher={d}/teacher", "model.dropout=0", "train.log_every=1", *extra]))


def first_batch(trainer: Trainer):
    return next(iter(eval_batches(trainer.data.train, 16, sharding=trainer.parts.batch_sharding,
                                  process_index=0, process_count=1)))


def logits_of(trainer: Trainer, params, batch) -> np.ndarray:
    model = nnx.merge(trainer.parts.spec.graphdef, params, {}, copy=True)
    return np.asarray(model(batch["input_ids"], token_type_ids=batch["token_type_ids"],
                            attention_mask=batch["attention_mask"], rngs=None), np.float64)


def kl_np(student_logits, teacher_logits, T):
    def log_softmax(x):
        x = x / T
        return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    lt, ls = log_softmax(teacher_logits), log_softmax(student_logits)
    return T * T * (np.exp(lt) * (lt - ls)).sum(-1)


def test_soft_loss_is_zero_for_the_teacher_itself_and_the_tempered_kl_otherwise(teacher):
    s = student(teacher, "same", "task.alpha=1.0", f"init.from={teacher}/teacher", "train.steps=2")
    state = s.init_state()
    batch = first_batch(s)
    params = jax.device_get(state.params)  # the teacher's; the step donates the state
    rng = np.random.default_rng(0)
    moved = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype), params)
    other = state.replace(params=jax.device_put(moved, s.parts.shardings.params))
    other = jax.tree.map(lambda x: x.copy(), other)  # a state of its own: the first is donated
    _, m = s.parts.train_step(state, batch)
    # identical graphs and parameters: the two softened distributions agree to rounding; a wrong
    # temperature, dropout left on or a mismatched head would give > 1e-3
    assert abs(float(m["soft_loss_sum"])) < 1e-6
    assert float(m["loss_sum"]) == pytest.approx(float(m["soft_loss_sum"]), abs=1e-9)  # alpha = 1
    assert float(m["hard_loss_sum"]) > 0.01  # the labels' loss is there, weighted 0
    # the same compiled step on moved parameters: the teacher's logits are the unmoved model's
    _, m = s.parts.train_step(other, batch)
    t_logits, s_logits = logits_of(s, params, batch), logits_of(s, moved, batch)
    soft = kl_np(s_logits, t_logits, 2.0).sum()
    labels = np.asarray(batch["labels"])
    ls = s_logits - s_logits.max(-1, keepdims=True)
    hard = -(ls[np.arange(16), labels] - np.log(np.exp(ls).sum(-1))).sum()
    # float32 against float64 over 16 rows: 1e-5 relative; a missing T^2 is a factor of 4
    assert soft > 1e-3 and float(m["soft_loss_sum"]) == pytest.approx(soft, rel=1e-5)
    assert float(m["hard_loss_sum"]) == pytest.approx(hard, rel=1e-5)
    assert float(m["loss_sum"]) == pytest.approx(soft, rel=1e-5)


def test_checkpoints_hold_the_student_alone_and_eval_needs_no_teacher(teacher, tmp_path):
    s = student(teacher, "trained", "model.d_model=16", "train.steps=4")
    final = s.train()
    step_dir = os.path.join(s.run_dir, "checkpoints", "4", "state")
    saved = flat_shapes(read_tree_metadata(step_dir))
    student_params = flat_shapes(s.parts.abstract.params)
    assert {k[len("params/"):]: v for k, v in saved.items() if k.startswith("params/")} == student_params
    # every array saved is the student's train state (parameters, adam's moments, counters):
    # a teacher slipped into the state would add its 14k parameters
    state_size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.parts.abstract))
    assert sum(int(np.prod(v)) for v in saved.values()) == state_size < 4 * s.n_params
    shutil.move(f"{teacher}/teacher", tmp_path / "gone")  # evaluation never reads the teacher
    try:
        assert Trainer.from_run(s.run_dir).evaluate() == final
    finally:
        shutil.move(tmp_path / "gone", f"{teacher}/teacher")
    rows = [json.loads(line) for line in open(os.path.join(s.run_dir, "metrics.jsonl"))]
    logged = [r for r in rows if "loss" in r]
    assert len(logged) == 4  # every step's row: alpha 0.5 mixes its two parts
    for r in logged:
        assert r["loss"] == pytest.approx(0.5 * r["soft_loss"] + 0.5 * r["hard_loss"], rel=1e-5)
        assert r["soft_loss"] > 0 and r["hard_loss"] > 0


def test_teacher_with_other_labels_is_one_line_exit_2(teacher, tmp_path, capsys):
    with open(teacher / "reviews.csv") as fh:
        text = fh.read().replace(",pos\n", ",good\n")
    (tmp_path / "other.csv").write_text(text)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"task": {"name": "distill", "teacher": f"{teacher}/teacher"}}))
    args = [a for a in TINY_BERT if not a.startswith("checkpoint.")]
    code = cli_run(["train", str(cfg), *args, f"run.dir={tmp_path}/run",
                    f"data.source={tmp_path}/other.csv"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err == (f"bigjax: error: task.teacher={teacher}/teacher: its labels [neg, pos] differ "
                   "from the data's [good, neg]; the teacher must score the same classes")


def test_teacher_reading_other_tokens_or_no_run_is_refused(teacher):
    from test_classification import MINILM
    with pytest.raises(ConfigError, match=r"its tokenizer \(\d+ tokens\) differs from the "
                                          r"student's \(30522 tokens\)"):
        student(teacher, "othertok", f"data.tokenizer={MINILM}")
    with pytest.raises(ConfigError, match="not a bigjax run dir"):
        student(teacher, "noteacher", f"task.teacher={teacher}/nowhere")
    with pytest.raises(ConfigError, match="task.alpha must be in"):
        student(teacher, "badalpha", "task.alpha=1.5")


def test_causal_lm_distillation_is_token_level_kl(tmp_path):
    docs = [{"text": f"the cat {i % 7} sat on the mat number {i % 5} and ran"} for i in range(120)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    common = [f"data.source={tmp_path}/t.jsonl", "data.vocab_size=300", "data.val_fraction=0.1", "model.d_model=32",
              "model.n_heads=2", "model.d_ff=64", "model.n_layers=1", "model.max_seq_len=16",
              "train.seq_len=16", "train.batch_size=16", "train.eval_every=0", "train.peak_tflops=1",
              "train.progress=false", "checkpoint.async_save=false", "optimizer.lr=0.01"]
    Trainer(load_config(None, common + [f"run.dir={tmp_path}/teacher", "train.steps=3"])).train()
    s = Trainer(load_config(None, common + [
        f"run.dir={tmp_path}/student", "task.name=distill", f"task.teacher={tmp_path}/teacher",
        "task.objective=causal_lm", "task.alpha=0.5", "task.temperature=2", "model.d_model=16",
        "train.steps=1"]))
    state = s.init_state()
    batch = next(iter(eval_batches(s.data.train, 16, sharding=s.parts.batch_sharding,
                                   process_index=0, process_count=1)))
    t = Trainer.from_run(f"{tmp_path}/teacher")

    def logits(trainer, params):
        model = nnx.merge(trainer.parts.spec.graphdef, params, {}, copy=True)
        return np.asarray(model(batch["inputs"], segment_ids=batch.get("segment_ids"),
                                positions=batch.get("positions"), rngs=None), np.float64)

    s_logits = logits(s, jax.device_get(state.params))
    t_logits = logits(t, jax.device_get(t.init_state().params))
    _, m = s.parts.train_step(state, batch)
    w = np.asarray(batch["weights"], np.float64)
    # per token, weighted like the labels' loss (1e-5: float32 sums over 256 tokens)
    assert float(m["soft_loss_sum"]) == pytest.approx((kl_np(s_logits, t_logits, 2.0) * w).sum(),
                                                      rel=1e-5)
    assert s.cfg.model.vocab_size == t.cfg.model.vocab_size
