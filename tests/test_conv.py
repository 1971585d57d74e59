"""bigjax/models/conv.py: oneDNN's kernels, the im2col filter gradient and 1x1 matrix products
compute what XLA's convolution computes (outputs and both gradients), also chunked, sharded and
inside a ResNet."""

import dataclasses
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from bigjax.errors import ConfigError
from bigjax.kernels import native
from bigjax.models import axes, conv
from bigjax.models.batchnorm import check_image_model
from bigjax.models.cnn import CNN, CNNConfig
from bigjax.models.resnet import ResNet, ResNetConfig


def reference(x, w, stride):
    p = w.shape[0] // 2
    return lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def both_ways(x, w, stride, g):
    """Outputs, and the gradients of sum(output * g), of lax's convolution and of im2col, in one
    compiled program (one compile per shape keeps the test cheap)."""
    def run(fn):
        y, vjp = jax.vjp(lambda x, w: fn(x, w, stride), x, w)
        return y, *vjp(g)
    return run(reference), run(lambda x, w, s: conv.conv2d(x, w, s, "im2col"))


# (image size, C in, C out, k, stride): a 3x3 stride-2 on an odd size (the last row and column
# are only ever padding's neighbours), ResNet's 1x1 downsample, the imagenet 7x7 stem (patch
# matrices); a 3x3 and a 5x5 stride-1 on non-square images (shifted copies, forced on these small
# sizes: a mix-up of the height and width shifts, or of i and k - 1 - i, would show); the cnn
# test below runs stride 1 through the patch matrix (8x8 images: below SHIFTED_MIN_ROWS)
SHAPES = [((9, 9), 4, 6, 3, 2), ((8, 8), 4, 6, 1, 2), ((12, 12), 3, 4, 7, 2), ((7, 5), 4, 6, 3, 1),
          ((6, 9), 3, 5, 5, 1)]


@pytest.mark.parametrize("size,c_in,c_out,k,stride", SHAPES)
def test_im2col_equals_xla_outputs_and_gradients(size, c_in, c_out, k, stride, monkeypatch):
    monkeypatch.setattr(conv, "PATCH_CHUNK_BYTES", 1)  # a chunk per image (6 <= MAX_CHUNKS)
    monkeypatch.setattr(conv, "SHIFTED_CHUNK_BYTES", 1)
    monkeypatch.setattr(conv, "SHIFTED_MIN_ROWS", 0)  # shifted copies on these small images too
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (6, *size, c_in))
    w = jax.random.normal(kw, (k, k, c_in, c_out)) / (k * k * c_in) ** 0.5
    size_out = [(n + 2 * (k // 2) - k) // stride + 1 for n in size]
    g = jax.random.normal(jax.random.key(2), (6, *size_out, c_out))  # a fixed cotangent
    (y_ref, dx_ref, dw_ref), (y, dx, dw) = jax.jit(both_ways, static_argnums=2)(x, w, stride, g)
    assert y.shape == y_ref.shape
    # float32 sums of at most 6*12*12 = 864 products of O(1) terms: summation-order differences
    # are ~1e-6; a wrong tap, stride offset or padding side moves values by O(0.1)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=0, atol=1e-4)
    if k > 1:  # the forward and the input gradient are XLA's own convolutions: the same bits
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(dx, dx_ref)


@pytest.mark.parametrize("method", ["shifted", "patches"])
def test_filter_grad_under_a_sharded_batch_equals_one_device(method, monkeypatch):
    """The batch sharded over the 8 test devices (an Auto mesh, as bigjax/mesh.py makes), in two
    chunks of 8 images: each chunk's rows are spread over all devices and the partial filter
    gradients are summed across them, so the result is the one-device one. Both stride-1
    methods: shifted copies (the default) and the patch matrix."""
    monkeypatch.setattr(conv, "PATCH_CHUNK_BYTES", 8 * 8 * 8 * 9 * 4 * 4)  # 8 images' patches
    monkeypatch.setattr(conv, "SHIFTED_CHUNK_BYTES", 8 * 10 * 8 * 3 * 9 * 4)  # 8 images' copies
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    kx, kd = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (16, 8, 8, 4))
    dy = jax.random.normal(kd, (16, 8, 8, 5))
    # the method's own function: jit caches by function, so a patched STRIDE1_FILTER_GRAD would
    # reuse the first method's compiled program
    grad = jax.jit({"shifted": lambda x, dy, k, s: conv._filter_grad_shifted(x, dy, k),
                    "patches": conv._filter_grad_patches}[method], static_argnums=(2, 3))
    one = grad(x, dy, 3, 1)
    sharding = NamedSharding(mesh, P("data"))
    sharded = grad(jax.device_put(x, sharding), jax.device_put(dy, sharding), 3, 1)
    np.testing.assert_allclose(sharded, one, rtol=0, atol=1e-4)
    lax_grad = jax.jit(lambda x, dy: jax.vjp(lambda w: reference(x, w, 1),
                                             jnp.zeros((3, 3, 4, 5)))[1](dy)[0])
    np.testing.assert_allclose(one, lax_grad(x, dy), rtol=0, atol=1e-4)


def test_onednn_kernels_are_built_here():
    """scripts/setup.sh builds bigjax/kernels/onednn_conv.cc on x86-64 Linux: a CI that did not
    would otherwise test `auto` on its fallback only."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("oneDNN's wheels are for x86-64 Linux only")
    assert native.onednn_conv(), native.BUILD_HINT


@pytest.mark.parametrize("size,c_in,c_out,k,stride", SHAPES)
def test_onednn_equals_xla_outputs_and_gradients(size, c_in, c_out, k, stride):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (6, *size, c_in))
    w = jax.random.normal(kw, (k, k, c_in, c_out)) / (k * k * c_in) ** 0.5
    size_out = [(n + 2 * (k // 2) - k) // stride + 1 for n in size]
    g = jax.random.normal(jax.random.key(2), (6, *size_out, c_out))

    def run(fn):
        y, vjp = jax.vjp(lambda x, w: fn(x, w, stride), x, w)
        return y, *vjp(g)
    (y_ref, dx_ref, dw_ref), (y, dx, dw) = jax.jit(
        lambda x, w: (run(reference), run(lambda x, w, s: conv.conv2d(x, w, s, "onednn"))))(x, w)
    assert y.shape == y_ref.shape and dx.shape == dx_ref.shape and dw.shape == dw_ref.shape
    # measured differences ~1e-7 of the largest entry (summation order); a wrong padding side,
    # tap order or filter layout (HWIO against oneDNN's OIHW) moves entries by O(0.1)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_onednn_in_bfloat16_equals_float32_convolutions_to_bfloat16_precision(stride):
    """bfloat16 operands (`model.dtype: bfloat16` with `conv_impl: onednn`): oneDNN accumulates in
    float32, so results are float32 convolutions of the same bfloat16 inputs, rounded once."""
    kx, kw, kg = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(kx, (4, 9, 9, 8)).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (3, 3, 8, 6)) / 8).astype(jnp.bfloat16)
    n = (9 - 1) // stride + 1
    g = jax.random.normal(kg, (4, n, n, 6)).astype(jnp.bfloat16)

    def run(fn, x, w):
        y, vjp = jax.vjp(lambda x, w: fn(x, w, stride), x, w)
        return y, *vjp(g.astype(y.dtype))
    got = jax.jit(lambda x, w: run(lambda x, w, s: conv.conv2d(x, w, s, "onednn"), x, w))(x, w)
    want = jax.jit(lambda x, w: run(reference, x.astype(jnp.float32), w.astype(jnp.float32)))(x, w)
    for a, b in zip(got, want):
        assert a.dtype == jnp.bfloat16
        # one bfloat16 rounding: <= 2^-8 of an entry; a wrong tap or layout is off by O(1)
        np.testing.assert_allclose(a.astype(jnp.float32), b, rtol=0,
                                   atol=2 ** -7 * float(jnp.abs(b).max()))


def test_onednn_under_a_sharded_batch_runs_per_device_and_equals_one_device():
    """With the train step's rules bound (batch over 8 devices), each custom call runs inside a
    shard_map on its device's rows and the filter gradient is summed over devices: the same
    outputs and gradients as one call on the whole batch (not 8 replicated whole-batch calls)."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rules = lambda names: NamedSharding(mesh, P(*("data" if n == "batch" else None for n in names)))
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (16, 8, 8, 4))
    w = jax.random.normal(kw, (3, 3, 4, 5)) / 6
    g = jax.random.normal(kg, (16, 4, 4, 5))

    def run():  # a new function per context: jax caches traces by function, not by context
        def f(x, w):
            y, vjp = jax.vjp(lambda x, w: conv.conv2d(x, w, 2, "onednn"), x, w)
            return y, *vjp(g)
        return f
    one = jax.jit(run())(x, w)
    with axes.constraints(rules):
        jaxpr = str(jax.make_jaxpr(run())(x, w))
        sharded = jax.jit(run())(jax.device_put(x, NamedSharding(mesh, P("data"))), w)
    assert jaxpr.count("shard_map") == 3  # forward, input gradient, filter gradient
    assert sharded[0].sharding.spec[0] == "data"  # the output stays split over the batch
    for a, b in zip(sharded[:2], one[:2]):  # per image: the very same computation
        np.testing.assert_array_equal(a, b)
    # the filter gradient: 8 partial sums added across devices instead of one sum (float32 order)
    np.testing.assert_allclose(sharded[2], one[2], rtol=0, atol=1e-5)


def test_bfloat16_units_are_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert native.bfloat16_units.__wrapped__(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not native.bfloat16_units.__wrapped__(str(info))
    assert not native.bfloat16_units.__wrapped__(str(tmp_path / "missing"))


def test_explicit_onednn_where_it_cannot_be_built_is_one_line(monkeypatch, tmp_path):
    """No oneDNN in the environment (sys.prefix): the config check names what to install."""
    monkeypatch.setattr(native, "_prefix", lambda: tmp_path)
    native.built.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"^model.conv_impl: onednn cannot be built here: "
                                              r"oneDNN is not installed in .*: pip install "
                                              r"'bigjax\[onednn\]'"):
            check_image_model("resnet", ResNetConfig(conv_impl="onednn"), ImageTaskStub())
    finally:
        native.built.cache_clear()


class ImageTaskStub:
    name, num_labels = "image_classification", 10


def test_auto_on_cpu_is_onednn_in_float32_else_xla_stride1_only_on_eigen(monkeypatch):
    """`auto` on CPU: oneDNN's kernels where they are built, in float32, and in bfloat16 where
    the CPU has bfloat16 units. Otherwise stride-1 filter gradients stay XLA's where bigjax's steps run convolutions on
    XLA's Eigen kernels (both jax versions here), all im2col where an XLA refused that option and
    convolutions stay on YNNPACK (whose filter gradients ran at a few GFLOP/s)."""
    assert jax.default_backend() == "cpu"
    assert conv.resolve_impl("auto") == "onednn"
    monkeypatch.setattr(native, "bfloat16_units", lambda: True)
    assert conv.resolve_impl("auto", jnp.bfloat16) == "onednn"
    monkeypatch.setattr(native, "bfloat16_units", lambda: False)
    assert conv.resolve_impl("auto", jnp.bfloat16) == "mixed"
    monkeypatch.setattr(native, "onednn_conv", lambda: False)
    assert conv.resolve_impl("auto") == "mixed"
    assert conv.resolve_impl("auto", jnp.bfloat16) == "mixed"
    assert conv.resolve_impl("xla") == "xla" and conv.resolve_impl("im2col") == "im2col"
    monkeypatch.setattr(conv.xla_cpu, "convolutions_on_eigen", lambda dtype: False)
    assert conv.resolve_impl("auto") == "im2col"


def cnn_loss_and_grads(impl: str, images, labels):
    model = CNN(CNNConfig(channels=[4, 6], image_height=8, image_width=8, image_channels=3,
                          conv_impl=impl), 3, nnx.Rngs(0))
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params):
        logits = nnx.merge(graph, params, rest, copy=True)(images, train=True)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    return jax.jit(jax.value_and_grad(f))(params)


def test_cnn_gradients_do_not_depend_on_conv_impl():
    """The cnn family (3x3 stride-1 convolutions, BatchNorm, max-pool) trains on the same loss and
    gradients whichever conv_impl computes its filter gradients."""
    images = jax.random.normal(jax.random.key(3), (6, 8, 8, 3))
    labels = jnp.array([0, 1, 2, 1, 0, 2])
    (l_x, g_x), (l_i, g_i) = (cnn_loss_and_grads(impl, images, labels)
                              for impl in ("xla", "im2col"))
    np.testing.assert_allclose(l_i, l_x, rtol=1e-6)

    def close(a, b):
        # float32 summation order, amplified where BatchNorm subtracts nearly equal terms: ~1e-5 of
        # a leaf's largest entry; a wrong filter gradient would be off by its whole size
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.abs(b).max()))
    jax.tree.map(close, g_i, g_x)


def test_every_resnet_convolution_follows_conv_impl():
    """Traced, not compiled: with im2col every k x k convolution's filter gradient is a matrix
    product and every 1x1 convolution a matrix product throughout; with xla none are."""
    cfg = ResNetConfig(depth=50, blocks=[1, 1, 1, 1], width=2, stem="imagenet", image_height=16,
                       image_width=16, image_channels=3)
    images = jnp.zeros((2, 16, 16, 3))
    counts = {}
    for impl in ("xla", "im2col", "mixed", "onednn", "auto"):
        model = nnx.eval_shape(lambda: ResNet(dataclasses.replace(cfg, conv_impl=impl), 3,
                                              nnx.Rngs(0)))  # abstract: no init to compile
        graph, params, rest = nnx.split(model, nnx.Param, ...)
        def loss(p, r, graph=graph):
            return nnx.merge(graph, p, r, copy=True)(images, train=True).sum()
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, rest))
        counts[impl] = (jaxpr.count("conv_general_dilated"), jaxpr.count("dot_general"),
                        jaxpr.count("ffi_call"))
    # 17 convolutions: the 7x7 stem, 4 strided-or-not 3x3, 12 1x1 (2 per bottleneck + downsample).
    # xla: each has a forward, an input and a filter gradient convolution (none for the images'
    # gradient) = 50; the classifier's 3 matrix products.
    assert counts["xla"] == (50, 3, 0)
    # im2col: the 5 k x k convolutions keep a forward and an input gradient convolution (the custom
    # backward re-traces the forward for its input vjp; XLA drops that unused copy) = 15; matrix
    # products: 12 1x1 x 3 + 5 filter gradients + the classifier's 3 = 44
    assert counts["im2col"] == (15, 44, 0)
    # mixed: the one stride-1 3x3 (stage 1's) is XLA's throughout, its filter gradient a
    # convolution instead of a product (3 convolutions either way): 15 and 43
    assert counts["mixed"] == (15, 43, 0)
    # onednn (auto on CPU in float32): 3 custom calls per convolution, all 17 of them (the stem's
    # input gradient is traced too, and dropped by XLA), no XLA convolution or 1x1 product
    assert counts["onednn"] == counts["auto"] == (0, 3, 51)
