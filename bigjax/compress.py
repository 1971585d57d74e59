"""int8 compression of a finished run (`bigjax compress RUN --int8 OUT`): the kernels of the
linear layers (every `layers.Dense`) quantised per output channel, scales in float32; the rest
(embeddings, norms, biases) stays float32.

For each output channel c: s_c = max|w[:, c]| / 127, q = round(w / s_c) in [-127, 127], so that
|w - q * s_c| <= s_c / 2 everywhere in the channel (rounding only: nothing is clipped).

OUT is a run of its own: config.yaml, tokenizer, labels and `int8.safetensors` (no optimizer
state). `eval`, `predict` and anything built on `Components.jit_eval` use it directly: the int8
arrays and their scales are the inputs of the jitted function, which multiplies them back into
float32 kernels on the fly (`Components.param_view`), so only int8 weights sit in device memory
between calls.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from bigjax.build import Components
from bigjax.config import Config, compute_dtype, save_config, updated
from bigjax.errors import CheckpointError
from bigjax.mesh import path_str
from bigjax.models import create_model
from bigjax.models.layers import Dense
from bigjax.paths import PathLike, copy_tree, run_path, run_str
from bigjax.state import TrainState
from bigjax.step import jit_eval_step, make_eval_step, with_activation_sharding

WEIGHTS = "int8.safetensors"
MARKER = "compressed.json"  # what makes a run dir a compressed one; also its report
FORMAT = "int8-per-output-channel"


def quantize(w: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 q, float32 scales over the trailing output dims) for a kernel whose first `n_in`
    dims are its inputs. An all-zero channel gets scale 1 (q = 0 there)."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=tuple(range(n_in)))
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """The float32 kernel back: scales broadcast over the trailing (output) dims."""
    return q.astype(jnp.float32) * scale


def linear_kernels(cfg: Config) -> dict[str, int]:
    """`path -> number of input dims` of every Dense kernel of the config's model (abstractly)."""
    model = nnx.eval_shape(lambda: create_model(cfg, nnx.Rngs(params=0)))
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Dense):
            out[path_str(tuple(path) + ("kernel",))] = len(node.in_shape)
    return out


def _is_q(x: Any) -> bool:
    return isinstance(x, dict) and set(x) == {"int8", "scale"}


def view(params: Any) -> Any:
    """The float32 parameter tree of a compressed one (traced inside the jitted function)."""
    return jax.tree.map(lambda x: dequantize(x["int8"], x["scale"]) if _is_q(x) else x,
                        params, is_leaf=_is_q)


def _flat(tree: Any) -> dict[str, Any]:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def compress_params(cfg: Config, params: Any) -> tuple[dict[str, np.ndarray], int]:
    """(the safetensors tensors of OUT, how many kernels were quantised)."""
    kernels = linear_kernels(cfg)
    tensors = {}
    for path, w in _flat(params).items():
        if path in kernels:
            q, s = quantize(np.asarray(w), kernels[path])
            tensors[f"int8/{path}"], tensors[f"scale/{path}"] = q, s
        else:
            tensors[f"float/{path}"] = np.asarray(w, np.float32)
    return tensors, len(kernels)


def is_compressed(run_dir: PathLike) -> bool:
    return (run_path(run_dir) / MARKER).is_file()


def int8_components(parts: Components) -> Components:
    """`parts` for a compressed run: parameters as int8 + scale where quantised, dequantised
    inside the jitted eval step and `jit_eval` functions; no optimizer state."""
    kernels = linear_kernels(parts.cfg)
    mesh = parts.mesh

    def shard(path, s, a):
        n_in = kernels.get(path_str(path))
        if n_in is None:
            return s
        spec = tuple(s.spec) + (None,) * (len(a.shape) - len(s.spec))
        return {"int8": s, "scale": NamedSharding(mesh, P(*spec[n_in:]))}

    def shape(path, a):
        n_in = kernels.get(path_str(path))
        if n_in is None:
            return a
        return {"int8": jax.ShapeDtypeStruct(a.shape, jnp.int8),
                "scale": jax.ShapeDtypeStruct(a.shape[n_in:], jnp.float32)}

    # the same tree as the parameters, a quantised kernel's leaf becoming {int8, scale}
    params_sh = jax.tree_util.tree_map_with_path(shard, parts.shardings.params,
                                                 parts.abstract.params)
    params_ab = jax.tree_util.tree_map_with_path(shape, parts.abstract.params)
    shardings = TrainState(step=parts.shardings.step, params=params_sh, opt_state=None,
                           model_state=parts.shardings.model_state)
    abstract = TrainState(step=parts.abstract.step, params=params_ab, opt_state=None,
                          model_state=parts.abstract.model_state)
    inner = make_eval_step(parts.spec, parts.task)
    eval_step = jit_eval_step(with_activation_sharding(
        lambda p, ms, b: inner(view(p), ms, b), mesh, parts.cfg.sharding.rules),
        shardings, parts.batch_sharding, dtype=compute_dtype(parts.cfg))
    return dataclasses.replace(parts, abstract=abstract, shardings=shardings, eval_step=eval_step,
                               param_view=view)


def load_state(run_dir: PathLike, parts: Components) -> TrainState:
    """A compressed run's arrays, each put straight into its shards (`parts` from
    `int8_components`)."""
    from safetensors.numpy import load
    run = run_path(run_dir)
    tensors = load((run / WEIGHTS).read_bytes())
    step = json.loads((run / MARKER).read_text(encoding="utf-8"))["step"]

    def put(path_tuple, sharding):
        path = path_str(path_tuple)
        for kind in ("int8", "scale"):
            if path.endswith("/" + kind) and f"{kind}/{path[:-len(kind) - 1]}" in tensors:
                return jax.device_put(tensors[f"{kind}/{path[:-len(kind) - 1]}"], sharding)
        key = f"float/{path}" if f"float/{path}" in tensors else f"model_state/{path}"
        if key not in tensors:
            raise CheckpointError(f"{run_dir}/{WEIGHTS} has no tensor for '{path}'; the file is "
                                  "damaged or from another model")
        return jax.device_put(tensors[key], sharding)

    params = jax.tree_util.tree_map_with_path(put, parts.shardings.params)
    model_state = jax.tree_util.tree_map_with_path(
        lambda p, s: jax.device_put(tensors[f"model_state/{path_str(p)}"], s),
        parts.shardings.model_state)
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=None,
                      model_state=model_state)


def dir_size(path: PathLike) -> int:
    """Bytes of the files under `path` (epath has no recursive glob on object stores)."""
    return sum(dir_size(f) if f.is_dir() else f.stat().length for f in run_path(path).iterdir())


def write_int8_run(src: PathLike, out: PathLike, cfg: Config, step: int, params: Any,
                   model_state: Any) -> dict[str, Any]:
    """Write OUT (its files into a temporary dir, moved in once all are written) and return its
    report."""
    from safetensors.numpy import save
    tensors, n_kernels = compress_params(cfg, params)
    for path, x in _flat(model_state).items():
        tensors[f"model_state/{path}"] = np.asarray(x)
    src_dir, out_dir = run_path(src), run_path(out)
    tmp = out_dir.parent / (out_dir.name + ".tmp-compress")  # what a killed compress left is redone
    tmp.rmtree(missing_ok=True)
    tmp.mkdir(parents=True)
    weights = save(tensors)
    (tmp / WEIGHTS).write_bytes(weights)
    save_config(updated(cfg, {"run.dir": run_str(out)}), tmp / "config.yaml")
    for name in ("tokenizer", "labels.json"):
        p = src_dir / name
        if p.is_dir():
            copy_tree(p, tmp / name)
        elif p.is_file():
            (tmp / name).write_bytes(p.read_bytes())
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    report = {"format": FORMAT, "source": run_str(src), "step": step,
              "quantized_kernels": n_kernels,
              "quantized_params": int(sum(t.size for k, t in tensors.items() if k.startswith("int8/"))),
              "params": n_params, "float32_params_bytes": 4 * n_params,
              "weights_bytes": len(weights)}
    (tmp / MARKER).write_text(json.dumps(report, indent=1), encoding="utf-8")
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():  # the marker last: a run dir without it is no compressed run
        if f.name != MARKER:
            f.replace(out_dir / f.name)
    (tmp / MARKER).replace(out_dir / MARKER)
    tmp.rmtree()
    return report
