"""Recurrent family `rnn`: stacked LSTM or GRU layers, optionally bidirectional, over token
embeddings; a classifier over the sequence (text classification) or a next-token head (causal LM).

Each direction of each layer is one `lax.scan` over time, so compile time does not grow with the
length; the input projections of all steps are one matmul before the scan, only h @ W_hh runs in
it. Steps outside `attention_mask` leave the state as it was and output zeros (PyTorch's packed
sequences), so the reverse direction starts at each row's last real token. Packed LM windows
(`segment_ids`) restart the state at every document start. Gates and weights follow PyTorch's
`nn.LSTM` / `nn.GRU` (gate order i, f, g, o and r, z, n; two biases), so its weights map one to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax import registry
from bigjax.config import Config, ModelConfig, derived, require_positive
from bigjax.errors import ConfigError
from bigjax.models import layers
from bigjax.models.axes import constrain, param
from bigjax.models.lm_head import OutputHead
from bigjax.models.matmul import einsum_f32
from bigjax.registry import register_model

GATES = {"lstm": 4, "gru": 3}
ACT = ("batch", "length", "act_embed")  # activations: split the batch, keep features whole
STATE = ("batch", "act_embed")
TASK_DATA = {"classification": "classification", "lm": "causal_lm"}  # the batches rnn reads


@dataclass(frozen=True)
class RNNConfig(ModelConfig):
    """`model:` keys of `name: rnn`."""

    name: str = "rnn"
    cell: Literal["lstm", "gru"] = "lstm"
    vocab_size: int = derived(0, "vocab")  # 0 = the tokenizer's size, rounded up to 128s
    embed_dim: int = 128  # token embedding size (the first layer's input)
    hidden_size: int = 128  # state size of each direction
    n_layers: int = 1  # stacked layers; layer i+1 reads layer i's outputs (both directions)
    bidirectional: bool = False  # a second, reversed scan per layer (not for causal_lm)
    # classification: what the classifier reads; last = the final states (forward after the last
    # real token, backward after the first), mean / max = over the real positions' outputs
    pool: Literal["last", "mean", "max"] = "last"
    dropout: float = 0.0  # on the embeddings, between layers and before the head, in training
    dtype: Literal["float32", "bfloat16"] = "float32"  # matmuls; the state stays float32
    # causal_lm's loss over the vocabulary, this many positions at a time (0 = all at once)
    loss_chunk: int = 512

    def check(self, cfg: Config) -> None:
        require_positive({"model.embed_dim": self.embed_dim, "model.hidden_size": self.hidden_size,
                          "model.n_layers": self.n_layers})
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.loss_chunk < 0:
            raise ConfigError(f"model.loss_chunk must be 0 (all logits at once) or a number of "
                              f"positions, got {self.loss_chunk}")
        data = registry.task(cfg.task.name).data
        if data not in TASK_DATA:
            raise ConfigError(f"model.name=rnn runs on classification or causal_lm batches, got "
                              f"task.name={cfg.task.name} (its data: {data})")
        if data == "lm" and self.bidirectional:
            raise ConfigError("model.bidirectional=true reads the future, which causal_lm predicts; "
                              "set model.bidirectional=false for a language model")


class Gates(nnx.Module):
    """x @ kernel + bias for all gates: kernel (in, gate, hidden), bias (gate, hidden). Uniform
    init in +-1/sqrt(hidden), as PyTorch; `bias` is left out of weight decay by the default
    `optimizer.no_decay`."""

    def __init__(self, d_in: int, n_gates: int, hidden: int, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(hidden)
        uniform = lambda shape: jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
        # the input dim goes to fsdp, the gates' hidden dim to tensor, like an MLP's kernels
        self.kernel = param(uniform((d_in, n_gates, hidden)), ("embed", None, "mlp"))
        self.bias = param(uniform((n_gates, hidden)), (None, "mlp"))

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        """float32 B x [T x] G x H."""
        y = einsum_f32("...d,dgh->...gh", x.astype(dtype), self.kernel[...].astype(dtype))
        return y + self.bias[...]


class Cell(nnx.Module):
    """One direction of one layer: PyTorch's weight_ih / bias_ih are `ih`, weight_hh / bias_hh
    are `hh` (PyTorch's (G*H, in) matrix is our kernel (in, G, H) transposed)."""

    def __init__(self, kind: str, d_in: int, hidden: int, dtype, rngs: nnx.Rngs):
        self.kind, self.dtype, self.hidden = kind, dtype, hidden
        self.ih = Gates(d_in, GATES[kind], hidden, rngs)
        self.hh = Gates(hidden, GATES[kind], hidden, rngs)

    def input_gates(self, x_BTD: jax.Array) -> jax.Array:
        """x @ W_ih + b_ih for every step at once: B x T x G x H, float32."""
        return self.ih(x_BTD, self.dtype)

    def step(self, carry: tuple[jax.Array, ...], gx_BGH: jax.Array) -> tuple[jax.Array, ...]:
        """One time step from the input gates: (h,) for a GRU, (h, c) for an LSTM."""
        h = carry[0]
        gh = self.hh(h, self.dtype)
        if self.kind == "lstm":
            g = gx_BGH + gh
            i, f = jax.nn.sigmoid(g[:, 0]), jax.nn.sigmoid(g[:, 1])
            c = f * carry[1] + i * jnp.tanh(g[:, 2])
            return jax.nn.sigmoid(g[:, 3]) * jnp.tanh(c), c
        r = jax.nn.sigmoid(gx_BGH[:, 0] + gh[:, 0])
        z = jax.nn.sigmoid(gx_BGH[:, 1] + gh[:, 1])
        n = jnp.tanh(gx_BGH[:, 2] + r * gh[:, 2])  # r gates W_hn h + b_hn, as in PyTorch
        return ((1 - z) * n + z * h,)

    def zeros(self, batch: int) -> tuple[jax.Array, ...]:
        n = 2 if self.kind == "lstm" else 1  # LSTM: (h, c)
        return tuple(jnp.zeros((batch, self.hidden), jnp.float32) for _ in range(n))


def run(cell: Cell, x_BTD: jax.Array, valid_BT: jax.Array, segment_ids_BT: jax.Array | None,
        reverse: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """The cell over time: outputs B x T x H (zero where not valid) and the final state.

    A step outside `valid_BT` keeps the state, so each row's real tokens are read in order as if
    the others were not there (reverse: from its last real token back). The state restarts at
    zero where `segment_ids_BT` changes (a new document of a packed window)."""
    B, T = valid_BT.shape
    gx = cell.input_gates(x_BTD)
    valid = valid_BT.astype(bool)
    start = jnp.zeros((B, T), bool)
    if segment_ids_BT is not None:  # the first position of each document, in scan order
        seg = jnp.flip(segment_ids_BT, 1) if reverse else segment_ids_BT
        start = start.at[:, 1:].set(seg[:, 1:] != seg[:, :-1])
        start = jnp.flip(start, 1) if reverse else start
    time_major = lambda a: jnp.swapaxes(a, 0, 1)
    zeros = cell.zeros(B)

    def body(carry, xs):
        gx_t, valid_t, start_t = xs
        carry = tuple(jnp.where(start_t[:, None], z, c) for z, c in zip(zeros, carry))
        new = cell.step(carry, gx_t)
        carry = tuple(jnp.where(valid_t[:, None], n, c) for n, c in zip(new, carry))
        return carry, jnp.where(valid_t[:, None], new[0], 0.0)

    final, out_TBH = jax.lax.scan(body, zeros, (time_major(gx), time_major(valid),
                                                time_major(start)), reverse=reverse)
    return time_major(out_TBH), final


class Layer(nnx.Module):
    def __init__(self, kind: str, d_in: int, hidden: int, bidirectional: bool, dtype,
                 rngs: nnx.Rngs):
        self.fwd = Cell(kind, d_in, hidden, dtype, rngs)
        self.bwd = Cell(kind, d_in, hidden, dtype, rngs) if bidirectional else None

    def __call__(self, x_BTD, valid_BT, segment_ids_BT):
        """Outputs B x T x (H or 2H) and the final hidden states [forward, backward]."""
        out, final = run(self.fwd, x_BTD, valid_BT, segment_ids_BT, reverse=False)
        if self.bwd is None:
            return out, [final[0]]
        out_b, final_b = run(self.bwd, x_BTD, valid_BT, segment_ids_BT, reverse=True)
        return jnp.concatenate([out, out_b], -1), [final[0], final_b[0]]


class RNN(nnx.Module):
    """`head`: "classification" (logits per sequence) or None (a causal LM: logits per token)."""

    def __init__(self, cfg: RNNConfig, head: str | None, num_labels: int, rngs: nnx.Rngs):
        if cfg.vocab_size < 1:
            raise ConfigError("model.vocab_size is 0: it comes from the tokenizer (a resolved "
                              "config), or set it")
        if head == "classification" and num_labels < 2:
            raise ConfigError(f"task.num_labels must be at least 2 for an rnn classifier, "
                              f"got {num_labels}")
        dtype = jnp.dtype(cfg.dtype)
        self.cfg, self.head = cfg, head
        self.embed = layers.Embed(cfg.vocab_size, cfg.embed_dim, ("vocab", "embed"), dtype,
                                  1.0, rngs)  # N(0, 1), as torch.nn.Embedding
        dirs = 2 if cfg.bidirectional else 1
        d_in = cfg.embed_dim
        for i in range(cfg.n_layers):
            setattr(self, f"layer_{i}", Layer(cfg.cell, d_in, cfg.hidden_size, cfg.bidirectional,
                                              dtype, rngs))
            d_in = dirs * cfg.hidden_size
        n_out = num_labels if head == "classification" else cfg.vocab_size
        self.out = layers.Dense((d_in,), (n_out,), ("embed", None if head else "vocab"),
                                use_bias=head == "classification", dtype=dtype,
                                std=1.0 / math.sqrt(d_in), rngs=rngs)

    def encode(self, ids_BT: jax.Array, valid_BT: jax.Array | None = None,
               segment_ids_BT: jax.Array | None = None, rngs: nnx.Rngs | None = None):
        """The top layer's outputs B x T x (H or 2H) and its final hidden states."""
        valid = jnp.ones(ids_BT.shape, bool) if valid_BT is None else valid_BT
        x = constrain(layers.drop(self.embed(ids_BT), self.cfg.dropout, rngs), ACT)
        final = []
        for i in range(self.cfg.n_layers):
            if i:
                x = layers.drop(x, self.cfg.dropout, rngs)  # between layers, as PyTorch
            x, final = getattr(self, f"layer_{i}")(x, valid, segment_ids_BT)
            x = constrain(x.astype(jnp.dtype(self.cfg.dtype)), ACT)
        return x, final

    def hidden(self, tokens_BT: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
        """causal_lm: the states that predict the next token (positions need no embedding here)."""
        h, _ = self.encode(tokens_BT, None, segment_ids, rngs)
        return layers.drop(h, self.cfg.dropout, rngs)

    def output_head(self) -> OutputHead | None:
        if self.head is not None:
            return None
        return OutputHead(self.out.kernel[...], 1, ("embed", "vocab"), jnp.dtype(self.cfg.dtype),
                          self.cfg.loss_chunk)

    def __call__(self, ids_BT: jax.Array, *, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
        """float32 logits: B x num_labels (classification; `attention_mask` marks the real
        tokens) or B x T x vocab (causal LM). `token_type_ids` are ignored."""
        if self.head is None:
            return self.output_head().logits(self.hidden(ids_BT, segment_ids=segment_ids, rngs=rngs))
        valid = (jnp.ones(ids_BT.shape, bool) if attention_mask is None
                 else attention_mask.astype(bool))
        h, final = self.encode(ids_BT, valid, None, rngs)
        pool = self.cfg.pool
        if pool == "last":
            pooled = jnp.concatenate(final, -1)
        elif pool == "mean":
            w = valid.astype(jnp.float32)[..., None]
            pooled = (h.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
        else:
            pooled = jnp.where(valid[..., None], h.astype(jnp.float32), -jnp.inf).max(1)
            pooled = jnp.where(jnp.isfinite(pooled), pooled, 0.0)  # a row with no real token
        pooled = layers.drop(pooled, self.cfg.dropout, rngs)
        return self.out(pooled).astype(jnp.float32)


def _head(cfg: Config) -> str | None:
    return "classification" if registry.task(cfg.task.name).data == "classification" else None


def build_rnn(cfg: Config, rngs: nnx.Rngs) -> RNN:
    return RNN(cfg.model, _head(cfg), getattr(cfg.task, "num_labels", 0), rngs)


def flops_per_token(cfg: Config, n_params: int) -> float:
    """Training FLOPs per token (3 x forward): every cell's input and recurrent matmuls per
    token, and the head (per token for a language model, once per sequence for a classifier).
    The embedding is a lookup; gate nonlinearities are a few FLOPs per state element."""
    m = cfg.model
    dirs, G, H = 2 if m.bidirectional else 1, GATES[m.cell], m.hidden_size
    forward, d_in = 0.0, m.embed_dim
    for _ in range(m.n_layers):
        forward += dirs * 2.0 * (d_in + H) * G * H
        d_in = dirs * H
    if _head(cfg) == "classification":
        forward += 2.0 * d_in * getattr(cfg.task, "num_labels", 0) / cfg.train.seq_len
    else:
        forward += 2.0 * d_in * m.vocab_size
    return 3.0 * forward


register_model("rnn", RNNConfig, build_rnn, flops_per_token=flops_per_token)
