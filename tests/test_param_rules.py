"""Per-parameter rules (optimizer.frozen, lr_multipliers, wd_multipliers): frozen parameters stay
bitwise and have no optimizer state; multipliers scale exactly; a rule that matches nothing fails."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigjax.config import OptimizerConfig, load_config
from bigjax.errors import ConfigError
from bigjax.optim import flat_paths, make_optimizer, param_rules
from bigjax.state import model_spec
from spine import Run, random_batches, tiny_config

FROZEN = "optimizer.frozen=['^embed/', 'layer_0/mlp/']"


def _train(cfg, batches):
    run = Run(cfg)
    state = run.init()
    start = jax.device_get(state.params)
    for b in batches:
        state, _ = run.step(state, jax.device_put(b, run.batch_sharding))
    return flat_paths(start), flat_paths(jax.device_get(state.params)), state


def test_frozen_parameters_stay_bitwise_have_no_optimizer_state_and_equal_a_zero_lr():
    """Two ways to keep parameters still: freezing them, or lr multiplier 0 (no clipping, no
    decay: nothing else couples them). Frozen ones stay bitwise and have no optimizer state;
    what trains comes out the same both ways. Accumulation on, so its scan is covered too."""
    common = ["train.grad_accum=2", "optimizer.weight_decay=0", "model.n_layers=1"]
    batches = random_batches(tiny_config(), 2)
    start, end, state = _train(tiny_config(FROZEN, *common), batches)
    frozen = {p for p in start if p.startswith(("embed/", "layer_0/mlp/"))}
    assert frozen == {"embed/embedding", "layer_0/mlp/up/kernel", "layer_0/mlp/up/bias",
                      "layer_0/mlp/down/kernel", "layer_0/mlp/down/bias"}
    for p in start:
        if p in frozen:
            np.testing.assert_array_equal(end[p], start[p], err_msg=p)
        else:
            assert not np.array_equal(end[p], start[p]), p  # everything else trained
    adam = state.opt_state[0]
    assert set(flat_paths(adam.mu)) == set(start) - frozen == set(flat_paths(adam.nu))
    _, zero, _ = _train(tiny_config(
        "optimizer.lr_multipliers={'^embed/': 0, 'layer_0/mlp/': 0}", *common), batches)
    for p in end:
        # float32 sums in another fusion order only; a leaked frozen gradient moves them by ~lr
        np.testing.assert_allclose(end[p], zero[p], atol=1e-6, rtol=0, err_msg=p)


PARAMS = {"layer_0": {"mlp": {"up": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}},
                      "attn_norm": {"scale": jnp.ones((2,))}}}


def test_multipliers_scale_updates_exactly_and_the_first_match_wins():
    o = OptimizerConfig(name="sgd", momentum=0.0, lr=0.1, weight_decay=0.5,
                        lr_multipliers={"bias$": 0.5, "mlp": 3.0},  # bias: 0.5, not 3
                        wd_multipliers={"kernel$": 2.0})
    tx, _ = make_optimizer(o, 10)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.2), PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    mlp = updates["layer_0"]["mlp"]["up"]
    np.testing.assert_allclose(mlp["kernel"], -0.1 * 3.0 * (0.2 + 0.5 * 2.0 * 1.0), rtol=1e-6)
    np.testing.assert_allclose(mlp["bias"], -0.1 * 0.5 * 0.2, rtol=1e-6)  # biases: no decay
    np.testing.assert_allclose(updates["layer_0"]["attn_norm"]["scale"], -0.1 * 0.2, rtol=1e-6)


def test_startup_lines_say_what_each_rule_matched():
    cfg = tiny_config(FROZEN, "optimizer.lr_multipliers={'kernel$': 0.5, 'mlp/': 2}")
    rules = param_rules(cfg, model_spec(cfg).abstract_params)
    assert rules.lines[0] == ("optimizer.frozen[0] '^embed/': 1 parameters (embed/embedding)")
    assert rules.lines[1].startswith("optimizer.frozen[1] 'layer_0/mlp/': 4 parameters")
    # mlp kernels went to the first rule: the second claims only the mlp biases
    assert rules.lines[3] == ("optimizer.lr_multipliers['mlp/'] x2: 4 parameters "
                              "(layer_0/mlp/down/bias, layer_0/mlp/up/bias, layer_1/mlp/down/bias "
                              "and 1 more)")
    assert len(rules.trainable) + len(rules.frozen) == len(flat_paths(model_spec(cfg).abstract_params))


@pytest.mark.parametrize("override,message", [
    ("optimizer.frozen=['^encoder/']", r"^optimizer.frozen\[0\]: '\^encoder/' matches no parameter "
                                       r"\(paths look like embed/embedding, "),
    ("optimizer.wd_multipliers={'nothing': 2}", r"^optimizer.wd_multipliers\['nothing'\]: 'nothing' "
                                                r"matches no parameter"),
    ("optimizer.frozen=['.']", r"leaves no parameter to train"),
])
def test_a_rule_that_matches_nothing_is_one_line(override, message):
    cfg = tiny_config(override)
    with pytest.raises(ConfigError, match=message):
        param_rules(cfg, model_spec(cfg).abstract_params)


@pytest.mark.parametrize("override,message", [
    ("optimizer.lr_multipliers={'bias': -1}", r"optimizer.lr_multipliers\['bias'\] must be 0 or more"),
    ("optimizer.lr_multipliers=[1]", r"optimizer.lr_multipliers: got \[1\], expected a mapping"),
    ("optimizer.wd_multipliers={'bias': 'x'}", r"optimizer.wd_multipliers\['bias'\]: got 'x', "
                                               r"expected a number"),
    ("optimizer.frozen=['[']", r"optimizer.frozen\[0\]: '\[' is not a regular expression"),
])
def test_bad_rules_in_the_config(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
