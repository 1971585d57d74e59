"""GPT-style decoder: pre-norm blocks, causal attention; switches cover GPT-2 and LLaMA layouts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.config import ModelConfig
from bigjax.mesh import constrain
from bigjax.models.layers import MLP, Attention, Dense, Embed, Norm, attention_mask, remat_layer


ACT = ("batch", "length", "act_embed")  # activations: split the batch, keep features whole


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2: scale residual writes
        attn_drop = cfg.dropout if cfg.attention_dropout < 0 else cfg.attention_dropout
        norm = lambda: Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, dtype, rngs)
        self.attn_norm = norm()
        self.attn = Attention(
            cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, head_dim,
            use_bias=cfg.use_bias, dropout=attn_drop,
            rope_theta=cfg.rope_theta if cfg.positions == "rotary" else None,
            dtype=dtype, std=cfg.init_std, out_std=out_std, rngs=rngs)
        self.mlp_norm = norm()
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.mlp, use_bias=cfg.use_bias, dtype=dtype,
                       std=cfg.init_std, out_std=out_std, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x, mask, positions, rngs):
        drop = lambda h: self.dropout(h, deterministic=rngs is None, rngs=rngs)
        x = x + drop(self.attn(self.attn_norm(x), mask, positions, rngs))
        return x + drop(self.mlp(self.mlp_norm(x)))


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), dtype, cfg.init_std, rngs)
        self.pos_embed = (Embed(cfg.max_seq_len, cfg.d_model, (None, "embed"), dtype, cfg.init_std, rngs)
                          if cfg.positions == "learned" else None)
        for i in range(cfg.n_layers):  # string names keep checkpoint and HF paths readable
            setattr(self, f"layer_{i}", Block(cfg, rngs))
        self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, dtype, rngs)
        self.lm_head = (None if cfg.tie_embeddings else
                        Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), use_bias=False,
                              dtype=dtype, std=cfg.init_std, rngs=rngs))
        self.dropout = nnx.Dropout(cfg.dropout)

    def hidden(self, tokens_BT: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
        B, T = tokens_BT.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        x = self.embed(tokens_BT)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = constrain(self.dropout(x, deterministic=rngs is None, rngs=rngs), ACT)
        mask = attention_mask(segment_ids, None, causal=True, length=T)
        layer = remat_layer(lambda block, x, rngs: block(x, mask, positions, rngs), self.cfg.remat)
        for i in range(self.cfg.n_layers):
            x = constrain(layer(getattr(self, f"layer_{i}"), x, rngs), ACT)
        return self.final_norm(x)

    def __call__(self, tokens_BT: jax.Array, **kw) -> jax.Array:
        """Logits B×T×V in float32."""
        h = self.hidden(tokens_BT, **kw)
        logits = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
        return logits.astype(jnp.float32)
