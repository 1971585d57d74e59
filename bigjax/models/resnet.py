"""ResNet-18/34/50 (He et al. 2015, torchvision's "v1.5": the stride of a bottleneck sits in its
3x3 convolution) for NHWC float32 `images`, with the global-batch BatchNorm of batchnorm.py.

Stems: `imagenet` (7x7 stride-2 convolution, 3x3 stride-2 max-pool: 224x224 inputs) or `cifar`
(3x3 stride-1 convolution, no pool: 32x32 inputs keep their resolution into stage 1). Names follow
torchvision's state_dict (`conv1`, `bn1`, `layer2_0/downsample_conv`, `fc`), so
bigjax/hf/torchvision.py maps one onto the other by renaming and transposing only. Padding is
explicit and symmetric (k // 2 on each side) like PyTorch's, not XLA's "SAME", which pads a
stride-2 convolution of an even size on one side only and would not give torchvision's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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

ACT = ("batch", None, None, None)
# depth -> (block kind, blocks per stage), torchvision's table
DEPTHS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]),
          50: ("bottleneck", [3, 4, 6, 3])}
EXPANSION = {"basic": 1, "bottleneck": 4}


@dataclass(frozen=True)
class ResNetConfig(ModelConfig):
    """`model:` keys of `name: resnet`."""

    name: str = "resnet"
    depth: int = 18  # 18 / 34 (basic blocks), 50 (bottleneck blocks)
    blocks: list[int] = field(default_factory=list)  # blocks per stage; [] = the depth's own
    width: int = 64  # channels of stage 1 (doubling per stage); 64 = torchvision
    stem: Literal["imagenet", "cifar"] = "imagenet"  # 7x7/2 conv + max-pool, or 3x3/1 conv
    bn_momentum: float = 0.9  # running = m * running + (1 - m) * batch (PyTorch's 0.1)
    bn_eps: float = 1e-5
    bn_unbiased_var: bool = True  # running variance as PyTorch keeps it (x n/(n-1))
    dtype: str = "float32"  # activations and convolutions (float32 or bfloat16)
    conv_impl: ConvImpl = "auto"  # how XLA computes convolution gradients: see conv.py
    image_height: int = derived(0, "image_height")  # 0 = from the data
    image_width: int = derived(0, "image_width")
    image_channels: int = derived(0, "image_channels")

    def check(self, cfg: Config) -> None:
        if self.depth not in DEPTHS:
            raise ConfigError(f"model.depth must be one of {sorted(DEPTHS)}, got {self.depth}")
        if self.blocks and (len(self.blocks) != 4 or any(b < 1 for b in self.blocks)):
            raise ConfigError(f"model.blocks must be 4 positive block counts (one per stage) or [], "
                              f"got {self.blocks}")
        if self.width < 1:
            raise ConfigError(f"model.width must be positive, got {self.width}")
        check_image_model("resnet", self, cfg.task)


def plan(cfg: ResNetConfig) -> tuple[str, list[tuple[int, int, int]]]:
    """(block kind, [(stage, block, stride)] for every block)."""
    kind, counts = DEPTHS[cfg.depth]
    counts = cfg.blocks or counts
    return kind, [(s, b, 2 if s > 0 and b == 0 else 1) for s, n in enumerate(counts)
                  for b in range(n)]


class Block(nnx.Module):
    """basic: 3x3 -> 3x3; bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4 channels); each convolution
    followed by BatchNorm, ReLU after the sum with the shortcut (a 1x1 strided conv + BatchNorm
    where the shape changes)."""

    def __init__(self, kind: str, c_in: int, planes: int, stride: int, bn: dict, *, dtype,
                 impl: str, rngs: nnx.Rngs):
        c_out = planes * EXPANSION[kind]
        shapes = ([(c_in, planes, 3, stride), (planes, planes, 3, 1)] if kind == "basic" else
                  [(c_in, planes, 1, 1), (planes, planes, 3, stride), (planes, c_out, 1, 1)])
        self.n = len(shapes)
        for i, (ci, co, k, s) in enumerate(shapes, 1):
            setattr(self, f"conv{i}", Conv(ci, co, k, s, fan="out", dtype=dtype, impl=impl,
                                           rngs=rngs))
            setattr(self, f"bn{i}", BatchNorm(co, **bn))
        down = stride != 1 or c_in != c_out
        self.downsample_conv = (Conv(c_in, c_out, 1, stride, fan="out", dtype=dtype, impl=impl,
                                     rngs=rngs)
                                if down else None)
        self.downsample_bn = BatchNorm(c_out, **bn) if down else None

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = x
        for i in range(1, self.n + 1):
            y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y), train=train)
            y = jax.nn.relu(y) if i < self.n else y
        if self.downsample_conv is not None:
            x = self.downsample_bn(self.downsample_conv(x), train=train)
        return constrain(jax.nn.relu(y + x), ACT)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """PyTorch's MaxPool2d(3, 2, padding=1): -inf padding, so padding never wins."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


class ResNet(nnx.Module):
    def __init__(self, cfg: ResNetConfig, num_labels: int, rngs: nnx.Rngs):
        check_image_input(cfg, num_labels, "ResNet")
        dtype = jnp.dtype(cfg.dtype)
        bn = dict(momentum=cfg.bn_momentum, eps=cfg.bn_eps, axis_name="conv_out",
                  unbiased_running_var=cfg.bn_unbiased_var)
        self.cfg = cfg
        stem_k, stem_s = (7, 2) if cfg.stem == "imagenet" else (3, 1)
        impl = cfg.conv_impl
        self.conv1 = Conv(cfg.image_channels, cfg.width, stem_k, stem_s, fan="out", dtype=dtype,
                          impl=impl, rngs=rngs)
        self.bn1 = BatchNorm(cfg.width, **bn)
        kind, blocks = plan(cfg)
        c_in, self.block_names = cfg.width, []
        for stage, b, stride in blocks:
            planes = cfg.width * 2 ** stage
            name = f"layer{stage + 1}_{b}"
            setattr(self, name, Block(kind, c_in, planes, stride, bn, dtype=dtype, impl=impl,
                                        rngs=rngs))
            self.block_names.append(name)
            c_in = planes * EXPANSION[kind]
        self.fc = layers.Dense((c_in,), (num_labels,), ("conv_out", None), use_bias=True,
                               dtype=dtype, std=(1.0 / c_in) ** 0.5, rngs=rngs)

    def __call__(self, images_BHWC: jax.Array, *, rngs: nnx.Rngs | None = None,
                 train: bool | None = None) -> jax.Array:
        """float32 logits B x num_labels. `train` (default: `rngs` given): BatchNorm normalises
        with the (global) batch's statistics and updates its running averages; else uses them."""
        train = rngs is not None if train is None else train
        x = constrain(images_BHWC.astype(jnp.dtype(self.cfg.dtype)), ACT)
        with jax.named_scope("stem"):  # scopes name the ops for bench/step_profile.py
            x = jax.nn.relu(self.bn1(self.conv1(x), train=train))
            if self.cfg.stem == "imagenet":
                x = max_pool_3x3_s2(x)
        for name in self.block_names:
            with jax.named_scope(name):
                x = getattr(self, name)(x, train)
        with jax.named_scope("head"):
            return self.fc(x.mean((1, 2))).astype(jnp.float32)  # global average pool


def build_resnet(cfg: Config, rngs: nnx.Rngs) -> ResNet:
    return ResNet(cfg.model, getattr(cfg.task, "num_labels", 0), rngs)


def _out(size: int, k: int, stride: int) -> int:
    return (size + 2 * (k // 2) - k) // stride + 1


def forward_flops(m: ResNetConfig, num_labels: int) -> float:
    """Multiply-adds x 2 of the convolutions and the classifier for one image."""
    h, w, total = m.image_height, m.image_width, 0.0

    def conv(c_in, c_out, k, s):
        nonlocal h, w, total
        h, w = _out(h, k, s), _out(w, k, s)
        total += 2.0 * h * w * k * k * c_in * c_out

    stem_k, stem_s = (7, 2) if m.stem == "imagenet" else (3, 1)
    conv(m.image_channels, m.width, stem_k, stem_s)
    if m.stem == "imagenet":
        h, w = _out(h, 3, 2), _out(w, 3, 2)
    kind, blocks = plan(m)
    c_in = m.width
    for stage, _, stride in blocks:
        planes = m.width * 2 ** stage
        c_out = planes * EXPANSION[kind]
        h0, w0 = h, w
        shapes = ([(c_in, planes, 3, stride), (planes, planes, 3, 1)] if kind == "basic" else
                  [(c_in, planes, 1, 1), (planes, planes, 3, stride), (planes, c_out, 1, 1)])
        for ci, co, k, s in shapes:
            conv(ci, co, k, s)
        if stride != 1 or c_in != c_out:
            h1, w1 = h, w
            h, w = h0, w0
            conv(c_in, c_out, 1, stride)
            h, w = h1, w1
        c_in = c_out
    return total + 2.0 * c_in * num_labels


def flops_per_token(cfg: Config, n_params: int) -> float:
    """Training FLOPs per image (3 x forward) per `train.seq_len` (1 for images: see cnn.py)."""
    return 3.0 * forward_flops(cfg.model, getattr(cfg.task, "num_labels", 0)) / cfg.train.seq_len


register_model("resnet", ResNetConfig, build_resnet, flops_per_token=flops_per_token)
