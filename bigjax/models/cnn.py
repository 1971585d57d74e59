"""A small configurable ConvNet for images (NHWC float32 `images`): conv blocks (3x3 convolution,
optional BatchNorm, ReLU, optional 2x2 max-pool), global average pool, dropout, a dense classifier
with `task.num_labels` outputs. The image size comes from the data (`derived`), like num_labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.config import Config, ModelConfig, derived
from bigjax.errors import ConfigError
from bigjax.models import layers
from bigjax.models.axes import constrain
from bigjax.models.batchnorm import BatchNorm, check_image_input, check_image_model
from bigjax.models.conv import Conv, ConvImpl
from bigjax.registry import register_model

KERNEL = 3
ACT = ("batch", None, None, None)


@dataclass(frozen=True)
class CNNConfig(ModelConfig):
    """`model:` keys of `name: cnn`."""

    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [32, 64])  # output channels of each block
    pool: bool = True  # 2x2 max-pool after each block (while the image is at least 2x2)
    batch_norm: bool = True  # BatchNorm after each convolution (else a conv bias)
    bn_momentum: float = 0.9  # running = m * running + (1 - m) * batch statistics
    bn_eps: float = 1e-5
    dropout: float = 0.0  # before the classifier
    dtype: str = "float32"  # activations and matmuls (float32 or bfloat16); BatchNorm in float32
    conv_impl: ConvImpl = "auto"  # how XLA computes convolution gradients: see conv.py
    image_height: int = derived(0, "image_height")  # 0 = from the data
    image_width: int = derived(0, "image_width")
    image_channels: int = derived(0, "image_channels")

    def check(self, cfg: Config) -> None:
        if not self.channels or any(c < 1 for c in self.channels):
            raise ConfigError(f"model.channels must be a non-empty list of positive channel counts, "
                              f"got {self.channels}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        check_image_model("cnn", self, cfg.task)


def _pool_sizes(cfg: CNNConfig) -> list[tuple[int, int, bool]]:
    """(height, width, pooled) at the input of each block."""
    h, w, out = cfg.image_height, cfg.image_width, []
    for _ in cfg.channels:
        pooled = cfg.pool and h >= 2 and w >= 2
        out.append((h, w, pooled))
        h, w = (h // 2, w // 2) if pooled else (h, w)
    return out


class CNN(nnx.Module):
    def __init__(self, cfg: CNNConfig, num_labels: int, rngs: nnx.Rngs):
        check_image_input(cfg, num_labels, "CNN")
        dtype = jnp.dtype(cfg.dtype)
        self.cfg, self.pools = cfg, [p for _, _, p in _pool_sizes(cfg)]
        c_in = cfg.image_channels
        for i, c in enumerate(cfg.channels):
            setattr(self, f"conv_{i}", Conv(c_in, c, KERNEL, fan="in",
                                            use_bias=not cfg.batch_norm, dtype=dtype,
                                            impl=cfg.conv_impl, rngs=rngs))
            setattr(self, f"bn_{i}", BatchNorm(c, momentum=cfg.bn_momentum, eps=cfg.bn_eps,
                                               axis_name="conv_out") if cfg.batch_norm else None)
            c_in = c
        self.classifier = layers.Dense((c_in,), (num_labels,), ("conv_out", None), use_bias=True,
                                       dtype=dtype, std=(1.0 / c_in) ** 0.5, rngs=rngs)

    def __call__(self, images_BHWC: jax.Array, *, rngs: nnx.Rngs | None = None,
                 train: bool | None = None) -> jax.Array:
        """float32 logits B x num_labels. `train` (default: `rngs` given): BatchNorm normalises
        with the batch's statistics and updates its running averages; else it uses them."""
        train = rngs is not None if train is None else train
        x = constrain(images_BHWC.astype(jnp.dtype(self.cfg.dtype)), ACT)
        for i, pooled in enumerate(self.pools):
            x = getattr(self, f"conv_{i}")(x)
            bn = getattr(self, f"bn_{i}")
            x = jax.nn.relu(bn(x, train=train) if bn is not None else x)
            if pooled:
                x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            x = constrain(x, ACT)
        x = layers.drop(x.mean((1, 2)), self.cfg.dropout, rngs)  # global average pool
        return self.classifier(x).astype(jnp.float32)


def build_cnn(cfg: Config, rngs: nnx.Rngs) -> CNN:
    return CNN(cfg.model, getattr(cfg.task, "num_labels", 0), rngs)


def flops_per_token(cfg: Config, n_params: int) -> float:
    """Training FLOPs per image (3 x forward: the backward pass costs twice the forward) divided by
    `train.seq_len`: for images the "token" is one image when `train.seq_len: 1` (what the image
    configs set), and MFU is right whatever seq_len says. Convolutions and the classifier count;
    BatchNorm, ReLU and pooling (a few FLOPs per activation) do not."""
    m = cfg.model
    c_in, forward = m.image_channels, 0.0
    for (h, w, _), c in zip(_pool_sizes(m), m.channels):
        forward += 2.0 * h * w * KERNEL * KERNEL * c_in * c
        c_in = c
    forward += 2.0 * c_in * getattr(cfg.task, "num_labels", 0)
    return 3.0 * forward / cfg.train.seq_len


register_model("cnn", CNNConfig, build_cnn, flops_per_token=flops_per_token)
