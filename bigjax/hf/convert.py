"""Whole-run conversion for `bigjax convert`: a Hugging Face dir <-> a bigjax run dir.

hf-to-bigjax writes a run dir that looks like a finished run at step 0 (config.yaml, tokenizer/,
an orbax checkpoint under checkpoints/0), so `init.from: <that dir>` and `bigjax eval` accept it.
bigjax-to-hf restores a run's latest parameters and writes config.json + model.safetensors +
tokenizer files. Both refuse to write into a directory that already holds their output.
"""

from __future__ import annotations

import jax

from bigjax import finetune
from bigjax.build import one_device
from bigjax.checkpoint import Checkpointer, abstract_with_shardings
from bigjax.config import CheckpointConfig, Config, load_config, save_config, to_dict, updated
from bigjax.data.tokenizer import FILES
from bigjax.errors import CheckpointError, ConfigError
from bigjax.hf import WEIGHTS, load_params, model_config_for, peft, save_params
from bigjax.models.lora import merge
from bigjax.paths import PathLike, run_path, run_str
from bigjax.tasks import head

def _copy_tokenizer(src: PathLike, dst: PathLike) -> bool:
    src, dst = run_path(src), run_path(dst)
    found = [f for f in FILES if (src / f).is_file()]  # a tokenizer dir's files
    if not found:
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for f in found:
        (dst / f).write_bytes((src / f).read_bytes())
    return True


def hf_to_bigjax(src: str, out: PathLike) -> Config:
    """Import `src` (config.json + model.safetensors) into a new bigjax run dir `out`."""
    checkpoints = run_path(out) / "checkpoints"
    if checkpoints.is_dir() and list(checkpoints.iterdir()):
        raise CheckpointError(f"'{out}' already holds checkpoints; convert into a new directory")
    cfg = model_config_for(src)
    params = load_params(src, cfg)  # before anything is written: bad input leaves `out` untouched
    run_dir = run_path(out)
    changes = {"run.dir": str(run_dir), "init.from": "", "checkpoint.async_save": False}
    run_dir.mkdir(parents=True, exist_ok=True)
    if _copy_tokenizer(src, run_dir / "tokenizer"):
        changes["data.tokenizer"] = str(run_dir / "tokenizer")
    cfg = updated(cfg, changes)
    parts = one_device(cfg)
    tx, shardings = parts.tx, parts.shardings
    state = parts.init_state()
    # heads absent from the checkpoint keep their fresh init; everything else is replaced
    merged = _merge(jax.device_get(state.params), params)
    state = state.replace(params=jax.device_put(merged, shardings.params),
                          opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(merged))
    ckpt = Checkpointer(out, CheckpointConfig(async_save=False))
    ckpt.save(0, state, {}, {"step": 0, "config": to_dict(cfg), "converted_from": run_str(src)},
              force=True)
    ckpt.close()
    save_config(cfg, run_dir / "config.yaml")
    return cfg


def _merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) else v
    return out


def run_params(run_dir: PathLike, step: int | None = None) -> tuple[Config, dict]:
    """The config and parameters (numpy) of a run's latest (or given) checkpoint."""
    cfg_path = run_path(run_dir, absolute=False) / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"'{cfg_path}' does not exist: expected a bigjax run dir")
    cfg = load_config(cfg_path, saved=True)
    if not (cfg_path.parent / "checkpoints").is_dir():
        raise CheckpointError(f"'{run_dir}' has no checkpoints/ directory")
    if finetune.is_lora(cfg):  # adapters alone on disk: the base comes back from init.from
        from bigjax.trainer import Trainer
        trainer = Trainer.from_run(run_dir)
        return trainer.cfg, jax.device_get(trainer.init_state().params)
    ckpt = Checkpointer(run_dir, cfg.checkpoint)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"'{run_dir}/checkpoints' holds no checkpoint")
    parts = one_device(cfg)
    restored = ckpt.restore(step, abstract_with_shardings(parts.abstract, parts.shardings))
    ckpt.close()
    return cfg, jax.device_get(restored.state.params)


def bigjax_to_hf(run_dir: PathLike, out: PathLike, adapter: bool = False) -> Config:
    """Export a run's latest parameters (and tokenizer) as a Hugging Face model dir; a LoRA run's
    adapters are merged into the base, or with `adapter` written alone in PEFT's format."""
    out_dir = run_path(out, absolute=False)
    for name in (peft.CONFIG, peft.WEIGHTS) if adapter else (WEIGHTS, "config.json"):
        if (out_dir / name).exists():
            raise CheckpointError(f"'{out_dir / name}' already exists; export into a new "
                                  "directory")
    cfg, params = run_params(run_dir)
    if cfg.model.name == "bert" and head(cfg) == "classification" and cfg.model.pooling == "mean":
        # BertForSequenceClassification pools [CLS]: an export would load but compute other logits
        raise ConfigError(f"'{run_dir}' classifies with model.pooling=mean, which Hugging Face's "
                          "BertForSequenceClassification cannot express (it reads [CLS]); only "
                          "model.pooling=cls runs export")
    if adapter and not finetune.is_lora(cfg):
        raise CheckpointError(f"--adapter: '{run_dir}' is not a LoRA run (finetune.lora.rank is "
                              f"0); export its whole weights without --adapter")
    merged = merge(params, cfg.finetune.lora.alpha / cfg.finetune.lora.rank) \
        if finetune.is_lora(cfg) else params
    tmp = out_dir.parent / (out_dir.name + ".tmp-export")  # what a killed export left is redone
    tmp.rmtree(missing_ok=True)
    from bigjax.data.classification import load_label_names
    labels = load_label_names(run_dir) if head(cfg) == "classification" else None
    if adapter:
        saved = [p for p in finetune.saved_paths(cfg, params)
                 if p.rsplit("/", 1)[-1] not in ("lora_a", "lora_b")]
        peft.save_adapter(params, merged, cfg, saved, tmp, labels)
    else:
        save_params(merged, cfg, tmp, labels)
    tok_dir = run_path(run_dir) / "tokenizer"
    if not tok_dir.is_dir() and cfg.data.tokenizer:
        tok_dir = run_path(cfg.data.tokenizer)
    if tok_dir.is_dir():
        _copy_tokenizer(tok_dir, tmp)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():  # files move in only once all of them were written
        f.replace(out_dir / f.name)
    tmp.rmtree()
    return cfg
