"""bigjax/xla_cpu.py: the option set this jax takes, which kernel library the compiled products
land in, and the same numbers as XLA's default program."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from bigjax import xla_cpu


def _custom_fusions(hlo: str) -> list[str]:
    """Names of the library fusions in a compiled program (`ynn_fusion.3`, `onednn_fusion`)."""
    return re.findall(r"%(\w+)(?:\.\d+)? = \S+ fusion\([^\n]*kind=kCustom", hlo)


def _dense_grads(x, w):
    """A dense layer's forward product and both of its gradients' products (the weight
    gradient contracts the batch, which jax 0.10's YNNPACK leaves to Eigen)."""
    return jax.grad(lambda x, w: jnp.tanh(x @ w).sum(), argnums=(0, 1))(x, w)


def test_first_option_set_is_taken_and_products_land_in_its_library():
    options = xla_cpu.compiler_options("float32")
    # this jax takes its first choice, else the test (and the measured speed) would be void
    assert options == xla_cpu.candidates("float32")[0]
    # bfloat16 products stay where XLA puts them (oneDNN kept more temporaries: xla_cpu.py)
    assert xla_cpu.compiler_options("bfloat16") == xla_cpu.CONV_ON_EIGEN
    x = jax.random.normal(jax.random.key(0), (64, 48))
    w = jax.random.normal(jax.random.key(1), (48, 32)) / 7
    hlo = jax.jit(_dense_grads, compiler_options=options).lower(x, w).compile().as_text()
    default = jax.jit(_dense_grads).lower(x, w).compile().as_text()
    if jax.__version_info__ < (0, 11):  # all three on oneDNN, the weight gradient included
        assert _custom_fusions(hlo).count("onednn_fusion") == hlo.count(" dot(") == 3
        assert "onednn_fusion" not in _custom_fusions(default)
    else:  # products where XLA puts them by default (YNNPACK, the weight gradient on Eigen)
        assert _custom_fusions(hlo) == _custom_fusions(default)
        assert "ynn_fusion" in _custom_fusions(hlo)
    # the same numbers as XLA's default program: another library, the same float32 products
    # (differences are rounding, ~1e-6 relative; a wrong transpose would be O(1))
    got = jax.jit(_dense_grads, compiler_options=options)(x, w)
    want = jax.jit(_dense_grads)(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-6)


def test_refused_option_sets_fall_through_to_the_next(monkeypatch, caplog):
    bad = {"xla_cpu_no_such_option": True}
    monkeypatch.setattr(xla_cpu, "candidates", lambda dtype: [bad, xla_cpu.CONV_ON_EIGEN])
    xla_cpu.compiler_options.cache_clear()
    try:
        assert xla_cpu.compiler_options("float32") == xla_cpu.CONV_ON_EIGEN
        assert "xla_cpu_no_such_option" in caplog.text
        monkeypatch.setattr(xla_cpu, "candidates", lambda dtype: [bad])
        xla_cpu.compiler_options.cache_clear()
        assert xla_cpu.compiler_options("float32") is None
    finally:
        monkeypatch.undo()
        xla_cpu.compiler_options.cache_clear()
