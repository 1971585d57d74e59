"""The rnn family: LSTM and GRU equal PyTorch's on the same weights (stacked, bidirectional, padded
rows), the sharded step equals one device, the causal-LM loss equals a per-step loop with state
resets at document starts, and bad config is one line."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from bigjax import mesh as mesh_lib
from bigjax.build import build, one_device
from bigjax.cli import run as cli_run
from bigjax.config import load_config, updated
from bigjax.errors import ConfigError
from bigjax.mesh import path_str
from bigjax.optim import decay_mask
from bigjax.state import TrainState, model_spec
from bigjax.models.rnn import GATES, RNN, RNNConfig
from bigjax.tasks import make_task

H, E, V = 8, 6, 50


def small_rnn(cfg: RNNConfig, head: str | None = "classification", seed: int = 0) -> RNN:
    """The model with numpy-drawn weights, uniform in +-0.5: creating them with jax.random would
    compile a kernel per parameter shape (seconds each on a busy CPU) that these tests do not need
    (the sharded-step test initialises through bigjax's own jitted init)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: RNN(cfg, head, 3, nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: rng.uniform(-0.5, 0.5, x.shape).astype(np.float32), state)
    return nnx.merge(graphdef, state)


def to_torch(model: RNN, kind: str, n_layers: int) -> torch.nn.Module:
    """A float64 torch.nn.LSTM / GRU holding the model's weights (PyTorch's weight_ih_l0 is
    (G*H, in), gates stacked in the same order)."""
    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    net = cls(E, H, num_layers=n_layers, bidirectional=True, batch_first=True).double()
    as_rows = lambda k: torch.tensor(np.asarray(k).transpose(1, 2, 0).reshape(GATES[kind] * H, -1))
    sd = {}
    for i in range(n_layers):
        layer = getattr(model, f"layer_{i}")
        for suffix, cell in (("", layer.fwd), ("_reverse", layer.bwd)):
            for part in ("ih", "hh"):
                gates = getattr(cell, part)
                sd[f"weight_{part}_l{i}{suffix}"] = as_rows(gates.kernel[...])
                bias = np.asarray(gates.bias[...]).reshape(-1)
                sd[f"bias_{part}_l{i}{suffix}"] = torch.tensor(bias)
    net.load_state_dict({k: v.double() for k, v in sd.items()})
    return net


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_equals_pytorch_stacked_bidirectional_padded_and_per_row(kind):
    """Two bidirectional layers on a right-padded batch (lengths 7, 3, 5, 1) against PyTorch's packed
    sequence and against each row run alone, unpadded: every output (zero at padding, like
    pad_packed_sequence) and the final states of both directions agree within 1e-5. Without the
    mask the reverse direction would start on padding and differ by ~1e-1 (checked last)."""
    model = small_rnn(RNNConfig(cell=kind, vocab_size=V, embed_dim=E, hidden_size=H, n_layers=2,
                                bidirectional=True))
    net = to_torch(model, kind, 2)
    rng = np.random.default_rng(0)
    B, T, lens = 4, 7, [7, 3, 5, 1]
    ids = rng.integers(1, V, (B, T))
    mask = np.arange(T)[None] < np.array(lens)[:, None]
    ids[~mask] = 0
    encode = jax.jit(lambda i, m: model.encode(i, m))
    out, final = encode(jnp.asarray(ids), jnp.asarray(mask))
    out, final = np.asarray(out), [np.asarray(f) for f in final]
    x = torch.tensor(np.asarray(model.embed(jnp.asarray(ids)), np.float64))
    with torch.no_grad():
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lens, batch_first=True,
                                                         enforce_sorted=False)
        t_out, t_state = net(packed)
        t_out = torch.nn.utils.rnn.pad_packed_sequence(t_out, batch_first=True, total_length=T)[0]
        t_h = (t_state[0] if kind == "lstm" else t_state).numpy()
        np.testing.assert_allclose(out, t_out.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(final[0], t_h[-2], rtol=0, atol=1e-5)  # last layer, forward
        np.testing.assert_allclose(final[1], t_h[-1], rtol=0, atol=1e-5)  # last layer, backward
        for b, n in enumerate(lens):  # each row alone, no padding at all
            row_out, row_state = net(x[b:b + 1, :n])
            np.testing.assert_allclose(out[b, :n], row_out[0].numpy(), rtol=0, atol=1e-5)
            assert np.all(out[b, n:] == 0)
            row_h = (row_state[0] if kind == "lstm" else row_state).numpy()
            np.testing.assert_allclose(final[1][b], row_h[-1, 0], rtol=0, atol=1e-5)
    # the same rows unmasked: padding steps would move the state
    _, unmasked = encode(jnp.asarray(ids), jnp.ones((B, T), bool))
    assert np.abs(np.asarray(unmasked[1])[1] - final[1][1]).max() > 1e-2


def test_padding_does_not_change_the_logits():
    """A row's class logits do not depend on what fills its padding (every pooling): rows 1-3
    repeat row 0's five real tokens, followed by pad ids or by random tokens, masked out."""
    rng = np.random.default_rng(1)
    ids = np.repeat(rng.integers(1, V, (1, 11)), 4, 0)
    ids[1, 5:] = 0
    ids[2:, 5:] = rng.integers(1, V, (2, 6))
    mask = np.repeat(np.arange(11)[None] < 5, 4, 0)
    mask[0] = True  # row 0: all 11 tokens real, a different sequence (the check can fail)
    for pool in ("last", "mean", "max"):
        model = small_rnn(RNNConfig(cell="gru", vocab_size=V, embed_dim=E, hidden_size=H,
                                    bidirectional=True, pool=pool), seed=1)
        logits = np.asarray(jax.jit(lambda i, m: model(i, attention_mask=m))(ids, mask))
        np.testing.assert_allclose(logits[2:], np.repeat(logits[1:2], 2, 0), rtol=0, atol=1e-6)
        assert np.abs(logits[0] - logits[1]).max() > 1e-3


def test_program_does_not_grow_with_length():
    """One scan per direction and layer: the traced program for 8 and for 256 positions is the
    same but for the numbers in its shapes (unrolled steps would add equations per position)."""
    model = small_rnn(RNNConfig(cell="lstm", vocab_size=V, embed_dim=E, hidden_size=H, n_layers=2,
                                bidirectional=True))
    program = lambda T: re.sub(r"\d+", "#", str(jax.make_jaxpr(
        lambda i, m: model(i, attention_mask=m))(np.ones((2, T), np.int32), np.ones((2, T), bool))))
    assert program(8) == program(256)
    assert str(jax.make_jaxpr(lambda i: model(i))(np.ones((2, 8), np.int32))).count("scan[") == 4


def test_parameter_names_axes_and_decay():
    """Paths a newcomer can map to PyTorch's, logical axes the mesh rules split, and the default
    `optimizer.no_decay` leaves the biases and the embedding out of weight decay."""
    cfg = load_config(None, CLS)
    spec = model_spec(cfg)
    flat = {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(spec.abstract_params)}
    assert sorted(k for k in flat if k.startswith("layer_1/bwd")) == [
        "layer_1/bwd/hh/bias", "layer_1/bwd/hh/kernel", "layer_1/bwd/ih/bias", "layer_1/bwd/ih/kernel"]
    assert flat["layer_1/bwd/ih/kernel"].shape == (32, 4, 16)  # both directions of layer 0 in
    assert spec.logical_axes["layer_1"]["bwd"]["hh"]["kernel"] == ("embed", None, "mlp")
    mask = {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(
        decay_mask(cfg.optimizer, spec.abstract_params))}
    assert {k for k, decayed in mask.items() if decayed} == {
        k for k in flat if k.endswith("kernel")}


# ---- in the step ---------------------------------------------------------------------------------
CLS = ["model.name=rnn", "model.cell=lstm", "model.vocab_size=64", "model.embed_dim=16",
       "model.hidden_size=16", "model.n_layers=2", "model.bidirectional=true", "model.dropout=0.0",
       "task.name=classification", "task.num_labels=3", "train.batch_size=8", "train.seq_len=12",
       "optimizer.name=sgd", "optimizer.lr=0.1"]
LM = ["model.name=rnn", "model.cell=gru", "model.vocab_size=64", "model.embed_dim=16",
      "model.hidden_size=16", "model.n_layers=2", "model.loss_chunk=5", "task.name=causal_lm",
      "train.batch_size=8", "train.seq_len=12", "optimizer.name=sgd", "optimizer.lr=0.1"]


def cls_batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 13, 8)
    mask = (np.arange(12)[None] < lens[:, None]).astype(np.int32)
    return {"input_ids": (rng.integers(1, 64, (8, 12)) * mask).astype(np.int32),
            "attention_mask": mask, "token_type_ids": np.zeros((8, 12), np.int32),
            "labels": rng.integers(0, 3, 8).astype(np.int32), "weights": np.ones(8, np.float32)}


def lm_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Packed windows: each row holds 1-3 documents; a target from the next document has weight 0."""
    rng = np.random.default_rng(seed)
    seg = np.sort(rng.integers(0, 3, (8, 12)), 1).astype(np.int32)
    seg -= seg[:, :1]
    tokens = rng.integers(1, 64, (8, 13)).astype(np.int32)
    weights = np.concatenate([seg[:, 1:] == seg[:, :-1], np.ones((8, 1), bool)], 1)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
            "positions": np.zeros((8, 12), np.int32), "weights": weights.astype(np.float32)}


def test_sharded_step_equals_one_device():
    """The train step on data=2 x fsdp=2 x tensor=2 (kernels split on fsdp and tensor, the batch
    over data x fsdp) equals plain autodiff of the same model on one device within 1e-5: the loss,
    and the parameters after one SGD step (p - lr x gradient / weight: the parameters compare the
    gradients; Adam's first step, lr x sign(g), would turn float noise on a zero gradient into a
    full step)."""
    cfg = load_config(None, CLS + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    parts = build(cfg, mesh_lib.make_mesh(cfg.mesh))
    kernel = parts.shardings.params["layer_0"]["fwd"]["hh"]["kernel"].spec
    assert tuple(kernel) == ("fsdp", None, "tensor"), kernel  # the split is real
    # numpy-drawn weights put in their shards (jax.random's init compiles for long on a busy CPU;
    # sharded init is the other families' tests' business)
    rng = np.random.default_rng(0)
    before = jax.tree.map(lambda x: rng.uniform(-0.5, 0.5, x.shape).astype(np.float32),
                          parts.spec.abstract_params)
    params = jax.device_put(before, parts.shardings.params)
    state = TrainState(step=jax.device_put(np.int32(0), parts.shardings.step), params=params,
                       opt_state=jax.jit(parts.tx.init, out_shardings=parts.shardings.opt_state)(
                           params), model_state={})
    batch = cls_batch()
    new_state, metrics = parts.train_step(state, jax.device_put(batch, parts.batch_sharding))
    after = jax.device_get(new_state.params)

    def loss(params):
        model = nnx.merge(parts.spec.graphdef, params, {})
        stats = parts.task.stats(model, batch, None)
        return stats["loss_sum"], stats["weight"]

    cpu = jax.devices()[0]
    with jax.default_device(cpu):
        (loss_sum, weight), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
            jax.device_put(before, cpu))
    assert abs(float(metrics["loss_sum"]) - float(loss_sum)) < 1e-5 * float(loss_sum)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g / weight, before, jax.device_get(grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), after, expected)
    moved = np.abs(after["layer_0"]["fwd"]["hh"]["kernel"] - before["layer_0"]["fwd"]["hh"]["kernel"])
    assert moved.max() > 1e-4  # the step moved the recurrent weights: their gradients agree


def _loop_loss(model: RNN, batch: dict[str, np.ndarray]) -> tuple[float, float]:
    """The causal-LM loss sum and weight, one token at a time in Python: each layer's state
    restarts at zero at every document start, the top state goes through the output layer."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    emb = np.asarray(params["embed"]["embedding"], np.float64)
    w_out = np.asarray(params["out"]["kernel"], np.float64)
    hidden = w_out.shape[0]
    sig = lambda a: 1 / (1 + np.exp(-a))
    loss_sum = weight = 0.0
    n_layers = model.cfg.n_layers
    for b in range(batch["inputs"].shape[0]):
        state = None
        for t in range(batch["inputs"].shape[1]):
            if t == 0 or batch["segment_ids"][b, t] != batch["segment_ids"][b, t - 1]:
                state = [np.zeros(hidden) for _ in range(n_layers)]
            x = emb[batch["inputs"][b, t]]
            for i in range(n_layers):
                c = params[f"layer_{i}"]["fwd"]
                ih, hh = ({k: np.asarray(v, np.float64) for k, v in c[p].items()} for p in ("ih", "hh"))
                gx = np.einsum("d,dgh->gh", x, ih["kernel"]) + ih["bias"]
                h = state[i]
                gh = np.einsum("h,hgk->gk", h, hh["kernel"]) + hh["bias"]
                r, z = sig(gx[0] + gh[0]), sig(gx[1] + gh[1])
                n = np.tanh(gx[2] + r * gh[2])
                state[i] = x = (1 - z) * n + z * h
            logits = x @ w_out
            logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            w = float(batch["weights"][b, t])
            loss_sum -= w * logp[batch["targets"][b, t]]
            weight += w
    return loss_sum, weight


def test_causal_lm_loss_equals_a_per_step_loop():
    """The causal_lm task's loss (one scan per layer; the head over chunks of 5 positions, or all
    logits at once) equals a float64 Python loop over positions that restarts the state at each
    document; without the restarts it would differ."""
    cfg = load_config(None, LM)
    batch = lm_batch(3)
    model = small_rnn(cfg.model, head=None, seed=2)
    whole = small_rnn(updated(cfg, {"model.loss_chunk": 0}).model, head=None, seed=2)
    task = make_task(cfg)
    stats = jax.jit(lambda b: [task.stats(m, b, None) for m in (model, whole)])(batch)
    expected, weight = _loop_loss(model, batch)
    no_reset, _ = _loop_loss(model, {**batch, "segment_ids": np.zeros_like(batch["segment_ids"])})
    for s in stats:
        assert float(s["weight"]) == weight
        assert abs(float(s["loss_sum"]) - expected) < 1e-5 * expected
    # ten times the tolerance above: a scan that ignored the documents would fail the check
    assert abs(no_reset - expected) > 1e-4 * expected


# ---- bad config ----------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("model.cell=rnn", "model.cell: got 'rnn', expected one of 'lstm', 'gru'"),
    ("model.hidden_size=0", "model.hidden_size must be at least 1, got 0"),
    ("model.n_layers=0", "model.n_layers must be at least 1, got 0"),
    ("model.dropout=1.0", "model.dropout must be in [0, 1), got 1.0"),
    ("model.pool=first", "model.pool: got 'first', expected one of 'last', 'mean', 'max'"),
    ("task.name=masked_lm", "model.name=rnn runs on classification or causal_lm batches, got "
                            "task.name=masked_lm (its data: mlm)"),
    ("model.n_heads=2", "unknown config key 'model.n_heads' for model 'rnn' (a key of model "
                        "bert, gpt)"),
])
def test_bad_config_is_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, LM + [override])
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_bidirectional_lm_and_rnn_key_on_gpt_exit_2(tmp_path, capsys):
    rc = cli_run(["train", "configs/gpt_tiny.yaml", f"run.dir={tmp_path}/a", "model.cell=gru"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("bigjax: error: unknown config key 'model.cell' for model 'gpt' "
                          "(a key of model rnn)"), err
    config = tmp_path / "lm.yaml"
    config.write_text("model: {name: rnn, bidirectional: true}\ntask: {name: causal_lm}\n")
    rc = cli_run(["train", str(config), f"run.dir={tmp_path}/b"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("bigjax: error: model.bidirectional=true reads the future, which "
                               "causal_lm predicts; set model.bidirectional=false for a language "
                               "model"), err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
