"""`build`: a resolved config and a mesh -> the components of a run, wired in one place.

The trainer, `convert`, the benches, the tests and users' scripts all build through here: model
spec, task, optimizer and schedule, the state's abstract shapes and shardings, the batch
sharding, and the jitted train and eval steps (compiled on first call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import optax
from jax.sharding import Mesh, NamedSharding

from bigjax import mesh as mesh_lib
from bigjax.config import Config, compute_dtype
from bigjax.optim import ParamRules, make_optimizer, param_rules
from bigjax.state import ModelSpec, TrainState, count_params, init_state, model_spec, state_shardings
from bigjax.step import (jit_eval_step, jit_train_step, jit_train_step_with_inputs, make_eval_step,
                         make_train_step, with_activation_sharding)
from bigjax.tasks import Task, make_task


@dataclass(frozen=True)
class Components:
    cfg: Config
    mesh: Mesh
    spec: ModelSpec
    task: Task
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract: TrainState  # shapes and dtypes of the state
    shardings: TrainState  # the state's NamedShardings
    batch_sharding: NamedSharding  # splits the leading (batch) axis of every batch array
    train_step: Callable  # (state, batch) -> (state, metrics); donates the state
    eval_step: Callable  # (params, model_state, batch) -> additive statistics
    rules: ParamRules  # which parameters train (frozen rules, LoRA) and what each rule matched
    # the float parameters from the state's `params` inside a jitted function (int8 runs
    # dequantise there, bigjax/compress.py); None: they are the parameters
    param_view: Callable | None = None

    @property
    def n_params(self) -> int:
        return count_params(self.spec.abstract_params)

    def init_state(self) -> TrainState:
        """A fresh state, every array created directly in its shards."""
        return init_state(self.cfg, self.tx, self.shardings)

    def jit_eval(self, fn: Callable) -> Callable:
        """`fn(params, model_state, batch)` jitted like the eval step (activation constraints on
        this mesh, the state's shardings in, replicated out): predict and generate use it."""
        view = self.param_view
        inner = fn if view is None else (lambda p, ms, b: fn(view(p), ms, b))
        return jit_eval_step(with_activation_sharding(inner, self.mesh, self.cfg.sharding.rules),
                             self.shardings, self.batch_sharding, dtype=compute_dtype(self.cfg))


def build(cfg: Config, mesh: Mesh) -> Components:
    """Raises ConfigError for a batch or a parameter that does not split over the mesh."""
    mesh_lib.check_batch(cfg.train, cfg.sharding.rules, mesh)
    task = make_task(cfg)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    spec = model_spec(cfg)
    abstract, shardings = state_shardings(cfg, spec, tx, mesh)
    # rank-1 spec: splits the leading (batch) axis of every batch array, whatever its rank
    # (classification labels are (B,), token arrays (B, T))
    axes = cfg.sharding.rules
    batch_sharding = NamedSharding(mesh, mesh_lib.batch_spec(axes, mesh, 1))
    rules = param_rules(cfg, spec.abstract_params)  # a rule that matches nothing fails here
    dtype = compute_dtype(cfg)  # picks the XLA:CPU options (bigjax/xla_cpu.py)
    step = make_train_step(spec, task, tx, schedule, grad_accum=cfg.train.grad_accum, seed=cfg.seed,
                           trainable=None if rules.all_trainable else rules.trainable)
    if hasattr(task, "step_inputs"):  # e.g. a distillation teacher: loaded on the first step
        train_step = jit_train_step_with_inputs(
            with_activation_sharding(step, mesh, axes), shardings, batch_sharding,
            lambda: task.step_inputs(mesh, axes), dtype=dtype)
    else:
        train_step = jit_train_step(with_activation_sharding(step, mesh, axes), shardings,
                                    batch_sharding, dtype=dtype)
    eval_step = jit_eval_step(with_activation_sharding(make_eval_step(spec, task), mesh, axes),
                              shardings, batch_sharding, dtype=dtype)
    return Components(cfg, mesh, spec, task, tx, schedule, abstract, shardings, batch_sharding,
                      train_step, eval_step, rules)


def one_device(cfg: Config) -> Components:
    """The components on a one-device mesh (conversion and inspection need no more)."""
    import jax

    from bigjax.config import MeshConfig
    return build(cfg, mesh_lib.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))


__all__ = ["Components", "build", "one_device"]
