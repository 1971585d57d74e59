"""Images: the cnn family's BatchNorm in the pure sharded step (global-batch statistics, running
averages carried in model_state), the image_classification task's metrics against scikit-learn,
and `bigjax train configs/cnn_digits.yaml` end to end (exact resume with BatchNorm state)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from test_checkpoint import read_state  # every array of a checkpoint, by path
from bigjax import mesh as mesh_lib
from bigjax.build import build, one_device
from bigjax.cli import run as cli_run
from bigjax.config import load_config
from bigjax.tasks_image import ImageClassification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["model.name=cnn", "model.channels=[8,16]", "model.dropout=0.0",
         "task.name=image_classification", "task.num_labels=10", "model.image_height=8",
         "model.image_width=8", "model.image_channels=1", "train.batch_size=16", "train.seq_len=1",
         "optimizer.lr=0.01"]


def cnn_config(*overrides: str):
    return load_config(None, SMALL + list(overrides))


def image_batch(n: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"images": (rng.normal(size=(n, 8, 8, 1)) * 2 + 0.5).astype(np.float32),
            "labels": rng.integers(0, 10, n).astype(np.int32),
            "weights": np.ones(n, np.float32)}


def _bn_stats(model_state) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(model_state))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v) for p, v in flat}


def _forward(parts, train: bool):
    """jitted (params, model_state, batch) -> (logits, model_state after the forward)."""
    spec = parts.spec

    def fn(params, model_state, batch):
        model = nnx.merge(spec.graphdef, params, model_state, copy=True)
        logits = model(batch["images"], train=train)
        return logits, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
    return parts.jit_eval(fn)


@pytest.fixture(scope="module")
def one_and_sharded():
    cfg = cnn_config("mesh.data=4", "mesh.fsdp=2")
    return one_device(cfg), build(cfg, mesh_lib.make_mesh(cfg.mesh))


def test_batchnorm_sharded_equals_one_device(one_and_sharded):
    """data=4 x fsdp=2: each device holds 2 of the 16 images, yet the forward, the updated running
    statistics and one whole train step equal the one-device ones: the batch mean is global."""
    batch = image_batch()
    out = {}
    for name, parts in zip(("one", "sharded"), one_and_sharded):
        state = parts.init_state()
        b = jax.device_put(batch, parts.batch_sharding)
        assert b["images"].sharding.spec[0] == ("data", "fsdp") or name == "one"
        logits, ms = _forward(parts, train=True)(state.params, state.model_state, b)
        new_state, metrics = parts.train_step(state, b)
        out[name] = (np.asarray(logits), _bn_stats(ms), _bn_stats(new_state.model_state),
                     jax.device_get(new_state.params), float(metrics["loss_sum"]))
    (l1, f1, s1, p1, loss1), (l8, f8, s8, p8, loss8) = out["one"], out["sharded"]
    np.testing.assert_allclose(l8, l1, rtol=0, atol=1e-5)
    assert set(s1) == {"bn_0/mean", "bn_0/var", "bn_1/mean", "bn_1/var"}
    for k in s1:
        np.testing.assert_allclose(f8[k], f1[k], rtol=0, atol=1e-5)
        np.testing.assert_allclose(s8[k], s1[k], rtol=0, atol=1e-5)
        np.testing.assert_allclose(s1[k], f1[k], rtol=0, atol=1e-6)  # the step carries them
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), p8, p1)
    assert abs(loss8 - loss1) < 1e-4
    # the statistics moved from their init (mean 0, var 1) towards the batch's: with momentum
    # 0.9, the first layer's running mean is 0.1 x the global batch mean of its conv output
    assert np.abs(s1["bn_0/mean"]).max() > 1e-3 and np.abs(s1["bn_0/var"] - 1).max() > 1e-3


def test_per_shard_statistics_would_differ(one_and_sharded):
    """The equality above can fail: normalising each device's 2 images by their own statistics
    (what a per-device BatchNorm does) gives other outputs."""
    parts = one_and_sharded[0]
    state = parts.init_state()
    batch = image_batch()
    fwd = _forward(parts, train=True)
    whole = np.asarray(fwd(state.params, state.model_state, batch)[0])
    halves = np.concatenate([np.asarray(fwd(state.params, state.model_state,
                                            {k: v[i:i + 2] for k, v in batch.items()})[0])
                             for i in range(0, 16, 2)])
    assert np.abs(whole - halves).max() > 1e-2


def test_train_mode_moves_statistics_eval_mode_does_not(one_and_sharded):
    parts = one_and_sharded[1]
    state = parts.init_state()
    batch = jax.device_put(image_batch(), parts.batch_sharding)
    state, _ = parts.train_step(state, batch)
    before = _bn_stats(state.model_state)
    state2, _ = parts.train_step(state, jax.device_put(image_batch(seed=1), parts.batch_sharding))
    after = _bn_stats(state2.model_state)
    assert all(np.abs(after[k] - before[k]).max() > 1e-4 for k in before)
    # eval: running averages used and kept; an image's logits do not depend on its batch-mates
    logits, ms = _forward(parts, train=False)(state2.params, state2.model_state, batch)
    assert all(np.array_equal(_bn_stats(ms)[k], after[k]) for k in after)
    other = image_batch(seed=5)
    other["images"][:8] = np.asarray(image_batch()["images"][:8])
    logits2, _ = _forward(parts, train=False)(state2.params, state2.model_state,
                                             jax.device_put(other, parts.batch_sharding))
    np.testing.assert_allclose(np.asarray(logits2)[:8], np.asarray(logits)[:8], rtol=0, atol=1e-6)
    stats = parts.eval_step(state2.params, state2.model_state, batch)
    assert float(stats["weight"]) == 16.0
    assert all(np.array_equal(_bn_stats(state2.model_state)[k], after[k]) for k in after)


def test_metrics_equal_scikit_learn_over_batches():
    from sklearn.metrics import accuracy_score, f1_score, log_loss, top_k_accuracy_score
    rng = np.random.default_rng(0)
    K, N = 7, 203
    logits = rng.normal(size=(N, K)).astype(np.float32) * 2
    labels = rng.integers(0, K - 1, N).astype(np.int32)  # class 6 never a label: F1 over present
    weights = (rng.random(N) > 0.2).astype(np.float32)
    task = ImageClassification(K)
    sums: dict[str, float] = {}
    for lo in range(0, N, 64):  # batched; the sums are exact
        sl = slice(lo, lo + 64)
        model = lambda images, rngs=None, train=None, sl=sl: jax.numpy.asarray(logits[sl])
        batch = {"images": np.zeros((len(labels[sl]), 1, 1, 1), np.float32),
                 "labels": labels[sl], "weights": weights[sl]}
        for k, v in task.stats(model, batch, None).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    m = task.finalize(sums)
    keep = weights > 0
    y, lg = labels[keep], logits[keep]
    probs = np.exp(lg - lg.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, lg.argmax(1)), abs=1e-9)
    assert m["macro_f1"] == pytest.approx(f1_score(y, lg.argmax(1), average="macro"), abs=1e-9)
    assert m["top5_accuracy"] == pytest.approx(
        top_k_accuracy_score(y, lg, k=5, labels=np.arange(K)), abs=1e-9)
    assert m["loss"] == pytest.approx(log_loss(y, probs, labels=np.arange(K)), abs=1e-5)
    # label smoothing a: cross-entropy with targets (1 - a) one-hot + a / K; metrics unchanged
    a = 0.1
    smooth = ImageClassification(K, a)
    model = lambda images, rngs=None, train=None: jax.numpy.asarray(lg)
    s = smooth.stats(model, {"images": np.zeros((len(y), 1, 1, 1), np.float32), "labels": y,
                             "weights": np.ones(len(y), np.float32)}, None)
    targets = (1 - a) * np.eye(K)[y] + a / K
    expected = -(targets * np.log(probs)).sum(1).mean()
    assert float(s["loss_sum"]) / float(s["weight"]) == pytest.approx(expected, abs=1e-5)
    assert float(s["correct"]) == pytest.approx(accuracy_score(y, lg.argmax(1)) * len(y))
    assert "top5_accuracy" not in ImageClassification(4).finalize(
        {"loss_sum": 1.0, "weight": 1.0, "correct": 1.0,
         **{f"{c}_{k}": 0.0 for c in ("tp", "fp", "fn") for k in range(4)}})


def test_a_cnn_key_on_a_gpt_model_is_one_line_exit_2(tmp_path, capsys):
    rc = cli_run(["train", "configs/cnn_digits.yaml", f"run.dir={tmp_path}/run", "model.name=gpt"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("bigjax: error: unknown config key 'model.channels' for model 'gpt' "
                          "(a key of model cnn)"), err
    assert not (tmp_path / "run").exists()


# ---- end to end ----------------------------------------------------------------------------------
STEPS = 12
E2E = [f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=6", "checkpoint.every=6",
       "checkpoint.keep=3", "checkpoint.async_save=false", "train.progress=false",
       "mesh.data=4", "mesh.fsdp=2", "train.batch_size=32", "model.channels=[8,16]"]


def _train(run_dir: str, cache: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.run([sys.executable, "-m", "bigjax.cli", "train", "configs/cnn_digits.yaml",
                           f"run.dir={run_dir}", *E2E], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("cnn")
    run_dir = str(base / "run")
    proc = _train(run_dir, str(base / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_train_writes_the_cnn_config_and_metric_rows(reference_run):
    with open(os.path.join(reference_run, "config.yaml")) as fh:
        cfg = yaml.safe_load(fh)
    assert cfg["model"] == {"name": "cnn", "channels": [8, 16], "pool": True, "batch_norm": True,
                            "bn_momentum": 0.9, "bn_eps": 1e-5, "dropout": 0.2,
                            "dtype": "float32", "conv_impl": "auto", "image_height": 8, "image_width": 8,
                            "image_channels": 1}
    assert cfg["task"] == {"name": "image_classification", "num_labels": 10,
                           "label_smoothing": 0.0}
    rows = _rows(reference_run)
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert set(evals[-1]) == {"step", "eval_loss", "eval_accuracy", "eval_top5_accuracy",
                              "eval_macro_f1"}
    # images per second: seq_len 1, so a token is an image
    assert all(r["tokens_per_s"] == pytest.approx(32 / r["step_time_s"]) for r in train_rows)


def test_final_eval_recomputed_from_the_run_equals_the_logged_one(reference_run):
    from bigjax.trainer import Trainer
    logged = [r for r in _rows(reference_run) if "eval_loss" in r][-1]
    trainer = Trainer.from_run(reference_run)
    again = trainer.evaluate()
    for k, v in again.items():
        assert v == pytest.approx(logged[k], rel=1e-6, abs=1e-7), k
    # the restored state carries BatchNorm's running averages, moved from their init
    stats = _bn_stats(trainer.state.model_state)
    assert np.abs(stats["bn_1/mean"]).max() > 1e-3


def test_resume_from_a_mid_run_checkpoint_is_bitwise_identical(reference_run, tmp_path):
    """Drop the run's last checkpoint and the rows after step 6, train again: the same steps
    (dropout masks, BatchNorm statistics, data order) give the same bits."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference_run, run_dir)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", str(STEPS)))
    ref_rows = _rows(reference_run)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as fh:
        for r in ref_rows:
            if r["step"] <= 6:
                fh.write(json.dumps(r) + "\n")
    proc = _train(run_dir, str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 6" in proc.stdout, proc.stdout[-2000:]
    ref = read_state(os.path.join(reference_run, "checkpoints", str(STEPS)))
    got = read_state(os.path.join(run_dir, "checkpoints", str(STEPS)))
    assert set(got) == set(ref) and any("model_state" in k and "bn_0" in k for k in ref)
    for k in ref:
        assert np.array_equal(got[k], ref[k]), k
    loss = lambda rows: {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert loss(_rows(run_dir)) == loss(ref_rows)


def test_accumulation_updates_the_statistics_once_per_micro_batch():
    """grad_accum=2: micro-batch i holds rows i, i+2, ... (step._split_micro); each one is
    normalised with its own statistics and updates the running averages in turn."""
    parts = one_device(cnn_config("train.grad_accum=2"))
    state = parts.init_state()
    batch = image_batch()
    fwd = _forward(parts, train=True)
    ms = state.model_state
    for i in range(2):
        _, ms = fwd(state.params, ms, {k: v[i::2] for k, v in batch.items()})
    _, whole = fwd(state.params, state.model_state, batch)  # (before the step donates state)
    new_state, _ = parts.train_step(state, batch)
    expected, got = _bn_stats(ms), _bn_stats(new_state.model_state)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-6)
    # not one update with the whole batch's statistics
    assert np.abs(_bn_stats(whole)["bn_0/mean"] - got["bn_0/mean"]).max() > 1e-4


@pytest.mark.parametrize("shape", [(6, 5, 3, 4), (12, 7)])
def test_batchnorm_textbook_gradient_equals_autodiff(shape):
    """Training BatchNorm's custom VJP (batchnorm._train_norm: two reductions, one elementwise
    pass) against the gradient JAX derives from the same forward, for x, scale and bias, with
    the mean and variance outputs also given a cotangent (they pass one back through x). Inputs
    far from zero mean and unit variance, so a dropped term (dbias / n, x^ dscale / n, the mean
    or variance path) moves the gradient by O(0.1-1); float32 reorderings stay ~1e-6."""
    from bigjax.models.batchnorm import _train_norm, _train_norm_impl
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * 3 + 2).astype(np.float32)
    scale, bias = (rng.normal(size=shape[-1:]).astype(np.float32) for _ in range(2))
    weights = [rng.normal(size=s).astype(np.float32) for s in (shape, shape[-1:], shape[-1:])]

    def loss(norm):
        def fn(x, scale, bias):
            return sum((out * w).sum() for out, w in zip(norm(x, scale, bias, 1e-5), weights))
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))

    (v1, g1), (v2, g2) = loss(_train_norm)(x, scale, bias), loss(_train_norm_impl)(x, scale, bias)
    assert float(v1) == float(v2)  # the forward is the same computation
    for got, want in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)
        assert np.abs(np.asarray(want)).max() > 0.1
