"""The output projection over the vocabulary (`OutputHead`) and the cross-entropy through it in
chunks of positions (`chunked_token_stats`), so that B x T x V logits never exist.

Each chunk's gradient is computed in the forward pass, while its logits are at hand (a
`jax.custom_vjp`): the backward pass only scales the saved gradients of the hidden states and of
the output weight, so the logits are neither kept nor recomputed (recomputing them, as a
`jax.checkpoint`ed scan would, costs one more V x D matmul per token: a third more of the head's
FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.models.axes import Axes, constrain
from bigjax.models.matmul import dot_general_f32

Stats = dict[str, jax.Array]
LOGITS = ("batch", "length", "vocab")  # a chunk's logits: rows as the batch, vocab as the head
HIDDEN = ("batch", "length", "act_embed")


@dataclass(frozen=True)
class OutputHead:
    """The projection hidden (..., D) -> logits (..., V) of a language model, as data: one matmul
    in the compute dtype that accumulates and returns float32 (`matmul.dot_general_f32`; bfloat16
    logits are never formed and rounded)."""

    weight: jax.Array  # V x D (vocab_axis 0: a tied embedding table) or D x V (vocab_axis 1)
    vocab_axis: int
    axes: Axes  # the weight's logical axis names: its gradient is kept sharded like it
    dtype: Any  # compute dtype
    loss_chunk: int = 0  # positions of each sequence per chunk of the loss; 0 = all at once

    def logits(self, h: jax.Array) -> jax.Array:
        return _logits(h.astype(self.dtype), self.weight.astype(self.dtype), self.vocab_axis)


def _logits(h_BcD: jax.Array, w: jax.Array, vocab_axis: int) -> jax.Array:
    return dot_general_f32(h_BcD, w, (((h_BcD.ndim - 1,), (1 - vocab_axis,)), ((), ())))


def chunk_size(length: int, chunk: int) -> tuple[int, int]:
    """(positions per chunk, chunks) for `length` positions and at most `chunk` per chunk: the
    fewest chunks, of equal size. When they do not tile the sequence (length 13, chunk 5: three
    chunks of 5 at 0, 5 and 8) the last one starts earlier and its positions that an earlier
    chunk covered have weight 0, so nothing is padded or copied."""
    n = -(-length // min(chunk, length))
    return -(-length // n), n


def max_and_argmax(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The largest of the last axis and its first index, as `jnp.max` and `jnp.argmax`, in the
    one pass over the logits that log-sum-exp's max needs anyway: the maximum of each block of
    the vocabulary, then argmax over the (few) block maxima and within the first block holding
    the maximum. XLA:CPU does not vectorise argmax's (value, index) reduction: over 1,024 x
    32,000 logits it took 20 ms more than the max alone, about 2.5% of the decoder's step.
    Other backends keep argmax: there it is fast, and a vocabulary split over devices would
    sum the chosen block across them (B x chunk x block floats per chunk)."""
    V = logits.shape[-1]
    block = next((b for b in (256, 128, 64, 32) if V % b == 0 and V > b), 0)
    if not block or jax.default_backend() != "cpu":
        return logits.max(-1), jnp.argmax(logits, -1)
    blocks = logits.reshape(*logits.shape[:-1], V // block, block)
    block_max = blocks.max(-1)
    first = jnp.argmax(block_max, -1)  # the first block holding the maximum holds its first index
    inside = jnp.take_along_axis(blocks, first[..., None, None], -2)[..., 0, :]
    return block_max.max(-1), first * block + jnp.argmax(inside, -1)


def chunked_token_stats(h_BTD: jax.Array, head: OutputHead, targets_BT: jax.Array,
                        weights_BT: jax.Array) -> Stats:
    """Cross-entropy and accuracy sums over weighted positions, as `tasks.token_stats` of
    `head.logits(h_BTD)`, computed `head.loss_chunk` positions of every sequence at a time: a
    chunk's logits are B x chunk x V (the batch axis stays whole, so it stays sharded), and
    accuracy is the argmax of those float32 logits (ties: the first, as before)."""
    B, T, D = h_BTD.shape
    c, n = chunk_size(T, head.loss_chunk)
    dtype, vocab_axis, axes = jnp.dtype(head.dtype), head.vocab_axis, head.axes
    # gathered once, in the compute dtype, outside the loop: vocab stays split, d_model whole
    gathered = tuple(a if i == vocab_axis else None for i, a in enumerate(axes))
    axes_DV = axes if vocab_axis == 1 else axes[::-1]

    def run(h, weight, targets, weights, grads: bool):
        w = constrain(weight.astype(dtype), gathered)
        h = h.astype(dtype)

        def body(i, carry):
            loss, correct, dW_DV, dh, loss_BT, correct_BT = carry
            start = jnp.minimum(i * c, T - c)
            take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, c, axis=1)
            h_c, t_c = take(h), take(targets)
            new = start + jnp.arange(c) >= i * c  # False where an earlier chunk covered it
            w_c = take(weights) * new
            logits = constrain(_logits(h_c, w, vocab_axis), LOGITS)  # B c V, float32
            top, pred = max_and_argmax(logits)
            lse = top + jnp.log(jnp.exp(logits - top[..., None]).sum(-1))
            tok_loss = lse - jnp.take_along_axis(logits, t_c[..., None], -1)[..., 0]
            tok_correct = (pred == t_c).astype(jnp.float32)
            loss = loss + (tok_loss * w_c).sum()
            correct = correct + (tok_correct * w_c).sum()
            if grads:
                # d loss_sum / d logits = (softmax - onehot) x weight; the matmuls run in the
                # compute dtype, accumulating in float32, as autodiff of the full logits would
                vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
                dl = ((jnp.exp(logits - lse[..., None]) - (vocab == t_c[..., None]))
                      * w_c[..., None]).astype(dtype)
                dh_c = dot_general_f32(dl, w, (((2,), (vocab_axis,)), ((), ())))
                dh = jax.lax.dynamic_update_slice_in_dim(
                    dh, take(dh) + dh_c.astype(dh.dtype), start, axis=1)
                # D x V whatever the weight's layout: dl is the matmul's right operand as it
                # lies (a V x D product would transpose a copy of dl, or compute dl twice)
                dW_DV = constrain(dW_DV + dot_general_f32(h_c, dl, (((0, 1), (0, 1)), ((), ()))),
                                  axes_DV)
                # per-token loss and hit: the cotangent of the weights
                keep = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(
                    buf, jnp.where(new, x, take(buf)), start, axis=1)
                loss_BT, correct_BT = keep(loss_BT, tok_loss), keep(correct_BT, tok_correct)
            return loss, correct, dW_DV, dh, loss_BT, correct_BT

        zero = jnp.zeros((), jnp.float32)
        if grads:
            bufs = (constrain(jnp.zeros((D, weight.shape[vocab_axis]), jnp.float32), axes_DV),
                    constrain(jnp.zeros((B, T, D), h.dtype), HIDDEN),
                    jnp.zeros((B, T), jnp.float32), jnp.zeros((B, T), jnp.float32))
        else:
            bufs = (None,) * 4
        return jax.lax.fori_loop(0, n, body, (zero, zero) + bufs)

    @jax.custom_vjp
    def sums(h, weight, targets, weights):
        return run(h, weight, targets, weights, grads=False)[:2]

    def sums_fwd(h, weight, targets, weights):
        loss, correct, dW_DV, dh, loss_BT, correct_BT = run(h, weight, targets, weights, grads=True)
        dW = dW_DV if vocab_axis == 1 else constrain(dW_DV.T, axes)
        return (loss, correct), (dW, dh.astype(h.dtype), loss_BT, correct_BT)

    def sums_bwd(res, g):
        dW, dh, loss_BT, correct_BT = res
        g_loss, g_correct = g
        return (dh * g_loss.astype(dh.dtype), dW * g_loss,
                np.zeros((B, T), jax.dtypes.float0),
                loss_BT * g_loss + correct_BT * g_correct)

    sums.defvjp(sums_fwd, sums_bwd)
    w_BT = weights_BT.astype(jnp.float32)
    loss_sum, correct = sums(h_BTD, head.weight, targets_BT, w_BT)
    return {"loss_sum": loss_sum, "weight": w_BT.sum(), "correct": correct}
