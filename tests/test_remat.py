"""Activation checkpointing (`model.remat`): the same losses and gradients as keeping every
activation, dropout included; the compiled step recomputes the layers and, under a memory-aware
schedule, needs less memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.config import load_config
from bigjax.models import create_model

GPT = ["model.vocab_size=256", "model.d_model=64", "model.n_heads=4", "model.d_ff=256",
       "model.n_layers=3", "model.max_seq_len=32", "train.seq_len=32", "model.dropout=0.1"]
BERT = GPT + ["model.name=bert", "task.name=masked_lm"]


def loss_and_grads(overrides, remat):
    cfg = load_config(None, overrides + [f"model.remat={remat}"])
    model = create_model(cfg, nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 256, (4, 32)), jnp.int32)
    kw = {"attention_mask": jnp.ones((4, 32), jnp.int32)} if "model.name=bert" in overrides else {}

    def loss(params):
        m = nnx.merge(graphdef, params, copy=True)
        logits = m(ids, rngs=nnx.Rngs(dropout=jax.random.key(7)), **kw)
        return jax.nn.log_softmax(logits)[..., 3].mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), jax.tree.leaves(nnx.to_pure_dict(grads)), jax.jit(jax.grad(loss)).lower(params)


@pytest.mark.parametrize("overrides", [GPT, BERT], ids=["gpt", "bert"])
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_loss_and_gradients(overrides, remat):
    base_loss, base_grads, _ = loss_and_grads(overrides, "none")
    loss, grads, _ = loss_and_grads(overrides, remat)
    assert loss == pytest.approx(base_loss, abs=1e-6)
    for g, b in zip(grads, base_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(b), atol=1e-6, rtol=1e-5)


MEMORY = """
import json, jax, jax.numpy as jnp
from flax import nnx
from bigjax.config import load_config
from bigjax.models import create_model
out = {}
for remat in ("none", "full", "dots"):
    cfg = load_config(None, ["model.vocab_size=512", "model.d_model=128", "model.n_heads=4",
                             "model.d_ff=512", "model.n_layers=8", "model.max_seq_len=256",
                             "train.seq_len=256", "model.remat=" + remat])
    model = create_model(cfg, nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.zeros((8, 256), jnp.int32)
    loss = lambda p: nnx.merge(graphdef, p, copy=True)(ids).mean()
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out[remat] = [compiled.memory_analysis().temp_size_in_bytes, cost["flops"]]
print(json.dumps(out))
"""


def test_remat_recomputes_and_saves_memory_in_the_compiled_step():
    # XLA:CPU's default schedule runs independent work early for concurrency, which keeps the
    # recomputed activations alive as long as the saved ones were; GPU and TPU schedules are
    # memory-aware, as this CPU schedule is
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    out = subprocess.run([sys.executable, "-c", MEMORY], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    (mem_none, flops_none), (mem_full, flops_full), (mem_dots, flops_dots) = (
        got["none"], got["full"], got["dots"])
    assert flops_full > 1.2 * flops_none  # the forward pass runs again in the backward pass
    assert flops_none < flops_dots < flops_full  # matmuls are kept, elementwise work redone
    assert mem_full < 0.8 * mem_none and mem_dots < 0.85 * mem_none
