"""tensorflow-datasets sources, offline: mock_data for reading, real builders for the errors."""

import os

import pytest
import tensorflow_datasets as tfds

from bigjax.config import load_config, updated
from bigjax.data.pipeline import build_data
from bigjax.data.tfds_source import tfds_records
from bigjax.errors import DataError


def test_mocked_tfds_split_feeds_the_lm_pipeline(tmp_path):
    with tfds.testing.mock_data(num_examples=40):
        records = tfds_records("tfds:imdb_reviews", "train", "", ("text", "label"))
        assert len(records) == 40
        row = records[3]
        assert isinstance(row["text"], str) and isinstance(row["label"], int)
        cfg = load_config(None, ["data.source=tfds:imdb_reviews", "data.eval_split=test",
                                 "data.vocab_size=300", "train.seq_len=8",
                                 f"run.dir={tmp_path}"])
        data = build_data(cfg, str(tmp_path))
    # the whole train split, EOS-separated, is packed; the test split is the eval data
    texts = [records[i]["text"] for i in range(40)]
    ids = data.tokenizer(texts, add_special_tokens=False)["input_ids"]
    n_tokens = sum(len(x) + 1 for x in ids)
    assert data.info["documents"] == 40 and data.info["eval_documents"] == 40
    assert len(data.train) == (n_tokens - 1) // 8
    assert data.tokenizer.decode(data.train[0]["inputs"]).startswith(texts[0][:5])


def test_unknown_name_lists_close_names():
    with pytest.raises(DataError) as e:
        tfds_records("tfds:imdb_review", "train", "")
    assert str(e.value) == ("data.source: unknown tensorflow-datasets name 'imdb_review' "
                            "(close names: imdb_reviews)")


def test_unprepared_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(DataError) as e:
        tfds_records("tfds:mnist", "train", str(tmp_path))
    assert str(e.value) == (
        f"data.source: tfds:mnist is not prepared in {tmp_path} and bigjax never downloads; "
        f"on a machine with network run `tfds build mnist --data_dir {tmp_path} "
        "--file_format array_record` (or the same with tfds.builder(...)."
        "download_and_prepare(file_format='array_record')) and set data.dir")


def test_unknown_split_lists_the_prepared_splits(tmp_path):
    # a prepared dataset's metadata (dataset_info.json) is what names its splits
    builder = tfds.builder("imdb_reviews", data_dir=str(tmp_path))
    template = tfds.core.ShardedFileTemplate(data_dir=builder.data_path, dataset_name="imdb_reviews",
                                             split="train", filetype_suffix="array_record")
    splits = [tfds.core.SplitInfo(name=n, shard_lengths=[3], num_bytes=10,
                                  filename_template=template.replace(split=n))
              for n in ("train", "test")]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    os.makedirs(builder.data_path)
    builder.info.write_to_directory(builder.data_path)
    with pytest.raises(DataError) as e:
        tfds_records("tfds:imdb_reviews", "validation", str(tmp_path))
    assert str(e.value) == ("data.split: tfds:imdb_reviews has no split 'validation' "
                            "(splits: test, train)")


def test_tfds_rows_that_are_not_utf8_follow_the_bad_row_policy():
    from bigjax.data.records import read_texts
    rows = [{"text": b"good one", "label": 1}, {"text": b"bad \xff", "label": 0},
            {"text": b"good two", "label": 1}]
    with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: rows):
        cfg = load_config(None, ["data.source=tfds:imdb_reviews"])
        texts, stats = read_texts(cfg)
        assert texts == ["good one", "good two"]
        assert stats.summary() == "2 rows read, 1 skipped (1 not valid UTF-8)"
        cfg = updated(cfg, {"data.on_bad_rows": "error"})
        with pytest.raises(DataError) as e:
            read_texts(cfg)
    assert str(e.value) == ("tfds:imdb_reviews split 'train': row 2: not valid UTF-8 (set "
                            "data.on_bad_rows=skip to skip and count such rows)")


def test_a_dataset_with_a_config_from_a_lazily_imported_package():
    with tfds.testing.mock_data(num_examples=6):
        records = tfds_records("tfds:glue/sst2", "validation", "", ("sentence", "label"))
        assert len(records) == 6
        assert sorted(records[0]) == ["label", "sentence"] and isinstance(records[0]["sentence"], str)


def test_a_streamed_tfds_split_gives_the_in_memory_windows_and_splits_records(tmp_path):
    import numpy as np
    with tfds.testing.mock_data(num_examples=40):
        args = ["data.source=tfds:imdb_reviews", "data.eval_split=test", "data.vocab_size=300",
                "train.seq_len=8", f"run.dir={tmp_path}"]
        memory = build_data(load_config(None, args + ["data.stream=false"]), str(tmp_path))
        # the same run dir: the tokenizer trained above is loaded, not trained on the sample
        stream = build_data(load_config(None, args + ["data.stream=true"]), str(tmp_path)).train
        got = list(stream.pipeline(0, 1, seed=0, shuffle=False, epochs=1))
        assert len(got) == len(memory.train) > 40
        for i in (0, 25, len(got) - 1):
            for k, v in memory.train[i].items():
                np.testing.assert_array_equal(got[i][k], v, err_msg=f"window {i} {k}")
        # two processes: records [0, 20) and [20, 40), in chunks
        shares = [stream.process_shards(p, 2) for p in range(2)]
        assert [(s[0].start, s[-1].stop) for s in shares] == [(0, 20), (20, 40)]
        assert all(a.stop == b.start for s in shares for a, b in zip(s, s[1:]))
