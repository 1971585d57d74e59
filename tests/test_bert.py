"""The BERT encoder: padding really is masked, every parameter names its logical axes, and the
encoder sharded over an fsdp x tensor mesh computes what it computes on one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from bigjax import mesh as mesh_lib
from bigjax.config import MeshConfig, load_config
from bigjax.errors import ConfigError
from bigjax.models.axes import constraints
from bigjax.models import create_model
from bigjax.state import model_spec

TINY = ["model.name=bert", "model.vocab_size=128", "model.d_model=32", "model.n_heads=4",
        "model.d_ff=64", "model.n_layers=2", "model.max_seq_len=16", "train.seq_len=16",
        "model.norm_eps=1e-12"]


def tiny(*extra: str):
    return load_config(None, TINY + list(extra))


def build(cfg):
    return create_model(cfg, nnx.Rngs(params=0))


def _inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 128, (8, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, 10:] = 0  # every other row is padded
    types = (np.arange(16) >= 6).astype(np.int32)[None].repeat(8, 0)
    return ids, types, mask


def test_padding_does_not_change_real_tokens():
    model = build(tiny())
    ids, types, _ = _inputs()
    short = model.encode(jnp.asarray(ids[:, :10]), token_type_ids=jnp.asarray(types[:, :10]))
    padded_ids = ids.copy()
    padded_ids[:, 10:] = 0
    mask = np.zeros_like(ids)
    mask[:, :10] = 1
    long = model.encode(jnp.asarray(padded_ids), token_type_ids=jnp.asarray(types),
                        attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(long)[:, :10], np.asarray(short), atol=1e-5, rtol=0)
    # without the mask the pad tokens do leak in: the comparison above can fail
    leaky = model.encode(jnp.asarray(padded_ids), token_type_ids=jnp.asarray(types))
    assert np.abs(np.asarray(leaky)[:, :10] - np.asarray(short)).max() > 1e-3


@pytest.mark.parametrize("task,shape", [("masked_lm", (8, 16, 128)), ("classification", (8, 3))])
def test_heads_output_float32_logits_and_name_logical_axes(task, shape):
    cfg = tiny(f"task.name={task}", *(["task.num_labels=3"] if task == "classification" else []))
    ids, types, mask = _inputs()
    out = build(cfg)(jnp.asarray(ids), token_type_ids=jnp.asarray(types),
                     attention_mask=jnp.asarray(mask))
    assert out.shape == shape and out.dtype == jnp.float32
    spec = model_spec(cfg)
    axes = jax.tree_util.tree_leaves_with_path(spec.logical_axes, is_leaf=lambda x: isinstance(x, tuple))
    shapes = dict(jax.tree_util.tree_leaves_with_path(spec.abstract_params))
    assert len(axes) == len(shapes)
    for path, logical in axes:
        assert len(logical) == len(shapes[path].shape), path
    top = set(spec.abstract_params)
    assert ({"mlm_dense", "mlm_norm", "mlm_bias"} <= top) == (task == "masked_lm")
    assert ({"pooler", "classifier"} <= top) == (task == "classification")
    assert "decoder" not in str(jax.tree_util.tree_structure(spec.abstract_params))  # tied head


def test_heads_compute_only_the_positions_they_read_yet_equal_the_full_encoder():
    """The last layer runs queries, output and MLP for [CLS] alone (classifier) or for the masked
    positions alone (masked-LM): the same logits as heads over the full B×T×D hidden states."""
    model = build(tiny("task.name=classification", "task.num_labels=3", "model.n_layers=3"))
    ids, types, mask = (jnp.asarray(a) for a in _inputs())
    kw = dict(token_type_ids=types, attention_mask=mask)
    full = model.encode(ids, **kw)
    positions = jnp.asarray(np.random.default_rng(1).integers(0, 10, (8, 4)), jnp.int32)
    part = model.encode(ids, positions_BP=positions, **kw)
    assert part.shape == (8, 4, 32)
    np.testing.assert_allclose(np.asarray(part), np.take_along_axis(np.asarray(full),
                               np.asarray(positions)[:, :, None], 1), atol=2e-6, rtol=0)
    logits = np.asarray(model(ids, **kw))
    np.testing.assert_allclose(logits, np.asarray(model.classifier(model.pool(full))), atol=2e-6,
                               rtol=0)
    assert np.abs(logits).max() > 1e-3  # not trivially equal
    # padding is still masked for the one query: changing a padded token changes nothing
    np.testing.assert_allclose(np.asarray(model(ids.at[::2, 12].set(5), **kw)), logits, atol=2e-6,
                               rtol=0)
    # changing a real token at the last position does change the [CLS] output
    assert np.abs(np.asarray(model(ids.at[1::2, 15].set(5), **kw)) - logits).max() > 1e-5

    mlm = build(tiny("task.name=masked_lm", "model.n_layers=3"))
    every = np.asarray(mlm(ids, **kw))  # B×T×V
    at = np.asarray(mlm(ids, masked_positions=positions, **kw))  # B×P×V
    assert every.shape == (8, 16, 128) and at.shape == (8, 4, 128)
    np.testing.assert_allclose(at, np.take_along_axis(every, np.asarray(positions)[:, :, None], 1),
                               atol=2e-5, rtol=0)


def test_classification_without_labels_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^task.num_labels must be at least 1 for a classification "
                                          r"head \(got 0; 0 means: count the labels in the data\)$"):
        build(tiny("task.name=classification"))


def test_sharded_encoder_equals_one_device():
    cfg = tiny("task.name=masked_lm")
    spec = model_spec(cfg)
    params = nnx.to_pure_dict(nnx.state(build(cfg), nnx.Param))
    ids, types, mask = _inputs()

    def forward(params, ids, types, mask):
        model = nnx.merge(spec.graphdef, params, {}, copy=True)
        logits = model(ids, token_type_ids=types, attention_mask=mask)
        hidden = model.encode(ids, token_type_ids=types, attention_mask=mask)
        return logits, hidden

    ref = jax.jit(forward)(params, ids, types, mask)

    mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = cfg.sharding.rules
    shardings = mesh_lib.named(mesh, mesh_lib.param_specs(spec.abstract_params, spec.logical_axes,
                                                          rules, mesh))
    assert shardings["layer_0"]["attn"]["query"]["kernel"].spec == P("fsdp", "tensor", None)
    assert shardings["embed"]["embedding"].spec == P("tensor", "fsdp")
    batch = NamedSharding(mesh, mesh_lib.batch_spec(rules, mesh, 2))

    def sharded_forward(*args):
        with constraints(mesh_lib.to_sharding(mesh, rules)):
            return forward(*args)

    out = jax.jit(sharded_forward, in_shardings=(shardings, batch, batch, batch))(
        jax.device_put(params, shardings), ids, types, mask)
    assert out[1].sharding.spec[0] == ("data", "fsdp")
    for a, b in zip(out, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)


def test_masked_lm_loss_at_masked_positions_equals_the_loss_over_every_position():
    """The pipeline's B×P batches (positions, targets, weights) give the masked-LM task the same
    loss and accuracy as B×T targets with weight 1 at those positions."""
    from bigjax.tasks import make_task
    cfg = tiny("task.name=masked_lm")
    model, task = build(cfg), make_task(cfg)
    ids, types, mask = _inputs()
    rng = np.random.default_rng(3)
    positions = np.sort(np.stack([rng.choice(10, 3, replace=False) for _ in range(8)]), 1)
    weights = np.ones((8, 3), np.float32)
    weights[0, 2] = 0  # a padded prediction slot
    targets = rng.integers(5, 128, (8, 3)).astype(np.int32)
    dense_t, dense_w = np.zeros((8, 16), np.int32), np.zeros((8, 16), np.float32)
    np.put_along_axis(dense_t, positions, targets, 1)
    np.put_along_axis(dense_w, positions, weights, 1)
    common = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    at = task.stats(model, {**common, "masked_positions": positions.astype(np.int32),
                            "targets": targets, "weights": weights}, None)
    every = task.stats(model, {**common, "targets": dense_t, "weights": dense_w}, None)
    assert float(at["weight"]) == float(every["weight"]) == 23.0
    assert float(at["correct"]) == float(every["correct"])
    assert float(at["loss_sum"]) == pytest.approx(float(every["loss_sum"]), rel=1e-5)


def test_a_plugin_task_on_classification_batches_gets_the_classifier_head():
    """The head follows the task's data builder, not its name: a task registered with
    data="classification" gets BERT's pooler and classifier, and predict accepts its runs."""
    from dataclasses import dataclass

    from bigjax import registry
    from bigjax.tasks import Classification, ClassificationConfig, head

    @dataclass(frozen=True)
    class OtherClassificationConfig(ClassificationConfig):
        name: str = "test_other_classification"

    registry.register_task("test_other_classification", OtherClassificationConfig,
                           lambda cfg: Classification(cfg.task.num_labels), data="classification")
    cfg = tiny("task.name=test_other_classification", "task.num_labels=3")
    assert head(cfg) == "classification"
    ids, types, mask = _inputs()
    out = build(cfg)(jnp.asarray(ids), token_type_ids=jnp.asarray(types),
                     attention_mask=jnp.asarray(mask))
    assert out.shape == (8, 3)


def test_mean_pooling_reads_the_mean_of_the_real_tokens():
    """`model.pooling: mean`: the pooler reads the mean hidden state over the non-padding tokens
    (numpy here), so padded positions change nothing and the [CLS] state alone is not it."""
    model = build(tiny("task.name=classification", "task.num_labels=3", "model.pooling=mean"))
    ids, types, mask = (jnp.asarray(a) for a in _inputs())
    kw = dict(token_type_ids=types, attention_mask=mask)
    full = np.asarray(model.encode(ids, **kw), np.float64)
    m = np.asarray(mask, np.float64)[:, :, None]
    mean = (full * m).sum(1) / m.sum(1)
    logits = np.asarray(model(ids, **kw))
    want = np.asarray(model.classifier(model.pool(jnp.asarray(mean, jnp.float32)[:, None])))
    np.testing.assert_allclose(logits, want, atol=2e-6, rtol=0)  # float32 sums of 16 rows
    np.testing.assert_allclose(np.asarray(model(ids.at[::2, 12].set(5), **kw)), logits, atol=2e-6,
                               rtol=0)
    cls = np.asarray(model.classifier(model.pool(jnp.asarray(full, jnp.float32))))
    assert np.abs(cls - logits).max() > 1e-4
