"""The train state and its sharded initialisation.

Init follows nanodo: `eval_shape` gives the abstract state, the logical axes give its shardings,
and `jit(init, out_shardings=...)` builds every array directly in its shards, so no full copy of
the parameters ever sits on one device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from bigjax import mesh as mesh_lib
from bigjax.config import Config
from bigjax.models import create_model
from bigjax.models.axes import logical_axes
from bigjax.models.lora import add_adapters
from bigjax.optim import param_rules, subtree


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # nested dict of float32 arrays (nnx.Param values)
    opt_state: Any
    model_state: Any  # non-parameter variables (BatchNorm statistics); {} for most models


@dataclass(frozen=True)
class ModelSpec:
    """What the step needs to rebuild the model from arrays: graph, shapes, logical axes."""

    graphdef: Any
    abstract_params: Any
    logical_axes: Any  # same tree as params, leaves are tuples of logical names


def nest_paths(flat: dict[tuple, Any]) -> dict:
    """{('a', 'b'): x} -> {'a': {'b': x}}: flat parameter paths back to the nested tree."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _build(cfg: Config, seed: int) -> tuple[Any, dict, dict, dict]:
    model = create_model(cfg, nnx.Rngs(params=seed))
    if cfg.finetune.lora.rank:
        add_adapters(model, cfg.finetune.lora, seed + 1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest), logical_axes(params)


def model_spec(cfg: Config) -> ModelSpec:
    box: dict = {}

    def shapes():
        gd, params, rest, logical = _build(cfg, cfg.seed)
        box.update(graphdef=gd, logical=logical)
        return params

    abstract = jax.eval_shape(shapes)
    return ModelSpec(box["graphdef"], abstract, box["logical"])


def state_shardings(cfg: Config, spec: ModelSpec, tx: optax.GradientTransformation,
                    mesh: Mesh | AbstractMesh, abstract: TrainState | None = None
                    ) -> tuple[TrainState, TrainState]:
    """(abstract state, its NamedShardings). Raises ConfigError on indivisible dimensions.
    `mesh` may be abstract (a plan for devices this machine lacks); `abstract`: the state's shapes
    when already known (they do not depend on the mesh)."""
    if abstract is None:
        abstract = jax.eval_shape(lambda: init_state_fn(cfg, tx)())
    pspecs = mesh_lib.param_specs(spec.abstract_params, spec.logical_axes, cfg.sharding.rules, mesh)
    param_sh = mesh_lib.named(mesh, pspecs)
    replicated = NamedSharding(mesh, P())
    trainable = param_rules(cfg, spec.abstract_params).trainable
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, abstract.opt_state, subtree(param_sh, trainable),
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))
    shardings = TrainState(
        step=replicated, params=param_sh, opt_state=opt_sh,
        model_state=jax.tree.map(lambda _: replicated, abstract.model_state))
    return abstract, shardings


def init_state_fn(cfg: Config, tx: optax.GradientTransformation):
    def init() -> TrainState:
        _, params, rest, _ = _build(cfg, cfg.seed)
        # optimizer state for the trainable parameters only (bigjax.optim: frozen ones have none)
        trainable = subtree(params, param_rules(cfg, params).trainable)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(trainable), model_state=rest)
    return init


def init_state(cfg: Config, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    return jax.jit(init_state_fn(cfg, tx), out_shardings=shardings)()


def count_params(abstract_params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(abstract_params))
