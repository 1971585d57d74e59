"""Record sources: formats, configurable fields, the bad-row policy and its counts, clear errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bigjax.data.sources import RecordReader, files_for, read_records
from bigjax.errors import DataError


def write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_all_formats_give_the_same_rows(tmp_path):
    rows = [{"body": "first doc", "y": "1"}, {"body": "second, with \"quotes\"\nand a newline", "y": "0"}]
    jsonl = write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows).encode() + b"\n\n")
    csv_path = tmp_path / "a.csv"
    import csv
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["y", "body"])
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    array = write(tmp_path / "b.json", json.dumps(rows, indent=1).encode())
    for path in (jsonl, str(csv_path), str(tmp_path / "a.parquet"), array):
        got = list(RecordReader("error", ("body", "y")).read(path))
        assert [{k: r[k] for k in ("body", "y")} for r in got] == rows, path
    txt = write(tmp_path / "a.txt", b"para one\nline two\n\n\npara two\n")
    assert [r["body"] for r in read_records(txt, "body")] == ["para one\nline two", "\npara two\n"]
    with pytest.raises(DataError, match=r"c.json: not a valid JSON array of objects \(Expecting"):
        list(read_records(write(tmp_path / "c.json", b'[{"text": "a"}, oops]')))
    assert files_for(str(tmp_path / "a.*")) == sorted(
        str(tmp_path / f"a.{e}") for e in ("csv", "jsonl", "parquet", "txt"))


BAD_JSONL = (b'{"text": "ok 1"}\n'
             b'{"text": "bad \xff\xfe bytes"}\n'
             b'{"text": broken\n'
             b'["a list"]\n'
             b'{"other": 1}\n'
             b'{"text": "ok 2"}\n')


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = write(tmp_path / "d.jsonl", BAD_JSONL)
    reader = RecordReader("skip", ("text",))
    assert [(r["text"], reader.row) for r in reader.read(path)] == [("ok 1", 1), ("ok 2", 6)]
    assert reader.stats.rows == 2 and reader.stats.skipped_total == 4
    assert reader.stats.summary() == ("2 rows read, 4 skipped (1 missing field 'text', "
                                      "1 not a JSON object, 1 not valid JSON, 1 not valid UTF-8)")


@pytest.mark.parametrize("data, row, reason", [
    (BAD_JSONL, 2, "not valid UTF-8"),
    (b'{"text": "ok"}\n{"text": broken\n', 2, "not valid JSON (Expecting value)"),
    (b'{"text": "ok"}\n{"txt": "x"}\n', 2, "missing field 'text' (has: txt)"),
])
def test_bad_rows_with_error_policy_name_file_and_row(tmp_path, data, row, reason):
    path = write(tmp_path / "d.jsonl", data)
    with pytest.raises(DataError) as e:
        list(read_records(path, "text", on_bad_rows="error"))
    assert str(e.value) == (f"{path}: row {row}: {reason} (set data.on_bad_rows=skip to skip "
                            "and count such rows)")


def test_csv_bad_utf8_row_and_missing_column(tmp_path):
    path = write(tmp_path / "d.csv", b"text,label\nfine,1\nbad \xff,0\nalso fine,1\n")
    reader = RecordReader("skip", ("text", "label"))
    assert [r["text"] for r in reader.read(path)] == ["fine", "also fine"]
    assert reader.stats.summary() == "2 rows read, 1 skipped (1 not valid UTF-8)"
    with pytest.raises(DataError) as e:
        list(RecordReader("skip", ("sentence",)).read(path))
    assert str(e.value) == (f"{path}: no column 'sentence' (columns: text, label); "
                            "set data.text_field / data.label_field to one of them")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet: no column 'text' \(columns: a\)"):
        list(read_records(str(tmp_path / "p.parquet")))


def test_missing_empty_and_unmatched_files(tmp_path):
    with pytest.raises(DataError, match=r"no files match '.*nothing\*\.jsonl' \(expected a path"):
        files_for(str(tmp_path / "nothing*.jsonl"))
    empty = write(tmp_path / "e.jsonl", b"")
    with pytest.raises(DataError, match=r"e.jsonl: file is empty$"):
        list(read_records(empty))
    blank = write(tmp_path / "b.txt", b"\n\n  \n")
    with pytest.raises(DataError, match=r"b.txt: holds no usable records \(0 rows read so far\)"):
        list(read_records(blank))
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(read_records(write(tmp_path / "x.parquet", b"not parquet")))
