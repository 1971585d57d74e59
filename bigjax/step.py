"""The pure train and eval steps: functions of (state, batch), jitted with explicit shardings.

The step knows nothing of objectives: it asks the task for additive statistics, so the same step
serves pretraining and finetuning. Gradient accumulation scans over micro-batches and divides the
summed gradient by the summed weight once, which makes k micro-batches of b exactly one batch of k*b.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from bigjax import xla_cpu
from bigjax.mesh import to_sharding
from bigjax.models import lora
from bigjax.models.axes import constraints
from bigjax.optim import flat_paths, join, subtree
from bigjax.state import ModelSpec, TrainState
from bigjax.tasks import Batch, Task

Metrics = dict[str, jax.Array]


def _stats_fn(spec: ModelSpec, task: Task):
    def fn(params, model_state, batch, rng, inputs=None):
        model = nnx.merge(spec.graphdef, params, model_state, copy=True)
        rngs = None if rng is None else nnx.Rngs(dropout=rng)
        # a task with arrays of its own (a distillation teacher) gets them bound as step inputs
        bound = task if inputs is None else task.bind(inputs)
        # LoRA adapters draw their dropout from the step's key too (a dense call takes no rngs)
        with lora.dropout_key(None if rng is None else jax.random.fold_in(rng, 0x10AA)):
            stats = bound.stats(model, batch, rngs)
        new_model_state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
        return stats["loss_sum"], (stats, new_model_state)
    return fn


def _split_micro(batch: Batch, k: int) -> Batch:
    # Micro-batch i takes rows i, i+k, ...: every device keeps feeding every micro-batch.
    return jax.tree.map(lambda x: jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0), batch)


def make_train_step(spec: ModelSpec, task: Task, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum: int, seed: int,
                    train: bool = True, trainable: tuple[str, ...] | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`trainable`: the parameter paths the step differentiates and updates (None: all); the
    others (bigjax.optim.param_rules' frozen) go through the forward pass only, and stay
    bitwise as they are."""
    stats_fn = _stats_fn(spec, task)
    everything = trainable is None

    def split(params):
        if everything:
            return params, {}
        keep = set(trainable)
        return subtree(params, keep), subtree(params, [p for p in flat_paths(params) if p not in keep])

    def loss(train_params, frozen_params, full_like, model_state, batch, rng, inputs):
        params = train_params if everything else join(full_like, train_params, frozen_params)
        return stats_fn(params, model_state, batch, rng, inputs)

    grad_loss = jax.grad(loss, has_aux=True)

    def train_step(state: TrainState, batch: Batch, inputs: Any = None
                   ) -> tuple[TrainState, Metrics]:
        """`inputs`: the task's own arrays (`task.step_inputs`), never differentiated or saved."""
        rng = jax.random.fold_in(jax.random.key(seed), state.step) if train else None
        train_params, frozen_params = split(state.params)
        grad_fn = lambda p, ms, b, r: grad_loss(p, frozen_params, state.params, ms, b, r, inputs)
        if grad_accum == 1:
            grads, (stats, model_state) = grad_fn(train_params, state.model_state, batch, rng)
        else:
            def body(carry, xs):
                g_acc, s_acc, ms = carry
                i, micro = xs
                r = None if rng is None else jax.random.fold_in(rng, i)
                g, (s, ms) = grad_fn(train_params, ms, micro, r)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s), ms), None

            micro = _split_micro(batch, grad_accum)
            first = jax.tree.map(lambda x: x[0], micro)
            zero_stats = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                lambda: grad_fn(train_params, state.model_state, first, rng)[1][0]))
            zero_grads = jax.tree.map(jnp.zeros_like, train_params)
            (grads, stats, model_state), _ = jax.lax.scan(
                body, (zero_grads, zero_stats, state.model_state),
                (jnp.arange(grad_accum), micro))
        # the mean's gradient as one scalar factor, and its norm from the summed gradient: XLA
        # folds a multiply into the optimizer's fusions, where a divide, or a norm of the scaled
        # gradient, makes it write every gradient out once more
        inv_weight = 1 / jnp.maximum(stats["weight"], 1e-9)
        grad_norm = optax.tree.norm(grads) * inv_weight
        grads = jax.tree.map(lambda g: g * inv_weight, grads)
        updates, opt_state = tx.update(grads, state.opt_state, train_params, grad_norm=grad_norm)
        params = optax.apply_updates(train_params, updates)
        if not everything:  # frozen leaves pass through untouched: bitwise the same
            params = join(state.params, params, frozen_params)
        metrics = {k: v for k, v in stats.items()}
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               model_state=model_state)
        return new_state, metrics

    return train_step


def make_eval_step(spec: ModelSpec, task: Task) -> Callable[[Any, Any, Batch], Metrics]:
    fn = _stats_fn(spec, task)

    def eval_step(params, model_state, batch: Batch) -> Metrics:
        _, (stats, _) = fn(params, model_state, batch, None)
        return stats

    return eval_step


def with_activation_sharding(fn, mesh, rules):
    """Trace `fn` with the models' activation constraints bound to this mesh."""
    def wrapped(*args):
        with constraints(to_sharding(mesh, rules)):
            return fn(*args)
    return wrapped


def jit_train_step(step_fn, state_shardings: TrainState, batch_shardings: Any, *, dtype: str):
    """`dtype`: the model's compute dtype, for the XLA:CPU options (bigjax/xla_cpu.py)."""
    replicated = NamedSharding(jax.tree.leaves(state_shardings)[0].mesh, P())
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0,
                   compiler_options=xla_cpu.compiler_options(dtype))


def jit_train_step_with_inputs(step_fn, state_shardings: TrainState, batch_shardings: Any,
                               load_inputs: Callable[[], tuple[Any, Any]], *, dtype: str):
    """`(state, batch) -> (state, metrics)` for a task with arrays of its own: `load_inputs()`
    gives (arrays, their shardings) on first call; they enter the jitted step as an argument, so
    they are sharded like any input, never part of the state and never in a checkpoint."""
    replicated = NamedSharding(jax.tree.leaves(state_shardings)[0].mesh, P())
    box: dict = {}

    def train_step(state, batch):
        if not box:
            arrays, shardings = load_inputs()
            box["inputs"] = arrays
            box["fn"] = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, shardings),
                                out_shardings=(state_shardings, replicated), donate_argnums=0,
                                compiler_options=xla_cpu.compiler_options(dtype))
        return box["fn"](state, batch, box["inputs"])

    return train_step


def jit_eval_step(step_fn, state_shardings: TrainState, batch_shardings: Any, *, dtype: str):
    replicated = NamedSharding(jax.tree.leaves(state_shardings)[0].mesh, P())
    return jax.jit(step_fn, in_shardings=(state_shardings.params, state_shardings.model_state,
                                          batch_shardings), out_shardings=replicated,
                   compiler_options=xla_cpu.compiler_options(dtype))
