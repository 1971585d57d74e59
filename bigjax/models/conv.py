"""2-D convolution for the image families (cnn, resnet), NHWC x HWIO with symmetric padding, with a
choice of how XLA computes it (`model.conv_impl`).

Why: on YNNPACK (jax 0.10's XLA:CPU default for convolutions) a convolution's filter gradient
(dL/dW, a contraction over batch x height x width) ran at a few GFLOP/s, 10-20x slower than the
forward pass: most of a ResNet-18 training step (notes/issue-12-perf.md). On XLA's own Eigen
kernels (where bigjax/xla_cpu.py puts convolutions) the stride-1 ones are fast; the strided
ones and the 1x1 layers still lose to matrix products in a whole step.

`onednn` runs all three (forward, input and filter gradient) as oneDNN's direct convolutions,
PyTorch's CPU kernels, through XLA:CPU custom calls (bigjax/models/conv_onednn.py): where it is
built (scripts/setup.sh) it is `auto`'s choice on CPU, the fastest of the three in a ResNet-18 step.

`im2col` keeps the forward pass and the input gradient as XLA convolutions (so the outputs are
the very numbers `xla` gives) and computes only the filter gradient as matrix products, in chunks
of the batch: for stride 1 on images of 8 rows per padding row or more, over k width-shifted
copies of the input against k height-shifted copies of the output gradient (2k copies instead of
the k*k of a patch matrix; `_filter_grad_shifted`), otherwise over image patches
(`_filter_grad_patches`); a 1x1 convolution is a plain matrix product throughout. Without oneDNN,
`auto` on CPU is `im2col` except that stride-1 layers stay XLA's convolutions where bigjax's
steps run convolutions on Eigen (README "Convolutions on CPU").
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from bigjax import xla_cpu
from bigjax.errors import ConfigError
from bigjax.kernels import native
from bigjax.models import conv_onednn
from bigjax.models.axes import param
from bigjax.models.matmul import dot_general_f32

ConvImpl = Literal["auto", "xla", "im2col", "onednn"]
IMPLS = ("auto", "xla", "im2col", "onednn")
_DIMS = ("NHWC", "HWIO", "NHWC")
PATCH_CHUNK_BYTES = 32 << 20  # patches of one chunk of the batch: big matmuls, little memory
SHIFTED_CHUNK_BYTES = 8 << 20  # both shifted operands of a chunk: measured faster than 32 MB
MAX_CHUNKS = 16  # chunks are unrolled: more would only grow the program (and its compile time)
STRIDE1_FILTER_GRAD = "shifted"  # or "patches" (the first version): bench/resnet_vs_torchvision.py
# shifted copies carry k - 1 rows of padding per image into their product: worth it from 8 output
# rows per padding row (32x32 1.76x and 16x16 1.36x faster than patches; 8x8 even, 4x4 0.65x)
SHIFTED_MIN_ROWS = 8


def resolve_impl(impl: str, dtype="float32") -> str:
    """`auto`: XLA's own convolutions on GPU and TPU (cuDNN and the TPU compiler have fast
    filter-gradient kernels); on CPU `onednn` where it is built, in float32, and in bfloat16 on
    CPUs with bfloat16 units; else `im2col`, or `mixed` (stride-1 layers XLA's, the rest as
    `im2col`) where a step computing in `dtype` runs convolutions on XLA's Eigen kernels."""
    cpu = jax.default_backend() == "cpu"
    if impl == "onednn":
        if not cpu:
            raise ConfigError(f"model.conv_impl: onednn runs on CPU only, this backend is "
                              f"{jax.default_backend()}: use auto or xla")
        if not native.onednn_conv():
            raise ConfigError(f"model.conv_impl: onednn cannot be built here: {native.built()[1]}")
    if impl != "auto":
        return impl
    if not cpu:
        return "xla"
    dtype = jnp.dtype(dtype)
    if (dtype == jnp.float32 or dtype == jnp.bfloat16 and native.bfloat16_units()) \
            and native.onednn_conv():
        return "onednn"
    return "mixed" if xla_cpu.convolutions_on_eigen(jnp.dtype(dtype).name) else "im2col"


def conv2d(x_BHWC: jax.Array, w_HWIO: jax.Array, stride: int, impl: str) -> jax.Array:
    """k x k convolution (k = w.shape[0], odd), `stride` in both directions, k // 2 zeros of
    padding on every side (PyTorch's padding=k//2; for stride 1 also XLA's "SAME")."""
    k = w_HWIO.shape[0]
    impl = resolve_impl(impl, x_BHWC.dtype)
    if impl == "xla":
        return _xla_conv(x_BHWC, w_HWIO, stride)
    if impl == "onednn":
        return conv_onednn.conv2d(x_BHWC, w_HWIO, stride)
    if k == 1:  # a strided matrix product: no convolution, no patches
        return jnp.einsum("bhwc,co->bhwo", x_BHWC[:, ::stride, ::stride], w_HWIO[0, 0])
    if impl == "mixed" and stride == 1:
        return _xla_conv(x_BHWC, w_HWIO, stride)
    return _conv_mm_filter_grad(x_BHWC, w_HWIO, stride)


class Conv(nnx.Module):
    """k x k convolution (`conv2d`) with an optional bias; He-normal kernel over the fan-in, or
    over the fan-out as torchvision's ResNets (`fan="out"`)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, *,
                 fan: Literal["in", "out"], use_bias: bool = False, dtype, impl: str,
                 rngs: nnx.Rngs):
        self.stride, self.dtype, self.impl = stride, dtype, impl
        std = (2.0 / (k * k * (c_in if fan == "in" else c_out))) ** 0.5
        init = nnx.initializers.normal(std)(rngs.params(), (k, k, c_in, c_out), jnp.float32)
        self.kernel = param(init, (None, None, "conv_in", "conv_out"))
        self.bias = param(jnp.zeros((c_out,), jnp.float32), ("conv_out",)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("conv"):  # names its ops in profiles (bench/step_profile.py)
            return self._apply(x)

    def _apply(self, x: jax.Array) -> jax.Array:
        y = conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride,
                   self.impl)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def _xla_conv(x, w, stride: int):
    p = w.shape[0] // 2
    return lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)),
                                    dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_mm_filter_grad(x, w, stride: int):
    return _xla_conv(x, w, stride)


def _fwd(x, w, stride):
    return _xla_conv(x, w, stride), (x, w)


def _bwd(stride, res, dy):
    x, w = res
    with jax.named_scope("conv_dx"):
        _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, w, stride), x)  # XLA's transposed conv
        (dx,) = input_vjp(dy)
    with jax.named_scope("conv_dw"):
        dw = filter_grad(x, dy, w.shape[0], stride).astype(w.dtype)
    return dx, dw


_conv_mm_filter_grad.defvjp(_fwd, _bwd)


def _taps(x_p, k: int, stride: int, h_out: int, w_out: int) -> list[jax.Array]:
    """The k*k shifted (strided) views of the padded input, tap (i, j) in row-major order: the
    order of HWIO's (H, W) axes."""
    span_h, span_w = stride * (h_out - 1) + 1, stride * (w_out - 1) + 1
    return [x_p[:, i:i + span_h:stride, j:j + span_w:stride] for i in range(k) for j in range(k)]


def filter_grad(x_BHWC: jax.Array, dy_BHWO: jax.Array, k: int, stride: int) -> jax.Array:
    """dL/dW (k x k x C x O, float32) of `conv2d` from its input and output gradient, as matrix
    products over chunks of the batch: shifted copies for stride 1 and at least
    SHIFTED_MIN_ROWS * (k - 1) output rows, a patch matrix otherwise.
    Chunk s takes images s, s + n, s + 2n, ... (a strided slice the copies read in place; a batch
    sharded over devices stays spread over all of them, each device contracting its own rows).
    The chunks are unrolled, not scanned: a scan needed the batch transposed to chunk-major
    first, two copies of x and dy that cost 1.46x in a ResNet-18 step."""
    if (stride == 1 and STRIDE1_FILTER_GRAD == "shifted"
            and dy_BHWO.shape[1] >= SHIFTED_MIN_ROWS * (k - 1)):
        return _filter_grad_shifted(x_BHWC, dy_BHWO, k)
    return _filter_grad_patches(x_BHWC, dy_BHWO, k, stride)


def _num_chunks(b: int, bytes_per_image: int, budget: int) -> int:
    """The fewest equal chunks of the batch (a divisor of b, at most MAX_CHUNKS) whose operands
    stay within `budget` bytes, or the most chunks allowed."""
    needed = min(-(-b * bytes_per_image // budget), MAX_CHUNKS)
    divisors = [d for d in range(1, MAX_CHUNKS + 1) if b % d == 0]
    return next((d for d in divisors if d >= needed), divisors[-1])


def _padded_chunks(x_BHWC: jax.Array, dy_BHWO: jax.Array, k: int, per_image: int,
                   budget: int) -> list[tuple[jax.Array, jax.Array]]:
    """(input padded by k // 2, output gradient) of each chunk of the batch (`_num_chunks`):
    chunk s holds images s, s + n, s + 2n, ..., strided slices the products read in place."""
    b, p = x_BHWC.shape[0], k // 2
    x_p = jnp.pad(x_BHWC, ((0, 0), (p, p), (p, p), (0, 0)))
    n = _num_chunks(b, per_image, budget)
    x_chunks = x_p.reshape(b // n, n, *x_p.shape[1:])
    dy_chunks = dy_BHWO.reshape(b // n, n, *dy_BHWO.shape[1:])
    return [(x_chunks[:, s], dy_chunks[:, s]) for s in range(n)]


def _filter_grad_shifted(x_BHWC: jax.Array, dy_BHWO: jax.Array, k: int) -> jax.Array:
    """Stride 1: dW[i, j] = sum over n, h, w of x_p[n, h + i, w + j]^T dy[n, h, w]. The k
    width-shifted copies of the padded input, side by side in channels (B, H + k - 1, W, k*C),
    against the output gradient padded by i rows above and k - 1 - i below, k of them side by
    side (B, H + k - 1, W, k*O), contract over batch and rows to [(j, c), (i, o)]: the height
    shift rides on the padding, so one product gives all k*k taps from 2k copies where a patch
    matrix needs k*k (stage 1 of a CIFAR ResNet: 107 MB written instead of 151 MB, one
    (k*C) x (k*O) product instead of (k*k*C) x O)."""
    _, h, w, o = dy_BHWO.shape
    c = x_BHWC.shape[-1]
    per_image = (h + k - 1) * w * k * (c + o) * x_BHWC.dtype.itemsize
    acc = jnp.zeros((k * c, k * o), jnp.float32)
    for xs, dys in _padded_chunks(x_BHWC, dy_BHWO, k, per_image, SHIFTED_CHUNK_BYTES):
        x_shift = jnp.concatenate([xs[:, :, j:j + w] for j in range(k)], -1)
        dy_shift = jnp.concatenate(
            [jnp.pad(dys, ((0, 0), (i, k - 1 - i), (0, 0), (0, 0))) for i in range(k)], -1)
        acc += dot_general_f32(x_shift.reshape(-1, k * c), dy_shift.reshape(-1, k * o),
                               (((0,), (0,)), ((), ())))
    return acc.reshape(k, c, k, o).transpose(2, 0, 1, 3)  # [j, c, i, o] -> HWIO


def _filter_grad_patches(x_BHWC: jax.Array, dy_BHWO: jax.Array, k: int, stride: int) -> jax.Array:
    """Any stride: sum over batch and output pixels of patch(x)^T dy, one patch matrix (at most
    PATCH_CHUNK_BYTES) x dy product per chunk of the batch."""
    _, h_out, w_out, o = dy_BHWO.shape
    c = x_BHWC.shape[-1]
    per_image = h_out * w_out * k * k * c * x_BHWC.dtype.itemsize
    acc = jnp.zeros((k * k * c, o), jnp.float32)
    for xs, dys in _padded_chunks(x_BHWC, dy_BHWO, k, per_image, PATCH_CHUNK_BYTES):
        patches = jnp.concatenate(_taps(xs, k, stride, h_out, w_out), -1)
        acc += dot_general_f32(patches.reshape(-1, k * k * c), dys.reshape(-1, o),
                               (((0,), (0,)), ((), ())))
    return acc.reshape(k, k, c, o)
