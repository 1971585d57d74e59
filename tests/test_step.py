"""The pure step: sharding changes placement, not math; accumulation is exact; memory shrinks."""

import jax
import numpy as np
import pytest

from spine import Run, random_batches, tiny_config


@pytest.fixture(scope="module")
def batches():
    return random_batches(tiny_config(), 5)


@pytest.fixture(scope="module")
def replicated():
    """One compiled replicated step shared by the tests that compare with it (a compile costs
    more than all their steps)."""
    return Run(tiny_config("mesh.data=8"))


@pytest.fixture(scope="module")
def reference(batches, replicated):
    return replicated.losses(batches)


@pytest.mark.parametrize("mesh", [(2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_losses_equal_across_meshes(batches, reference, mesh):
    d, f, t = mesh
    cfg = tiny_config(f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}",
                      "model.n_heads=8", "model.d_model=64") if t == 8 else \
        tiny_config(f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}")
    if t == 8:  # eight-way tensor parallelism needs 8 heads: compare with its own replicated run
        ref_losses, _ = Run(tiny_config("mesh.data=8", "model.n_heads=8", "model.d_model=64")).losses(batches)
    else:
        ref_losses = reference[0]
    losses, _ = Run(cfg).losses(batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    assert losses[-1] < losses[0]  # it does learn


def test_params_and_optimizer_state_sharded_as_rules_say():
    run = Run(tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    state = run.init()
    P = jax.sharding.PartitionSpec
    layer = state.params["layer_0"]
    assert layer["attn"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert layer["attn"]["out"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
    assert layer["mlp"]["up"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert layer["mlp"]["down"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert state.params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    adam = state.opt_state[0]  # the chain: moments, decoupled decay, learning rate
    assert adam.mu["layer_0"]["mlp"]["up"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert adam.nu["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    # each device holds 1/4 of an fsdp x tensor sharded kernel
    k = layer["mlp"]["up"]["kernel"]
    assert k.addressable_shards[0].data.shape == (k.shape[0] // 2, k.shape[1] // 2)


def _argument_bytes(cfg) -> int:
    run = Run(cfg)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=run.batch_sharding)
             for k, v in random_batches(cfg, 1)[0].items()}
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         run.abstract, run.shardings)
    return run.step.lower(state, batch).compile().memory_analysis().argument_size_in_bytes


def test_fsdp8_argument_bytes_at_most_20_percent_of_replicated():
    big = ("model.vocab_size=512", "model.d_model=128", "model.d_ff=512", "model.n_heads=8")
    replicated = _argument_bytes(tiny_config("mesh.data=8", *big))
    fsdp = _argument_bytes(tiny_config("mesh.data=1", "mesh.fsdp=8", *big))
    assert fsdp <= 0.2 * replicated, (fsdp, replicated)


def test_grad_accumulation_equals_one_big_batch(batches, replicated):
    one, s1 = replicated.losses(batches[:2])
    four, s4 = Run(tiny_config("mesh.data=4", "mesh.tensor=2", "train.grad_accum=4")).losses(batches[:2])
    np.testing.assert_allclose(four, one, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_dropout_depends_on_step_only(replicated):
    cfg = tiny_config("mesh.data=8", "model.dropout=0.3")
    b = random_batches(cfg, 3, seed=1)
    # the same Run (one compile) twice: RNG state hidden in it would have moved on by the second
    # run, which two fresh Runs would each start from the same place and miss
    run = Run(cfg)
    l1, s1 = run.losses(b)
    l2, s2 = run.losses(b)
    assert l1 == l2  # bitwise: the dropout key is (seed, step), not hidden RNG state
    no_drop, _ = replicated.losses(b)
    assert abs(l1[0] - no_drop[0]) > 1e-4
