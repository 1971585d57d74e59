"""A `gs://` that lives in memory: etils.epath's fsspec backend over an fsspec memory file system.

With it, code that reaches a run dir through epath works on `gs://bucket/...` in a test, and code
that would fall back to `os` (os.path.isdir("gs://...") is False, open() makes a local `gs:` dir)
fails visibly. orbax/tensorstore write arrays through their own GCS driver, which this does not
fake: what is tested on it is everything bigjax itself reads and writes in a run dir.
"""

from __future__ import annotations

import os

import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem


class _BucketFS(MemoryFileSystem):
    """`gs://b/x` is stored as `/gs/b/x` (the memory fs keeps URIs with a scheme as opaque keys,
    without parent directories)."""

    protocol = ("fakegs",)

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        if path.startswith("gs://"):
            path = "/gs/" + path[len("gs://"):]
        return super()._strip_protocol(path)


class _BucketBackend(epath_backend._FileSystemSpecBackend):  # the backend epath uses for gs://
    def __init__(self):
        self.memory = _BucketFS(global_store=False, skip_instance_cache=True)

    def fs(self, path):
        return self.memory


@pytest.fixture
def bucket(monkeypatch):
    """Routes every `gs://` epath of the test to a fresh in-memory store; yields that store's
    file names (`/gs/bucket/...`) as a function."""
    backend = _BucketBackend()
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", backend)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # TensorFlow would take gs://
    cwd_before = set(os.listdir("."))
    yield lambda: sorted(backend.memory.store)
    # an os fallback writes `gs:/bucket/...` relative to the working directory
    assert set(os.listdir(".")) - cwd_before == set()
