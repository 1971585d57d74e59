"""A streamed corpus through the Trainer with real checkpoints: the data position a mid-run
checkpoint stores (taken while the loader had read batches ahead) restores a loader to exactly
the batches the run went on to train on."""

import json
import os

import numpy as np
from stream_helpers import write_corpus

from bigjax.data.stream_loader import StreamLoader
from bigjax.trainer import Trainer

STEPS, EVERY, BATCH = 8, 4, 8
RUN = ["data.vocab_size=300", "data.stream=true", "data.val_fraction=0.2",
       "data.tokenizer_sample_chars=3000", "train.seq_len=16", "model.max_seq_len=16",
       f"train.batch_size={BATCH}", "model.d_model=32", "model.d_ff=64", "model.n_layers=1",
       "model.n_heads=2", f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0",
       "train.eval_batches=1", "train.progress=false", "train.peak_tflops=1",
       "optimizer.schedule=constant", "optimizer.warmup_steps=0", f"checkpoint.every={EVERY}",
       "checkpoint.async_save=false", "mesh.data=8"]


def test_a_mid_run_checkpoint_resumes_the_stream_at_the_next_batch(tmp_path):
    # (one Trainer run: a second, resumed one would compile everything again, ~25 s more here;
    # the trainer restores with the same `StreamLoader.restore` this test calls)
    write_corpus(str(tmp_path / "corpus"), files=10, docs=20)
    run = tmp_path / "run"
    trainer = Trainer("configs/gpt_tiny.yaml",
                      RUN + [f"data.source={tmp_path}/corpus/*.jsonl", f"run.dir={run}"])
    trainer.train()
    with open(run / "checkpoints" / str(EVERY) / "data" / "metadata") as fh:
        state = json.load(fh)
    cfg = trainer.cfg
    make = lambda: StreamLoader(trainer.data.train, BATCH, seed=cfg.seed, shuffle=True,
                                sharding=None)
    trained = make()  # what the run read: the same pipeline from the start
    want = [next(trained) for _ in range(STEPS)][EVERY:]
    resumed = make()
    resumed.restore(state)
    for a, b in zip([next(resumed) for _ in range(STEPS - EVERY)], want):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    with open(run / "metrics.jsonl") as fh:
        steps = [r["step"] for r in map(json.loads, fh) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
