"""tensorflow-datasets sources: a prepared split read through `tfds.data_source` (random access
over ArrayRecord, no TensorFlow needed to read), as rows of plain Python values.

bigjax never downloads: a split that is not prepared is an error that says how to prepare it.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterator, Sequence

import numpy as np

from bigjax.data.sources import RecordReader
from bigjax.errors import DataError, first_line


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
        raise DataError(f"data.source: cannot open tfds:{name}: {first_line(e)}")
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
                        f"{first_line(e)} (prepare it with --file_format array_record)")
    return TfdsRecords(source, name, split, fields)
