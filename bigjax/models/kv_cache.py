"""The key/value cache of autoregressive decoding, and the interface a decoder family implements
for `bigjax generate` (bigjax/generate.py drives it; the family never sees prompts or sampling).

A family supports generation when its module has two methods:

    init_cache(batch: int, length: int) -> cache
        A pytree of arrays (zeros) holding keys and values for `length` positions of `batch`
        rows; its dtype is the model's compute dtype. `KVCache.zeros` builds gpt's.

    extend(tokens_BT, cache, index, positions_BT, valid_BS) -> (logits_BV, cache)
        Runs the T new tokens of every row, writes their keys and values into cache slots
        [index, index + T) and returns float32 logits of each row's last new token and the
        updated cache. `index` is a traced int32 scalar (the same slot for every row: prompts
        are left-padded); `positions_BT` are the tokens' positions in their own sequence (what
        position embeddings see); `valid_BS` marks the cache slots holding real tokens (False:
        left padding). A new token attends to every valid slot up to its own (causal by slot).

Prefill is one `extend` over the whole (padded) prompt at index 0; each decoding step is one
`extend` of one token. Cache arrays should carry logical axis names (`CACHE_AXES`), so that
`constrain` shards them on the run's mesh: batch over data/fsdp, kv heads over tensor.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bigjax.models.axes import constrain

# layers x batch x cache slots x kv heads x head dim
CACHE_AXES = ("layers", "batch", "length", "kv_heads", "kv")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer, L×B×S×K×H each (one array per kind, not per layer: a
    scanned decoder indexes the layer axis, and a decoding step updates slots in place)."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, n_layers: int, batch: int, length: int, n_kv_heads: int, head_dim: int,
              dtype) -> "KVCache":
        shape = (n_layers, batch, length, n_kv_heads, head_dim)
        return cls(*(constrain(jnp.zeros(shape, dtype), CACHE_AXES) for _ in range(2)))

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def layer(self, i) -> tuple[jax.Array, jax.Array]:
        """Layer i's keys and values, B×S×K×H (`i` may be traced: the scanned decoder)."""
        return (jax.lax.dynamic_index_in_dim(self.k, i, 0, keepdims=False),
                jax.lax.dynamic_index_in_dim(self.v, i, 0, keepdims=False))

    def write(self, i, index, k_BTKH: jax.Array, v_BTKH: jax.Array) -> "KVCache":
        """The cache with layer i's slots [index, index + T) set to these keys and values."""
        zero = jnp.zeros((), jnp.int32)
        at = (jnp.asarray(i, jnp.int32), zero, jnp.asarray(index, jnp.int32), zero, zero)
        put = lambda c, x: constrain(jax.lax.dynamic_update_slice(c, x[None].astype(c.dtype), at),
                                     CACHE_AXES)
        return KVCache(put(self.k, k_BTKH), put(self.v, v_BTKH))


def supports_cache(model) -> bool:
    """Whether a model implements the interface above."""
    return callable(getattr(model, "init_cache", None)) and callable(getattr(model, "extend", None))
