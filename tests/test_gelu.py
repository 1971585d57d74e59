"""layers.gelu, the exact GELU through erf (one fused pass on XLA:CPU), computes what the plain
form does."""

import math

import jax
import jax.numpy as jnp
import numpy as np

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
