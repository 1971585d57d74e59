"""The FLOPs per token behind MFU agree with what XLA counts in the compiled forward+backward pass,
for a decoder and for BERT heads that compute only the positions they read."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bigjax.config import load_config
from bigjax.tasks import num_predictions
from bigjax.models import create_model
from bigjax.perf import flops_per_token

B, T = 4, 64
SIZE = ["model.vocab_size=2048", "model.d_model=128", "model.n_heads=4", "model.d_ff=512",
        "model.n_layers=2", f"model.max_seq_len={T}", f"train.seq_len={T}"]


@pytest.mark.parametrize("overrides", [
    [],  # GPT decoder, tied head
    ["model.tie_embeddings=false"],
    ["model.name=bert", "task.name=masked_lm"],
    ["model.name=bert", "task.name=classification", "task.num_labels=3"],
    ["model.name=bert"],  # bare encoder: every position through every layer
])
def test_flops_per_token_matches_xla_cost_analysis(overrides):
    cfg = load_config(None, SIZE + overrides)
    model = create_model(cfg, nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    kw = {}
    if cfg.task.name == "masked_lm":
        kw["masked_positions"] = jnp.tile(jnp.arange(num_predictions(T, 0.15)), (B, 1))
    if cfg.model.name == "bert":
        kw["attention_mask"] = jnp.ones((B, T), jnp.int32)

    def loss(params, ids):
        return nnx.merge(graphdef, params)(ids, **kw).sum()

    cost = jax.jit(jax.grad(loss)).lower(params, jnp.ones((B, T), jnp.int32)).compile()
    cost = cost.cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / (B * T)
    # XLA also counts elementwise work and skips the input gradient of the first layer
    assert flops_per_token(cfg, n_params) == pytest.approx(xla, rel=0.15)
