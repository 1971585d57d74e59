"""BERT-style encoder: learned token, position and token-type embeddings, post-LayerNorm blocks,
exact-GELU MLP, padding mask; heads chosen by the task (masked-LM tied to the word embeddings, or
pooler + dropout + classifier). Parameter names map one to one onto Hugging Face's (bigjax/hf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.config import Config
from bigjax.errors import ConfigError
from bigjax.models import layers
from bigjax.models.attention import AttentionMask
from bigjax.models.axes import constrain, param
from bigjax.models.layers import MLP, Attention, Dense, Embed, Norm, TransformerConfig
from bigjax.registry import register_model
from bigjax.tasks import head, num_predictions


@dataclass(frozen=True)
class BertConfig(TransformerConfig):
    """`model:` keys of the encoder (`name: bert`): post-LayerNorm, learned positions, biases."""

    name: str = "bert"
    type_vocab_size: int = 2  # token types (segments A/B)
    pad_token_id: int = 0
    # classification: what the pooler reads: the [CLS] token's hidden state (BERT) or the mean
    # over the non-padding tokens (sentence-transformers' embedding, e.g. all-MiniLM-L6-v2)
    pooling: Literal["cls", "mean"] = "cls"
    # classification reads packed rows (data.examples_per_row > 1): segment ids, per-text
    # positions, one pooled vector per text (not a config key)
    reads_packed_rows: ClassVar[bool] = True

ACT = ("batch", "length", "act_embed")


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        norm = lambda: Norm(cfg.d_model, "layernorm", cfg.norm_eps, True, dtype, rngs)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_heads, head_dim, use_bias=True,
                              dropout=cfg.attention_rate, rope_theta=None, dtype=dtype,
                              std=cfg.init_std, out_std=cfg.init_std, rngs=rngs,
                              implementation=cfg.attention)
        self.attn_norm = norm()
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.mlp, use_bias=True, dtype=dtype,
                       std=cfg.init_std, out_std=cfg.init_std, rngs=rngs)
        self.mlp_norm = norm()
        self.rate = cfg.dropout

    def __call__(self, x, mask: AttentionMask, rngs, positions_BP: jax.Array | None = None):
        """With `positions_BP`, the output at those positions alone (B×P×D); keys and values still
        come from every position, so those outputs equal the full layer's."""
        drop = lambda h: layers.drop(h, self.rate, rngs)
        q = x
        if positions_BP is not None:
            q = jnp.take_along_axis(x, positions_BP[:, :, None], axis=1)
            mask = mask.at(positions_BP)
        h = self.attn_norm(q + drop(self.attn(q, mask, None, rngs, kv_BSD=x)))  # post-norm (BERT)
        return self.mlp_norm(h + drop(self.mlp(h)))


class Bert(nnx.Module):
    """`head`: "masked_lm", "classification" or None (bare encoder with pooler, like BertModel)."""

    def __init__(self, cfg: BertConfig, head: str | None, num_labels: int, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.cfg, self.head = cfg, head
        D = cfg.d_model
        embed = lambda n, axes: Embed(n, D, axes, dtype, cfg.init_std, rngs)
        self.embed = embed(cfg.vocab_size, ("vocab", "embed"))
        self.pos_embed = embed(cfg.max_seq_len, (None, "embed"))
        self.type_embed = embed(cfg.type_vocab_size, (None, "embed"))
        self.embed_norm = Norm(D, "layernorm", cfg.norm_eps, True, dtype, rngs)
        for i in range(cfg.n_layers):
            setattr(self, f"layer_{i}", BertLayer(cfg, rngs))
        dense = lambda n_out, axes: Dense((D,), (n_out,), axes, use_bias=True, dtype=dtype,
                                          std=cfg.init_std, rngs=rngs)
        # BertForMaskedLM has no pooler; BertModel and the classifier do
        self.pooler = dense(D, ("embed", None)) if head != "masked_lm" else None
        if head == "classification" and num_labels < 1:
            raise ConfigError("task.num_labels must be at least 1 for a classification head "
                              f"(got {num_labels}; 0 means: count the labels in the data)")
        self.classifier = dense(num_labels, ("embed", None)) if head == "classification" else None
        mlm = head == "masked_lm"
        self.mlm_dense = dense(D, ("embed", None)) if mlm else None
        self.mlm_norm = Norm(D, "layernorm", cfg.norm_eps, True, dtype, rngs) if mlm else None
        self.mlm_bias = param(jnp.zeros((cfg.vocab_size,), jnp.float32), ("vocab",)) if mlm else None
        self.rate = cfg.dropout

    def encode(self, input_ids_BT: jax.Array, *, token_type_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None, rngs: nnx.Rngs | None = None,
               positions_BP: jax.Array | None = None, segment_ids: jax.Array | None = None,
               position_ids: jax.Array | None = None) -> jax.Array:
        """Last hidden states B×T×D (Hugging Face's `last_hidden_state`); with `positions_BP`,
        B×P×D at those positions only. Heads read few positions ([CLS] for the classifier, the
        masked ones for masked-LM), so the last layer computes queries, attention output and MLP for
        P positions instead of T: 14% of a 6-layer MiniLM classification step's matmul FLOPs.

        Packed rows (bigjax/data/pack_cls.py): `segment_ids` B×T (0 = padding) keep attention
        within each text, `position_ids` B×T restart at 0 in each."""
        B, T = input_ids_BT.shape
        if token_type_ids is None:
            token_type_ids = jnp.zeros((B, T), jnp.int32)
        pos = jnp.arange(T)[None] if position_ids is None else position_ids
        x = self.embed(input_ids_BT) + self.pos_embed(pos) + self.type_embed(token_type_ids)
        x = layers.drop(self.embed_norm(x), self.rate, rngs)
        x = constrain(x, ACT)
        # padding is segment 0: a segment of its own, which no text attends to
        mask = (AttentionMask(valid=attention_mask) if segment_ids is None
                else AttentionMask(segment_ids=segment_ids))
        last = self.cfg.n_layers - 1
        every = layers.remat_layer(lambda layer, x, rngs: layer(x, mask, rngs), self.cfg.remat)
        for i in range(self.cfg.n_layers):
            layer = getattr(self, f"layer_{i}")
            if i == last and positions_BP is not None:  # small: B×P outputs, nothing to save
                x = layer(x, mask, rngs, positions_BP)
            else:
                x = every(layer, x, rngs)
            x = constrain(x, ACT)
        return x

    def __call__(self, input_ids_BT: jax.Array, *, token_type_ids: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, rngs: nnx.Rngs | None = None,
                 masked_positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 position_ids: jax.Array | None = None,
                 example_starts: jax.Array | None = None) -> jax.Array:
        """float32 logits: B×T×vocab (masked_lm; B×P×vocab at `masked_positions` B×P, as
        original BERT's pretraining computes them), B×num_labels (classification); else hidden
        states. Packed classification rows (`segment_ids`, `position_ids`, and `example_starts`
        B×K: each text's [CLS] index) give B×K×num_labels, one per text slot."""
        positions = None
        mean = self.cfg.pooling == "mean"
        packed = self.head == "classification" and example_starts is not None
        if self.head == "classification" and not mean:
            positions = (example_starts.astype(jnp.int32) if packed
                         else jnp.zeros((input_ids_BT.shape[0], 1), jnp.int32))  # [CLS]
        elif self.head == "masked_lm":
            positions = masked_positions
        h = self.encode(input_ids_BT, token_type_ids=token_type_ids, attention_mask=attention_mask,
                        rngs=rngs, positions_BP=positions, segment_ids=segment_ids,
                        position_ids=position_ids)
        if self.head == "masked_lm":
            h = self.mlm_norm(jax.nn.gelu(self.mlm_dense(h), approximate=False))
            return (self.embed.attend(h) + self.mlm_bias[...]).astype(jnp.float32)
        if packed:
            if mean:  # each text's mean hidden state: a one-hot B×T×K text membership, normalised
                K = example_starts.shape[1]
                member = (segment_ids[:, :, None] == jnp.arange(1, K + 1)).astype(h.dtype)
                h = (jnp.einsum("btk,btd->bkd", member, h)
                     / jnp.maximum(member.sum(1), 1)[:, :, None])
            # cls: the last layer ran at the K starts already, so h is B×K×D either way
            pooled = layers.drop(jnp.tanh(self.pooler(h)), self.rate, rngs)
            return self.classifier(pooled).astype(jnp.float32)
        if self.head == "classification":
            if mean:  # the pooler reads the mean hidden state in [CLS]'s place
                valid = (jnp.ones(input_ids_BT.shape, h.dtype) if attention_mask is None
                         else attention_mask.astype(h.dtype))[:, :, None]
                h = ((h * valid).sum(1) / jnp.maximum(valid.sum(1), 1))[:, None]
            pooled = layers.drop(self.pool(h), self.rate, rngs)
            return self.classifier(pooled).astype(jnp.float32)
        return h.astype(jnp.float32)

    def pool(self, h_BTD: jax.Array) -> jax.Array:
        """BERT's pooler: dense + tanh on the first ([CLS]) token."""
        return jnp.tanh(self.pooler(h_BTD[:, 0]))


def build_bert(cfg: Config, rngs: nnx.Rngs) -> Bert:
    return Bert(cfg.model, head(cfg), getattr(cfg.task, "num_labels", 0), rngs)


def flops_per_token(cfg: Config, n_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B: 6 x matmul parameters + attention scores).

    Token and position tables are lookups. A head reads a few positions (the masked ones, or
    [CLS]), and bigjax computes the vocabulary projection and the last layer's queries, output and
    MLP for those alone, so they count at that share of the tokens.
    """
    m, T, kind = cfg.model, cfg.train.seq_len, head(cfg)
    head_dim = m.head_dim or m.d_model // m.n_heads
    matmul = float(n_params - (m.vocab_size + m.max_seq_len) * m.d_model)
    attention = 12.0 * m.n_layers * T * m.n_heads * head_dim
    share = {"masked_lm": num_predictions(T, getattr(cfg.task, "mlm_probability", 0.15)) / T,
             # packed rows: the last layer runs at each text's [CLS], examples_per_row of them
             "classification": cfg.data.examples_per_row / T if m.pooling == "cls" else 1.0,
             }.get(kind, 1.0)
    last = 2 * m.d_model * m.n_heads * head_dim + (3 if m.mlp == "swiglu" else 2) * m.d_model * m.d_ff
    matmul -= (1 - share) * last
    # the head's d x d dense (pooler, or masked-LM transform) runs at those positions only; a bare
    # encoder returns hidden states and never runs its pooler
    head_dense = (m.d_model + 1) * m.d_model
    matmul -= (1 - share) * head_dense if kind else head_dense
    attention -= (1 - share) * 12.0 * T * m.n_heads * head_dim
    if kind == "masked_lm":  # tied to the word embeddings
        matmul += share * m.vocab_size * m.d_model
    return 6.0 * matmul + attention


register_model("bert", BertConfig, build_bert, flops_per_token=flops_per_token)
