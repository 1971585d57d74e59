"""A plug-in from outside bigjax (examples/plugin): installed into a temporary directory (the venv
stays as it is), found by a CLI process through its `bigjax.plugins` entry point, trained for a few
steps with its own model family and task; and what the same command says without it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from separable import write_separable_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "examples", "plugin")
CONFIG = os.path.join(PLUGIN, "config.yaml")
SMOOTHING = 0.2


def _env(site: str | None) -> dict:
    """One CPU device; the plug-in importable only when `site` is given."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
    if site:
        env["PYTHONPATH"] = site
    return env


def _run(site: str | None, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "bigjax.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(site), cwd=ROOT, timeout=300)


def _overrides(run_dir: str, source: str, *extra: str, smoothing: bool = True) -> list[str]:
    return [f"run.dir={run_dir}", f"data.source={source}", "data.text_field=review",
            "data.label_field=sentiment", "data.vocab_size=120", "data.val_fraction=0.25",
            "model.d_model=16", "model.d_hidden=16", "model.dropout=0.1", "model.init_std=0.1",
            *([f"task.label_smoothing={SMOOTHING}"] if smoothing else []),
            "train.steps=5", "train.batch_size=16", "train.seq_len=16", "train.log_every=1",
            "train.eval_every=0", "train.peak_tflops=1", "train.progress=false",
            "optimizer.lr=0.05", "optimizer.warmup_steps=0", "optimizer.schedule=constant",
            "checkpoint.async_save=false", *extra]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The plug-in installed into `site` (from a copy: the build writes build/ and *.egg-info
    next to its sources) and a separable CSV."""
    d = tmp_path_factory.mktemp("plugin")
    src, site = str(d / "src"), str(d / "site")
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                        "--no-index", "-q", "--target", site, src],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    write_separable_csv(str(d / "reviews.csv"), 96)
    return {"dir": d, "site": site, "csv": str(d / "reviews.csv")}


@pytest.fixture(scope="module")
def trained(work):
    run_dir = str(work["dir"] / "run")
    p = _run(work["site"], "train", CONFIG, *_overrides(run_dir, work["csv"]))
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir


def test_entry_point_is_installed_in_the_target_dir(work):
    eps = [p for p in os.listdir(work["site"]) if p.endswith(".dist-info")]
    assert len(eps) == 1
    with open(os.path.join(work["site"], eps[0], "entry_points.txt")) as fh:
        text = fh.read()
    assert "[bigjax.plugins]" in text and "example = bigjax_plugin_example" in text


def test_trains_with_the_plugin_model_and_task(trained):
    with open(os.path.join(trained, "config.yaml")) as fh:
        cfg = yaml.safe_load(fh)
    assert cfg["model"]["name"] == "bag_of_words" and cfg["task"]["name"] == "smoothed_classification"
    assert cfg["task"]["label_smoothing"] == SMOOTHING
    assert cfg["task"]["num_labels"] == 2  # derived from the data
    assert cfg["model"]["vocab_size"] > 0 and cfg["model"]["vocab_size"] % 128 == 0  # derived
    with open(os.path.join(trained, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in train_rows)
    final = rows[-1]
    assert final["step"] == 5 and set(final) == {"step", "eval_loss", "eval_accuracy"}


# Restores the run with the public API and prints, at its parameters: the eval split's logits (the
# test computes the losses from them with its own formula, not the plug-in's); how much they move
# when masked-out positions hold other tokens (none: the mean pools over the mask) and with
# training-mode dropout (rngs given: they do); the parameters' logical axes.
RESTORE = """
import json, sys
import numpy as np
from flax import nnx
from bigjax.models.axes import logical_axes
from bigjax.trainer import Trainer
t = Trainer.from_run(sys.argv[1])
state = t.init_state()
model = nnx.merge(t.parts.spec.graphdef, state.params, state.model_state)
ev = t.data.eval.arrays
ids, mask = ev["input_ids"], ev["attention_mask"]
logits = np.asarray(model(ids, token_type_ids=ev["token_type_ids"], attention_mask=mask))
junk = np.pad(np.where(mask > 0, ids, 7), ((0, 0), (0, 5)), constant_values=9)
moved = np.asarray(model(junk, attention_mask=np.pad(mask, ((0, 0), (0, 5)))))
dropped = np.asarray(model(ids, attention_mask=mask, rngs=nnx.Rngs(dropout=1)))
print(json.dumps({"step": int(state.step), "logits": logits.astype(np.float64).tolist(),
                  "labels": ev["labels"].tolist(), "dtype": str(logits.dtype),
                  "mask_moves": float(np.abs(moved - logits).max()),
                  "dropout_moves": float(np.abs(dropped - logits).max()),
                  "axes": logical_axes(model)}))
"""


@pytest.fixture(scope="module")
def restored(work, trained):
    p = _run(work["site"], trained, code=RESTORE)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_reported_eval_loss_is_the_smoothed_cross_entropy(trained, restored):
    """eval_loss of the final evaluation = cross-entropy against (1 - s) one_hot + s / K at the
    saved parameters, over the whole validation split; plain cross-entropy there is different."""
    logits, labels = np.array(restored["logits"]), np.array(restored["labels"])
    assert restored["step"] == 5 and logits.shape == (24, 2)  # 25% of 96 rows
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    onehot = np.eye(2)[labels]
    smoothed = float(-(((1 - SMOOTHING) * onehot + SMOOTHING / 2) * log_p).sum(1).mean())
    plain = float(-(onehot * log_p).sum(1).mean())
    with open(os.path.join(trained, "metrics.jsonl")) as fh:
        final = [json.loads(line) for line in fh][-1]
    np.testing.assert_allclose(final["eval_loss"], smoothed, rtol=1e-5)
    assert abs(final["eval_loss"] - plain) > 1e-3, (smoothed, plain)
    assert final["eval_accuracy"] == pytest.approx(float((logits.argmax(1) == labels).mean()))


def test_model_pools_over_the_mask_and_names_its_axes(restored):
    assert restored["dtype"] == "float32"
    assert restored["mask_moves"] < 1e-5  # masked-out tokens (and extra padding) change nothing
    assert restored["dropout_moves"] > 1e-4  # model.dropout=0.1 acts when rngs are given
    assert restored["axes"] == {
        "embed": {"embedding": ["vocab", "embed"]},
        "hidden": {"kernel": ["embed", "mlp"], "bias": ["mlp"]},
        "classifier": {"kernel": ["mlp", None], "bias": [None]},
    }


def test_without_the_plugin_the_model_is_unknown(work, tmp_path):
    # after `pip install -e examples/plugin` into the test environment (as its README suggests for
    # a user's own environment) this check would prove nothing: say so rather than pass
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("bigjax-plugin-example")
    run_dir = tmp_path / "run"
    p = _run(None, "train", CONFIG, *_overrides(str(run_dir), work["csv"]))
    assert p.returncode == 2, p.stderr[-3000:]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1, p.stderr
    assert err[0].startswith("bigjax: error: model.name: unknown model 'bag_of_words'"), err[0]
    assert "'bigjax.plugins' entry points" in err[0]
    assert not run_dir.exists()


# Several bad configs in one process (each a CLI run, as `bigjax train` would do it); the
# process's own stderr must stay empty: importing the plug-in prints nothing.
CLI_ERRORS = """
import contextlib, io, json, logging, sys
from bigjax.cli import run
logging.basicConfig(level=logging.WARNING)  # any log line goes to the process's stderr
out = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = run(args)
    out.append([rc, err.getvalue()])
print(json.dumps(out))
"""


# (override, the error's start); the last one runs on a config without task.label_smoothing,
# where a task that has no such key would report the key instead of the check under test
BAD_CONFIGS = [
    ("model.d_hiden=8", "unknown config key 'model.d_hiden' for model 'bag_of_words'; "
                        "did you mean 'model.d_hidden'? (known: d_hidden, d_model, dropout, "),
    ("task.label_smoothing=1.0", "task.label_smoothing must be in [0, 1), got 1.0"),
    ("model.d_hidden=0", "model.d_hidden must be at least 1, got 0"),
    ("model.dropout=1.5", "model.dropout must be in [0, 1), got 1.5"),
    ("task.name=causal_lm", "model.name=bag_of_words is a classifier: task.name=causal_lm has no "
                            "task.num_labels"),
]
BARE = "task.name=causal_lm"


@pytest.fixture(scope="module")
def cli_errors(work):
    """{override: (exit code, stderr)} of every bad config, run in one subprocess."""
    run_dir = str(work["dir"] / "never")
    bare = str(work["dir"] / "bare.yaml")
    with open(bare, "w") as fh:
        yaml.safe_dump({"model": {"name": "bag_of_words"}}, fh)
    argv = [["train", bare, *_overrides(run_dir, work["csv"], bad, smoothing=False)] if bad == BARE
            else ["train", CONFIG, *_overrides(run_dir, work["csv"], bad)] for bad, _ in BAD_CONFIGS]
    p = _run(work["site"], json.dumps(argv), code=CLI_ERRORS)
    assert p.returncode == 0 and p.stderr == "", p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    assert not os.path.exists(run_dir)
    return {bad: tuple(r) for (bad, _), r in zip(BAD_CONFIGS, results)}


@pytest.mark.parametrize("bad, message", BAD_CONFIGS, ids=[b for b, _ in BAD_CONFIGS])
def test_plugin_config_errors_are_one_line(cli_errors, bad, message):
    """Checked by the plug-in's own schema: exit code 2, one line naming the key."""
    rc, err = cli_errors[bad]
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.strip().startswith("bigjax: error: " + message), err
