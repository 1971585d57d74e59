"""Record sources: rows of {field: value} from local text, JSONL and CSV files.

(Extended by the input-pipeline work with tensorflow-datasets, Parquet and bad-row accounting.)
"""

from __future__ import annotations

import csv
import glob
import json
import os
from typing import Iterator

from bigjax.errors import DataError


def files_for(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise DataError(f"data.source: no files match '{pattern}'")
    return files


def read_records(path: str, text_field: str = "text") -> Iterator[dict]:
    """Rows of one file; .txt files give one record per blank-line-separated paragraph."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i}: not valid JSON ({e.msg})")
    elif ext == ".csv":
        with open(path, encoding="utf-8", errors="replace", newline="") as fh:
            yield from csv.DictReader(fh)
    else:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for para in fh.read().split("\n\n"):
                if para.strip():
                    yield {text_field: para}
