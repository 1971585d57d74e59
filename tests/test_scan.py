"""`model.scan_layers`: the decoder's blocks stacked and applied by one lax.scan train exactly like
the unrolled blocks, shard the same way (plus an unsharded leading layers axis), and convert."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bigjax.errors import CheckpointError, ConfigError
from bigjax.init_from import load_init_params
from bigjax.models.gpt import stack_layers, unstack_layers
from spine import Run, random_batches, tiny_config

MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def run_from(run: Run, params) -> tuple[list[float], dict]:
    state = run.init()
    params = jax.device_put(params, run.shardings.params)
    state = state.replace(params=params, opt_state=jax.jit(
        run.tx.init, out_shardings=run.shardings.opt_state)(params))
    losses = []
    for b in random_batches(run.cfg, 5):
        state, m = run.step(state, jax.device_put(b, run.batch_sharding))
        losses.append(float(m["loss_sum"]) / float(m["weight"]))
    return losses, jax.device_get(state.params)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_blocks_train_like_unrolled_ones(remat):
    unrolled = Run(tiny_config(*MESH, "model.n_layers=3", f"model.remat={remat}"))
    scanned = Run(tiny_config(*MESH, "model.n_layers=3", f"model.remat={remat}",
                              "model.scan_layers=true"))
    start = jax.device_get(unrolled.init().params)
    want, want_params = run_from(unrolled, start)
    got, got_params = run_from(scanned, stack_layers(start, 3))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert want[-1] < want[0] - 0.1  # it learns
    # 1e-4: attention key biases get no gradient but rounding noise, which Adam scales up to
    # ~1e-5 steps whose sign depends on summation order; weights move by ~1e-2 in these 5 steps
    for a, b in zip(jax.tree.leaves(unstack_layers(got_params)), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    # the stacked kernels shard like the unrolled ones, behind an unsharded layers axis
    sh = scanned.shardings.params["layers"]["attn"]["query"]["kernel"]
    assert sh.spec == P(None, "fsdp", "tensor", None)
    assert unrolled.shardings.params["layer_0"]["attn"]["query"]["kernel"].spec == P("fsdp", "tensor", None)
    assert scanned.abstract.params["layers"]["attn"]["query"]["kernel"].shape == (3, 32, 4, 8)


def test_scan_layers_is_for_the_decoder():
    with pytest.raises(ConfigError, match=r"^unknown config key 'model.scan_layers' for model "
                                          r"'bert' \(a key of model gpt\) \(known: "):
        tiny_config("model.name=bert", "model.scan_layers=true")


def test_init_from_across_layer_layouts_names_the_key(tmp_path):
    """A checkpoint with unrolled layers cannot feed a scanned model silently half-loaded."""
    from bigjax.checkpoint import Checkpointer
    from bigjax.config import to_dict
    source = Run(tiny_config())
    state = source.init()
    ckpt = Checkpointer(str(tmp_path / "src"), source.cfg.checkpoint)
    ckpt.save(1, state, {}, {"step": 1, "config": to_dict(source.cfg)}, force=True)
    ckpt.wait()
    target = Run(tiny_config("model.scan_layers=true"))
    with pytest.raises(CheckpointError, match=r"the source stores its layers one by one and this "
                                              r"model has model.scan_layers=true; set "
                                              r"model.scan_layers=false"):
        load_init_params(target.cfg, str(tmp_path / "src"), target.init().params)


def test_resume_may_change_remat_but_not_the_layer_layout():
    from bigjax.checkpoint import model_config_diff
    from bigjax.config import to_dict
    saved = to_dict(tiny_config("model.remat=full", "model.scan_layers=true"))["model"]
    assert model_config_diff(saved, to_dict(tiny_config("model.scan_layers=true"))["model"]) == []
    assert model_config_diff(saved, to_dict(tiny_config("model.remat=full"))["model"]) == [
        "model.scan_layers (checkpoint True, config False)"]
