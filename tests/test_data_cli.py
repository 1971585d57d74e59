"""`bigjax tokenizer train` and `bigjax data inspect`, with real files, tokenizers and processes."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from bigjax.cli import run

DOCS = [f"document number {i} talks about topic {i % 3} in plain words" for i in range(30)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    with open(d / "train.jsonl", "w") as fh:
        for t in DOCS:
            fh.write(json.dumps({"body": t}) + "\n")
    # one row that is not JSON: skipped and counted by default, an error on request
    with open(d / "train.jsonl", "a") as fh:
        fh.write("{not json\n")
    with open(d / "val.jsonl", "w") as fh:
        fh.write(json.dumps({"body": "held out words for validation only"}) + "\n")
    (d / "config.yaml").write_text("seed: 0\n")
    return d


@pytest.fixture(scope="module")
def tokenizer_dir(corpus):
    out = corpus / "tok"
    assert run(["tokenizer", "train", "--files", str(corpus / "train.jsonl"), "--text-field",
                "body", "--vocab-size", "300", "--out", str(out)]) == 0
    return str(out)


def test_tokenizer_train_writes_a_loadable_tokenizer_and_never_overwrites(tokenizer_dir, capsys):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.decode(tok(DOCS[7])["input_ids"]) == DOCS[7]
    assert tok.eos_token == "<|endoftext|>"
    before = sorted(os.listdir(tokenizer_dir))
    assert run(["tokenizer", "train", "--files", "nothing*.txt", "--vocab-size", "300",
                "--out", tokenizer_dir]) == 2
    assert run(["tokenizer", "train", "--files", os.path.join(os.path.dirname(tokenizer_dir),
                "train.jsonl"), "--text-field", "body", "--vocab-size", "300",
                "--out", tokenizer_dir]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "bigjax: error: data.source: no files match 'nothing*.txt' (expected a path or glob of "
        ".txt/.md/.jsonl/.json/.csv/.tsv/.parquet files, tfds:NAME or builtin:pydocs)",
        f"bigjax: error: tokenizer output '{tokenizer_dir}' already exists; choose a new directory"]
    assert sorted(os.listdir(tokenizer_dir)) == before


def test_data_inspect_shows_each_stage_with_exact_counts(corpus, tokenizer_dir, capsys):
    args = ["data", "inspect", "-n", "1", "--seconds", "0.2", str(corpus / "config.yaml"),
            f"data.source={corpus}/train.jsonl", f"data.eval_split={corpus}/val.jsonl",
            "data.text_field=body", f"data.tokenizer={tokenizer_dir}", "train.seq_len=8",
            "train.batch_size=4", "data.pack=false", "data.shuffle=false"]
    assert run(args) == 0
    out = capsys.readouterr().out.splitlines()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(DOCS[0], add_special_tokens=False)["input_ids"]
    n_real = min(len(ids) + 1, 9) - 1  # EOS appended, cut to seq_len + 1, one target per input
    assert out[0] == f"== source: {corpus}/train.jsonl (30 rows read, 1 skipped (1 not valid JSON))"
    assert out[1] == repr(DOCS[0]).join(["[0] ", ""])
    assert out[3].startswith(f"[0] {len(ids)} tokens: {ids[:16]}")
    assert out[4].startswith("== examples: 30 train, 1 eval")
    assert f"truncated_docs={sum(len(x) + 1 > 9 for x in tok(DOCS, add_special_tokens=False)['input_ids'])}" in out[4]
    assert out[5] == (f"[0] {n_real} tokens, {n_real} weighted (inputs[8], targets[8], weights[8], "
                      "segment_ids[8], positions[8])")
    assert out[6] == "    " + repr(tok.decode(ids[:n_real]))
    assert out[7].startswith("== throughput (batch 4, workers=0,")
    assert out[7].endswith(" tokens/s") and " examples/s, " in out[7]


def test_bad_rows_as_errors_exit_2_with_one_line(corpus, tokenizer_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "bigjax.cli", "data", "inspect", str(corpus / "config.yaml"),
         f"data.source={corpus}/train.jsonl", "data.text_field=body", "data.on_bad_rows=error",
         f"data.tokenizer={tokenizer_dir}"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"bigjax: error: {corpus}/train.jsonl: row 31: not valid JSON (Expecting property name "
        "enclosed in double quotes) (set data.on_bad_rows=skip to skip and count such rows)")
    assert proc.stdout == ""
