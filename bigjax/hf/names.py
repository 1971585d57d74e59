"""Parameter name tables: bigjax path <-> Hugging Face tensor name, with the layout change of each.

One `Entry` per bigjax parameter. Kinds:
  linear  HF nn.Linear weight (out, in): transposed, then reshaped to bigjax's (in..., out...)
  conv1d  GPT-2's Conv1D weight (in, out): already bigjax's order, only reshaped
  copy    biases and norms: same values, flattened on the HF side ((heads, kv) -> heads*kv)
  table   embedding tables: same shape on both sides
`part`/`parts` cut one slice out of a fused HF tensor (GPT-2's c_attn holds q, k, v).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bigjax.config import Config
from bigjax.errors import ConfigError
from bigjax.tasks import head


@dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]  # bigjax parameter path
    hf: str  # HF tensor name, without the base-model prefix when `base` is True
    kind: str = "copy"
    n_in: int = 1  # leading bigjax dims that are the input side of a kernel
    part: int = 0
    parts: int = 1
    base: bool = True  # inside the base model (gets the "bert." / "transformer." prefix)
    head: bool = False  # belongs to a task head: may be absent from a checkpoint


def _in_out(shape: tuple[int, ...], n_in: int) -> tuple[int, int]:
    return int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))


def hf_shape(e: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the whole HF tensor that holds a bigjax parameter of `shape`."""
    if e.kind == "linear":
        n_in, n_out = _in_out(shape, e.n_in)
        return (n_out * e.parts, n_in)
    if e.kind == "conv1d":
        n_in, n_out = _in_out(shape, e.n_in)
        return (n_in, n_out * e.parts)
    if e.kind == "table":
        return tuple(shape)
    return (int(np.prod(shape)) * e.parts,)


def to_bigjax(e: Entry, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if e.kind == "linear":
        t = np.split(t, e.parts, axis=0)[e.part].T
    elif e.kind == "conv1d":
        t = np.split(t, e.parts, axis=1)[e.part]
    elif e.parts > 1:
        t = np.split(t.reshape(-1), e.parts)[e.part]
    return np.ascontiguousarray(t.reshape(shape), dtype=np.float32)


def to_hf(e: Entry, x: np.ndarray) -> np.ndarray:
    """One part of the HF tensor; the caller concatenates the parts of fused tensors."""
    shape = x.shape
    if e.kind == "linear":
        return x.reshape(_in_out(shape, e.n_in)).T
    if e.kind == "conv1d":
        return x.reshape(_in_out(shape, e.n_in))
    return x if e.kind == "table" else x.reshape(-1)


def join_axis(e: Entry) -> int:
    return 1 if e.kind == "conv1d" else 0


def _bert(cfg: Config) -> list[Entry]:
    E = Entry
    out = [E(("embed", "embedding"), "embeddings.word_embeddings.weight", "table"),
           E(("pos_embed", "embedding"), "embeddings.position_embeddings.weight", "table"),
           E(("type_embed", "embedding"), "embeddings.token_type_embeddings.weight", "table"),
           E(("embed_norm", "scale"), "embeddings.LayerNorm.weight"),
           E(("embed_norm", "bias"), "embeddings.LayerNorm.bias")]
    for i in range(cfg.model.n_layers):
        b, h = f"layer_{i}", f"encoder.layer.{i}."
        for ours, theirs in (("query", "attention.self.query"), ("key", "attention.self.key"),
                             ("value", "attention.self.value")):
            out += [E((b, "attn", ours, "kernel"), h + theirs + ".weight", "linear"),
                    E((b, "attn", ours, "bias"), h + theirs + ".bias")]
        out += [E((b, "attn", "out", "kernel"), h + "attention.output.dense.weight", "linear", n_in=2),
                E((b, "attn", "out", "bias"), h + "attention.output.dense.bias"),
                E((b, "attn_norm", "scale"), h + "attention.output.LayerNorm.weight"),
                E((b, "attn_norm", "bias"), h + "attention.output.LayerNorm.bias"),
                E((b, "mlp", "up", "kernel"), h + "intermediate.dense.weight", "linear"),
                E((b, "mlp", "up", "bias"), h + "intermediate.dense.bias"),
                E((b, "mlp", "down", "kernel"), h + "output.dense.weight", "linear"),
                E((b, "mlp", "down", "bias"), h + "output.dense.bias"),
                E((b, "mlp_norm", "scale"), h + "output.LayerNorm.weight"),
                E((b, "mlp_norm", "bias"), h + "output.LayerNorm.bias")]
    if head(cfg) != "masked_lm":
        # a pooler-less checkpoint (e.g. from BertForMaskedLM) leaves the fresh pooler in place
        out += [E(("pooler", "kernel"), "pooler.dense.weight", "linear", head=True),
                E(("pooler", "bias"), "pooler.dense.bias", head=True)]
    if head(cfg) == "classification":
        out += [E(("classifier", "kernel"), "classifier.weight", "linear", base=False, head=True),
                E(("classifier", "bias"), "classifier.bias", base=False, head=True)]
    if head(cfg) == "masked_lm":
        t = "cls.predictions."
        out += [E(("mlm_dense", "kernel"), t + "transform.dense.weight", "linear", base=False, head=True),
                E(("mlm_dense", "bias"), t + "transform.dense.bias", base=False, head=True),
                E(("mlm_norm", "scale"), t + "transform.LayerNorm.weight", base=False, head=True),
                E(("mlm_norm", "bias"), t + "transform.LayerNorm.bias", base=False, head=True),
                E(("mlm_bias",), t + "bias", base=False, head=True)]
    return out


def _gpt2(cfg: Config) -> list[Entry]:
    E = Entry
    out = [E(("embed", "embedding"), "wte.weight", "table"), E(("pos_embed", "embedding"), "wpe.weight", "table"),
           E(("final_norm", "scale"), "ln_f.weight"), E(("final_norm", "bias"), "ln_f.bias")]
    for i in range(cfg.model.n_layers):
        b, h = f"layer_{i}", f"h.{i}."
        for j, name in enumerate(("query", "key", "value")):
            out += [E((b, "attn", name, "kernel"), h + "attn.c_attn.weight", "conv1d", part=j, parts=3),
                    E((b, "attn", name, "bias"), h + "attn.c_attn.bias", part=j, parts=3)]
        out += [E((b, "attn", "out", "kernel"), h + "attn.c_proj.weight", "conv1d", n_in=2),
                E((b, "attn", "out", "bias"), h + "attn.c_proj.bias"),
                E((b, "attn_norm", "scale"), h + "ln_1.weight"), E((b, "attn_norm", "bias"), h + "ln_1.bias"),
                E((b, "mlp_norm", "scale"), h + "ln_2.weight"), E((b, "mlp_norm", "bias"), h + "ln_2.bias"),
                E((b, "mlp", "up", "kernel"), h + "mlp.c_fc.weight", "conv1d"),
                E((b, "mlp", "up", "bias"), h + "mlp.c_fc.bias"),
                E((b, "mlp", "down", "kernel"), h + "mlp.c_proj.weight", "conv1d"),
                E((b, "mlp", "down", "bias"), h + "mlp.c_proj.bias")]
    if not cfg.model.tie_embeddings:
        out.append(E(("lm_head", "kernel"), "lm_head.weight", "linear", base=False, head=True))
    return out


def _llama(cfg: Config) -> list[Entry]:
    E = Entry
    out = [E(("embed", "embedding"), "embed_tokens.weight", "table"), E(("final_norm", "scale"), "norm.weight")]
    for i in range(cfg.model.n_layers):
        b, h = f"layer_{i}", f"layers.{i}."
        out += [E((b, "attn", "query", "kernel"), h + "self_attn.q_proj.weight", "linear"),
                E((b, "attn", "key", "kernel"), h + "self_attn.k_proj.weight", "linear"),
                E((b, "attn", "value", "kernel"), h + "self_attn.v_proj.weight", "linear"),
                E((b, "attn", "out", "kernel"), h + "self_attn.o_proj.weight", "linear", n_in=2),
                E((b, "attn_norm", "scale"), h + "input_layernorm.weight"),
                E((b, "mlp_norm", "scale"), h + "post_attention_layernorm.weight"),
                E((b, "mlp", "gate", "kernel"), h + "mlp.gate_proj.weight", "linear"),
                E((b, "mlp", "up", "kernel"), h + "mlp.up_proj.weight", "linear"),
                E((b, "mlp", "down", "kernel"), h + "mlp.down_proj.weight", "linear")]
    if not cfg.model.tie_embeddings:
        out.append(E(("lm_head", "kernel"), "lm_head.weight", "linear", base=False, head=True))
    return out


# family -> (entries, prefixes the base model's tensors may carry in checkpoints with heads)
TABLES = {"bert": (_bert, "bert."), "gpt2": (_gpt2, "transformer."), "llama": (_llama, "model.")}


def family_of(cfg: Config) -> str:
    """Which HF family a bigjax model config corresponds to."""
    m = cfg.model
    if m.name == "bert":
        return "bert"
    if m.name != "gpt":
        raise ConfigError(f"model {m.name} has no Hugging Face mapping (bigjax converts gpt and bert)")
    if m.name == "gpt" and m.positions == "learned" and m.norm == "layernorm" and m.use_bias \
            and m.mlp in ("gelu", "gelu_tanh", "relu") and not m.n_kv_heads:
        return "gpt2"
    if m.name == "gpt" and m.positions == "rotary" and m.norm == "rmsnorm" and not m.use_bias \
            and m.mlp == "swiglu":
        return "llama"
    raise ConfigError(
        f"model {m.name} (positions={m.positions}, norm={m.norm}, mlp={m.mlp}, use_bias={m.use_bias}) "
        "has no Hugging Face counterpart; exportable: bert, GPT-2 style (learned, layernorm, bias) "
        "or LLaMA style (rotary, rmsnorm, swiglu, no bias)")
