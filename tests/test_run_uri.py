"""The whole flow on a run dir given as a URI: train, stop on SIGTERM, resume, eval, predict, list
checkpoints, with `run.dir=file:///...` and `Trainer.from_run(epath.Path(...))`; each result is
checked against the run's own results (tiny classifier, separable data)."""

from __future__ import annotations

import os
import signal

import pytest
from etils import epath

import standin_encoder  # noqa: F401  (registers the stand-in model)
from separable import write_separable_csv
from bigjax import cli
from bigjax.checkpoint import list_checkpoints
from bigjax.config import load_config
from bigjax.report import Reporter, read_metrics
from bigjax.trainer import Trainer

STEPS = 12


def tiny(run_dir: str, source: str) -> list[str]:
    return [f"run.dir={run_dir}", "model.name=standin_encoder", "model.d_model=16", "model.d_ff=32",
            "task.name=classification", f"data.source={source}", "data.text_field=review",
            "data.label_field=sentiment", "data.vocab_size=60", "data.val_fraction=0.25",
            f"train.steps={STEPS}", "train.batch_size=16", "train.seq_len=16", "train.log_every=1",
            "train.eval_every=0", "train.peak_tflops=1", "train.progress=false",
            "optimizer.lr=0.01", "checkpoint.async_save=false"]


def losses(run_dir) -> dict[int, float]:
    """step -> training loss; a resumed run logs some steps twice, the last row wins."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("uri")
    csv = str(d / "reviews.csv")
    write_separable_csv(csv, 96)
    uri = f"file://{d}/run"
    log = Reporter.log

    def stop_after_step_5(self, row):  # a real SIGTERM, as a scheduler sends it
        log(self, row)
        if row.get("step") == 5 and "loss" in row:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Reporter, "log", stop_after_step_5)
        first = Trainer(load_config(None, tiny(uri, csv)))
        first.train()
    stopped = [c.step for c in list_checkpoints(uri)]
    first_rows = read_metrics(uri)
    resumed = Trainer(load_config(None, tiny(uri, csv)))
    metrics = resumed.train()
    return {"dir": str(d / "run"), "uri": uri, "csv": csv, "resumed": resumed, "metrics": metrics,
            "stopped": stopped, "signal": first.stop_signal, "first_rows": first_rows}


def test_a_run_on_a_file_uri_stops_on_sigterm_and_resumes_from_its_checkpoint(runs):
    """(That a resumed run equals an uninterrupted one, bitwise, is test_checkpoint's; here: the
    checkpoint, metrics and config of the URI's directory are the ones found again.)"""
    assert runs["signal"] == signal.SIGTERM
    [stopped] = runs["stopped"]
    assert 5 <= stopped < STEPS  # stopped in the middle, with a checkpoint
    rows = [r["step"] for r in read_metrics(runs["dir"]) if "loss" in r]
    # the first session's steps once, then the resumed session from the step after the checkpoint
    assert rows == list(range(1, stopped + 1)) + list(range(stopped + 1, STEPS + 1))
    assert read_metrics(runs["uri"])[:len(runs["first_rows"])] == runs["first_rows"]
    assert runs["resumed"].run_dir == runs["dir"]  # `file://` stripped, the path kept
    assert [(c.step, c.complete) for c in list_checkpoints(runs["uri"])] == [
        (stopped, True), (STEPS, True)]
    # the URI became the plain directory, not a `file:` directory under the working directory
    assert sorted(os.listdir(runs["dir"])) == ["checkpoints", "config.yaml", "labels.json",
                                               "loss.png", "metrics.jsonl", "tb", "tokenizer"]
    assert not os.path.exists("file:")


def test_eval_and_predict_from_an_epath_and_a_uri(runs, capsys):
    again = Trainer.from_run(epath.Path(runs["dir"]), [f"data.source={runs['csv']}"])
    assert again.evaluate() == runs["metrics"]
    texts = ["good good", "poor", "a movie"]
    assert again.predict(texts) == runs["resumed"].predict(texts)
    assert cli.run(["eval", runs["uri"]]) == 0
    m = runs["metrics"]
    assert capsys.readouterr().out.strip() == (
        f"step {STEPS}: eval_loss={m['eval_loss']:.4f} eval_accuracy={m['eval_accuracy']:.4f} "
        f"eval_macro_f1={m['eval_macro_f1']:.4f}")
