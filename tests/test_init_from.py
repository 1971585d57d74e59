"""init.from and the checkpoint fallbacks, in process: real orbax checkpoints of a tiny GPT written
on one mesh and read into another, a real safetensors round trip, damaged checkpoints on disk."""

from __future__ import annotations

import logging
import os
import shutil

import jax
import numpy as np
import pytest

from bigjax import mesh as mesh_lib
from bigjax.checkpoint import Checkpointer, abstract_with_shardings, model_config_diff
from bigjax.config import load_config, to_dict
from bigjax.errors import CheckpointError
from bigjax.init_from import load_init_params
from bigjax.optim import make_optimizer
from bigjax.state import init_state, model_spec, state_shardings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Everything explicit: no shared config file that may change under us.
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
        "model.vocab_size=256", "model.max_seq_len=32", "model.positions=learned",
        "model.norm=layernorm", "model.mlp=gelu_tanh", "model.use_bias=true",
        "model.tie_embeddings=true", "train.seq_len=32", "train.steps=10", "optimizer.name=adamw"]


def build(overrides: list[str]):
    cfg = load_config(None, TINY + overrides)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    tx, _ = make_optimizer(cfg.optimizer, cfg.train.steps)
    abstract, shardings = state_shardings(cfg, model_spec(cfg), tx, mesh)
    return cfg, abstract, shardings, init_state(cfg, tx, shardings)


def flat(tree) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A run dir whose checkpoint (step 5, seed 1, mesh data=8) holds known parameters."""
    run_dir = str(tmp_path_factory.mktemp("src"))
    cfg, _, _, state = build(["seed=1"])
    ckpt = Checkpointer(run_dir, cfg.checkpoint)
    ckpt.save(5, state, {"pos": 0}, {"step": 5, "config": to_dict(cfg)}, force=True)
    ckpt.close()
    return run_dir, {k: np.asarray(v) for k, v in flat(state.params).items()}


def test_params_load_into_the_runs_shardings_new_head_fresh(source, caplog):
    run_dir, src = source
    cfg, _, shardings, fresh = build(["model.tie_embeddings=false", "model.positions=rotary",
                                      "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"])
    with caplog.at_level(logging.WARNING, logger="bigjax"):
        params = load_init_params(cfg, f"{run_dir}@5", fresh.params)
    got, before, want_sh = flat(params), flat(fresh.params), flat(shardings.params)
    assert sorted(got) == sorted(set(src) - {"pos_embed/embedding"} | {"lm_head/kernel"})
    for k, v in got.items():
        assert v.sharding == want_sh[k], k  # read straight into fsdp=4 x tensor=2 shards
        np.testing.assert_array_equal(np.asarray(v), src[k] if k in src else np.asarray(before[k]))
    assert [r.getMessage() for r in caplog.records if r.name == "bigjax"][1:] == [
        "init.from: not in the source, freshly initialised: lm_head/kernel",
        "init.from: in the source but not in this model, ignored: pos_embed/embedding"]


def test_a_relative_source_path_loads_the_same(source, monkeypatch):
    """Configs name run dirs relative to the working dir (runs/x); orbax needs absolute paths."""
    run_dir, src = source
    cfg, _, _, fresh = build([])
    monkeypatch.chdir(os.path.dirname(run_dir))
    params = flat(load_init_params(cfg, os.path.basename(run_dir), fresh.params))
    assert sorted(params) == sorted(src)
    for k, v in params.items():
        np.testing.assert_array_equal(np.asarray(v), src[k])


def test_shape_mismatch_names_the_parameter_and_both_shapes(source):
    run_dir, _ = source
    cfg, _, _, fresh = build(["model.d_ff=128"])
    with pytest.raises(CheckpointError) as e:
        load_init_params(cfg, run_dir, fresh.params)
    assert str(e.value) == (
        "init.from: parameter 'layer_0/mlp/down/kernel' has shape (64, 32) in the source but "
        "(128, 32) in this model; change the model config to match or drop init.from")


def test_bad_sources_are_one_clear_line(source, tmp_path):
    run_dir, _ = source
    cfg, _, _, fresh = build([])
    cases = {
        f"{run_dir}@last": f"init.from='{run_dir}@last': '@last' is not a step number "
                           "(expected PATH or PATH@STEP)",
        f"{run_dir}@7": f"init.from='{run_dir}@7': no complete checkpoint at step 7 "
                        "(complete steps: [5])",
        str(tmp_path / "nope"): f"init.from='{tmp_path}/nope': '{tmp_path}/nope' is not a "
                                "directory (expected a run dir, its checkpoints/ dir or one step "
                                "dir, or hf:DIR)",
        str(tmp_path): f"init.from='{tmp_path}': no complete checkpoint under '{tmp_path}'",
    }
    for spec, message in cases.items():
        with pytest.raises(CheckpointError) as e:
            load_init_params(cfg, spec, fresh.params)
        assert str(e.value) == message


def test_hf_safetensors_round_trip(source, tmp_path):
    from bigjax import hf
    run_dir, src = source
    cfg, _, _, fresh = build([])
    hf.save_params(jax.tree.map(np.asarray, load_init_params(cfg, run_dir, fresh.params)), cfg,
                   str(tmp_path / "hf"))
    params = flat(load_init_params(cfg, f"hf:{tmp_path / 'hf'}", fresh.params))
    assert sorted(params) == sorted(src)
    for k, v in params.items():
        np.testing.assert_array_equal(np.asarray(v), src[k], err_msg=k)


def test_damaged_everywhere_refuses_to_start_over_and_deletes_nothing(tmp_path, caplog):
    cfg, abstract, shardings, state = build([])
    ckpt = Checkpointer(str(tmp_path), cfg.checkpoint)
    for step in (1, 2):
        ckpt.save(step, state, {"pos": step}, {"step": step, "config": to_dict(cfg)}, force=True)
    ckpt.wait()
    os.remove(os.path.join(ckpt.directory, "2", "state", "manifest.ocdbt"))
    with open(os.path.join(ckpt.directory, "1", "meta", "metadata"), "w") as fh:
        fh.write('{"step": 1, "conf')  # cut mid-write
    target = abstract_with_shardings(abstract, shardings)
    with caplog.at_level(logging.WARNING, logger="bigjax"), pytest.raises(CheckpointError) as e:
        ckpt.restore_latest(target, to_dict(cfg))
    assert str(e.value) == (f"no usable checkpoint in {ckpt.directory} (damaged: steps [2, 1]); "
                            "not starting from scratch over them: move them away or use a new run.dir")
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.name == "bigjax"] == [
        f"warning: checkpoint step 2 in {ckpt.directory} is incomplete",
        f"warning: checkpoint step 1 in {ckpt.directory}: metadata unreadable"]
    assert sorted(os.listdir(ckpt.directory)) == ["1", "2"]
    ckpt.close()


def test_model_diff_ignores_keys_that_leave_parameters_alone():
    saved = {"d_model": 32, "n_layers": 1, "dropout": 0.0, "dtype": "float32", "mlp": "gelu"}
    now = {"d_model": 64, "n_layers": 1, "dropout": 0.1, "dtype": "bfloat16", "mlp": "swiglu"}
    assert model_config_diff(saved, now) == [
        "model.d_model (checkpoint 32, config 64)", "model.mlp (checkpoint 'gelu', config 'swiglu')"]


def test_keep_best_metric_must_be_an_eval_metric(tmp_path):
    cfg = load_config(None, ["checkpoint.keep_best_metric=eval_bleu"])
    ckpt = Checkpointer(str(tmp_path), cfg.checkpoint)
    with pytest.raises(CheckpointError) as e:
        ckpt.check_metrics({"eval_loss": 1.0, "eval_accuracy": 0.5})
    assert str(e.value) == ("checkpoint.keep_best_metric='eval_bleu' is not an evaluation metric "
                            "(available: eval_accuracy, eval_loss)")
    ckpt.close()


def test_listing_marks_unfinished_and_cut_checkpoints(source, tmp_path, capsys):
    from bigjax.cli import run
    run_dir = str(tmp_path / "run")
    shutil.copytree(source[0], run_dir)
    ckpt = os.path.join(run_dir, "checkpoints")
    shutil.copytree(os.path.join(ckpt, "5"), os.path.join(ckpt, "7"))
    os.remove(os.path.join(ckpt, "7", "meta", "metadata"))
    os.makedirs(os.path.join(ckpt, "9.orbax-checkpoint-tmp-123", "state"))
    assert run(["checkpoints", run_dir]) == 0
    rows = [line.split("  ") for line in capsys.readouterr().out.splitlines()]
    assert [(r[0].strip(), r[-1].strip()) for r in rows] == [
        ("step", "status"), ("5", "complete"), ("7", "INCOMPLETE: missing meta/metadata"),
        ("9", "INCOMPLETE: unfinished save (orbax ignores it)")]
    assert run(["checkpoints", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"bigjax: error: run dir '{tmp_path}/nope' does not exist\n"


def test_init_run_dir_finds_the_run_behind_any_init_from_spelling():
    """The data pipeline finds the source's tokenizer in its run dir, whichever way init.from
    names the source (a step dir too: the run's tokenizer is two levels up)."""
    from bigjax.config import init_run_dir
    for spec in ("runs/a", "runs/a/", "runs/a@5", "runs/a/checkpoints", "runs/a/checkpoints@3",
                 "runs/a/checkpoints/100"):
        assert init_run_dir(spec) == "runs/a", spec
