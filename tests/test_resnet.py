"""The resnet family against torchvision (same weights through the safetensors import path: eval
logits and one training forward's BatchNorm statistics), sharded BatchNorm equal to one device,
FLOP counts against torchvision's published figures, config errors."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from bigjax import mesh as mesh_lib
from bigjax.build import build, one_device
from bigjax.checkpoint import abstract_with_shardings
from bigjax.cli import run as cli_run
from bigjax.config import load_config
from bigjax.errors import CheckpointError
from bigjax.hf.torchvision import bigjax_name
from bigjax.init_from import load_init_model_state, load_init_params
from bigjax.models.resnet import forward_flops
from test_cnn import _bn_stats
from torchvision_ref import import_torchvision


def resnet_config(*overrides: str):
    return load_config(None, ["model.name=resnet", "task.name=image_classification",
                              "task.num_labels=10", "model.image_height=32", "model.image_width=32",
                              "model.image_channels=3", "train.batch_size=8", "train.seq_len=1",
                              *overrides])


def test_steps_compile_convolutions_outside_ynnpack():
    """bigjax/xla_cpu.py: on CPU the train step keeps every convolution on XLA's own
    kernels (YNNPACK ran ResNet-18's widest ones on one core of two); matrix products and
    reductions stay in library fusions (tests/test_xla_cpu.py says which). Without the options 4
    of this network's 5 convolution bodies are YNNPACK fusions."""
    from bigjax.plan import random_batch
    from bigjax.xla_cpu import compiler_options
    assert compiler_options("float32") is not None  # taken, else the test is void
    parts = one_device(resnet_config("model.blocks=[1,1,1,1]", "model.width=16",
                                     "model.conv_impl=xla"))  # XLA's own convolutions
    state = parts.init_state()
    batch = jax.device_put(random_batch(parts.cfg, 0), parts.batch_sharding)
    # the train step (eval and predict steps are jitted with the same options: bigjax/step.py)
    hlo = parts.train_step.lower(state, batch).compile().as_text()
    ynn_bodies = set(re.findall(r"kind=kCustom, calls=(%[\w.\-]+)", hlo))
    bodies = re.split(r"\n(?=%|ENTRY)", hlo)
    assert any("convolution(" in b for b in bodies)
    assert not [b.split(" ")[0] for b in bodies
                if "convolution(" in b and b.split(" ")[0] in ynn_bodies]
    assert ynn_bodies  # the classifier's matmul and the reductions (YNNPACK or oneDNN)


def _torch_model(depth: int):
    tv = import_torchvision()
    torch.manual_seed(depth)
    if depth == 18:
        model = tv.models.resnet18(num_classes=10)
    else:  # a bottleneck ResNet, one block per stage (ResNet-50's blocks, fewer of them)
        model = tv.models.resnet.ResNet(tv.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=10)
    with torch.no_grad():  # non-trivial BatchNorm affine and running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("depth,blocks", [(18, "[]"), (50, "[1,1,1,1]")])
def test_logits_and_statistics_equal_torchvision(depth, blocks, tmp_path):
    """Eval-mode logits within 1e-4 and, after one training-mode forward, every running mean and
    variance within 1e-5 of PyTorch's. Both frameworks compute in float32; the differences left are
    summation order over at most 4,608-term dot products (~1e-6 here). A transposed kernel, a
    one-sided stride-2 padding, a biased running variance or a missed BatchNorm is >1e-2."""
    from safetensors.torch import save_file
    tmodel = _torch_model(depth)
    path = str(tmp_path / "resnet.safetensors")
    save_file(tmodel.state_dict(), path)
    parts = one_device(resnet_config(f"model.depth={depth}", f"model.blocks={blocks}"))
    # the import replaces every array, so shapes and shardings stand in for a fresh init
    fresh = abstract_with_shardings(parts.abstract, parts.shardings)
    spec = f"torchvision:{path}"
    params = load_init_params(parts.cfg, spec, fresh.params)
    model_state = load_init_model_state(parts.cfg, spec, fresh.model_state)
    assert not any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(
        (params, model_state)))

    def both(params, model_state, batch):
        model = nnx.merge(parts.spec.graphdef, params, model_state, copy=True)
        eval_logits = model(batch["images"], train=False)
        model(batch["images"], train=True)
        return eval_logits, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
    x = np.random.default_rng(depth).normal(size=(4, 32, 32, 3)).astype(np.float32)
    logits, stats = parts.jit_eval(both)(params, model_state, {"images": x})

    tmodel.eval()
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        tmodel.train()
        tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=1e-4)
    assert np.abs(ref).max() > 0.1  # the logits are not all ~0 (which would pass anything)
    got = _bn_stats(stats)
    tstate = tmodel.state_dict()
    n = 0
    for name, value in tstate.items():
        if name.endswith(("running_mean", "running_var")):
            key = "/".join(bigjax_name(name))  # layer2.0.bn1.running_var -> layer2_0/bn1/var
            np.testing.assert_allclose(got[key], value.numpy(), rtol=0, atol=1e-5, err_msg=key)
            n += 1
    assert n == len(got) == 2 * (20 if depth == 18 else 17)


def test_sharded_batchnorm_equals_one_device():
    """data=4 x fsdp=2, each device 2 of 8 images: a training forward's logits and updated
    running statistics equal one device's within 1e-5 (tests/test_cnn.py checks a whole step)."""
    from test_cnn import _forward
    over = ["model.width=4", "model.blocks=[1,1,1,1]", "model.stem=cifar", "model.image_height=8",
            "model.image_width=8"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)
    params = model_state = None
    out = []
    for mesh_over in (["mesh.data=1"], ["mesh.data=4", "mesh.fsdp=2"]):
        cfg = resnet_config(*over, *mesh_over)
        parts = build(cfg, mesh_lib.make_mesh(cfg.mesh)) if "mesh.fsdp=2" in mesh_over \
            else one_device(cfg)
        if params is None:  # numpy values: compiling a ResNet's init costs more than this test
            params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.3 + (
                1 if a.ndim == 1 else 0)).astype(np.float32), parts.abstract.params)
            model_state = jax.tree.map(lambda a: np.ones(a.shape, np.float32),
                                       parts.abstract.model_state)
        logits, ms = _forward(parts, train=True)(
            jax.device_put(params, parts.shardings.params),
            jax.device_put(model_state, parts.shardings.model_state),
            jax.device_put({"images": x}, parts.batch_sharding))
        out.append((np.asarray(logits), _bn_stats(ms)))
    (l1, s1), (l8, s8) = out
    np.testing.assert_allclose(l8, l1, rtol=0, atol=1e-5)
    assert len(s1) == 2 * 12  # stem, 4 blocks x 2, 3 downsampling shortcuts
    for k in s1:
        np.testing.assert_allclose(s8[k], s1[k], rtol=0, atol=1e-5, err_msg=k)
    assert np.abs(s1["bn1/mean"] - 1).max() > 1e-3  # they moved from the ones they started at


def test_flops_equal_torchvisions_published_counts():
    """torchvision's model table: 1.814 / 3.664 / 4.089 GFLOPS (multiply-adds) at 224x224."""
    for depth, gmacs in ((18, 1.814), (34, 3.664), (50, 4.089)):
        cfg = resnet_config(f"model.depth={depth}", "model.image_height=224",
                            "model.image_width=224")
        assert round(forward_flops(cfg.model, 1000) / 2e9, 3) == gmacs


@pytest.mark.parametrize("over,message", [
    ("model.depth=20", "model.depth must be one of [18, 34, 50], got 20"),
    ("model.blocks=[2,2]", "model.blocks must be 4 positive block counts (one per stage) or [], "
                           "got [2, 2]"),
    ("model.stem=tiny", "model.stem"),
    ("model.conv_impl=cudnn", "model.conv_impl: got 'cudnn', expected one of 'auto', 'xla', "
                              "'im2col', 'onednn'"),
])
def test_bad_resnet_keys_are_one_line(over, message, tmp_path, capsys):
    rc = cli_run(["train", "configs/resnet18_cifar10.yaml", f"run.dir={tmp_path}/run", over])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_torchvision_file_errors(tmp_path):
    parts = one_device(resnet_config("model.width=4", "model.blocks=[1,1,1,1]"))
    fresh = parts.abstract.params
    with pytest.raises(CheckpointError, match="no such file"):
        load_init_params(parts.cfg, f"torchvision:{tmp_path}/none.safetensors", fresh)
    from safetensors.numpy import save_file
    save_file({"embed.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="not a torchvision ResNet state_dict"):
        load_init_params(parts.cfg, f"torchvision:{tmp_path}/x.safetensors", fresh)
