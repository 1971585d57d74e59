"""Model FLOPs per token and the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.config import Config
from bigjax.data.mlm import num_predictions


def flops_per_token(cfg: Config, n_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 × the matmul parameters a token passes
    through + attention scores.

    Lookup tables (token and position embeddings) do no matmul; an output projection onto the
    vocabulary does, tied or not. A BERT head reads a few positions (the masked ones, or [CLS]), and
    bigjax computes the vocabulary projection and the last layer's queries, output and MLP for
    those alone (models/bert.py), so they count at that share of the tokens.
    """
    m, T = cfg.model, cfg.train.seq_len
    lookup = m.vocab_size * m.d_model + (m.max_seq_len * m.d_model if m.positions == "learned" else 0)
    head_dim = m.head_dim or m.d_model // m.n_heads
    matmul = float(n_params - lookup)  # an untied output head is among the parameters
    attention = 12.0 * m.n_layers * T * m.n_heads * head_dim
    if m.name != "bert":
        return 6.0 * (matmul + (m.vocab_size * m.d_model if m.tie_embeddings else 0)) + attention
    share = {"masked_lm": num_predictions(T, cfg.task.mlm_probability) / T,
             "classification": 1 / T}.get(cfg.task.name, 1.0)
    last = 2 * m.d_model * m.n_heads * head_dim + (3 if m.mlp == "swiglu" else 2) * m.d_model * m.d_ff
    matmul -= (1 - share) * last if m.n_layers else 0
    # the head's d×d dense (pooler, or masked-LM transform) runs at those positions only; a bare
    # encoder returns hidden states and never runs its pooler
    head = (m.d_model + 1) * m.d_model
    matmul -= (1 - share) * head if cfg.task.name in ("masked_lm", "classification") else head
    attention -= (1 - share) * 12.0 * T * m.n_heads * head_dim if m.n_layers else 0
    if cfg.task.name == "masked_lm":  # tied to the word embeddings
        matmul += share * m.vocab_size * m.d_model
    return 6.0 * matmul + attention


def measure_peak_flops(n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of a float32 n×n matmul on the host CPU (shared by all simulated CPU devices)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / float(np.median(times))


def peak_flops(cfg: Config) -> float:
    """Peak FLOP/s of all devices together."""
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops * 1e12 * jax.device_count()
    if jax.devices()[0].platform == "cpu":
        return measure_peak_flops()
    return 0.0  # unknown accelerator and no config value: MFU is not reported
