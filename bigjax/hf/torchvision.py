"""torchvision ResNet weights -> bigjax `resnet` parameters and BatchNorm statistics.

A user saves a torchvision model's state_dict with safetensors (no pickle):

    from safetensors.torch import save_file
    save_file(torchvision.models.resnet18(weights="DEFAULT").state_dict(), "resnet18.safetensors")

and starts a run from it with `init.from: torchvision:resnet18.safetensors`. The file is read with
safetensors' numpy API, so PyTorch is not needed here. Names map one to one (resnet.py keeps
torchvision's): `layer2.0.downsample.0.weight` -> `layer2_0/downsample_conv/kernel`, convolution
kernels O x I x kh x kw -> kh x kw x I x O, the classifier's K x C -> C x K. BatchNorm's running
mean and variance go to the model state (`num_batches_tracked` is PyTorch bookkeeping, dropped).
"""

from __future__ import annotations

import os
import re

import numpy as np

from bigjax.errors import CheckpointError, first_line

BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
STATS = ("mean", "var")


def bigjax_name(tv_name: str) -> tuple[str, ...] | None:
    """The bigjax path of a torchvision ResNet state_dict key (None: not carried over)."""
    parts = tv_name.split(".")
    if parts[-1] == "num_batches_tracked":
        return None
    if parts[0].startswith("layer") and len(parts) >= 4:
        block = f"{parts[0]}_{parts[1]}"
        rest = parts[2:]
        if rest[0] == "downsample":  # Sequential(conv 1x1, BatchNorm)
            rest = ["downsample_conv" if rest[1] == "0" else "downsample_bn"] + rest[2:]
        parts = [block] + rest
    module, leaf = parts[:-1], parts[-1]
    if re.fullmatch(r"(bn\d|downsample_bn)", module[-1]):
        if leaf not in BN_NAMES:
            return None
        return (*module, BN_NAMES[leaf])
    if leaf == "weight":
        return (*module, "kernel")
    return (*module, leaf)


def convert(tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """({path: array} parameters, {path: array} BatchNorm statistics) in bigjax's layout."""
    params, stats = {}, {}
    for name, value in tensors.items():
        path = bigjax_name(name)
        if path is None:
            continue
        value = np.asarray(value, np.float32)
        if path[-1] == "kernel":
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        (stats if path[-1] in STATS else params)[path] = value
    return params, stats


def read(path: str) -> tuple[dict, dict]:
    """A torchvision ResNet state_dict saved with safetensors -> (params, statistics) by path."""
    from safetensors.numpy import load_file
    if not os.path.isfile(path):
        raise CheckpointError(f"init.from='torchvision:{path}': no such file (expected a "
                              f"torchvision ResNet state_dict saved with safetensors.torch.save_file)")
    try:
        tensors = load_file(path)
    except Exception as e:
        raise CheckpointError(f"init.from='torchvision:{path}': not a safetensors file "
                              f"({first_line(e, 120)})")
    if "conv1.weight" not in tensors or "fc.weight" not in tensors:
        raise CheckpointError(f"init.from='torchvision:{path}': not a torchvision ResNet "
                              f"state_dict (no conv1.weight / fc.weight; it has "
                              f"{', '.join(sorted(tensors)[:4])}, ...)")
    return convert(tensors)
