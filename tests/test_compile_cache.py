"""Where `bigjax` commands keep JAX's persistent compilation cache, and a bad place for it.
(That runs reuse it and still resume bitwise: tests/test_checkpoint.py, whose runs all share one.)"""

import os

import jax

from bigjax import compile_cache
from bigjax.cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("BIGJAX_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("BIGJAX_CACHE_DIR", str(tmp_path))
    assert compile_cache.directory() == os.path.join(str(tmp_path), "xla")
    monkeypatch.setenv("BIGJAX_COMPILE_CACHE", "gs://bucket/xla")
    assert compile_cache.directory() == "gs://bucket/xla"
    for off in ("off", "OFF", "0", "false"):
        monkeypatch.setenv("BIGJAX_COMPILE_CACHE", off)
        assert compile_cache.directory() is None
    # the user's own JAX setting wins (jax reads it itself)
    monkeypatch.setenv("BIGJAX_COMPILE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compile_cache.directory() is None


def test_an_uncreatable_cache_dir_is_one_line_before_anything_is_written(monkeypatch, tmp_path,
                                                                         capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("BIGJAX_COMPILE_CACHE", str(blocker / "xla"))
    before = jax.config.jax_compilation_cache_dir
    rc = run(["train", "configs/gpt_tiny.yaml", f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == (f"bigjax: error: BIGJAX_COMPILE_CACHE: cannot create "
                               f"'{blocker}/xla' (Not a directory); set it to a writable "
                               "directory, or to 'off'"), err
    assert blocker.read_text() == "x" and not (tmp_path / "run").exists()
    assert jax.config.jax_compilation_cache_dir == before


def test_an_unknown_storage_scheme_is_one_line_and_creates_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("BIGJAX_COMPILE_CACHE", "gcs://bucket/xla")
    monkeypatch.chdir(tmp_path)
    rc = run(["train", os.path.join(ROOT, "configs/gpt_tiny.yaml"), f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("bigjax: error: BIGJAX_COMPILE_CACHE=gcs://bucket/xla: unknown "
                               "storage 'gcs://' (expected a local path, file:///abs/path, "
                               "gs://BUCKET/PATH or s3://BUCKET/PATH), or 'off'"), err
    assert os.listdir(tmp_path) == []  # no local directory named gcs:
