"""GPT-style decoder: pre-norm blocks, causal attention; switches cover GPT-2 and LLaMA layouts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.config import Config
from bigjax.errors import ConfigError
from bigjax.models import layers
from bigjax.models.attention import AttentionMask
from bigjax.models.axes import constrain
from bigjax.models.kv_cache import KVCache
from bigjax.models.layers import (MLP, Attention, Dense, Embed, Norm, TransformerConfig,
                                  remat_layer, remat_policy)
from bigjax.models.lm_head import OutputHead
from bigjax.registry import register_model


@dataclass(frozen=True)
class GPTConfig(TransformerConfig):
    """`model:` keys of the decoder (`name: gpt`): GPT-2 and LLaMA layouts are switches."""

    name: str = "gpt"
    n_kv_heads: int = 0  # grouped-query attention; 0 = n_heads
    positions: Literal["learned", "rotary", "none"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    use_bias: bool = True
    tie_embeddings: bool = True
    # decoder blocks as one stacked block applied by lax.scan: compile time independent of depth
    scan_layers: bool = False
    # causal_lm's loss over the vocabulary, this many positions of every sequence at a time
    # (0 = all logits at once): a chunk's logits are batch x loss_chunk x vocab, not x seq_len
    loss_chunk: int = 512

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if self.loss_chunk < 0:
            raise ConfigError(f"model.loss_chunk must be 0 (all logits at once) or a number of "
                              f"positions, got {self.loss_chunk}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ConfigError(f"model.n_heads={self.n_heads} is not divisible by "
                              f"model.n_kv_heads={kv}")

    @property
    def learned_positions(self) -> bool:
        return self.positions == "learned"


ACT = ("batch", "length", "act_embed")  # activations: split the batch, keep features whole


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2: scale residual writes
        norm = lambda: Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, dtype, rngs)
        self.attn_norm = norm()
        self.attn = Attention(
            cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, head_dim,
            use_bias=cfg.use_bias, dropout=cfg.attention_rate,
            rope_theta=cfg.rope_theta if cfg.positions == "rotary" else None,
            dtype=dtype, std=cfg.init_std, out_std=out_std, rngs=rngs, implementation=cfg.attention)
        self.mlp_norm = norm()
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.mlp, use_bias=cfg.use_bias, dtype=dtype,
                       std=cfg.init_std, out_std=out_std, rngs=rngs)
        self.rate = cfg.dropout

    def __call__(self, x, mask, positions, rngs):
        drop = lambda h: layers.drop(h, self.rate, rngs)
        x = x + drop(self.attn(self.attn_norm(x), mask, positions, rngs))
        return x + drop(self.mlp(self.mlp_norm(x)))

    def extend(self, x, positions, cache: KVCache, i, index, valid):
        """`__call__` for new tokens over layer i of a key/value cache (evaluation mode)."""
        q, k, v = self.attn.extend_qkv(self.attn_norm(x), positions)
        cache = cache.write(i, index, k, v)  # before reading the layer's slots: in place
        x = x + self.attn.extend_attend(q, *cache.layer(i), index, valid)
        return x + self.mlp(self.mlp_norm(x)), cache


class GPT(nnx.Module):
    """`GPT(GPTConfig(...), nnx.Rngs(0))` builds and runs as a plain Flax module (no mesh)."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), dtype, cfg.init_std, rngs)
        self.pos_embed = (Embed(cfg.max_seq_len, cfg.d_model, (None, "embed"), dtype, cfg.init_std, rngs)
                          if cfg.positions == "learned" else None)
        if cfg.scan_layers:  # one stacked block: parameters get a leading "layers" axis
            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.n_layers,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked(rngs):
                return Block(cfg, rngs)
            self.layers = stacked(rngs)
        else:
            for i in range(cfg.n_layers):  # string names keep checkpoint and HF paths readable
                setattr(self, f"layer_{i}", Block(cfg, rngs))
        self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, dtype, rngs)
        self.lm_head = (None if cfg.tie_embeddings else
                        Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), use_bias=False,
                              dtype=dtype, std=cfg.init_std, rngs=rngs))
        self.rate = cfg.dropout

    def hidden(self, tokens_BT: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
        B, T = tokens_BT.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        x = self.embed(tokens_BT)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = constrain(layers.drop(x, self.rate, rngs), ACT)
        mask = AttentionMask(causal=True, segment_ids=segment_ids)
        call = lambda block, x, rngs: block(x, mask, positions, rngs)
        if self.cfg.scan_layers:
            return self.final_norm(_scan_blocks(self.layers, x, call, rngs, self.cfg))
        layer = remat_layer(call, self.cfg.remat)
        for i in range(self.cfg.n_layers):
            x = constrain(layer(getattr(self, f"layer_{i}"), x, rngs), ACT)
        return self.final_norm(x)

    def output_head(self) -> OutputHead:
        """The output projection (the tied embedding table or `lm_head`): causal_lm computes
        its loss from `hidden` through it in chunks of `model.loss_chunk` positions."""
        dtype, chunk = jnp.dtype(self.cfg.dtype), self.cfg.loss_chunk
        if self.lm_head is None:
            return OutputHead(self.embed.embedding[...], 0, ("vocab", "embed"), dtype, chunk)
        return OutputHead(self.lm_head.kernel[...], 1, ("embed", "vocab"), dtype, chunk)

    def __call__(self, tokens_BT: jax.Array, **kw) -> jax.Array:
        """Logits B×T×V in float32 (from the matmul: with bfloat16 compute too)."""
        return self.output_head().logits(self.hidden(tokens_BT, **kw))

    # ---- generation: the cache interface of bigjax/models/kv_cache.py -------------------------
    def init_cache(self, batch: int, length: int) -> KVCache:
        """Zeros for `length` positions of `batch` rows, sized by kv heads (GQA, MQA), in the
        compute dtype."""
        c = self.cfg
        return KVCache.zeros(c.n_layers, batch, length, c.n_kv_heads or c.n_heads,
                             c.head_dim or c.d_model // c.n_heads, jnp.dtype(c.dtype))

    def extend(self, tokens_BT: jax.Array, cache: KVCache, index: jax.Array,
               positions_BT: jax.Array, valid_BS: jax.Array) -> tuple[jax.Array, KVCache]:
        """Float32 logits B×V of each row's last new token, and the cache with the new tokens'
        keys and values in slots [index, index + T) (bigjax/models/kv_cache.py)."""
        x = self.embed(tokens_BT)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions_BT)
        x = constrain(x, ACT)
        if self.cfg.scan_layers:  # the cache rides in the carry: each layer updates it in place
            graphdef, stacked = nnx.split(self.layers)

            def body(carry, layer):
                x, cache = carry
                state, i = layer
                x, cache = nnx.merge(graphdef, state).extend(x, positions_BT, cache, i, index,
                                                             valid_BS)
                return (constrain(x, ACT), cache), None

            layer_ids = jnp.arange(self.cfg.n_layers, dtype=jnp.int32)
            (x, cache), _ = jax.lax.scan(body, (x, cache), (stacked, layer_ids))
        else:
            for i in range(self.cfg.n_layers):
                x, cache = getattr(self, f"layer_{i}").extend(x, positions_BT, cache, i, index,
                                                              valid_BS)
                x = constrain(x, ACT)
        return self.output_head().logits(self.final_norm(x[:, -1])), cache


def _scan_blocks(blocks: Block, x: jax.Array, call, rngs: nnx.Rngs | None,
                 cfg: GPTConfig) -> jax.Array:
    """The stacked blocks applied in order by one `lax.scan`: XLA compiles one block, not
    n_layers copies (compile time stays flat as the model deepens). Each layer's dropout draws
    from its own key, split from one."""
    graphdef, stacked = nnx.split(blocks)
    keys = None if rngs is None else jax.random.split(rngs.dropout(), cfg.n_layers)

    def body(x, layer):
        state, key = layer
        block = nnx.merge(graphdef, state)
        return constrain(call(block, x, None if key is None else nnx.Rngs(dropout=key)), ACT), None

    policy = remat_policy(cfg.remat)
    if policy is not None:
        body = jax.checkpoint(body, policy=policy)
    return jax.lax.scan(body, x, (stacked, keys))[0]


def stack_layers(params: dict, n_layers: int) -> dict:
    """Unrolled naming (`layer_0` ... `layer_{n-1}`) to `model.scan_layers` naming (`layers`, each
    parameter with a leading axis of n_layers)."""
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    out["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                 *[params[f"layer_{i}"] for i in range(n_layers)])
    return out


def unstack_layers(params: dict) -> dict:
    """The inverse of `stack_layers`."""
    out = {k: v for k, v in params.items() if k != "layers"}
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    for i in range(n):
        out[f"layer_{i}"] = jax.tree.map(lambda x: np.asarray(x)[i], params["layers"])
    return out


def flops_per_token(cfg: Config, n_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 x the matmul parameters a token passes
    through (token and position tables are lookups; a tied output projection is a matmul) plus
    attention scores."""
    m, T = cfg.model, cfg.train.seq_len
    lookup = m.vocab_size * m.d_model + (m.max_seq_len * m.d_model if m.positions == "learned" else 0)
    head_dim = m.head_dim or m.d_model // m.n_heads
    matmul = float(n_params - lookup) + (m.vocab_size * m.d_model if m.tie_embeddings else 0)
    return 6.0 * matmul + 12.0 * m.n_layers * T * m.n_heads * head_dim


register_model("gpt", GPTConfig, lambda cfg, rngs: GPT(cfg.model, rngs),
               flops_per_token=flops_per_token)
