"""`init.from`: start a run from another run's parameters (finetuning, continuing elsewhere).

Only parameters are taken, never optimizer state or step. Names the source lacks keep their fresh
init, names the model lacks are ignored, both listed; a shape mismatch is an error. Arrays are read
straight into the run's shardings (orbax partial restore), so no full copy sits on one device.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from bigjax.checkpoint import flat_shapes, missing_files, read_tree_metadata
from bigjax.config import Config
from bigjax.errors import CheckpointError, first_line
from bigjax.mesh import path_str
from bigjax.paths import run_path
from bigjax.state import nest_paths

log = logging.getLogger("bigjax")


def _flat(tree: Any) -> dict[str, Any]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[path_str(path)] = leaf
    return out


def _unflat_like(flat: dict[str, Any], like: Any) -> Any:
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    keys = [path_str(p) for p, _ in paths]
    return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])


def resolve_step_dir(source: str) -> epath.Path:
    """`run_dir | checkpoints_dir | step_dir` with optional `@step` -> one finished step dir."""
    text, _, at = source.partition("@")
    if at and not at.isdigit():
        raise CheckpointError(f"init.from='{source}': '@{at}' is not a step number "
                              f"(expected PATH or PATH@STEP)")
    path = run_path(text)
    if not path.is_dir():
        raise CheckpointError(f"init.from='{source}': '{text}' is not a directory "
                              f"(expected a run dir, its checkpoints/ dir or one step dir, or hf:DIR)")
    if (path / "state").is_dir() and not at:
        step_dirs = {int(path.name) if path.name.isdigit() else 0: path}
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        step_dirs = {int(d.name): d for d in root.iterdir() if d.name.isdigit()}
    complete = {s: d for s, d in step_dirs.items() if not missing_files(d)}
    if at:
        if int(at) not in complete:
            raise CheckpointError(f"init.from='{source}': no complete checkpoint at step {at} "
                                  f"(complete steps: {sorted(complete) or 'none'})")
        return complete[int(at)]
    if not complete:
        raise CheckpointError(f"init.from='{source}': no complete checkpoint under '{text}'")
    return complete[max(complete)]


def _from_checkpoint(step_dir: epath.Path, fresh: dict[str, Any]) -> tuple[dict, dict]:
    """(arrays read into the fresh shardings for names whose shapes agree, the source's shapes)."""
    state_dir = step_dir / "state"  # absolute (run_path): orbax needs absolute paths
    try:
        shapes = flat_shapes(read_tree_metadata(state_dir)["params"])
    except Exception as e:
        raise CheckpointError(f"init.from: cannot read the parameter list of {state_dir}: "
                              f"{first_line(e, 200)}")
    _check_shapes(shapes, fresh)
    wanted = {k: v for k, v in fresh.items() if k in shapes}
    if not wanted:
        return {}, shapes
    item = {"params": nest_paths({tuple(k.split("/")): jax.ShapeDtypeStruct(
        v.shape, v.dtype, sharding=v.sharding) for k, v in wanted.items()})}
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype),
                                item)
    try:
        out = ocp.PyTreeCheckpointer().restore(
            state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    except Exception as e:
        raise CheckpointError(f"init.from: cannot read parameters from {state_dir}: "
                              f"{first_line(e, 200)}")
    return _flat(out["params"]), shapes


def _check_shapes(shapes: dict[str, tuple], fresh: dict[str, Any]) -> None:
    for k, v in fresh.items():
        if k in shapes and tuple(shapes[k]) != tuple(v.shape):
            raise CheckpointError(
                f"init.from: parameter '{k}' has shape {tuple(shapes[k])} in the source but "
                f"{tuple(v.shape)} in this model; change the model config to match or drop init.from")


def _from_hf(hf_dir: str, cfg: Config, fresh: dict[str, Any]) -> tuple[dict, dict]:
    from bigjax import hf  # written in parallel; only runs that ask for hf: need it
    arrays = _flat(hf.load_params(hf_dir, cfg))
    shapes = {k: tuple(np.shape(v)) for k, v in arrays.items()}
    _check_shapes(shapes, fresh)
    loaded = {k: jax.device_put(np.asarray(arrays[k], dtype=v.dtype), v.sharding)
              for k, v in fresh.items() if k in arrays}
    return loaded, shapes


def _from_torchvision(path: str, fresh: dict[str, Any], part: int) -> tuple[dict, dict]:
    """part 0: parameters, 1: BatchNorm statistics, of a torchvision ResNet safetensors file."""
    from bigjax.hf import torchvision
    arrays = {"/".join(k): v for k, v in torchvision.read(path)[part].items()}
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    _check_shapes(shapes, fresh)
    loaded = {k: jax.device_put(np.asarray(arrays[k], dtype=v.dtype), v.sharding)
              for k, v in fresh.items() if k in arrays}
    return loaded, shapes


def load_init_model_state(cfg: Config, spec: str, fresh_model_state: Any) -> Any:
    """The non-parameter state to start from: a torchvision ResNet's BatchNorm running statistics
    (its eval-mode outputs need them); the fresh one for every other source (a checkpoint's
    statistics belong to its own training run)."""
    if not spec.startswith("torchvision:"):
        return fresh_model_state
    fresh = _flat(fresh_model_state)
    loaded, shapes = _from_torchvision(spec[len("torchvision:"):], fresh, 1)
    missing = sorted(k for k in fresh if k not in loaded)
    if missing and jax.process_index() == 0:
        log.warning("init.from: BatchNorm statistics not in the source, fresh: %s", ", ".join(missing))
    return _unflat_like({k: loaded.get(k, v) for k, v in fresh.items()}, fresh_model_state)


def load_init_params(cfg: Config, spec: str, fresh_params: Any) -> Any:
    """`fresh_params` (sharded, freshly initialised) with every parameter the source has replaced."""
    fresh = _flat(fresh_params)
    if spec.startswith("hf:"):
        loaded, shapes = _from_hf(spec[3:], cfg, fresh)
        where = spec
    elif spec.startswith("torchvision:"):
        loaded, shapes = _from_torchvision(spec[len("torchvision:"):], fresh, 0)
        where = spec
    else:
        where = resolve_step_dir(spec)
        loaded, shapes = _from_checkpoint(where, fresh)
    scanned = lambda keys: any(k.startswith("layers/") for k in keys)
    layered = lambda keys: any(k.startswith(("layers/", "layer_")) for k in keys)
    if layered(shapes) and layered(fresh) and scanned(fresh) != scanned(shapes):
        raise CheckpointError(
            f"init.from='{spec}': the source stores its layers "
            f"{'stacked' if scanned(shapes) else 'one by one'} and this model has "
            f"model.scan_layers={str(scanned(fresh)).lower()}; set model.scan_layers="
            f"{str(scanned(shapes)).lower()}, or go through `bigjax convert` (Hugging Face "
            "format reads into either)")
    if not loaded:
        raise CheckpointError(f"init.from='{spec}': none of this model's parameters are in the "
                              f"source (it has {', '.join(sorted(shapes)[:5])}, ...)")
    missing = sorted(k for k in fresh if k not in loaded)
    extra = sorted(k for k in shapes if k not in fresh)
    if jax.process_index() == 0:
        log.warning("init.from: %d parameters loaded from %s", len(loaded), where)
        if missing:
            log.warning("init.from: not in the source, freshly initialised: %s", ", ".join(missing))
        if extra:
            log.warning("init.from: in the source but not in this model, ignored: %s",
                        ", ".join(extra))
    return _unflat_like({k: loaded.get(k, v) for k, v in fresh.items()}, fresh_params)
