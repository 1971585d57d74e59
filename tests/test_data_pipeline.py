"""From `data.*` config to examples: file sources, eval split or held-out fraction, config errors."""

import json

import numpy as np
import pytest

from bigjax.config import load_config
from bigjax.data.pipeline import build_data
from bigjax.errors import BigjaxError

TRAIN = [f"training text {i} with some words that repeat and repeat" for i in range(24)]
VAL = ["validation text alpha", "validation text beta"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    for name, texts in (("train-0.jsonl", TRAIN[:12]), ("train-1.jsonl", TRAIN[12:]),
                        ("val.jsonl", VAL)):
        (d / name).write_text("".join(json.dumps({"t": t}) + "\n" for t in texts))
    return d


def test_file_glob_and_eval_split_give_packed_windows_of_the_right_documents(files, tmp_path):
    cfg = load_config(None, [f"data.source={files}/train-*.jsonl", f"data.eval_split={files}/val.jsonl",
                             "data.text_field=t", "data.vocab_size=300", "train.seq_len=16"])
    data = build_data(cfg, str(tmp_path))
    tok = data.tokenizer
    n_train = sum(len(x) + 1 for x in tok(TRAIN, add_special_tokens=False)["input_ids"])
    n_val = sum(len(x) + 1 for x in tok(VAL, add_special_tokens=False)["input_ids"])
    assert (data.info["documents"], data.info["eval_documents"]) == (24, 2)
    assert (len(data.train), len(data.eval)) == ((n_train - 1) // 16, (n_val - 1) // 16)
    eval_text = tok.decode(np.concatenate([data.eval[i]["inputs"] for i in range(len(data.eval))]))
    assert len(eval_text) > 20 and (VAL[0] + tok.eos_token + VAL[1]).startswith(eval_text)
    # the tokenizer is kept in the run dir and reused: the same ids the second time
    again = build_data(cfg, str(tmp_path))
    np.testing.assert_array_equal(again.train[3]["inputs"], data.train[3]["inputs"])


def test_held_out_fraction_splits_documents_without_overlap(files, tmp_path):
    cfg = load_config(None, [f"data.source={files}/train-*.jsonl", "data.text_field=t",
                             "data.vocab_size=300", "train.seq_len=32", "data.val_fraction=0.25",
                             "data.pack=false"])
    data = build_data(cfg, str(tmp_path))
    assert (data.info["documents"], data.info["eval_documents"]) == (18, 6)
    decode = lambda ex: data.tokenizer.decode(ex["inputs"][ex["weights"] > 0])
    train = {decode(data.train[i]) for i in range(len(data.train))}
    val = {decode(data.eval[i]) for i in range(len(data.eval))}
    assert len(train) == 18 and len(val) == 6 and train | val == set(TRAIN)
    assert data.info["truncated_docs"] == 0


@pytest.mark.parametrize("override, message", [
    ("data.val_fraction=1", "data.val_fraction must be in [0, 1), got 1.0"),
    ("data.workers=-1", "data.workers must be 0 or more, got -1"),
    ("data.source=hf:gpt2", "data.source 'hf:gpt2': unknown scheme (expected builtin:pydocs, "
                            "tfds:NAME[/CONFIG], sklearn:digits, a file path/glob or a "
                            "prepared dir's gs:// or s3:// URI)"),
    ("data.on_bad_rows=ignore", "data.on_bad_rows: got 'ignore', expected one of 'skip', 'error'"),
])
def test_bad_data_config_is_one_clear_line(override, message):
    with pytest.raises(BigjaxError) as e:
        load_config(None, [override])
    assert str(e.value) == message
