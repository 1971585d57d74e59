"""Products that accumulate and return float32 whatever the compute dtype.

On GPUs and TPUs that is `preferred_element_type=float32` on the low-precision operands. XLA:CPU
has no bfloat16 x bfloat16 -> float32 dot (`UNIMPLEMENTED: Unsupported element type for
DotThunk::Execute` when the dot is not fused away), so there the operands are widened to float32
first: the same products (bfloat16 values are exact in float32), the same float32 sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


# backends whose dots take no float32 result from low-precision operands (tests empty it to see
# the GPU/TPU program on CPU)
WIDEN_ON = ("cpu",)


def _operands(*xs: jax.Array) -> tuple[tuple[jax.Array, ...], dict]:
    if all(x.dtype == jnp.float32 for x in xs):
        return xs, {}
    if jax.default_backend() in WIDEN_ON:
        return tuple(x.astype(jnp.float32) for x in xs), {}
    return xs, {"preferred_element_type": jnp.float32}


def dot_general_f32(a: jax.Array, b: jax.Array, dims) -> jax.Array:
    (a, b), kw = _operands(a, b)
    return jax.lax.dot_general(a, b, dims, **kw)


def einsum_f32(spec: str, *xs: jax.Array) -> jax.Array:
    xs, kw = _operands(*xs)
    return jnp.einsum(spec, *xs, **kw)
