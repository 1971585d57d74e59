"""Dropout masks from the position hash (bigjax/models/dropout.py): the rate, independence between
neighbours and between keys, and the same mask however the array is sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bigjax.models.dropout import dropout, keep_scale


@pytest.mark.parametrize("shape", [(64, 512), (64, 511), (4, 16, 513)])
def test_dropout_is_unbiased_and_deterministic(shape):
    x = jnp.ones(shape, jnp.float32)
    y = np.asarray(dropout(x, 0.1, jax.random.key(3)))
    # 32k-34k draws: the dropped share's standard deviation is 0.0017, so 0.005 is 3 of them
    assert abs((y == 0).mean() - 0.1) < 0.005
    assert abs(y.mean() - 1.0) < 0.006
    assert set(np.unique(y)) == {0.0, np.float32(keep_scale(0.1)[1])}
    np.testing.assert_array_equal(np.asarray(dropout(x, 0.1, jax.random.key(3))), y)
    assert dropout(x, 0.1, None) is x and dropout(x, 0.0, jax.random.key(3)) is x


def test_neighbours_rows_and_keys_drop_independently():
    x = jnp.ones((256, 512), jnp.float32)
    kept = np.asarray(dropout(x, 0.5, jax.random.key(0))) > 0
    other = np.asarray(dropout(x, 0.5, jax.random.key(1))) > 0
    corr = lambda a, b: np.corrcoef(a.ravel(), b.ravel())[0, 1]
    # 131k pairs: a correlation's standard deviation is ~0.003; a hash that ignored the row, the
    # column or the key gives 1 on one of these
    assert abs(corr(kept[:, 1:], kept[:, :-1])) < 0.02  # next column
    assert abs(corr(kept[1:], kept[:-1])) < 0.02  # next row
    assert abs(corr(kept, other)) < 0.02  # another key
    assert abs(kept.mean() - 0.5) < 0.01


def test_the_mask_does_not_depend_on_sharding():
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x = jax.random.normal(jax.random.key(0), (8, 16, 64))
    ref = np.asarray(dropout(x, 0.3, jax.random.key(7)))
    for spec in (P("a", None, "b"), P(None, "a", None), P(("a", "b"))):
        xs = jax.device_put(x, NamedSharding(mesh, spec))
        out = jax.jit(lambda v: dropout(v, 0.3, jax.random.key(7)))(xs)
        np.testing.assert_array_equal(np.asarray(out), ref)
