"""JAX's persistent compilation cache for `bigjax` commands.

A resumed run (after a preemption), `eval` after `train`, a second finetune of the same config:
each compiles programs an earlier command already compiled. With the cache on, XLA's executables
are written once and read back (the key is the program, the compiler options, jax's version and
the devices), so the same program never compiles twice on a machine. On a pod only process 0
writes (jax's rule); point every host at shared storage (a `gs://` path) to share it.

`BIGJAX_COMPILE_CACHE`: a directory, or `off`; unset = `<bigjax cache dir>/xla`
(`$BIGJAX_CACHE_DIR`, else `~/.cache/bigjax`). A `JAX_COMPILATION_CACHE_DIR` set by the user wins:
jax reads it itself. `bigjax bench` leaves the cache off, so its `compile_s` is a compile.
"""

from __future__ import annotations

import os
import warnings

from etils import epath

from bigjax.errors import ConfigError, first_line
from bigjax.paths import run_dir_problem, run_str

OFF = ("off", "0", "false", "no")


def directory() -> str | None:
    """Where the cache lives for this process (None: off or left to JAX_COMPILATION_CACHE_DIR)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    value = os.environ.get("BIGJAX_COMPILE_CACHE", "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return value
    from bigjax.perf import cache_dir  # imports jax: not before cli.main has set up host memory
    return str(epath.Path(cache_dir()) / "xla")


def enable() -> None:
    """Turn the cache on (before the first compile); programs that compile in under a second
    are not stored (jax's default threshold: reading them back would save nothing)."""
    # jax 0.10's XLA:CPU cannot serialise a step whose products run on oneDNN (bigjax/xla_cpu.py,
    # float32): such a step is not stored and compiles each time; say nothing on every compile
    warnings.filterwarnings("ignore", message=r"Error writing persistent compilation cache entry"
                            r".*onednn")
    path = directory()
    if path is None:
        return
    # the same URIs a run dir takes: a typo such as gcs:// would otherwise become a local dir
    problem = run_dir_problem(path)
    if problem:
        raise ConfigError(f"BIGJAX_COMPILE_CACHE={path}: {problem}, or 'off'")
    path = run_str(path)  # file:///x -> /x, relative -> absolute
    try:
        epath.Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"BIGJAX_COMPILE_CACHE: cannot create {path!r} "
                          f"({e.strerror or first_line(e)}); set it to a writable directory, "
                          "or to 'off'") from None
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
