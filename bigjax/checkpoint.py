"""Orbax checkpoints of a run: the train state, the data loader's position and JSON metadata.

One CheckpointManager per run under `<run.dir>/checkpoints`. Restores go through the abstract
state with the *current* shardings, so a checkpoint written on one mesh restores on another.
Nothing is pickled: arrays go through orbax/tensorstore, the rest is JSON.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from bigjax.config import CheckpointConfig
from bigjax.errors import CheckpointError


class Checkpointer:
    def __init__(self, run_dir: str, cfg: CheckpointConfig):
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        best = bool(cfg.keep_best_metric)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            create=True,
            best_fn=(lambda m: m[cfg.keep_best_metric]) if best else None,
            best_mode=cfg.keep_best_mode,
            keep_checkpoints_without_metrics=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, meta: dict,
             metrics: dict[str, float] | None = None, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """`abstract_state`: ShapeDtypeStructs with the target shardings (this reshards)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        try:
            out = self.manager.restore(step, args=args)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be restored: "
                f"{str(e).splitlines()[0][:300]}")
        return out["state"], out["data"], out["meta"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
