"""Logical axis names on parameters and activations, with no mesh in sight.

A parameter carries its names as `logical_axes` metadata (a `Param`), not Flax's `out_sharding`:
Flax shards a variable with `out_sharding` eagerly and needs a mesh to build it, while a bigjax
model is a plain NNX module that builds and runs anywhere. The mesh rules turn the names into
shardings elsewhere (bigjax.mesh, or your own code: `logical_axes(model)` gives the tree).

Activations: models call `constrain(x, names)`; it does nothing unless a caller (the train step)
has bound a `names -> sharding` function with `constraints(...)` while it traces.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Sequence

import jax
from flax import nnx

Axes = tuple[str | None, ...]


class Param(nnx.Param):
    """nnx.Param with `logical_axes` metadata that follows stacking: `nnx.vmap(...,
    transform_metadata={nnx.PARTITION_NAME: "layers"})` prepends "layers" as Flax does for its
    own sharding metadata."""

    def add_axis(self, axis_index: int, axis_name: str | None) -> None:
        axes = list(self.get_metadata().get("logical_axes") or ())
        axes.insert(axis_index, axis_name)
        self.set_metadata(logical_axes=tuple(axes))
        super().add_axis(axis_index, axis_name)


def param(value: jax.Array, axes: Axes) -> Param:
    return Param(value, logical_axes=tuple(axes))


def logical_axes(state: Any) -> dict:
    """{path...: names} of an nnx.State (or module): the same nested-dict tree as
    `nnx.to_pure_dict`, with a tuple of logical names (or Nones) at every leaf."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)
    out: dict = {}
    for path, v in nnx.to_flat_state(state):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        names = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
        node[path[-1]] = tuple(names) if names else (None,) * len(getattr(v, "shape", ()))
    return out


_RULES: contextvars.ContextVar = contextvars.ContextVar("bigjax_activation_rules", default=None)


@contextlib.contextmanager
def constraints(to_sharding: Callable[[Sequence[str | None]], Any]):
    """While tracing inside, `constrain(x, names)` pins x to `to_sharding(names)`."""
    token = _RULES.set(to_sharding)
    try:
        yield
    finally:
        _RULES.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    to_sharding = _RULES.get()
    if to_sharding is None:
        return x
    return jax.lax.with_sharding_constraint(x, to_sharding(names))


def sharding_of(names: Sequence[str | None]) -> Any | None:
    """The sharding `constrain` pins these logical names to, or None when no caller has bound
    any (attention maps its kernels over the devices with it)."""
    to_sharding = _RULES.get()
    return None if to_sharding is None else to_sharding(names)
