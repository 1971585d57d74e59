"""The Python API (Trainer.train / evaluate / predict / from_run) and the `eval` / `predict` CLI on
a tiny classifier and a trivially separable synthetic dataset."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import standin_encoder  # noqa: F401  (registers the stand-in model)
from separable import write_separable_csv
from bigjax import cli
from bigjax import mesh as mesh_lib
from bigjax.config import load_config
from bigjax.trainer import Trainer



def tiny(run_dir: str, source: str, *extra: str) -> list[str]:
    return [f"run.dir={run_dir}", "model.name=standin_encoder", "model.d_model=32", "model.d_ff=64",
            "task.name=classification",
            f"data.source={source}", "data.text_field=review", "data.label_field=sentiment",
            "data.vocab_size=120", "data.val_fraction=0.25", "train.steps=40", "train.batch_size=16",
            "train.seq_len=16", "train.log_every=1", "train.eval_every=0", "train.peak_tflops=1",
            "train.progress=false", "optimizer.lr=0.01", "checkpoint.async_save=false", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    write_separable_csv(str(d / "reviews.csv"), 240)
    trainer = Trainer(load_config(None, tiny(str(d / "run"), str(d / "reviews.csv"))))
    final = trainer.train()
    return trainer, final, str(d / "run")


def test_train_reaches_perfect_accuracy_and_predicts_labels(trained):
    trainer, final, run_dir = trained
    assert final["eval_accuracy"] == 1.0 and final["eval_macro_f1"] == 1.0
    assert trainer.evaluate() == final  # the same whole-split metrics, computed again
    preds = trainer.predict(["love great good the", "hate awful bad movie", "nice it a"])
    assert [p[0] for p in preds] == ["pos", "neg", "pos"]
    assert all(0.9 < p[1] <= 1.0 for p in preds)
    with open(os.path.join(run_dir, "labels.json")) as fh:
        assert json.load(fh) == {"names": ["neg", "pos"]}


def test_from_run_restores_the_same_model(trained):
    trainer, final, run_dir = trained
    again = Trainer.from_run(run_dir)
    assert again.evaluate() == final
    texts = ["good good", "poor", "a movie"]
    assert again.predict(texts) == trainer.predict(texts)


def test_predict_needs_the_run_not_its_training_data(trained, tmp_path):
    """A finished run predicts with its saved tokenizer and labels: the training files may be gone
    (and are not read again, which made `bigjax predict` re-read a whole corpus)."""
    trainer, _, run_dir = trained
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    again = Trainer.from_run(moved, [f"data.source={tmp_path / 'gone.csv'}"])
    texts = ["good good", "poor", "a movie"]
    assert again.predict(texts) == trainer.predict(texts)


def test_predict_cli_prints_label_probability_text(trained):
    _, _, run_dir = trained
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": os.path.dirname(__file__)}
    texts = ["I love this movie!", "This is a terrible film.", "great nice", "awful hate"]
    # the stand-in model is registered by importing its module before the CLI runs
    code = "import standin_encoder, sys; from bigjax.cli import main; main(sys.argv[1:])"
    out = subprocess.run([sys.executable, "-c", code, "predict", run_dir, *texts],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().split("\n")
    assert len(lines) == len(texts)
    for line, text in zip(lines, texts):
        assert re.fullmatch(r"(neg|pos)\t[01]\.\d{4}\t" + re.escape(text), line), line
    assert lines[2].startswith("pos\t") and lines[3].startswith("neg\t")


def test_eval_cli_prints_whole_split_metrics(trained, capsys):
    _, final, run_dir = trained
    assert cli.run(["eval", run_dir]) == 0
    out = capsys.readouterr().out.strip()
    assert out == (f"step 40: eval_loss={final['eval_loss']:.4f} eval_accuracy=1.0000 "
                   "eval_macro_f1=1.0000")


def test_eval_and_predict_cli_reject_a_dir_that_is_not_a_run(tmp_path, capsys):
    assert cli.run(["eval", str(tmp_path)]) == 2
    assert cli.run(["predict", str(tmp_path), "hello"]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert err == [f"bigjax: error: '{tmp_path}' is not a bigjax run dir (no config.yaml in it)"] * 2


def test_sharded_finetune_matches_one_device(trained, tmp_path, monkeypatch):
    """fsdp x tensor (2x2x2 over 8 devices) and a single device: the same first losses."""
    source = os.path.join(os.path.dirname(trained[2]), "reviews.csv")
    losses = {}
    for name, mesh in [("sharded", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
                       ("one", ["mesh.data=1"])]:
        if name == "one":
            one_device = mesh_lib.make_mesh
            monkeypatch.setattr(mesh_lib, "make_mesh",
                                lambda cfg, devices=None: one_device(cfg, jax.devices()[:1]))
        cfg = load_config(None, tiny(str(tmp_path / name), source, "train.steps=4",
                                     "model.dropout=0.1", *mesh))
        trainer = Trainer(cfg)
        if name == "sharded":  # the parameters really are split over fsdp and tensor
            spec = trainer.parts.shardings.params["up"]["kernel"].spec
            assert tuple(spec) == ("fsdp", "tensor")
        trainer.train()
        with open(tmp_path / name / "metrics.jsonl") as fh:
            rows = [json.loads(line) for line in fh]
        losses[name] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["one"]) == 4
    np.testing.assert_allclose(losses["sharded"], losses["one"], rtol=0, atol=1e-5)


def test_mlm_pretrain_then_finetune_from_the_run(trained, tmp_path):
    """masked_lm through the Trainer with the real BERT, then a classifier that starts from that
    run: the encoder's parameters and the tokenizer carry over, the head is new."""
    source = os.path.join(os.path.dirname(trained[2]), "reviews.csv")
    # one layer (the default is 4): what carries over is per parameter, layer_0's as any other's,
    # and each extra layer only lengthens the four compiles (train, eval, two inits)
    bert = ["model.name=bert", "model.norm_eps=1e-12", "model.n_layers=1", "train.steps=3",
            "data.pack=true"]
    mlm_cfg = load_config(None, tiny(str(tmp_path / "mlm"), source, *bert, "task.name=masked_lm"))
    mlm = Trainer(mlm_cfg)
    final = mlm.train()
    assert set(final) == {"eval_loss", "eval_accuracy", "eval_perplexity"}
    assert final["eval_perplexity"] == pytest.approx(np.exp(final["eval_loss"]), rel=1e-9)
    ft = Trainer(load_config(None, tiny(str(tmp_path / "ft"), source, *bert,
                                        f"init.from={tmp_path / 'mlm'}")))
    assert ft.data.tokenizer.get_vocab() == mlm.data.tokenizer.get_vocab()
    start = jax.device_get(ft.init_state().params)
    pretrained = jax.device_get(mlm.state.params)
    flat = lambda t: {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    start, pretrained = flat(start), flat(pretrained)
    shared = [k for k in start if k in pretrained]
    assert any("layer_0" in k for k in shared) and not any("classifier" in k for k in pretrained)
    assert any("classifier" in k for k in start)
    for k in shared:
        np.testing.assert_array_equal(start[k], pretrained[k], err_msg=k)
