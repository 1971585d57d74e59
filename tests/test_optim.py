"""Optimizers: decoupled decay and its mask, schedules, and optimizer choice from config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigjax.config import OptimizerConfig
from bigjax.optim import clip_by_global_norm, decay_mask, make_optimizer, make_schedule

PARAMS = {"embed": {"embedding": jnp.ones((4, 2))},
          "layer_0": {"mlp": {"up": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}},
                      "attn_norm": {"scale": jnp.ones((2,))}}}


def _update(o: OptimizerConfig, grads, params=PARAMS, steps=10):
    tx, _ = make_optimizer(o, steps)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)


def test_default_mask_skips_bias_norm_scale_and_embeddings():
    mask = decay_mask(OptimizerConfig(), PARAMS)
    assert mask == {"embed": {"embedding": False},
                    "layer_0": {"mlp": {"up": {"kernel": True, "bias": False}},
                                "attn_norm": {"scale": False}}}
    assert decay_mask(OptimizerConfig(no_decay=[r"bias$"]), PARAMS)["embed"]["embedding"] is True


@pytest.mark.parametrize("name", ["adamw", "sgd", "rmsprop"])
def test_decay_is_decoupled_and_masked(name):
    """Zero gradients: only decayed weights move, by exactly lr * wd * p."""
    o = OptimizerConfig(name=name, lr=0.1, weight_decay=0.5)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    new = _update(o, zeros)
    np.testing.assert_allclose(new["layer_0"]["mlp"]["up"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(new["layer_0"]["mlp"]["up"]["bias"], 1.0)
    np.testing.assert_array_equal(new["layer_0"]["attn_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(new["embed"]["embedding"], 1.0)


def test_adamw_matches_optax_adamw():
    o = OptimizerConfig(name="adamw", lr=0.01, weight_decay=0.1, no_decay=[])
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), PARAMS)
    ref = optax.adamw(0.01, weight_decay=0.1)
    upd, _ = ref.update(grads, ref.init(PARAMS), PARAMS)
    for a, b in zip(jax.tree.leaves(_update(o, grads)), jax.tree.leaves(optax.apply_updates(PARAMS, upd))):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_sgd_nesterov_matches_optax_without_decay():
    o = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True)
    tx, _ = make_optimizer(o, 10)
    ref = optax.sgd(0.1, momentum=0.9, nesterov=True)
    p1 = p2 = PARAMS
    s1, s2 = tx.init(p1), ref.init(p2)
    for i in range(3):
        g = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (i + 1)), PARAMS)
        u1, s1 = tx.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_warmup_then_cosine_and_linear():
    o = OptimizerConfig(lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    s = make_schedule(o, 110)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # halfway down the cosine
    assert float(s(110)) == pytest.approx(0.1)
    lin = make_schedule(OptimizerConfig(lr=1.0, schedule="linear", min_lr_ratio=0.0), 100)
    assert float(lin(25)) == pytest.approx(0.75)
    assert float(make_schedule(OptimizerConfig(lr=0.3), 100)(77)) == pytest.approx(0.3)


def test_clipping_bounds_the_update():
    o = OptimizerConfig(name="sgd", lr=1.0, momentum=0.0, clip_norm=1.0)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), PARAMS)
    new = _update(o, grads)
    delta = jax.tree.map(lambda a, b: a - b, PARAMS, new)
    assert float(optax.tree.norm(delta)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("scale", [100.0, 0.01])  # clipped, and left as it is
def test_clip_is_optaxs_clip_and_takes_the_steps_norm(scale):
    grads = jax.tree.map(lambda p: scale * (jnp.arange(p.size, dtype=p.dtype).reshape(p.shape) + 1)
                         / 100, PARAMS)  # global norm 0.18 x scale
    ours, _ = clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    ref, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        # u * (1 / |u|) vs optax's u / |u| * 1: at most an ulp apart; unclipped, bitwise
        np.testing.assert_allclose(a, b, rtol=3e-7, atol=0)
        if scale < 1:
            np.testing.assert_array_equal(a, b)
    # the step hands it the norm of the unscaled gradient: that norm, not the updates', decides
    norm = optax.tree.norm(grads)
    halved, _ = clip_by_global_norm(1.0).update(grads, optax.EmptyState(), grad_norm=2 * norm)
    expect = jax.tree.map(lambda g: g * jnp.minimum(1.0, 0.5 / norm), grads)
    for a, b in zip(jax.tree.leaves(halved), jax.tree.leaves(expect)):
        np.testing.assert_allclose(a, b, rtol=3e-7, atol=0)
