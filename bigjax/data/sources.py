"""Record sources: rows of {field: value} from local text, JSON(L), CSV and Parquet files, with a
bad-row policy and counts of what was skipped.

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
empty files are always errors. tensorflow-datasets splits: `bigjax.data.tfds_source`, whose
`tfds_records(...).read(reader)` iterates a split with the same policy and counts.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from bigjax.errors import DataError, first_line
from bigjax.paths import is_remote

FILE_KINDS = (".txt", ".md", ".jsonl", ".json", ".csv", ".tsv", ".parquet")


def files_for(pattern: str) -> list[str]:
    """The files a glob names, sorted (so every process sees the same order)."""
    if is_remote(pattern):  # only prepared dirs are read from object storage (bigjax.data.prepared)
        raise DataError(f"data.source: '{pattern}' is on object storage but is no prepared dir "
                        "(no manifest.json there); files are read from local or mounted paths: "
                        "run `bigjax data prepare CONFIG --out URI` on local files and set "
                        "data.source to that URI, or mount the bucket")
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
            raise DataError(f"{path}: not a readable Parquet file ({first_line(e)})")
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
