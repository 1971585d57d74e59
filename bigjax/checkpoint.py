"""Orbax checkpoints of a run: the train state, the data loader's position and JSON metadata.

One CheckpointManager per run under `<run.dir>/checkpoints`. Restores go through the abstract
state with the *current* shardings, so a checkpoint written on one mesh restores on another.
A checkpoint that cannot be read is skipped with a warning for the newest one that can; one from a
different model is refused. Nothing is pickled: arrays go through orbax/tensorstore, the rest is JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from bigjax.config import CheckpointConfig
from bigjax.errors import CheckpointError, first_line
from bigjax.mesh import path_str
from bigjax.paths import COMMIT_FILE, PathLike, private_path, run_path
# what makes a checkpoint complete lives without JAX, for launchers
from bigjax.resume import REQUIRED_FILES, missing_files  # noqa: F401

log = logging.getLogger("bigjax")


class _NoOrbaxTracebacks(logging.Filter):
    """orbax logs a failed save with its traceback and then re-raises the error to us, which
    reports it as one line; the logged copy would bury that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


logging.getLogger("absl").addFilter(_NoOrbaxTracebacks())


def _quiet_closed_loop_hook(previous):
    """After a failed async write, tensorstore completes the save's other futures by calling
    `loop.call_soon_threadsafe` on orbax's already closed event loop; each RuntimeError is printed
    as "unraisable" (a traceback per future) although nothing is lost: the error that matters
    reaches us and becomes one line. Only that exact error is silenced."""
    def hook(args):
        if args.exc_type is RuntimeError and str(args.exc_value) == "Event loop is closed":
            return
        previous(args)
    return hook


sys.unraisablehook = _quiet_closed_loop_hook(sys.unraisablehook)

ITEMS = ("state", "data", "meta")
# Model keys that change neither the parameter tree nor its meaning, so a resume may change them.
RESUMABLE_MODEL_KEYS = frozenset({"dropout", "attention_dropout", "dtype", "init_std", "remat",
                                  "loss_chunk", "attention"})


def unwritable_reason(directory: PathLike) -> str | None:
    """Why files cannot be created in `directory` (made if missing), or None if they can."""
    directory = epath.Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = epath.Path(private_path(directory / ".write_test"))
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # OSError locally; object-store clients raise their own types
        return str(getattr(e, "strerror", None) or first_line(e))
    return None


def _probe_writable(directory: PathLike) -> None:
    reason = unwritable_reason(directory)
    if reason:
        raise CheckpointError(f"checkpoint directory '{directory}' is not writable "
                              f"({reason}); use a run.dir on a writable disk")


def model_config_diff(saved: dict, current: dict) -> list[str]:
    """`model.key (checkpoint X, config Y)` for every model key that would not fit the checkpoint.
    Keys only one side has are not compared (a family's schema may have gained or dropped keys
    since the checkpoint was written), except the family's name."""
    out = []
    for key in sorted(set(saved) & set(current) | {"name"}):
        if key in RESUMABLE_MODEL_KEYS or saved.get(key) == current.get(key):
            continue
        out.append(f"model.{key} (checkpoint {saved.get(key)!r}, config {current.get(key)!r})")
    return out


_HANDLER_SET = []


def _single_process_array_handler() -> None:
    """Replica-parallel saving splits every replicated array into one slice per device so that
    hosts share the writing; in one process that is only ~8 slice dispatches per array on the
    loop's time (4x the blocking of an async save in bench/checkpoint_bench.py)."""
    if _HANDLER_SET or jax.process_count() > 1:
        return
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orbax warns that it overrides its default handler
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    finally:
        absl_log.setLevel(level)
    _HANDLER_SET.append(True)


class ModelMismatch(CheckpointError):
    """The checkpoint's model config differs in keys that change the parameters."""


@dataclass
class Restored:
    step: int
    state: Any
    data_state: dict
    meta: dict


class Checkpointer:
    def __init__(self, run_dir: PathLike, cfg: CheckpointConfig):
        self.directory = run_path(run_dir) / "checkpoints"
        _single_process_array_handler()
        keep: list[policies.PreservationPolicy] = [policies.LatestN(n=cfg.keep)]
        if cfg.keep_best_metric:
            metric = cfg.keep_best_metric
            # The latest `keep` always stay (resume needs them) plus the best `keep_best` evaluated.
            keep.append(policies.BestN(get_metric_fn=lambda m: m[metric],
                                       reverse=cfg.keep_best_mode == "min", n=cfg.keep_best,
                                       keep_checkpoints_without_metrics=False))
        # best_fn only makes orbax store (and reload) each checkpoint's metrics; BestN ranks them
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save, create=True,
            best_fn=(lambda m: m[cfg.keep_best_metric]) if cfg.keep_best_metric else None,
            best_mode=cfg.keep_best_mode,
            preservation_policy=policies.AnyPreservationPolicy(keep))
        self.best_metric = cfg.keep_best_metric
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def check_writable(self) -> None:
        """Before training (not on construction: eval, predict and export only read)."""
        _probe_writable(self.directory)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def check_metrics(self, metrics: dict[str, float]) -> None:
        """keep_best_metric must be one of the evaluation's metrics."""
        if self.best_metric and self.best_metric not in metrics:
            raise CheckpointError(
                f"checkpoint.keep_best_metric='{self.best_metric}' is not an evaluation metric "
                f"(available: {', '.join(sorted(metrics))})")

    def save(self, step: int, state: Any, data_state: dict, meta: dict,
             metrics: dict[str, float] | None = None, force: bool = False) -> bool:
        if metrics is not None:
            self.check_metrics(metrics)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        try:
            return self.manager.save(step, args=args, metrics=metrics, force=force)
        except Exception as e:  # orbax re-raises a failed async save on the next call
            raise self._write_error(step, e) from e

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(None, e) from e

    def _write_error(self, step: int | None, e: BaseException) -> CheckpointError:
        # An async save fails in its thread and surfaces at the next call, so name no step.
        kept = [s for s in self.all_steps()
                if not missing_files(self.directory / str(s))]
        reason = first_line(e)
        code = re.search(r"os_error_code='(\d+)'", str(e))  # tensorstore hides errno at the end
        if code:
            reason = f"{os.strerror(int(code.group(1)))} ({reason[:200]})"
        return CheckpointError(
            f"writing a checkpoint to {self.directory} failed: {reason}; the complete "
            f"checkpoints (steps {kept or 'none'}) are untouched; free space or fix permissions, "
            f"then run again to resume")

    def restore(self, step: int, abstract_state: Any) -> Restored:
        """`abstract_state`: ShapeDtypeStructs with the target shardings (this reshards)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        try:
            out = self.manager.restore(step, args=args)
        except Exception as e:  # tensorstore, orbax and JSON report damage with many types
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be restored: {first_line(e)}")
        return Restored(step, out["state"], out["data"], out["meta"])

    def read_meta(self, step: int) -> dict:
        path = self.directory / str(step) / "meta" / "metadata"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory}: metadata "
                                  f"unreadable ({first_line(e)})")

    def _check(self, step: int, abstract_state: Any, config: dict) -> None:
        """Raise CheckpointError (damaged) or ModelMismatch (fine, but another model's).
        `config`: the run's config as plain data (`to_dict`)."""
        where = f"checkpoint step {step} in {self.directory}"
        gone = missing_files(self.directory / str(step))
        if gone:
            raise CheckpointError(f"{where} is incomplete (missing {', '.join(gone)})")
        saved_config = self.read_meta(step).get("config", {})
        diff = model_config_diff(saved_config.get("model", {}), config["model"])
        if diff:
            raise ModelMismatch(
                f"{where} was written by a different model: {'; '.join(diff)}; use the same "
                f"model config, a new run.dir, or init.from={self.directory}@{step} to start "
                f"from its parameters")
        try:
            saved = flat_shapes(read_tree_metadata(self.directory / str(step) / "state"))
        except Exception as e:
            raise CheckpointError(f"{where}: array metadata unreadable ({first_line(e)})")
        want = flat_shapes(abstract_state)
        diff = [f"{k} (checkpoint {saved.get(k, 'absent')}, model {want.get(k, 'absent')})"
                for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
        if diff:  # same model keys but another state tree (task head, optimizer): say which first
            settings = [f"{section}.{k} (checkpoint {saved_config[section].get(k)!r}, config "
                        f"{config[section].get(k)!r})"
                        for section in ("optimizer", "task") if section in saved_config
                        for k in sorted(set(saved_config[section]) | set(config[section]))
                        if saved_config[section].get(k) != config[section].get(k)]
            why = f"the config differs in {'; '.join(settings)}; " if settings else ""
            raise ModelMismatch(f"{where} does not fit this run's state: {why}arrays "
                                f"{'; '.join(diff[:5])}"
                                f"{f' and {len(diff) - 5} more' if len(diff) > 5 else ''}")

    def restore_latest(self, abstract_state: Any, config: dict) -> Restored | None:
        """The newest checkpoint that restores; damaged ones are skipped with a warning.

        A checkpoint of a different model raises before anything is read or written. Returns None
        only when the run holds no checkpoint at all; raises when all of them are unusable.
        """
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                self._check(step, abstract_state, config)
                restored = self.restore(step, abstract_state)
            except ModelMismatch:
                raise
            except CheckpointError as e:
                log.warning("warning: %s; trying an older checkpoint", e)
                damaged.append(step)
            else:
                self._set_aside(damaged)
                return restored
        if damaged:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory} (damaged: steps {damaged}); not "
                f"starting from scratch over them: move them away or use a new run.dir")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged checkpoints out of orbax's way (the resumed run saves those steps again)
        into `<run.dir>/checkpoints_damaged/`, where nothing deletes them."""
        if not steps:
            return
        if jax.process_index() == 0:
            set_aside(self.directory, steps)
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.wait()
        self.manager.close()


def set_aside(directory: PathLike, steps: list[int]) -> list[epath.Path]:
    """Move the step dirs `steps` of a checkpoints dir to `<it>_damaged/<step>-<time>`; returns
    where they went. On object storage the move is a copy then a delete (no rename there)."""
    directory = epath.Path(directory)
    aside = directory.parent / (directory.name + "_damaged")
    moved = []
    for step in steps:
        target = aside / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        try:
            aside.mkdir(parents=True, exist_ok=True)
            (directory / str(step)).rename(target)
        except OSError as e:
            raise CheckpointError(
                f"cannot move damaged checkpoint step {step} out of {directory} "
                f"({e.strerror or e}); the run would save that step again over it")
        log.warning("warning: damaged checkpoint step %d moved to %s", step, target)
        moved.append(target)
    return moved


def read_tree_metadata(item_dir: PathLike) -> Any:
    """The saved tree of one item (shapes, dtypes), without reading arrays."""
    item_dir = run_path(item_dir)  # orbax reads no array metadata through a relative path
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orbax warns that a composite item has no step metadata
    try:
        item = ocp.PyTreeCheckpointer().metadata(item_dir).item_metadata
    finally:
        absl_log.setLevel(level)
    if item is None:  # orbax returns None when tensorstore cannot read the array metadata
        raise CheckpointError(f"{item_dir}: orbax cannot read its array metadata")
    return item.tree


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`a/b/c` path -> shape for every array leaf of a state tree or orbax metadata tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "shape"):
            out[path_str(path)] = tuple(leaf.shape)
    return out


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


# ---- listing (`bigjax checkpoints RUN_DIR`) ---------------------------------------------------
@dataclass
class CheckpointInfo:
    step: int
    path: str
    time: float | None  # commit time (seconds since the epoch); None when unfinished
    size_bytes: int
    metrics: dict[str, float]
    complete: bool
    problem: str  # why it is not complete; "" when complete


def _dir_size(path: epath.Path) -> int:
    total = 0
    for child in path.iterdir():
        try:
            total += _dir_size(child) if child.is_dir() else child.stat().length
        except OSError:
            pass
    return total


def _read_json(path: epath.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def list_checkpoints(run_dir: PathLike) -> list[CheckpointInfo]:
    """Every step directory under `<run_dir>/checkpoints`, finished or not, oldest first."""
    root = run_path(run_dir, absolute=False)
    directory = root / "checkpoints"
    if not root.is_dir():
        raise CheckpointError(f"run dir '{run_dir}' does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"'{run_dir}' holds no checkpoints/ directory (is it a run dir?)")
    out = []
    for path in directory.iterdir():
        name = path.name
        head = name.split(".", 1)[0]
        if not head.isdigit():
            continue
        tmp = name != head  # orbax writes into `<step>.orbax-checkpoint-tmp-*`, then renames
        info = _read_json(path / "_CHECKPOINT_METADATA") or {}
        metrics = info.get("metrics") or {}
        # orbax keeps the metrics given to save() in their own item when best_fn is set
        metrics = _read_json(path / "metrics" / "metrics") or metrics
        gone = missing_files(path)
        problem = ("unfinished save (orbax ignores it)" if tmp or gone == [COMMIT_FILE] else
                   f"missing {', '.join(gone)}" if gone else "")
        stamp = info.get("commit_timestamp_nsecs")
        out.append(CheckpointInfo(step=int(head), path=str(path),
                                  time=stamp / 1e9 if stamp else None,
                                  size_bytes=_dir_size(path), metrics=metrics,
                                  complete=not problem, problem=problem))
    return sorted(out, key=lambda c: (c.step, c.complete))


def format_checkpoints(infos: list[CheckpointInfo]) -> str:
    rows = [("step", "time (UTC)", "size", "metrics", "status")]
    for c in infos:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c.time)) if c.time else "-"
        metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(c.metrics.items())) or "-"
        rows.append((str(c.step), when, f"{c.size_bytes / 1e6:.2f} MB", metrics,
                     "complete" if c.complete else f"INCOMPLETE: {c.problem}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4]
                     for r in rows)
