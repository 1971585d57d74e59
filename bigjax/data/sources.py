"""Record sources: rows of {field: value} from local text, JSONL, CSV and Parquet files, and from
tensorflow-datasets, with a bad-row policy and counts of what was skipped.

For other pipelines (classification, masked LM), the API is:

    reader = RecordReader(on_bad_rows=cfg.data.on_bad_rows, fields=("text", "label"))
    for path in files_for(cfg.data.source):
        for row in reader.read(path):        # dict: field -> str / int / float
            ...
    log.info(reader.stats.summary())          # "1200 rows read, 3 skipped (2 invalid UTF-8, ...)"

`reader.row` is the row number (in the file, as in its error messages) of the record last
yielded. `fields` are the fields every row must have: a CSV/Parquet file without such a column is an error
(naming the file and its columns); a JSONL row without one is a bad row. Bad rows (not valid UTF-8,
not valid JSON, not a JSON object, a missing field) are skipped and counted with
`on_bad_rows="skip"`, or raise a `DataError` naming the file and row with `"error"`. Missing and
empty files are always errors. `tfds_records(...)` gives a random-access tfds split;
`tfds_records(...).read(reader)` iterates it with the same policy and counts.
"""

from __future__ import annotations

import csv
import difflib
import glob
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from bigjax.errors import DataError

FILE_KINDS = (".txt", ".md", ".jsonl", ".json", ".csv", ".tsv", ".parquet")


def files_for(pattern: str) -> list[str]:
    """The files a glob names, sorted (so every process sees the same order)."""
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise DataError(f"data.source: no files match '{pattern}' (expected a path or glob of "
                        f"{'/'.join(FILE_KINDS)} files, tfds:NAME or builtin:pydocs)")
    return files


@dataclass
class ReadStats:
    """What a reader saw: rows kept, and rows skipped by reason (for the logs)."""
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.rows} rows read"
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{self.rows} rows read, {self.skipped_total} skipped ({why})"


def _has_surrogates(s: str) -> bool:
    # bytes that are not UTF-8 were decoded with surrogateescape into U+DC80..U+DCFF
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


class RecordReader:
    """Reads records from files with the `data.on_bad_rows` policy; `.stats` counts rows."""

    def __init__(self, on_bad_rows: str = "error", fields: Sequence[str] = ("text",)):
        if on_bad_rows not in ("skip", "error"):
            raise DataError(f"data.on_bad_rows: got {on_bad_rows!r}, expected 'skip' or 'error'")
        self.on_bad_rows, self.fields = on_bad_rows, tuple(fields)
        self.stats = ReadStats()
        self.row = 0  # the file's row number of the record last yielded, for error messages

    def _bad(self, path: str, row: int, reason: str) -> None:
        if self.on_bad_rows == "error":
            raise DataError(f"{path}: row {row}: {reason} (set data.on_bad_rows=skip to skip "
                            "and count such rows)")
        self.stats.skipped[reason.split(" (")[0].split(":")[0]] += 1

    def _check_columns(self, path: str, columns: Sequence[str]) -> None:
        missing = [f for f in self.fields if f not in columns]
        if missing:
            raise DataError(f"{path}: no column '{missing[0]}' (columns: {', '.join(columns)}); "
                            "set data.text_field / data.label_field to one of them")

    def read(self, path: str) -> Iterator[dict]:
        """Rows of one file; .txt/.md give one record per blank-line-separated paragraph."""
        if not os.path.isfile(path):
            raise DataError(f"{path}: file does not exist")
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: file is empty")
        ext = os.path.splitext(path)[1].lower()
        reader = {".jsonl": self._jsonl, ".json": self._json, ".csv": self._csv,
                  ".tsv": self._csv, ".parquet": self._parquet}.get(ext, self._text)
        n = 0
        for row in reader(path):
            n += 1
            self.stats.rows += 1
            yield row
        if n == 0:
            raise DataError(f"{path}: holds no usable records ({self.stats.summary()} so far)")

    def _lines(self, path: str) -> Iterator[tuple[int, str]]:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
            yield from enumerate(fh, 1)

    def _text(self, path: str) -> Iterator[dict]:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            paras = fh.read().split("\n\n")
        for i, para in enumerate(paras, 1):
            if not para.strip():
                continue
            if _has_surrogates(para):
                self._bad(path, i, "not valid UTF-8 (paragraph)")
                continue
            self.row = i
            yield {self.fields[0] if self.fields else "text": para}

    def _jsonl(self, path: str) -> Iterator[dict]:
        for i, line in self._lines(path):
            if not line.strip():
                continue
            if _has_surrogates(line):
                self._bad(path, i, "not valid UTF-8")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                self._bad(path, i, f"not valid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                self._bad(path, i, f"not a JSON object (got {type(row).__name__})")
                continue
            missing = [f for f in self.fields if f not in row]
            if missing:
                self._bad(path, i, f"missing field '{missing[0]}' (has: {', '.join(row)})")
                continue
            self.row = i
            yield row

    def _json(self, path: str) -> Iterator[dict]:
        """A .json file is either one array of objects or JSON lines."""
        with open(path, "rb") as fh:
            if fh.read(64).lstrip()[:1] != b"[":
                yield from self._jsonl(path)
                return
        try:
            with open(path, encoding="utf-8") as fh:
                rows = json.load(fh)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:  # one document: no row to skip
            raise DataError(f"{path}: not a valid JSON array of objects ({e})")
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                self._bad(path, i, f"not a JSON object (got {type(row).__name__})")
            elif missing := [f for f in self.fields if f not in row]:
                self._bad(path, i, f"missing field '{missing[0]}' (has: {', '.join(row)})")
            else:
                self.row = i
                yield row

    def _csv(self, path: str) -> Iterator[dict]:
        delim = "\t" if path.lower().endswith(".tsv") else ","
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delim)
            self._check_columns(path, reader.fieldnames or [])
            for i, row in enumerate(reader, 1):
                if any(_has_surrogates(v) for v in row.values() if isinstance(v, str)):
                    self._bad(path, i, "not valid UTF-8")
                    continue
                if any(row.get(f) is None for f in self.fields):  # a short row
                    self._bad(path, i, f"too few columns ({len([v for v in row.values() if v is not None])})")
                    continue
                self.row = i
                yield row

    def _parquet(self, path: str) -> Iterator[dict]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})")
        self._check_columns(path, pf.schema_arrow.names)
        i = 0
        for batch in pf.iter_batches(columns=list(self.fields) or None):
            for row in batch.to_pylist():
                i += 1
                bad = [k for k, v in row.items() if isinstance(v, bytes)]
                try:
                    row.update({k: row[k].decode("utf-8") for k in bad})
                except UnicodeDecodeError:
                    self._bad(path, i, "not valid UTF-8")
                    continue
                self.row = i
                yield row


def read_records(path: str, text_field: str = "text", on_bad_rows: str = "error") -> Iterator[dict]:
    """Rows of one file that carry `text_field` (the simple form of `RecordReader.read`)."""
    yield from RecordReader(on_bad_rows, (text_field,)).read(path)


# ---- tensorflow-datasets ---------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """tfds values (numpy scalars, bytes) as plain Python; bytes must be UTF-8."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return value


class TfdsRecords:
    """A random-access tfds split as rows of plain Python values (a grain source)."""

    def __init__(self, source: Any, name: str, split: str, fields: Sequence[str]):
        self.source, self.name, self.split, self.fields = source, name, split, tuple(fields)
        if len(source) == 0:
            raise DataError(f"tfds:{name} split '{split}' is empty")
        first = source[0]
        missing = [f for f in self.fields if f not in first]
        if missing:
            raise DataError(f"tfds:{name}: no feature '{missing[0]}' (features: "
                            f"{', '.join(first)}); set data.text_field / data.label_field")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        row = self.source[i]
        try:
            return {k: _plain(row[k]) for k in (self.fields or row)}
        except UnicodeDecodeError:
            raise DataError(f"tfds:{self.name} split '{self.split}': row {i + 1}: not valid UTF-8")

    def read(self, reader: RecordReader) -> Iterator[dict]:
        """Every row in order, with `reader`'s bad-row policy and counts (in this process, so a
        bad row never surfaces inside a loader worker)."""
        for i in range(len(self.source)):
            try:
                row = self[i]
            except DataError:
                reader._bad(f"tfds:{self.name} split '{self.split}'", i + 1, "not valid UTF-8")
                continue
            reader.row = i + 1
            reader.stats.rows += 1
            yield row


# tfds imports its older builder packages lazily; a name from one is unknown until it is imported
_TFDS_PACKAGES = ("text", "image_classification", "structured", "translate", "summarization",
                  "question_answering", "audio", "image", "video", "object_detection")


def _register_legacy_builders() -> None:
    import importlib

    for pkg in _TFDS_PACKAGES:
        try:
            importlib.import_module(f"tensorflow_datasets.{pkg}")
        except Exception:  # a package that needs TensorFlow: its datasets stay unknown here
            pass


def tfds_records(spec: str, split: str, data_dir: str = "",
                 fields: Sequence[str] = ("text",)) -> TfdsRecords:
    """`spec` is `tfds:NAME[/CONFIG]`; the split must be prepared already (never downloads)."""
    import tensorflow_datasets as tfds

    name = spec[len("tfds:"):]
    data_dir = data_dir or None
    try:
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            _register_legacy_builders()  # e.g. glue lives in a lazily imported package
            builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        known = sorted(set(tfds.list_builders(with_community_datasets=False)))  # has duplicates
        close = difflib.get_close_matches(name.split("/")[0], known, n=5, cutoff=0.6)
        hint = f"close names: {', '.join(close)}" if close else "see tfds.list_builders()"
        raise DataError(f"data.source: unknown tensorflow-datasets name '{name}' ({hint})")
    except (ValueError, ImportError) as e:
        raise DataError(f"data.source: cannot open tfds:{name}: {str(e).splitlines()[0]}")
    known_splits = list(builder.info.splits.keys())
    base_split = split.split("[")[0]
    if known_splits and base_split not in known_splits:
        raise DataError(f"data.split: tfds:{name} has no split '{split}' "
                        f"(splits: {', '.join(sorted(known_splits))})")
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises assorted types; only the preparation state matters here
        if not builder.is_prepared():
            where = data_dir or "~/tensorflow_datasets"
            raise DataError(
                f"data.source: tfds:{name} is not prepared in {where} and bigjax never downloads; "
                f"on a machine with network run `tfds build {name} --data_dir {where} "
                f"--file_format array_record` (or the same with tfds.builder(...)."
                f"download_and_prepare(file_format='array_record')) and set data.dir")
        raise DataError(f"data.source: cannot read tfds:{name} split '{split}': "
                        f"{str(e).splitlines()[0]} (prepare it with --file_format array_record)")
    return TfdsRecords(source, name, split, fields)
