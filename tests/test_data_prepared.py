"""Prepared data dirs (bigjax.data.prepare, prepared) on object storage: `data prepare --out gs://`
writes through etils.epath, resumes there, and `data.source: gs://...` trains on the same windows
as the tokenized files. The bucket is tests/fake_bucket.py's in-memory gs://, which is not the os:
a path that slipped past epath would fail (or leave a local `gs:` dir, which the fixture checks)."""

import glob
import os
import tempfile

import pytest
from etils import epath

from fake_bucket import bucket  # noqa: F401  (fixture)
from bigjax import cli
from bigjax.config import load_config
from bigjax.data.lm import build_lm_data
from bigjax.data.prepare import prepare
from bigjax.errors import DataError
from stream_helpers import write_corpus

OUT = "gs://bucket/prepared"


def lm_config(tmp_path, *overrides):
    return load_config(None, ["data.vocab_size=300", "train.seq_len=16", "train.batch_size=4",
                              f"run.dir={tmp_path}/run", "data.val_fraction=0.2", *overrides])


def first_epoch(cfg, tmp_path) -> list:
    data = build_lm_data(cfg, str(tmp_path))
    return [ex["inputs"].tolist() for ex in data.train.pipeline(0, 1, seed=0, shuffle=False,
                                                                 epochs=1)]


def shard_copies() -> set:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "bigjax-shard-*")))


def test_prepare_to_a_bucket_resumes_there_and_trains_on_the_uri(bucket, tmp_path):  # noqa: F811
    root = str(tmp_path / "corpus")
    write_corpus(root)
    raw = lm_config(tmp_path, f"data.source={root}/*.jsonl", "data.stream=true",
                    "data.tokenizer_sample_chars=3000")
    done = prepare(raw, OUT)
    assert (done["written"], done["skipped"]) == (6, 0)
    names = bucket()
    assert [n for n in names if n.endswith(".array_record")] == [
        f"/gs/bucket/prepared/shard-{i:05d}.array_record" for i in range(6)]
    assert "/gs/bucket/prepared/manifest.json" in names
    assert "/gs/bucket/prepared/tokenizer/tokenizer.json" in names
    assert not [n for n in names if ".tmp" in n]  # shards and JSON land whole, no leftovers
    assert not glob.glob(os.path.join(tempfile.gettempdir(), "bigjax-upload-*"))

    # killed before shard 3's JSON (its "done" mark): the rerun writes that shard only
    epath.Path(f"{OUT}/shard-00003.json").unlink()
    again = prepare(raw, OUT)
    assert (again["written"], again["skipped"]) == (1, 5)
    assert again["manifest"] == done["manifest"]

    # training reads the ids from the bucket: the windows of tokenizing the files themselves
    before = shard_copies()
    from_ids = first_epoch(lm_config(tmp_path, f"data.source={OUT}"), tmp_path)
    tokenized = first_epoch(lm_config(tmp_path, f"data.source={root}/*.jsonl", "data.stream=true",
                                      f"data.tokenizer={OUT}/tokenizer"), tmp_path)
    assert from_ids == tokenized and len(from_ids) > 20
    assert shard_copies() == before  # each shard's local copy is removed once it is read


def test_a_bucket_uri_that_is_no_prepared_dir_is_one_line(bucket, tmp_path, capsys):  # noqa: F811
    with pytest.raises(DataError) as e:
        build_lm_data(lm_config(tmp_path, "data.source=gs://bucket/raw/*.jsonl",
                                "data.stream=true"), str(tmp_path))
    assert str(e.value) == (
        "data.source: 'gs://bucket/raw/*.jsonl' is on object storage but is no prepared dir (no "
        "manifest.json there); files are read from local or mounted paths: run `bigjax data "
        "prepare CONFIG --out URI` on local files and set data.source to that URI, or mount the "
        "bucket")
    (tmp_path / "c.yaml").write_text("seed: 0\n")
    code = cli.run(["train", str(tmp_path / "c.yaml"), "data.source=gs://bucket/raw",
                    f"run.dir={tmp_path}/run2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("bigjax: error: data.source: 'gs://bucket/raw' is on "
                                        "object storage but is no prepared dir")
    assert "\n" not in err
