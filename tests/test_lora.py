"""LoRA (finetune.lora): only adapters (and modules_to_save) train, the base stays bitwise, the
checkpoint holds the adapters alone, merged weights equal the adapter model, and the PEFT export
loaded by `peft` onto the transformers base gives bigjax's logits."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from bigjax import cli, hf
from bigjax.checkpoint import flat_shapes, read_tree_metadata
from bigjax.config import load_config, updated
from bigjax.errors import ConfigError
from bigjax.models.lora import merge
from bigjax.optim import flat_paths
from bigjax.state import model_spec
from bigjax.trainer import Trainer
from separable import FILL, NEG, POS, write_separable_csv

# a WordPiece vocabulary of the separable CSV's words (a 30k one would cost seconds per test)
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POS + NEG + FILL
         + [str(d) for d in range(10)] + [f"##{d}" for d in range(10)])


def _base(path: str, seed: int) -> str:
    torch.manual_seed(seed)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32)).save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "vocab.txt"), "w") as fh:
        fh.write("\n".join(VOCAB) + "\n")
    transformers.BertTokenizerFast(os.path.join(path, "vocab.txt")).save_pretrained(path)
    return path


def _overrides(tmp, base, run):
    return [f"init.from=hf:{base}", "task.name=classification", f"data.source={tmp}/d.csv",
            "data.text_field=review", "data.label_field=sentiment", "train.steps=2",
            "train.batch_size=8", "train.seq_len=16", "train.eval_every=0", "train.progress=false",
            "checkpoint.async_save=false", "optimizer.lr=0.05", f"run.dir={run}",
            "finetune.lora.rank=4", "finetune.lora.alpha=8", "finetune.lora.dropout=0.1",
            "finetune.lora.targets=['attn/(query|value)/kernel$', 'mlp/down/kernel$']",
            "finetune.lora.modules_to_save=['^classifier/']"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    write_separable_csv(str(tmp / "d.csv"), 48)
    base = _base(str(tmp / "base"), 0)
    run_dir = str(tmp / "run")
    trainer = Trainer(load_config(None, _overrides(tmp, base, run_dir)))
    trainer.train()
    return tmp, base, run_dir, trainer


def test_only_adapters_and_the_head_change_and_only_they_are_saved(run):
    tmp, base, run_dir, trainer = run
    params = flat_paths(jax.device_get(trainer.state.params))
    source = flat_paths(hf.load_params(base, trainer.cfg))
    adapters = {p for p in params if p.endswith(("/lora_a", "/lora_b"))}
    assert len(adapters) == 2 * 3  # query, value and mlp/down of the one layer
    trainable = adapters | {"classifier/kernel", "classifier/bias"}
    for path, value in params.items():
        if path in source:  # the whole base, pooler included, bitwise as loaded
            assert path not in trainable
            np.testing.assert_array_equal(value, source[path], err_msg=path)
    assert all(np.abs(params[p]).max() > 0 for p in adapters if p.endswith("lora_b"))  # trained
    # optimizer state (adam's mu) only for what trains
    mu = trainer.state.opt_state[0].mu
    assert set(flat_paths(mu)) == trainable
    # the checkpoint: adapters and the head alone, and the base's source recorded
    step_dir = os.path.join(run_dir, "checkpoints", "2")
    saved = flat_shapes(read_tree_metadata(os.path.join(step_dir, "state"))["params"])
    assert set(saved) == trainable
    meta = trainer.checkpointer.read_meta(2)
    assert meta["lora_base"]["source"] == f"hf:{base}"
    assert "layer_0/attn/key/kernel" in meta["lora_base"]["fingerprint"]


def _logits(cfg, params, ids, mask):
    spec = model_spec(cfg)
    model = nnx.merge(spec.graphdef, jax.tree.map(jnp.asarray, params), {}, copy=True)
    return np.asarray(model(jnp.asarray(ids), token_type_ids=jnp.zeros_like(jnp.asarray(ids)),
                            attention_mask=jnp.asarray(mask), rngs=None))


def _batch():
    ids = np.random.default_rng(0).integers(5, len(VOCAB), (3, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


def test_merged_weights_equal_the_adapter_model(run):
    _, _, _, trainer = run
    cfg, params = trainer.cfg, jax.device_get(trainer.state.params)
    ids, mask = _batch()
    adapted = _logits(cfg, params, ids, mask)
    plain = updated(cfg, {"finetune.lora.rank": 0})
    merged = _logits(plain, merge(params, 8 / 4), ids, mask)
    # adapters that moved the output: equality below is not trivial
    assert np.abs(adapted - _logits(plain, _without_adapters(params), ids, mask)).max() > 1e-3
    np.testing.assert_allclose(merged, adapted, atol=1e-5, rtol=0)  # float32 reassociation only


def _without_adapters(params):
    if not isinstance(params, dict):
        return params
    return {k: _without_adapters(v) for k, v in params.items() if k not in ("lora_a", "lora_b")}


def test_peft_adapter_and_merged_export_give_bigjax_logits(run, capsys):
    import peft
    tmp, base, run_dir, trainer = run
    ids, mask = _batch()
    ours = _logits(trainer.cfg, jax.device_get(trainer.state.params), ids, mask)
    adapter = str(tmp / "adapter")
    assert cli.run(["convert", "bigjax-to-hf", run_dir, adapter, "--adapter"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    model = transformers.BertForSequenceClassification.from_pretrained(base, num_labels=2)
    model = peft.PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    merged = str(tmp / "merged")
    assert cli.run(["convert", "bigjax-to-hf", run_dir, merged]) == 0
    full = transformers.BertForSequenceClassification.from_pretrained(merged).eval()
    with torch.no_grad():
        theirs = full(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # again into the same directory: refused, nothing overwritten
    before = os.path.getmtime(os.path.join(adapter, "adapter_model.safetensors"))
    assert cli.run(["convert", "bigjax-to-hf", run_dir, adapter, "--adapter"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(adapter, "adapter_model.safetensors")) == before


def test_adapters_on_another_base_are_one_line_exit_2(run, capsys):
    tmp, base, run_dir, trainer = run
    other = _base(str(tmp / "other"), 1)
    listing = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    code = cli.run(["train", os.path.join(run_dir, "config.yaml"), f"init.from=hf:{other}",
                    "train.steps=3"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the tokenizer's progress bar
    assert code == 2 and err.startswith("bigjax: error: checkpoint step 2 in ")
    assert f"trained on init.from=hf:{base}, but init.from=hf:{other} has other weights" in err
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == listing


@pytest.mark.parametrize("overrides,message", [
    (["init.from=x", "finetune.lora.targets=['attn/nothing']"],
     r"^finetune.lora.targets\[0\]: 'attn/nothing' matches no dense kernel \(kernels: "),
    ([], r"^finetune.lora needs init.from \(the base model"),
    (["init.from=x", "finetune.lora.targets=['(']"],
     r"^finetune.lora.targets\[0\]: '\(' is not a regular expression"),
])
def test_bad_lora_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        model_spec(load_config(None, ["model.name=bert", "model.vocab_size=128", "model.n_layers=1",
                                      "finetune.lora.rank=2", *overrides]))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan_layers"])
def test_gpt2_fused_attention_adapters_load_in_peft(tmp_path, scan):
    """GPT-2 fuses query, key and value in one Conv1D (c_attn): their three adapters go out as
    one of rank 3r (rank_pattern), which must give the same logits as bigjax's. With
    model.scan_layers the stacked adapters go out one HF module per layer."""
    import peft

    from bigjax.hf.peft import save_adapter
    torch.manual_seed(2)
    base = str(tmp_path / "gpt2")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16)).save_pretrained(base)
    cfg = updated(hf.model_config_for(base), {
        "init.from": f"hf:{base}", "finetune.lora.rank": 2, "finetune.lora.alpha": 6.0,
        "finetune.lora.targets": ["attn/(query|key|value)/kernel$", "mlp/up/kernel$"],
        "model.scan_layers": scan})
    spec = model_spec(cfg)
    rng = np.random.default_rng(0)
    loaded = flat_paths(hf.load_params(base, cfg))
    flat = {p: loaded[p] if p in loaded else rng.normal(0, 0.3, a.shape).astype(np.float32)
            for p, a in flat_paths(spec.abstract_params).items()}  # b != 0: adapters that act
    params = {}
    for p, v in flat.items():
        node = params
        *parents, last = p.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = v
    ids = np.random.default_rng(1).integers(0, 50, (2, 10)).astype(np.int32)
    model = nnx.merge(spec.graphdef, jax.tree.map(jnp.asarray, params), {}, copy=True)
    ours = np.asarray(model(jnp.asarray(ids)))
    out = str(tmp_path / "adapter")
    save_adapter(params, merge(params, 3.0), cfg, [], out)
    theirs_model = peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(base), out).eval()
    assert theirs_model.peft_config["default"].rank_pattern == {"transformer.h.0.attn.c_attn": 6,
                                                                "transformer.h.1.attn.c_attn": 6}
    with torch.no_grad():
        theirs = theirs_model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
