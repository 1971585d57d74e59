"""Layers shared by the model families. Parameters name logical axes only, never mesh axes.

Logical axes: vocab, embed, heads, kv_heads, kv (per-head dim), mlp, length. Parameters are
float32; `dtype` is the compute dtype. Dropout takes an explicit `rngs` at call time (None in
evaluation), so the train step derives it from (seed, step) and resume needs no RNG state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.config import (Config, ModelConfig, derived, example_len, packs_examples,
                           require_positive)
from bigjax.errors import ConfigError
from bigjax.models import attention
from bigjax.models.attention import AttentionMask, attend
from bigjax.models.axes import Axes, param
from bigjax.models.dropout import dropout


@dataclass(frozen=True)
class TransformerConfig(ModelConfig):
    """The `model:` keys the Transformer families share (gpt and bert add their own)."""

    vocab_size: int = derived(0, "vocab")  # 0 = the tokenizer's size, rounded up to 128s
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 0  # 0 = d_model // n_heads
    d_ff: int = 512
    max_seq_len: int = 512  # size of the learned position table
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "gelu_tanh", "swiglu", "relu"] = "gelu"
    dropout: float = 0.0  # residual, attention and embedding dropout in training
    attention_dropout: float = -1.0  # -1 = same as dropout
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; parameters stay float32
    # activation checkpointing per layer: none | full (keep only layer inputs, recompute the rest
    # in the backward pass) | dots (also keep matmul outputs: recompute only elementwise work)
    remat: Literal["none", "full", "dots"] = "none"
    init_std: float = 0.02
    # attention kernel: auto (the fastest this backend has for each call) | xla (plain) | cudnn
    # (NVIDIA GPUs, bfloat16) | splash (TPUs) | chunked (flash-style blocks in float32)
    attention: Literal["auto", "xla", "cudnn", "splash", "chunked"] = "auto"

    def check(self, cfg: Config) -> None:
        require_positive({"model.d_model": self.d_model, "model.n_layers": self.n_layers,
                          "model.n_heads": self.n_heads, "model.d_ff": self.d_ff})
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not self.head_dim and self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by "
                              f"model.n_heads={self.n_heads}; set model.head_dim")
        # packed classification rows restart positions in each text: the table needs one text
        if self.learned_positions and example_len(cfg) > self.max_seq_len:
            key = "data.max_example_len" if packs_examples(cfg) else "train.seq_len"
            raise ConfigError(f"{key}={example_len(cfg)} exceeds "
                              f"model.max_seq_len={self.max_seq_len}")
        # what the config alone tells; the backend is checked when the model is built (after
        # jax.distributed starts), the batch's masks when a step is traced
        attention.check(self.attention, needs=attention.Needs(
            dropout=self.attention_rate > 0, dtype=self.dtype,
            head_dim=self.head_dim or self.d_model // self.n_heads))

    @property
    def attention_rate(self) -> float:
        """Attention dropout (model.attention_dropout, -1 = model.dropout)."""
        return self.dropout if self.attention_dropout < 0 else self.attention_dropout

    @property
    def learned_positions(self) -> bool:
        return True


def _param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Axes) -> nnx.Param:
    return param(init(rngs.params(), tuple(shape), jnp.float32), axes)


class Dense(nnx.Module):
    """y = x @ kernel + bias over trailing `in_shape` dims, producing `out_shape` dims."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], axes: Axes, *,
                 use_bias: bool, dtype, std: float, rngs: nnx.Rngs):
        self.in_shape, self.out_shape, self.dtype = tuple(in_shape), tuple(out_shape), dtype
        self.kernel = _param(rngs, nnx.initializers.normal(std), self.in_shape + self.out_shape, axes)
        n_in = len(self.in_shape)
        self.bias = (_param(rngs, nnx.initializers.zeros_init(), self.out_shape, axes[n_in:])
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        # one 2-D matmul (rows x inputs) @ (inputs x outputs), reshaped back: a dot_general over
        # the (batch, length) dims made XLA:CPU transpose the activations' gradient for the
        # kernel's gradient (the same sums, and 1.7x slower for a SwiGLU MLP's backward pass)
        lead = x.shape[:x.ndim - len(self.in_shape)]
        n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
        y = jnp.dot(x.reshape(-1, n_in).astype(self.dtype),
                    self.kernel[...].reshape(n_in, n_out).astype(self.dtype))
        y = y.reshape(lead + self.out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Norm(nnx.Module):
    """LayerNorm or RMSNorm over the last (embed) dim, statistics in float32."""

    def __init__(self, dim: int, kind: str, eps: float, use_bias: bool, dtype, rngs: nnx.Rngs):
        self.kind, self.eps, self.dtype = kind, eps, dtype
        self.scale = _param(rngs, nnx.initializers.ones_init(), (dim,), ("embed",))
        self.bias = (_param(rngs, nnx.initializers.zeros_init(), (dim,), ("embed",))
                     if use_bias and kind == "layernorm" else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x32 = x32 - x32.mean(-1, keepdims=True)
        y = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + self.eps)
        y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)


class Embed(nnx.Module):
    def __init__(self, num: int, dim: int, axes: Axes, dtype, std: float, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = _param(rngs, nnx.initializers.normal(std), (num, dim), axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: logits against the embedding table."""
        return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(self.dtype))


def rotary(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, half-split layout (as in LLaMA / Hugging Face)."""
    half = x_BTNH.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions_BT[..., None].astype(jnp.float32) * freq  # B T half
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def drop(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
    """Dropout in training (`rngs` given), the identity in evaluation (`rngs` None): what the
    models call; `dropout` (bigjax/models/dropout.py) draws the mask."""
    return x if rngs is None or rate <= 0 else dropout(x, rate, rngs.dropout())


def remat_policy(remat: str):
    """The jax.checkpoint policy of `model.remat` ("none": no checkpointing, None)."""
    return {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
            "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[remat]


def remat_layer(call, remat: str):
    """`call(layer, x, rngs)` under activation checkpointing: "none" keeps every activation for
    the backward pass; "full" keeps the layer's input only and recomputes the rest (memory per
    layer ~ one activation, for ~1/3 more FLOPs); "dots" keeps matmul outputs too and recomputes
    only elementwise work. Dropout masks come from the same keys, so the recomputation is exact."""
    policy = remat_policy(remat)
    return call if policy is None else nnx.remat(call, policy=policy)


def dot_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask: AttentionMask,
                  *, implementation: str = "auto", dropout: float = 0.0,
                  key: jax.Array | None = None) -> jax.Array:
    """Masked softmax attention by `implementation` (bigjax/models/attention.py: auto, xla,
    cudnn, splash, chunked); dropout on the attention weights when `key` is given."""
    return attend(q_BTNH, k_BSKH, v_BSKH, mask, implementation=implementation, dropout=dropout,
                  key=key)


class Attention(nnx.Module):
    """Multi-head attention with optional grouped-query heads (n_kv_heads < n_heads).

    `implementation`: `model.attention`; an explicit one this backend lacks is a ConfigError here,
    when the model is built."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
                 use_bias: bool, dropout: float, rope_theta: float | None, dtype, std: float,
                 out_std: float, rngs: nnx.Rngs, implementation: str = "auto"):
        attention.check_backend(implementation)
        self.implementation = implementation
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope_theta, self.dtype, self.dropout_rate = rope_theta, dtype, dropout
        kw = dict(use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.query = Dense((d_model,), (n_heads, head_dim), ("embed", "heads", "kv"), std=std, **kw)
        self.key = Dense((d_model,), (n_kv_heads, head_dim), ("embed", "kv_heads", "kv"), std=std, **kw)
        self.value = Dense((d_model,), (n_kv_heads, head_dim), ("embed", "kv_heads", "kv"), std=std, **kw)
        self.out = Dense((n_heads, head_dim), (d_model,), ("heads", "kv", "embed"), std=out_std, **kw)

    def __call__(self, x_BTD: jax.Array, mask: AttentionMask, positions_BT: jax.Array,
                 rngs: nnx.Rngs | None, kv_BSD: jax.Array | None = None) -> jax.Array:
        """`kv_BSD`: keys and values from another sequence than the queries (by default x)."""
        kv_BSD = x_BTD if kv_BSD is None else kv_BSD
        q, k, v = self.query(x_BTD), self.key(kv_BSD), self.value(kv_BSD)
        if self.rope_theta is not None:
            assert kv_BSD is x_BTD, "rotary attention takes one sequence"
            q, k = rotary(q, positions_BT, self.rope_theta), rotary(k, positions_BT, self.rope_theta)
        key = rngs.dropout() if rngs is not None and self.dropout_rate > 0 else None
        out = dot_attention(q, k, v, mask, implementation=self.implementation,
                            dropout=self.dropout_rate, key=key)
        return self.out(out)

    def extend_qkv(self, x_BTD: jax.Array, positions_BT: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values of T new tokens (positions applied), for a key/value cache
        (bigjax/models/kv_cache.py): the caller writes the keys and values into the cache first
        and then attends over it (`extend_attend`), so the cache is updated in place; reading a
        layer's slots before writing them made XLA copy the whole cache at every layer."""
        q, k, v = self.query(x_BTD), self.key(x_BTD), self.value(x_BTD)
        if self.rope_theta is not None:
            q, k = rotary(q, positions_BT, self.rope_theta), rotary(k, positions_BT, self.rope_theta)
        return q, k, v

    def extend_attend(self, q_BTNH: jax.Array, keys_BSKH: jax.Array, values_BSKH: jax.Array,
                      index: jax.Array, valid_BS: jax.Array) -> jax.Array:
        """The new tokens' queries (slots [index, index + T)) attending over the cache's keys and
        values, which already hold theirs."""
        T = q_BTNH.shape[1]
        mask = AttentionMask(causal=True, valid=valid_BS,
                             query_index=index + jnp.arange(T, dtype=jnp.int32)[None])
        # one query per row (a decoding step) is a B×N×S dot: the plain computation; fused
        # kernels take no causal mask on gathered queries, so a prefill gets auto's pick
        impl = ("xla" if T == 1 else
                self.implementation if self.implementation in ("xla", "chunked") else "auto")
        out = dot_attention(q_BTNH.astype(keys_BSKH.dtype), keys_BSKH, values_BSKH, mask,
                            implementation=impl)
        return self.out(out)


class MLP(nnx.Module):
    def __init__(self, d_model: int, d_ff: int, kind: str, *, use_bias: bool, dtype, std: float,
                 out_std: float, rngs: nnx.Rngs):
        self.kind = kind
        kw = dict(use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.up = Dense((d_model,), (d_ff,), ("embed", "mlp"), std=std, **kw)
        self.gate = Dense((d_model,), (d_ff,), ("embed", "mlp"), std=std, **kw) if kind == "swiglu" else None
        self.down = Dense((d_ff,), (d_model,), ("mlp", "embed"), std=out_std, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.up(x)
        if self.kind == "swiglu":
            h = jax.nn.silu(self.gate(x)) * h
        elif self.kind == "relu":
            h = jax.nn.relu(h)
        else:
            h = jax.nn.gelu(h, approximate=self.kind == "gelu_tanh")
        return self.down(h)


def attention_mask(segment_ids_BT: jax.Array | None, valid_BT: jax.Array | None, causal: bool,
                   length: int) -> jax.Array:
    """Boolean B×T×S mask: causal, within one packed document, and only onto real tokens (the
    models pass `AttentionMask`, which implementations read without materialising this)."""
    return AttentionMask(causal, segment_ids_BT, valid_BT).dense(length, length)
