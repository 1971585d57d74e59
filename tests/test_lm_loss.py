"""The causal-LM loss in chunks of positions (`model.loss_chunk`, bigjax/models/lm_head.py): the
same loss, accuracy and gradients as from the full logits, on a mesh too; no B x T x V array in
the forward or backward program; float32 logits from bfloat16 matmuls; and the compiled step's
temporary memory no longer holds the full logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.build import build, one_device
from bigjax.config import load_config
from bigjax.errors import ConfigError
from bigjax.mesh import make_mesh
from bigjax.models import create_model, matmul
from bigjax.models.lm_head import chunk_size, max_and_argmax
from bigjax.plan import compile_memory_here
from bigjax.tasks import CausalLM
from spine import random_batches, tiny_config

V = 96
BASE = [f"model.vocab_size={V}", "model.d_model=32", "model.n_heads=4", "model.d_ff=48",
        "model.n_layers=2", "model.max_seq_len=16", "train.seq_len=16"]
UNTIED = ["model.tie_embeddings=false", "model.use_bias=false"]


def make(overrides):
    cfg = load_config(None, BASE + overrides)
    return nnx.split(create_model(cfg, nnx.Rngs(params=0)), nnx.Param)


def lm_batch(graphdef, params, B: int, T: int) -> dict:
    """Random tokens; half the targets are the model's own argmax, so accuracy counts hits."""
    rng = np.random.default_rng(1)
    inputs = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    argmax = np.asarray(jnp.argmax(nnx.merge(graphdef, params)(inputs), -1))
    targets = np.where(rng.random((B, T)) < 0.5, argmax, rng.integers(0, V, (B, T)))
    return {"inputs": inputs, "targets": jnp.asarray(targets, jnp.int32),
            "weights": jnp.asarray(rng.random((B, T)) > 0.2, jnp.float32)}


def stats_fn(graphdef, batch):
    def fn(params, weights):
        model = nnx.merge(graphdef, params, copy=True)
        stats = CausalLM().stats(model, {**batch, "weights": weights}, None)
        return stats["loss_sum"], stats
    return fn


def test_chunk_sizes_are_equal_and_fewest():
    assert chunk_size(4096, 512) == (512, 8)
    assert chunk_size(13, 5) == (5, 3)  # starts 0, 5, 8: positions 8 and 9 counted once
    assert chunk_size(4097, 2048) == (1366, 3)  # not 2048, 2048, 1
    assert chunk_size(128, 512) == (128, 1)


@pytest.mark.parametrize("V", [32000, 96, 97])  # blocks of 256 or 32; 97: no block divides it
def test_max_and_argmax_in_blocks_equal_max_and_first_argmax_with_ties(V):
    """Ties decide accuracy at a zero-initialised head (every logit equal: the first index wins,
    not every target), and in rounded logits the maximum repeats across blocks."""
    x = jax.random.normal(jax.random.key(0), (3, 5, V)) * 3
    for logits in (x, jnp.round(x), jnp.zeros_like(x), x.at[..., V - 1].set(100.0)):
        top, pred = jax.jit(max_and_argmax)(logits)
        np.testing.assert_array_equal(top, logits.max(-1))
        np.testing.assert_array_equal(pred, jnp.argmax(logits, -1))
    assert int(jax.jit(max_and_argmax)(jnp.zeros((1, V)))[1][0]) == 0


@pytest.mark.parametrize("head,T,chunk", [([], 12, 4), (UNTIED, 13, 5)],
                         ids=["tied-chunks-tile", "untied-last-chunk-overlaps"])
def test_chunked_loss_accuracy_and_gradients_equal_the_full_logits(head, T, chunk):
    graphdef, params = make(head + ["model.loss_chunk=0"])
    batch = lm_batch(graphdef, params, 3, T)
    grad = lambda graphdef: jax.jit(jax.value_and_grad(stats_fn(graphdef, batch), argnums=(0, 1),
                                                       has_aux=True))
    (_, full), (g_full, gw_full) = grad(graphdef)(params, batch["weights"])
    chunked_graphdef, _ = make(head + [f"model.loss_chunk={chunk}"])
    (_, got), (g, gw) = grad(chunked_graphdef)(params, batch["weights"])
    assert float(full["correct"]) >= 10  # the argmax targets hit
    assert float(got["correct"]) == float(full["correct"])
    assert float(got["weight"]) == float(full["weight"])
    np.testing.assert_allclose(float(got["loss_sum"]), float(full["loss_sum"]), rtol=1e-6)
    leaves = lambda tree: jax.tree.leaves(nnx.to_pure_dict(tree))
    for a, b in zip(leaves(g), leaves(g_full)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
    # the weights' cotangent (each position's loss) too, overlapped positions included
    np.testing.assert_allclose(np.asarray(gw), np.asarray(gw_full), rtol=0, atol=1e-5)
    # evaluation (no gradient) runs the plain loop
    plain = jax.jit(stats_fn(chunked_graphdef, batch))(params, batch["weights"])[1]
    assert float(plain["correct"]) == float(full["correct"])
    np.testing.assert_allclose(float(plain["loss_sum"]), float(full["loss_sum"]), rtol=1e-6)


def equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (loops, custom_vjp, pjit)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from equations(sub)


@pytest.mark.parametrize("chunk", [0, 4])
def test_bfloat16_logits_come_from_the_matmul_in_float32(chunk, monkeypatch):
    """Logits are a bf16 x bf16 matmul accumulating into float32 (not bf16 logits cast up), in the
    full and the chunked path, as GPUs and TPUs run it (traced here, not run: XLA:CPU has no such
    dot, see the next test); with chunks, no array anywhere in the forward and backward program
    has B x T x V elements (more than any parameter here)."""
    monkeypatch.setattr(matmul, "WIDEN_ON", ())
    B, T = 4, 16
    graphdef, params = make(UNTIED + ["model.dtype=bfloat16", f"model.loss_chunk={chunk}"])
    batch = lm_batch(graphdef, params, B, T)
    fn = jax.value_and_grad(stats_fn(graphdef, batch), has_aux=True)
    jaxpr = jax.make_jaxpr(fn)(params, batch["weights"]).jaxpr
    to_vocab = [e for e in equations(jaxpr) if e.primitive.name == "dot_general"
                and e.outvars[0].aval.shape[-1] == V]
    assert to_vocab
    for e in to_vocab:
        assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2
        assert e.outvars[0].aval.dtype == jnp.float32
    largest = max(v.aval.size for e in equations(jaxpr) for v in e.outvars
                  if hasattr(v.aval, "size"))
    assert largest == B * T * V if not chunk else largest < B * T * V


def test_bfloat16_chunked_loss_runs_on_cpu_and_equals_the_full_logits():
    """XLA:CPU has no bf16 x bf16 -> float32 dot inside the chunks' loop (it raised UNIMPLEMENTED
    there): on CPU the operands are widened to float32, the same products and sums, so the chunked
    loss and gradients equal the full logits' in bfloat16 as they do in float32. A bf16-rounded
    logit would move the loss sum by ~1e-2 here, far above the tolerance."""
    def run(chunk):
        graphdef, params = make(UNTIED + ["model.dtype=bfloat16", f"model.loss_chunk={chunk}"])
        batch = lm_batch(graphdef, params, 3, 16)
        fn = jax.jit(jax.value_and_grad(stats_fn(graphdef, batch), has_aux=True))
        (_, stats), grads = fn(params, batch["weights"])
        return stats, jax.tree.leaves(nnx.to_pure_dict(grads))
    (full, g_full), (got, g) = run(0), run(4)
    assert float(got["correct"]) == float(full["correct"])
    np.testing.assert_allclose(float(got["loss_sum"]), float(full["loss_sum"]), rtol=1e-6)
    # gradients: the two paths round d logits to bfloat16 at different points (chunked: once per
    # chunk, autodiff: per op), ~1% apart elementwise; a chunk's gradient lost or doubled moves
    # the norm by a quarter or more
    for a, b in zip(g, g_full):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)


def _train(parts, batches):
    state, rows = parts.init_state(), []
    for b in batches:
        state, m = parts.train_step(state, jax.device_put(b, parts.batch_sharding))
        rows.append({k: float(m[k]) for k in ("loss_sum", "weight", "correct", "grad_norm")})
    return rows, state


@pytest.mark.parametrize("head", [[], ["model.tie_embeddings=false"]], ids=["tied", "untied"])
def test_chunked_train_step_on_a_2x2x2_mesh_equals_full_logits_on_one_device(head):
    """tiny_config's 16 positions in chunks of at most 6: 3 chunks of 6, the last overlapping.
    Plain SGD, so the parameters after 3 steps differ only as much as the gradients do (AdamW
    would magnify round-off in near-zero gradients)."""
    sgd = ["optimizer.name=sgd", "optimizer.lr=0.5", "optimizer.weight_decay=0", *head]
    batches = random_batches(tiny_config(), 3)
    ref, ref_state = _train(one_device(tiny_config("model.loss_chunk=0", *sgd)), batches)
    cfg = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.loss_chunk=6", *sgd)
    got, state = _train(build(cfg, make_mesh(cfg.mesh)), batches)
    for r, g in zip(ref, got):
        assert g["weight"] == r["weight"] and g["correct"] == r["correct"]
        assert g["loss_sum"] / g["weight"] == pytest.approx(r["loss_sum"] / r["weight"], abs=1e-5)
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5)
    assert got[-1]["loss_sum"] / got[-1]["weight"] < got[0]["loss_sum"] / got[0]["weight"]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


def _step_temp_bytes(cfg) -> int:
    return int(compile_memory_here(cfg, 1, memory_aware=False)["temp"])


def test_chunked_step_needs_less_temporary_memory_than_one_logits_array_at_32k_vocab():
    """Batch 8 x 256 at a 32,768 vocabulary: one B x T x V float32 logits array is 256 MiB. The
    full-logits train step's temporaries exceed it (measured 554 MiB); in chunks of 16 positions
    they stay below half of it, 128 MiB (measured 74 MiB: two 16 MiB chunk buffers and
    the rest of a d_model-64 step). Abstract inputs: compiled, never allocated."""
    sizes = ["model.vocab_size=32768", "model.d_model=64", "model.n_heads=4", "model.d_ff=256",
             "model.n_layers=2", "model.max_seq_len=256", "train.seq_len=256",
             "train.batch_size=8"]
    logits_bytes = 8 * 256 * 32768 * 4
    full = _step_temp_bytes(load_config(None, sizes + ["model.loss_chunk=0"]))
    chunked = _step_temp_bytes(load_config(None, sizes + ["model.loss_chunk=16"]))
    assert full > logits_bytes, full
    assert chunked < logits_bytes // 2, chunked


def test_loss_chunk_must_not_be_negative():
    with pytest.raises(ConfigError, match="model.loss_chunk"):
        load_config(None, ["model.loss_chunk=-1"])


def test_a_resume_may_change_loss_chunk():
    """loss_chunk changes the schedule of the loss, not the parameters or their meaning."""
    from bigjax.checkpoint import model_config_diff
    from bigjax.config import to_dict
    saved = to_dict(tiny_config("model.loss_chunk=0"))["model"]
    assert model_config_diff(saved, to_dict(tiny_config("model.loss_chunk=6"))["model"]) == []
