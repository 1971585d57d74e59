"""Run-dir paths through `etils.epath`, so a run dir may be local or a `gs://` / `s3://` URI.

Everything a run writes or reads in its run dir goes through here or through `epath.Path` directly
(orbax and tensorstore take the same URIs). What needs a local file (Hugging Face tokenizers'
`save_pretrained` / `from_pretrained`) goes through a local temporary copy. No JAX here:
`bigjax.resume` and the config loader use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from typing import Iterator, Union

from etils import epath

from bigjax.errors import ConfigError

PathLike = Union[str, os.PathLike]
# `file://` is no epath scheme (it would become a relative path `file:/...`): it is stripped here
_FILE = "file://"
# orbax's commit-file protocol: on gs:// it writes a step in place and marks it done with this
COMMIT_FILE = "commit_success.txt"
# object stores that orbax/tensorstore (arrays) and epath (everything else) both write
REMOTE_SCHEMES = ("gs", "s3")


def run_path(path: PathLike, absolute: bool = True) -> epath.Path:
    """`path` as an `epath.Path`: `file:///x` -> `/x`, local paths made absolute (orbax reads no
    array metadata through a relative path) unless not `absolute`, `gs://`, `s3://` kept."""
    text = os.fspath(path)
    if text.startswith(_FILE):
        text = text[len(_FILE):]
        if not text.startswith("/"):  # file://host/x names another machine's file
            raise ConfigError(f"'{path}': a file:// URI needs an absolute path (file:///x)")
    p = epath.Path(text)
    return p if is_remote(p) or not absolute else epath.Path(os.path.abspath(text))


def run_dir_problem(value: str) -> str | None:
    """Why `value` cannot be a run dir, or None. A scheme epath does not know would silently
    become a local directory named `gcs:` (epath reads `gcs://b/x` as a relative path)."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        return None
    if scheme == "file":
        return None if rest.startswith("/") else "a file:// URI needs an absolute path (file:///x)"
    if scheme in REMOTE_SCHEMES and rest.strip("/"):
        return None
    return (f"unknown storage '{scheme}://' (expected a local path, file:///abs/path, "
            f"gs://BUCKET/PATH or s3://BUCKET/PATH)")


def run_str(path: PathLike) -> str:
    """`run_path` as the string stored in a config (`run.dir`), printed in messages."""
    return os.fspath(run_path(path))


def is_remote(path: PathLike) -> bool:
    """A URI of object storage (`gs://`, `s3://`, ...), not a local path."""
    text = os.fspath(path)
    return "://" in text and not text.startswith(_FILE)


def private_path(path: PathLike) -> str:
    """A sibling of `path` that no other process writes, for write-then-rename: several hosts of a
    pod write the same run dir on shared storage, and containers often share process ids."""
    return f"{os.fspath(path)}.tmp-{socket.gethostname()}-{os.getpid()}"


def write_text(path: PathLike, text: str) -> None:
    """Write a small file whole or not at all: into a private sibling, then replace. (On object
    storage the upload of one object is atomic already; the replace costs one copy.)"""
    target = epath.Path(path)
    tmp = epath.Path(private_path(target))
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)


def copy_tree(src: PathLike, dst: PathLike) -> None:
    """Copy a directory's files (recursively) from any backend to any backend (dst made)."""
    src, dst = epath.Path(src), epath.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            copy_tree(child, dst / child.name)
        else:
            (dst / child.name).write_bytes(child.read_bytes())


@contextlib.contextmanager
def local_dir(path: PathLike) -> Iterator[str]:
    """A local directory holding what `path` holds, for libraries that only read local files:
    `path` itself when local, else a temporary download (removed on exit)."""
    if not is_remote(path):
        yield os.fspath(run_path(path))
        return
    with tempfile.TemporaryDirectory(prefix="bigjax-") as tmp:
        copy_tree(path, tmp)
        yield tmp


def publish_dir(local_tmp: str, final: PathLike) -> None:
    """Move a finished local dir into place at `final` (local or remote). If another process got
    there first (same content: tokenizers trained here are deterministic), keep theirs.

    Locally this is one atomic rename. On object storage no rename is atomic: the files go to a
    private sibling, which is then renamed object by object; readers wait for process 0 at a
    barrier (data/lm.py), so none of them sees it half-moved."""
    target = epath.Path(final)
    if is_remote(target):
        staged = epath.Path(private_path(target))
        copy_tree(local_tmp, staged)
        epath.Path(local_tmp).rmtree()
        src = staged
    else:
        src = epath.Path(local_tmp)
    try:
        src.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        src.rmtree(missing_ok=True)


def local_staging(final: PathLike) -> str:
    """A new empty local dir where a library may write what goes to `final` (see publish_dir):
    next to `final` when local (so the rename stays on one file system), in /tmp otherwise."""
    if is_remote(final):
        return tempfile.mkdtemp(prefix="bigjax-staging-")
    parent = os.path.dirname(os.fspath(run_path(final)))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would stay on the published dir: others read it
    return staging


def file_size(path: PathLike) -> int:
    """Bytes of a file, local or on object storage."""
    if not is_remote(path):
        return os.path.getsize(os.fspath(run_path(path)))
    return int(epath.Path(path).stat().length)


@contextlib.contextmanager
def local_file(path: PathLike) -> Iterator[str]:
    """A local file holding what `path` holds, for readers that only open local files (ArrayRecord):
    `path` itself when local, else a temporary download (streamed, removed on exit)."""
    if not is_remote(path):
        yield os.fspath(run_path(path))
        return
    fd, tmp = tempfile.mkstemp(prefix="bigjax-shard-")
    try:
        with os.fdopen(fd, "wb") as out, epath.Path(path).open("rb") as src:
            shutil.copyfileobj(src, out, 8 << 20)
        yield tmp
    finally:
        os.remove(tmp)


def local_target(final: PathLike) -> str:
    """A local file name to write what goes to `final` (see put_file): a hidden private sibling
    when local (one file system, so the move is a rename), in /tmp otherwise."""
    if is_remote(final):
        fd, tmp = tempfile.mkstemp(prefix="bigjax-upload-")
        os.close(fd)
        return tmp
    target = run_path(final)
    return os.fspath(target.parent / ("." + os.path.basename(private_path(target))))


def put_file(local: str, final: PathLike) -> None:
    """Move a finished local file to `final`: a rename locally; on object storage one upload
    (an object appears whole or not at all), then the local file is removed."""
    if not is_remote(final):
        os.replace(local, os.fspath(run_path(final)))
        return
    try:
        with open(local, "rb") as src, epath.Path(final).open("wb") as out:
            shutil.copyfileobj(src, out, 8 << 20)
    finally:
        os.remove(local)
