"""int8 compression (`bigjax compress RUN --int8 OUT`): the per-channel round-trip bound, a
compressed run that eval and predict use directly, and unfinished runs or an existing OUT refused
without touching anything."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from bigjax.cli import run as cli_run
from bigjax.compress import MARKER, dequantize, linear_kernels, quantize
from bigjax.config import load_config
from bigjax.predict import probs_fn
from bigjax.trainer import Trainer
from separable import write_separable_csv
from test_distill import TINY_BERT


@pytest.mark.parametrize("shape,n_in", [((6, 5), 1), ((8, 2, 3), 1), ((2, 3, 4), 2)])
def test_round_trip_error_is_at_most_half_a_step_per_output_channel(shape, n_in):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3, shape[n_in:])).astype(np.float32)
    w[(slice(None),) * n_in + (0,) * (len(shape) - n_in)] = 0  # an all-zero channel
    q, s = quantize(w, n_in)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == shape[n_in:]
    amax = np.abs(w).max(axis=tuple(range(n_in)))
    # the scale is the channel's own: its largest weight maps to +-127 exactly
    np.testing.assert_array_equal(s, np.where(amax > 0, amax / 127, 1).astype(np.float32))
    np.testing.assert_array_equal(np.abs(q).max(axis=tuple(range(n_in))), np.where(amax > 0, 127, 0))
    back = np.asarray(dequantize(q, s))
    np.testing.assert_array_equal(back, q.astype(np.float32) * s)
    # |w - q*s| <= s/2 per channel; 1e-6 relative: the float32 rounding of w/s and q*s, while a
    # scale shared across channels or one step of clipping breaks it by far more
    assert np.all(np.abs(w - back) <= s / 2 * (1 + 1e-6))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("compress")
    write_separable_csv(str(d / "reviews.csv"), 160)
    cfg = load_config(None, TINY_BERT + [f"run.dir={d}/run", f"data.source={d}/reviews.csv",
                                         "task.name=classification", "train.steps=12"])
    Trainer(cfg).train()
    return d


def test_compressed_run_is_evaluated_and_predicts_from_int8(trained, capsys):
    out = trained / "int8"
    assert cli_run(["compress", str(trained / "run"), "--int8", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "as int8, float32 scales per output channel" in printed and "eval_accuracy" in printed
    # the float metrics are the run's final evaluation, kept in its checkpoint, not a new one
    assert "float metrics: the run's evaluation of step 12 over all 40 validation" in printed
    report = json.load(open(out / MARKER))
    q = Trainer.from_run(out)
    assert q.evaluate() == report["metrics_after"]  # eval reads the same int8 run
    before, after = report["metrics_before"], report["metrics_after"]
    assert abs(after["eval_accuracy"] - before["eval_accuracy"]) <= 0.025  # one of 40 texts
    assert after["eval_loss"] == pytest.approx(before["eval_loss"], rel=0.02)
    # two ways to the same probabilities: the run's int8 path, and the float model with the
    # kernels dequantised here in numpy (1e-5: the same float32 arithmetic, other fusion)
    f = Trainer.from_run(trained / "run")
    assert f.evaluate() == before  # what evaluating the float run again gives, bit for bit
    params = jax.device_get(f.init_state().params)
    kernels = linear_kernels(f.cfg)
    deq = jax.tree_util.tree_map_with_path(
        lambda p, w: np.asarray(dequantize(*quantize(w, kernels["/".join(k.key for k in p)])))
        if "/".join(k.key for k in p) in kernels else w, params)
    texts = ["good great the", "awful poor movie", "a nice it"]
    batch = {k: v for k, v in _encode(f, texts).items()}
    model = nnx.merge(f.parts.spec.graphdef, deq, {}, copy=True)
    want = np.asarray(jax.nn.softmax(model(batch["input_ids"], token_type_ids=batch["token_type_ids"],
                                           attention_mask=batch["attention_mask"], rngs=None)))
    got = q.predict(texts)
    np.testing.assert_allclose([p for _, p in got], want.max(-1), atol=1e-5)
    assert [label for label, _ in got] == [label for label, _ in f.predict(texts)]
    assert report["weights_bytes"] < report["float32_params_bytes"]
    with pytest.raises(Exception, match="int8-compressed run"):
        q.train()


def _encode(trainer, texts):
    from bigjax.data.wordpiece import encode
    return encode(trainer._tokenizer(), texts, trainer.cfg.train.seq_len)


def test_unfinished_run_or_existing_out_is_refused_untouched(trained, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert cli_run(["compress", str(trained / "run"), "--int8", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (f"bigjax: error: '{tmp_path / 'out'}' already "
                                               "exists; compress into a new directory")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    shutil.copytree(trained / "run", tmp_path / "unfinished")
    cfg = yaml.safe_load(open(tmp_path / "unfinished" / "config.yaml"))
    cfg["train"]["steps"] = 50
    yaml.safe_dump(cfg, open(tmp_path / "unfinished" / "config.yaml", "w"))
    assert cli_run(["compress", str(tmp_path / "unfinished"), "--int8", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"bigjax: error: '{tmp_path / 'unfinished'}' is not finished: its latest checkpoint is "
        "step 12 of train.steps=50; run its training to the end first")
    assert not os.path.exists(tmp_path / "o2")
