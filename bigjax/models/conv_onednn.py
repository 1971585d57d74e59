"""`conv2d` on oneDNN's direct convolutions (bigjax/kernels/onednn_conv.cc): forward, input gradient and filter
gradient are one XLA:CPU custom call each, joined by a custom VJP.

Why: XLA:CPU's convolutions (Eigen's or YNNPACK's) ran a ResNet-18 step at 0.69-0.84x PyTorch's
on an AVX-512 machine, and the filter gradient has no direct kernel in XLA at all (bigjax
computed it as matrix products, models/conv.py). oneDNN's kernels are PyTorch's own on CPU.

A custom call is opaque to XLA's sharding propagation, which would gather a sharded batch onto
every device; so where the train step has bound a mesh (models/axes.py) each call runs per
device on its rows of the batch (`jax.shard_map`), and the filter gradient is summed over the
devices that split the batch.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from bigjax.kernels import native
from bigjax.models import axes


def _call(target: str, out: jax.ShapeDtypeStruct, a, b, stride: int, pad: int):
    s, p = np.int64(stride), np.int64(pad)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
        a, b, sh=s, sw=s, plh=p, phh=p, plw=p, phw=p)


def _out_shape(x, w, stride: int) -> tuple[int, int, int, int]:
    k, p = w.shape[0], w.shape[0] // 2
    return (x.shape[0], (x.shape[1] + 2 * p - k) // stride + 1,
            (x.shape[2] + 2 * p - k) // stride + 1, w.shape[3])


def _fwd_local(x, w, stride):
    out = jax.ShapeDtypeStruct(_out_shape(x, w, stride), x.dtype)
    return _call("bigjax_conv_fwd", out, x, w, stride, w.shape[0] // 2)


def _bwd_data_local(dy, w, x_shape, stride):
    return _call("bigjax_conv_bwd_data", jax.ShapeDtypeStruct(x_shape, dy.dtype), dy, w, stride,
                 w.shape[0] // 2)


def _bwd_weights_local(x, dy, w_shape, stride):
    return _call("bigjax_conv_bwd_weights", jax.ShapeDtypeStruct(w_shape, x.dtype), x, dy, stride,
                 w_shape[0] // 2)


def _batch_split(batch: int):
    """(mesh, mesh axes splitting the batch) when the step bound a mesh of several devices
    whose batch split divides `batch`; None: one call on the whole batch."""
    sharding = axes.sharding_of(("batch", None, None, None))
    if sharding is None or sharding.mesh.size == 1 or sharding.spec[0] is None:
        return None
    names = sharding.spec[0]
    names = (names,) if isinstance(names, str) else tuple(names)
    if batch % math.prod(sharding.mesh.shape[n] for n in names):
        return None  # a batch that does not split stays whole on every device
    return sharding.mesh, names


def _per_device(fn, batch: int, in_batched: tuple[bool, ...], out_batched: bool, *args):
    """fn(*args) on each device's rows (args whose in_batched flag is set are split over the
    batch axes; an unbatched output is summed over them), or on all rows."""
    split = _batch_split(batch)
    if split is None:
        return fn(*args)
    mesh, names = split
    spec = lambda batched: P(names) if batched else P()

    def local(*a):
        y = fn(*a)
        return y if out_batched else jax.lax.psum(y, names)

    return jax.shard_map(local, mesh=mesh, in_specs=tuple(spec(b) for b in in_batched),
                         out_specs=spec(out_batched), check_vma=False)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x_BHWC: jax.Array, w_HWIO: jax.Array, stride: int) -> jax.Array:
    """k x k convolution, `stride` both ways, k // 2 zeros of padding on every side (models/conv.py's
    `conv2d`), float32 or bfloat16. Needs `native.onednn_conv()` true."""
    return _per_device(lambda x, w: _fwd_local(x, w, stride), x_BHWC.shape[0], (True, False),
                       True, x_BHWC, w_HWIO)


def _fwd(x, w, stride):
    return conv2d(x, w, stride), (x, w)


def _bwd(stride, res, dy):
    x, w = res
    b = x.shape[0]
    with jax.named_scope("conv_dx"):
        dx = _per_device(lambda dy_, w_: _bwd_data_local(dy_, w_, (dy_.shape[0],) + x.shape[1:],
                                                         stride),
                         b, (True, False), True, dy, w)
    with jax.named_scope("conv_dw"):
        dw = _per_device(lambda x_, dy_: _bwd_weights_local(x_, dy_, w.shape, stride),
                         b, (True, True), False, x, dy)
    return dx, dw


conv2d.defvjp(_fwd, _bwd)


def available() -> bool:
    return native.onednn_conv()
