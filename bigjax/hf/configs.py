"""Hugging Face `config.json` <-> bigjax `model.*` values, for BERT, GPT-2 and LLaMA-style models."""

from __future__ import annotations

import json
from typing import Any

from bigjax.config import Config
from bigjax.errors import CheckpointError
from bigjax.paths import PathLike, run_path
from bigjax.tasks import head

SUPPORTED = "bert, gpt2, llama"
_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def read_hf_config(hf_dir: PathLike) -> dict[str, Any]:
    path = run_path(hf_dir, absolute=False) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"'{path}' does not exist: expected a Hugging Face model dir "
                              "with config.json and model.safetensors")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{path}' is not valid JSON: {e}")
    if hf.get("model_type") not in ("bert", "gpt2", "llama"):
        raise CheckpointError(f"{path}: model_type {hf.get('model_type')!r} is not supported "
                              f"(supported: {SUPPORTED})")
    return hf


def _act(hf: dict, key: str, where: str) -> str:
    act = hf.get(key, "gelu")
    if act not in _ACT:
        raise CheckpointError(f"{where}: {key}={act!r} is not supported (supported: {', '.join(_ACT)})")
    return _ACT[act]


def model_config_from_hf(hf_dir: str) -> dict[str, Any]:
    """`model.*` values that describe the checkpoint in `hf_dir` (sizes, norms, dropout, ...)."""
    hf = read_hf_config(hf_dir)
    where = run_path(hf_dir, absolute=False) / "config.json"
    kind = hf["model_type"]
    if kind == "bert":
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{where}: position_embedding_type="
                                  f"{hf['position_embedding_type']!r} is not supported (absolute)")
        return dict(name="bert", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                    n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                    n_kv_heads=0, head_dim=0, d_ff=hf["intermediate_size"],
                    max_seq_len=hf["max_position_embeddings"], positions="learned",
                    norm="layernorm", norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
                    mlp=_act(hf, "hidden_act", where), use_bias=True, tie_embeddings=True,
                    dropout=float(hf.get("hidden_dropout_prob", 0.1)),
                    attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
                    type_vocab_size=hf.get("type_vocab_size", 2),
                    pad_token_id=hf.get("pad_token_id") or 0)
    if kind == "gpt2":
        d = hf["n_embd"]
        return dict(name="gpt", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"],
                    n_heads=hf["n_head"], n_kv_heads=0, head_dim=0, d_ff=hf.get("n_inner") or 4 * d,
                    max_seq_len=hf["n_positions"], positions="learned", norm="layernorm",
                    norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                    mlp=_act(hf, "activation_function", where), use_bias=True,
                    tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                    dropout=float(hf.get("resid_pdrop", 0.1)),
                    attention_dropout=float(hf.get("attn_pdrop", 0.1)))
    # llama
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{where}: rope scaling {rope.get('rope_type')!r} is not supported "
                              "(default rotary only)")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{where}: only SwiGLU (hidden_act=silu) without attention/MLP "
                              "biases is supported for llama")
    n_heads = hf["num_attention_heads"]
    return dict(name="gpt", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
                d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                positions="rotary", rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e4))),
                norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu",
                use_bias=False, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                dropout=0.0, attention_dropout=float(hf.get("attention_dropout", 0.0)))


def task_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """`task.*` values implied by the checkpoint's architecture (its head)."""
    arch = (hf.get("architectures") or [""])[0]
    if arch.endswith("ForMaskedLM") or arch.endswith("ForPreTraining"):
        return {"name": "masked_lm"}
    if arch.endswith("ForSequenceClassification"):
        n = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
        return {"name": "classification", "num_labels": n}
    return {}


def hf_config_from_bigjax(cfg: Config, family: str,
                          label_names: list[str] | None = None) -> dict[str, Any]:
    """config.json for an export; `architectures` follows the run's task head."""
    m = cfg.model
    drop = m.dropout
    attn_drop = m.dropout if m.attention_dropout < 0 else m.attention_dropout
    act = {v: k for k, v in reversed(list(_ACT.items()))}.get(m.mlp, "silu")
    if family == "bert":
        arch = {"masked_lm": "BertForMaskedLM",
                "classification": "BertForSequenceClassification"}.get(head(cfg), "BertModel")
        out = dict(model_type="bert", architectures=[arch], vocab_size=m.vocab_size,
                   hidden_size=m.d_model, num_hidden_layers=m.n_layers,
                   num_attention_heads=m.n_heads, intermediate_size=m.d_ff,
                   max_position_embeddings=m.max_seq_len, type_vocab_size=m.type_vocab_size,
                   layer_norm_eps=m.norm_eps, hidden_act=act, hidden_dropout_prob=drop,
                   attention_probs_dropout_prob=attn_drop, pad_token_id=m.pad_token_id,
                   position_embedding_type="absolute", initializer_range=m.init_std)
        if head(cfg) == "classification":
            names = label_names or [f"LABEL_{i}" for i in range(cfg.task.num_labels)]
            out.update(num_labels=cfg.task.num_labels,
                       id2label={str(i): n for i, n in enumerate(names)},
                       label2id={n: i for i, n in enumerate(names)})
        return out
    if family == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=m.vocab_size,
                    n_embd=m.d_model, n_layer=m.n_layers, n_head=m.n_heads, n_inner=m.d_ff,
                    n_positions=m.max_seq_len, layer_norm_epsilon=m.norm_eps,
                    activation_function=act,
                    resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=attn_drop,
                    tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std)
    head_dim = m.head_dim or m.d_model // m.n_heads
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=m.vocab_size,
                hidden_size=m.d_model, num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                num_key_value_heads=m.n_kv_heads or m.n_heads, head_dim=head_dim,
                intermediate_size=m.d_ff, max_position_embeddings=m.max_seq_len,
                rope_theta=m.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                rms_norm_eps=m.norm_eps, hidden_act="silu", attention_bias=False, mlp_bias=False,
                tie_word_embeddings=m.tie_embeddings, attention_dropout=attn_drop,
                initializer_range=m.init_std)
