"""The faster formulations in bigjax/models/layers.py compute what the plain ones do: exact GELU
through erf, q/k/v projections as one matmul."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.models import layers


def test_gelu_is_exact_gelu_and_its_derivative():
    x = np.linspace(-9.0, 9.0, 2001)
    phi = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])  # float64 reference
    got = np.asarray(layers.gelu(jnp.asarray(x, jnp.float32)), np.float64)
    # float32 rounding of values up to 9: a tanh approximation is off by up to ~5e-4, erf's
    # polynomial by ~1e-6
    np.testing.assert_allclose(got, x * cdf, rtol=1e-6, atol=2e-6)
    grad = jax.vmap(jax.grad(layers.gelu))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad, np.float64), cdf + x * phi, rtol=1e-5, atol=2e-6)
    # the same function as jax's erfc form
    np.testing.assert_allclose(got, jax.nn.gelu(jnp.asarray(x, jnp.float32), approximate=False),
                               rtol=1e-6, atol=2e-6)


def _attention(n_kv: int, use_bias: bool = True) -> layers.Attention:
    attn = layers.Attention(16, 4, n_kv, 8, use_bias=use_bias, dropout=0.0, rope_theta=None,
                            dtype=jnp.float32, std=0.3, out_std=0.3, rngs=nnx.Rngs(0))
    if use_bias:  # non-zero biases, different per projection: a mixed-up split shows
        for i, d in enumerate((attn.query, attn.key, attn.value)):
            d.bias[...] = jax.random.normal(jax.random.key(10 + i), d.bias[...].shape)
    return attn


@pytest.mark.parametrize("n_kv,use_bias,gathered", [(4, True, False), (2, False, False),
                                                    (4, True, True)])
def test_fused_qkv_equals_separate_projections_with_gradients(n_kv, use_bias, gathered):
    attn = _attention(n_kv, use_bias)
    x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    q_in = x[:, :2] if gathered else x  # BERT's last layer: queries at a few positions only
    graphdef, params = nnx.split(attn)

    def loss(params, x, fused):
        a = nnx.merge(graphdef, params)
        q_x = x[:, :2] if gathered else x
        q, k, v = a.qkv(q_x, x) if fused else (a.query(q_x), a.key(x), a.value(x))
        w = lambda t, s: jnp.cos(jnp.arange(t.size, dtype=jnp.float32) * s).reshape(t.shape)
        return (q * w(q, 0.1)).sum() + (k * w(k, 0.2)).sum() + (v * w(v, 0.3)).sum()

    outs = [jax.jit(lambda p, x: jax.value_and_grad(loss, (0, 1))(p, x, f))(params, x)
            for f in (True, False)]
    (lf, (gpf, gxf)), (ls, (gps, gxs)) = outs
    np.testing.assert_allclose(lf, ls, rtol=1e-6)  # float32 sums of the same products
    np.testing.assert_allclose(gxf, gxs, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(gpf), jax.tree.leaves(gps)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    q, k, v = jax.jit(lambda p, x: nnx.merge(graphdef, p).qkv(x[:, :2] if gathered else x, x))(
        params, x)
    assert q.shape == (2, q_in.shape[1], 4, 8) and k.shape == v.shape == (2, 6, n_kv, 8)


def test_self_attention_projects_queries_keys_and_values_in_one_matmul():
    attn = _attention(4)
    graphdef, params = nnx.split(attn)
    x = jnp.ones((2, 6, 16))
    run = lambda p, x: nnx.merge(graphdef, p).qkv(x, x)
    hlo = jax.jit(run).lower(params, x).as_text()
    assert hlo.count("stablehlo.dot_general") == 1, hlo.count("stablehlo.dot_general")


def test_fused_projection_keeps_a_subclass_call():
    """A Dense subclass (LoRA's adapters) has its own call: it is not fused away."""
    class Doubled(layers.Dense):
        def __call__(self, x):
            return 2 * super().__call__(x)

    attn = _attention(4)
    attn.key.__class__ = Doubled
    x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    q, k, v = attn.qkv(x, x)
    np.testing.assert_allclose(k, 2 * layers.Dense.__call__(attn.key, x), rtol=1e-6)
    np.testing.assert_allclose(q, attn.query(x), rtol=1e-6)
