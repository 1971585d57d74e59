"""Hugging Face weights without PyTorch: `config.json` + `model.safetensors` <-> bigjax parameter trees.

`load_params(hf_dir, cfg)` reads a BERT, GPT-2 or LLaMA checkpoint (bare base model or with its
head) into bigjax's naming; `save_params(params, cfg, out_dir)` writes what
`transformers.AutoModel.from_pretrained(out_dir)` loads. Name tables live in `names.py`, config
translation in `configs.py`, whole-run conversion (the `convert` CLI) in `convert.py`.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from bigjax import registry
from bigjax.config import Config, updated
from bigjax.errors import CheckpointError, first_line
from bigjax.hf import names
from bigjax.hf.configs import hf_config_from_bigjax, model_config_from_hf, read_hf_config
from bigjax.paths import PathLike, is_remote, run_path
from bigjax.state import nest_paths

__all__ = ["load_params", "save_params", "model_config_from_hf", "hf_model_values"]

WEIGHTS = "model.safetensors"
# Settings a user may choose differently from the pretrained checkpoint when finetuning.
_USER_CHOOSES = ("dropout", "attention_dropout")


def _abstract_params(cfg: Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    from flax import nnx

    from bigjax.models import create_model

    cfg = _unrolled(cfg)  # the name tables count layers one by one
    model = nnx.eval_shape(lambda: create_model(cfg, nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat[tuple(str(k.key) for k in path)] = tuple(leaf.shape)
    return flat


def _unrolled(cfg: Config) -> Config:
    if not getattr(cfg.model, "scan_layers", False):
        return cfg
    return updated(cfg, {"model.scan_layers": False})


def _read_tensors(hf_dir: PathLike) -> tuple[dict[str, np.ndarray], str]:
    from safetensors.numpy import load, load_file

    path = run_path(hf_dir, absolute=False) / WEIGHTS
    if not path.is_file():
        sharded = path.parent / (WEIGHTS + ".index.json")
        hint = " (sharded checkpoints are not supported)" if sharded.is_file() else ""
        raise CheckpointError(f"'{path}' does not exist{hint}: bigjax reads Hugging Face weights "
                              "from model.safetensors only (no pytorch_model.bin)")
    try:
        # a local file is memory-mapped; object storage is read whole (no mmap there)
        return (load(path.read_bytes()) if is_remote(path) else load_file(path)), str(path)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"'{path}' is not a readable safetensors file: {first_line(e)}")


def load_params(hf_dir: str, cfg: Config) -> dict:
    """Nested dict of float32 numpy arrays in bigjax naming for the model `cfg` describes.

    Head parameters absent from the checkpoint are absent from the result (init-from keeps their
    fresh initialisation); a missing base tensor or a shape mismatch is a CheckpointError.
    """
    read_hf_config(hf_dir)  # checks the file and the family before the big read
    tensors, path = _read_tensors(hf_dir)
    family = names.family_of(cfg)
    table, prefix = names.TABLES[family]
    has_prefix = any(k.startswith(prefix) for k in tensors)
    shapes = _abstract_params(cfg)
    out = {}
    for e in table(cfg):
        name = (prefix if has_prefix and e.base else "") + e.hf
        if name not in tensors:
            if e.head:
                continue
            raise CheckpointError(f"{path}: tensor '{name}' is missing (needed for bigjax "
                                  f"parameter {'/'.join(e.path)}; is this a {family} checkpoint?)")
        shape = shapes[e.path]
        want = names.hf_shape(e, shape)
        if tuple(tensors[name].shape) != want:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                                  f"expected {want} for the configured model")
        out[e.path] = names.to_bigjax(e, tensors[name], shape)
    if getattr(cfg.model, "scan_layers", False):
        from bigjax.models.gpt import stack_layers
        return stack_layers(nest_paths(out), cfg.model.n_layers)
    return nest_paths(out)


def hf_model_values(cfg: Config, hf_dir: str) -> dict[str, Any]:
    """`{"model.key": value}` that make `cfg.model` the checkpoint's architecture (the user need
    not copy sizes), for `bigjax.config.updated`. Dropout stays the user's when they changed it
    from the family's default; dtype, remat and scan_layers are always the user's."""
    values = model_config_from_hf(hf_dir)
    family = registry.model(values["name"]).config
    defaults = family()
    keep = cfg.model if isinstance(cfg.model, family) else defaults
    return {f"model.{k}": v for k, v in values.items()
            if hasattr(defaults, k)
            and not (k in _USER_CHOOSES and getattr(keep, k) != getattr(defaults, k))}


def _flat_params(params: Any) -> dict[tuple[str, ...], np.ndarray]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat[tuple(str(getattr(k, "key", k)) for k in path)] = np.asarray(leaf, np.float32)
    return flat


def hf_tensors(params: Any, cfg: Config, label_names: list[str] | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(safetensors dict, config.json dict) for a bigjax parameter tree."""
    family = names.family_of(cfg)
    table, prefix = names.TABLES[family]
    if getattr(cfg.model, "scan_layers", False):
        from bigjax.models.gpt import unstack_layers
        params = unstack_layers(jax.device_get(params))
    flat = _flat_params(params)
    hf_cfg = hf_config_from_bigjax(cfg, family, label_names)
    # the base model goes under its prefix whenever the architecture carries a head
    with_head = hf_cfg["architectures"][0] not in ("BertModel",)
    parts: dict[str, list[tuple[int, np.ndarray]]] = {}
    axis: dict[str, int] = {}
    for e in table(cfg):
        if e.path not in flat:
            raise CheckpointError(f"parameter {'/'.join(e.path)} is missing from the bigjax "
                                  f"checkpoint (model {cfg.model.name}, task {cfg.task.name})")
        name = (prefix if with_head and e.base else "") + e.hf
        parts.setdefault(name, []).append((e.part, names.to_hf(e, flat[e.path])))
        axis[name] = names.join_axis(e)
    tensors = {n: np.ascontiguousarray(np.concatenate([t for _, t in sorted(p, key=lambda x: x[0])],
                                                      axis=axis[n]))
               for n, p in parts.items()}
    return tensors, hf_cfg


def save_params(params: Any, cfg: Config, out_dir: PathLike,
                label_names: list[str] | None = None) -> None:
    """Write config.json + model.safetensors that transformers' Auto classes load (any epath)."""
    from safetensors.numpy import save

    tensors, hf_cfg = hf_tensors(params, cfg, label_names)
    out = run_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2), encoding="utf-8")


def model_config_for(hf_dir: str, base: Config | None = None) -> Config:
    """A Config whose model (and task head) describe the checkpoint in `hf_dir`."""
    from bigjax.hf.configs import task_from_hf

    cfg = base if base is not None else Config()
    task = {f"task.{k}": v for k, v in task_from_hf(read_hf_config(hf_dir)).items()}
    model = hf_model_values(cfg, hf_dir)
    # windows no longer than the checkpoint's position table
    seq_len = min(cfg.train.seq_len, model.get("model.max_seq_len", cfg.train.seq_len))
    return updated(cfg, {**model, **task, "train.seq_len": seq_len})
