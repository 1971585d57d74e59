"""A whole tiny run through the Trainer: what a person finds in the run dir afterwards."""

import json

import numpy as np
import pytest
import yaml

from bigjax.config import load_config, to_dict
from bigjax.trainer import Trainer

TINY_RUN = ["data.max_chars=150000", "data.vocab_size=384", "train.steps=24", "train.seq_len=32",
            "model.max_seq_len=32", "train.batch_size=16", "model.d_model=64", "model.d_ff=128",
            "model.n_layers=2", "train.log_every=4", "train.eval_every=12", "train.progress=false",
            "optimizer.lr=0.01", "optimizer.warmup_steps=2", "checkpoint.every=12",
            "mesh.data=4", "mesh.fsdp=2", 'train.sample_prompts=["def ", "import"]',
            "train.sample_new_tokens=4"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    trainer = Trainer("configs/gpt_tiny.yaml", TINY_RUN + [f"run.dir={run_dir}"])
    final = trainer.train()
    return run_dir, trainer, final


def test_metrics_jsonl_rows(finished_run):
    run_dir, trainer, final = finished_run
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [4, 8, 12, 16, 20, 24]
    assert [r["step"] for r in eval_rows] == [0, 12, 24]
    for key in ("loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    assert train_rows[0]["tokens_per_s"] > 0
    assert eval_rows[-1]["eval_loss"] < eval_rows[0]["eval_loss"]
    assert eval_rows[-1]["eval_loss"] == pytest.approx(final["eval_loss"])
    # cosine schedule: lr at step 24 (logged lr is the one used for that update) is near the minimum
    assert train_rows[-1]["lr"] < train_rows[1]["lr"]


def test_run_dir_holds_config_plot_events_and_checkpoints(finished_run):
    run_dir, trainer, _ = finished_run
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved == to_dict(trainer.cfg)
    assert saved["model"]["vocab_size"] == 384  # taken from the tokenizer, rounded up to 128
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["12", "24"]


def test_evaluate_repeats_exactly(finished_run):
    _, trainer, final = finished_run
    assert trainer.evaluate() == final


def test_samples_at_every_evaluation_equal_generate_from_the_trainer_and_the_cli(finished_run,
                                                                                 capsys):
    from bigjax import cli
    run_dir, trainer, _ = finished_run
    rows = [json.loads(l) for l in (run_dir / "samples.jsonl").read_text().splitlines()]
    prompts = ["def ", "import"]
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (0, 12, 24) for p in prompts]
    last = [r for r in rows if r["step"] == 24]
    assert [c.tokens for c in trainer.generate(prompts, max_new_tokens=4)] == \
        [r["tokens"] for r in last]
    events = next((run_dir / "tb").glob("events.out.tfevents.*")).read_bytes()
    assert b"samples/0" in events and b"samples/1" in events
    # the restored checkpoint writes what the run wrote at its last evaluation
    assert cli.run(["generate", str(run_dir), "import", "--max-new-tokens", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["tokens"], row["completion"]) == (last[1]["tokens"], last[1]["completion"])
