"""BatchNorm for bigjax's pure, sharded step: batch statistics of the GLOBAL batch in training,
running averages in evaluation.

The running averages are `nnx.BatchStat` variables, so they are not parameters: the step carries
them in `TrainState.model_state` (returned by the forward, never differentiated). Under `jit` with
the batch sharded over data/fsdp, `mean` over the batch axis is a global mean (XLA inserts the
all-reduce), so a sharded step normalises exactly like a one-device step on the same batch
(tests/test_cnn.py checks outputs and updated statistics).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.errors import ConfigError
from bigjax.kernels import native
from bigjax.models.axes import param


class BatchNorm(nnx.Module):
    """Normalises over every axis but the last (features): NHWC images or B x D vectors.

    `momentum`: running = momentum * running + (1 - momentum) * batch (Flax's convention; PyTorch's
    momentum 0.1 is 0.9 here). The running variance is the biased batch variance, as in Flax, or
    with `unbiased_running_var` the unbiased one (x n/(n-1), n = values per feature in the batch),
    as in PyTorch: ResNets imported from torchvision keep torchvision's running statistics when
    finetuned. Normalisation in training always uses the biased variance (both frameworks do).
    """

    def __init__(self, dim: int, *, momentum: float = 0.9, eps: float = 1e-5,
                 axis_name: str | None = None, unbiased_running_var: bool = False):
        self.momentum, self.eps, self.unbiased = momentum, eps, unbiased_running_var
        self.scale = param(jnp.ones((dim,), jnp.float32), (axis_name,))
        self.bias = param(jnp.zeros((dim,), jnp.float32), (axis_name,))
        self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        with jax.named_scope("batchnorm"):  # names its ops in profiles (bench/step_profile.py)
            return self._normalise(x, train)

    def _normalise(self, x: jax.Array, train: bool) -> jax.Array:
        xf = x.astype(jnp.float32)
        if train:
            norm = _train_norm if TRAIN_BACKWARD == "textbook" else _train_norm_impl
            y, mean, var = norm(xf, self.scale[...], self.bias[...], self.eps)
            m, n = self.momentum, x.size // x.shape[-1]  # static: the global batch under jit
            run_var = var * (n / max(n - 1, 1)) if self.unbiased else var
            self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
            self.var[...] = m * self.var[...] + (1 - m) * jax.lax.stop_gradient(run_var)
        else:
            mean, var = self.mean[...], self.var[...]
            y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


# "textbook": training BatchNorm's gradient as a custom VJP (two channel reductions and one
# elementwise pass); "autodiff": what JAX derives from the forward (more passes: through the
# mean, the centred square and the rsqrt separately). bench/resnet_vs_torchvision.py compares them.
TRAIN_BACKWARD = "textbook"


def _train_norm_impl(xf, scale, bias, eps: float):
    """(normalised and affine x, batch mean, biased batch variance) over all axes but the last."""
    axes = tuple(range(xf.ndim - 1))
    mean = xf.mean(axes)
    var = jnp.square(xf - mean).mean(axes)  # two passes: no E[x^2]-E[x]^2 cancellation
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias
    return y, mean, var


_train_norm = jax.custom_vjp(_train_norm_impl, nondiff_argnums=(3,))


def _train_norm_fwd(xf, scale, bias, eps):
    y, mean, var = _train_norm_impl(xf, scale, bias, eps)
    return (y, mean, var), (xf, mean, jax.lax.rsqrt(var + eps), scale)


def _train_norm_bwd(eps, res, cotangents):
    """With x^ = (x - mean) * rstd and n values per channel: dbias = sum dy, dscale = sum dy x^,
    dx = scale rstd (dy - dbias / n - x^ dscale / n), plus what the mean and variance outputs
    pass back (zero in the model, where they only feed the running averages)."""
    xf, mean, rstd, scale = res
    dy, dmean, dvar = cotangents
    axes = tuple(range(xf.ndim - 1))
    n = xf.size // xf.shape[-1]
    x_hat = (xf - mean) * rstd
    dbias = dy.sum(axes)
    dscale = (dy * x_hat).sum(axes)
    dx = (scale * rstd) * (dy - dbias / n - x_hat * (dscale / n))
    dx = dx + dmean / n + (xf - mean) * (2 * dvar / n)
    return dx, dscale, dbias


_train_norm.defvjp(_train_norm_fwd, _train_norm_bwd)


def check_image_model(name: str, model, task) -> None:
    """The checks an image classifier with BatchNorm shares (`cnn`, `resnet`): BatchNorm's
    momentum and epsilon, the compute dtype, a task with labels. ConfigError, one line."""
    if not 0 <= model.bn_momentum < 1:
        raise ConfigError(f"model.bn_momentum must be in [0, 1), got {model.bn_momentum}")
    if model.bn_eps <= 0:
        raise ConfigError(f"model.bn_eps must be positive, got {model.bn_eps}")
    if model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype: got {model.dtype!r}, expected 'float32' or 'bfloat16'")
    if model.conv_impl == "onednn" and native.built()[0] is None:
        raise ConfigError(f"model.conv_impl: onednn cannot be built here: {native.built()[1]}")
    if not hasattr(task, "num_labels"):
        raise ConfigError(f"model.name={name} needs a task with num_labels "
                          f"(image_classification), got task.name={task.name}")


def check_image_input(model, num_labels: int, family: str) -> None:
    """At build time: the image shape (from the data) and a class count a classifier can have."""
    if min(model.image_height, model.image_width, model.image_channels) < 1:
        raise ConfigError("model.image_height/image_width/image_channels are 0: they come from "
                          "the data (an images task), or set them")
    if num_labels < 2:
        raise ConfigError(f"task.num_labels must be at least 2 for a {family} classifier, "
                          f"got {num_labels}")
