"""The FLOPs per token behind MFU agree with what XLA counts in the forward+backward pass, for a
decoder and for BERT heads that compute only the positions they read."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bigjax.config import load_config
from bigjax.models import create_model
from bigjax.perf import flops_per_token
from bigjax.tasks import num_predictions

# wide: the weight matmuls dominate (attention 5-8% of the FLOPs, a GPT's tied head 38%); long:
# the attention scores are 36-57% (T large against d_model)
SIZES = {"wide": ["model.vocab_size=2048", "model.d_model=128", "model.n_heads=4",
                  "model.d_ff=512", "model.n_layers=2", "model.max_seq_len=64",
                  "train.seq_len=64"],
         "long": ["model.vocab_size=2048", "model.d_model=64", "model.n_heads=2",
                  "model.d_ff=256", "model.n_layers=2", "model.max_seq_len=512",
                  "train.seq_len=512"]}
B = 1
# the plain attention: `chunked` (CPU's auto) recomputes the scores in its backward pass (7 matmuls
# where model FLOPs count 6, as remat recomputes), and loops, whose body XLA's cost analysis counts
# once
ATTENTION = "model.attention=xla"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("overrides", [
    [],  # GPT decoder, tied head
    ["model.tie_embeddings=false"],
    ["model.name=bert", "task.name=masked_lm"],
    ["model.name=bert", "task.name=classification", "task.num_labels=3"],
    ["model.name=bert"],  # bare encoder: every position through every layer
])
def test_flops_per_token_matches_xla_cost_analysis(size, overrides):
    cfg = load_config(None, SIZES[size] + overrides + [ATTENTION])
    T = cfg.train.seq_len
    # shapes only: nothing is initialised or run
    model = nnx.eval_shape(lambda: create_model(cfg, nnx.Rngs(params=0)))
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    kw = {}
    if cfg.task.name == "masked_lm":
        kw["masked_positions"] = jnp.tile(jnp.arange(num_predictions(T, 0.15)), (B, 1))
    if cfg.model.name == "bert":
        kw["attention_mask"] = jnp.ones((B, T), jnp.int32)

    def loss(params, ids):
        out = nnx.merge(graphdef, params)(ids, **kw)
        # not out.sum(): under its constant cotangent one of the head's backward matmuls goes
        # uncounted (a GPT's formula / XLA 1.12)
        return (out * out).sum()

    lowered = jax.jit(jax.grad(loss)).lower(params, jax.ShapeDtypeStruct((B, T), jnp.int32))
    cost = lowered.cost_analysis()  # the program as written, before XLA's optimisations
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / (B * T)
    # XLA also counts elementwise work (softmax, norms, GELU, the loss) that model FLOPs leave out:
    # 1.7-3.2% more here at "wide", 2.1-4.4% at "long" (formula / XLA 0.969-0.983 and 0.957-0.979).
    # Model FLOPs above XLA's count are wrong; so are 6% below. What fails: no attention term
    # (formula / XLA: wide 0.90-0.93, long 0.41-0.62), the tied head left out (GPT 0.61-0.62,
    # masked-LM 0.86), the BERT pooler / masked-LM transform counted at every token (wide
    # 1.007-1.043).
    assert 0.94 * xla <= flops_per_token(cfg, n_params) <= xla
