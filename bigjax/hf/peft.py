"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(base, dir)` loads onto the transformers base model.

Each adapted bigjax kernel maps through the name tables (names.py) to one HF module: `lora_A`
(r, in) = a.T and `lora_B` (out, r) = b.T, both flattened the way its kernel is. A fused HF tensor
(GPT-2's c_attn holds query, key and value) gets one adapter whose rank is the sum of its parts':
A stacks their `a`s, B places each `b` in its part's rows, so B @ A is each part's update in its
place; its rank and alpha go in PEFT's rank_pattern / alpha_pattern, keeping alpha / r. Parameters
trained in full (`finetune.lora.modules_to_save`) go in whole, as PEFT saves modules_to_save.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from bigjax.config import Config
from bigjax.errors import CheckpointError
from bigjax.hf import hf_tensors, names
from bigjax.paths import PathLike, run_path
from bigjax.tasks import head

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPES = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


def _flat(params: Any, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = np.asarray(v, np.float32)
    return out


def adapter_tensors(params: dict, merged: dict, cfg: Config, saved: list[str],
                    label_names: list[str] | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(safetensors dict, adapter_config.json dict). `params`: the run's unmerged tree (numpy);
    `merged`: the same with the adapters folded in; `saved`: paths trained in full besides them."""
    if getattr(cfg.model, "scan_layers", False):  # one HF module per layer, as for the kernels
        from bigjax.models.gpt import unstack_layers
        params = unstack_layers(params)
    lora = cfg.finetune.lora
    flat = _flat(params)
    family = names.family_of(cfg)
    table, prefix = names.TABLES[family]
    full, hf_cfg = hf_tensors(merged, cfg, label_names)
    with_head = hf_cfg["architectures"][0] not in ("BertModel",)
    groups: dict[str, list[tuple[names.Entry, np.ndarray, np.ndarray]]] = {}
    whole: dict[str, str] = {}  # HF tensor -> its module, trained in full
    for e in table(cfg):
        name = (prefix if with_head and e.base else "") + e.hf
        module = e.path[:-1]
        if e.path[-1] == "kernel" and module + ("lora_a",) in flat:
            groups.setdefault(name, []).append(
                (e, flat[module + ("lora_a",)], flat[module + ("lora_b",)]))
        elif "/".join(e.path) in saved:
            whole[name] = name.rsplit(".", 1)[0]
    adapted = {p[:-1] for p in flat if p[-1] == "lora_a"}
    covered = {e.path[:-1] for g in groups.values() for e, _, _ in g}
    if adapted - covered:
        missing = ", ".join("/".join(p) for p in sorted(adapted - covered))
        raise CheckpointError(f"adapters on {missing} have no Hugging Face module to go on")
    tensors: dict[str, np.ndarray] = {}
    rank_pattern, alpha_pattern = {}, {}
    for name, parts in groups.items():
        module = name.rsplit(".", 1)[0]
        a_rows, b_blocks = [], []
        for e, a, b in parts:
            a2 = a.reshape(-1, a.shape[-1])  # (in, r)
            b2 = b.reshape(b.shape[0], -1)  # (r, out of this part)
            a_rows.append(a2.T)
            b_blocks.append((e.part, e.parts, b2.T))
        r_total = sum(x.shape[0] for x in a_rows)
        n_parts = parts[0][0].parts
        out_part = b_blocks[0][2].shape[0]
        lora_b = np.zeros((out_part * n_parts, r_total), np.float32)
        col = 0
        for part, _, bt in b_blocks:
            lora_b[part * out_part:(part + 1) * out_part, col:col + bt.shape[1]] = bt
            col += bt.shape[1]
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(np.concatenate(a_rows))
        tensors[f"{PREFIX}{module}.lora_B.weight"] = lora_b
        if r_total != lora.rank:  # a fused module: same alpha / r as each part's
            rank_pattern[module] = r_total
            alpha_pattern[module] = lora.alpha / lora.rank * r_total
    for name, module in whole.items():
        tensors[f"{PREFIX}{name}"] = np.ascontiguousarray(full[name])
    config = {
        "peft_type": "LORA", "task_type": TASK_TYPES.get(head(cfg)),
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted({n.rsplit(".", 1)[0] for n in groups}),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "modules_to_save": sorted(set(whole.values())) or None,
        "fan_in_fan_out": family == "gpt2", "bias": "none", "inference_mode": True,
        "base_model_name_or_path": cfg.init.from_.removeprefix("hf:"),
    }
    return tensors, config


def save_adapter(params: dict, merged: dict, cfg: Config, saved: list[str], out_dir: PathLike,
                 label_names: list[str] | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors that `peft` loads (any epath)."""
    from safetensors.numpy import save

    tensors, config = adapter_tensors(params, merged, cfg, saved, label_names)
    out = run_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
    (out / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
