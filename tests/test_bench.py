"""`bigjax bench`: the compiled step timed on random batches of the configured shape, without
data; its JSON object and what it says about memory and MFU."""

from __future__ import annotations

import json

import pytest

from bigjax.cli import run

TINY = ["model.vocab_size=256", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
        "model.n_layers=1", "train.seq_len=16", "model.max_seq_len=16", "train.batch_size=8"]


@pytest.mark.parametrize("config, overrides", [
    ("gpt_tiny", []),  # causal LM, data=8
    ("gpt_tiny", ["mesh.fsdp=2", "model.dtype=bfloat16"]),
    ("bert_mini_mlm", []),
    ("bert_mini_sentiment", ["task.num_labels=3"]),
], ids=["gpt", "gpt-fsdp-bf16", "bert-mlm", "bert-classification"])
def test_bench_json(capsys, config, overrides):
    rc = run(["bench", f"configs/{config}.yaml", *TINY, *overrides, "--steps", "3", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    r = json.loads(out)
    assert r["devices"] == 8 and r["steps"] == 3
    assert r["compile_s"] > 0 and r["step_time_min_s"] <= r["step_time_s"] <= r["step_time_max_s"]
    assert r["tokens_per_s"] == pytest.approx(8 * 16 / r["step_time_s"])
    assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 8)
    assert r["tflops_per_s"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 1e12)
    assert 0 < r["mfu"] <= 1
    mem = r["memory_bytes_per_device"]
    assert mem["compiled"]["argument"] > 0 and mem["total"] >= mem["compiled"]["temp"]
