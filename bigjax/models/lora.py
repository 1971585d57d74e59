"""LoRA on any model: low-rank adapters added to the dense layers of a built NNX module tree.

`add_adapters` walks the module tree (whatever the family) and gives every module whose `kernel`
path matches `finetune.lora.targets` two parameters beside its kernel, `lora_a` (in..., r) and
`lora_b` (r, out...), and a call that adds `alpha/r * dropout(x) @ a @ b` to its output. The
base's parameter paths are unchanged, so init-from, checkpoints and the Hugging Face tables still
name them; `b` starts at zero, so the adapted model starts as the base. `merge` folds the adapters
into the kernels (kernel + alpha/r * a @ b), giving the base's tree back for export.

A module's input dims are its `in_shape` (bigjax's Dense) or its kernel's first non-stacked dim
(nnx.Linear-like); stacked layers (`model.scan_layers`) keep their leading "layers" axis on `a`
and `b` too, and the scan slices them with the kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.config import LoraConfig
from bigjax.errors import ConfigError
from bigjax.models.axes import param
from bigjax.models.layers import dropout

_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("bigjax_lora_dropout", default=None)


@contextlib.contextmanager
def dropout_key(key: jax.Array | None):
    """While tracing inside, adapters drop their input with keys folded from `key` (a dense
    layer's call takes no rngs, so the train step hands the key over this way)."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


class Adapter:
    """Mixed into a targeted module's class: its output plus the low-rank update."""

    lora_a: nnx.Param
    lora_b: nnx.Param

    def lora_delta(self, x: jax.Array) -> jax.Array:
        a, b = self.lora_a[...], self.lora_b[...]
        n_in = a.ndim - 1
        key = _DROPOUT_KEY.get()
        if key is not None and self.lora_rate > 0:
            # one id per adapter; the stacked layers of a scan share theirs (and so their masks)
            x = dropout(x, self.lora_rate, jax.random.fold_in(key, self.lora_id))
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        h = jax.lax.dot_general(x, a.astype(x.dtype), (contract, ((), ())))
        return jnp.tensordot(h, b.astype(x.dtype), axes=1) * self.lora_scale


_CLASSES: dict[type, type] = {}


def _adapted(cls: type) -> type:
    """One subclass per module class (the graphdef keeps it, so merge rebuilds the same)."""
    if cls not in _CLASSES:
        def __call__(self, x, *args, **kw):
            y = cls.__call__(self, x, *args, **kw)
            return y + self.lora_delta(x).astype(y.dtype)
        _CLASSES[cls] = type(f"Lora{cls.__name__}", (cls, Adapter),
                             {"__call__": __call__, "__module__": __name__})
    return _CLASSES[cls]


def _dims(module: nnx.Module, kernel: jax.Array) -> tuple[int, int, int]:
    """(stacked leading dims, input dims, output dims) of a module's kernel."""
    if hasattr(module, "in_shape") and hasattr(module, "out_shape"):
        n_in, n_out = len(module.in_shape), len(module.out_shape)
    else:  # nnx.Linear and its kind: kernel (in, out)
        n_in, n_out = 1, 1
    return kernel.ndim - n_in - n_out, n_in, n_out


def module_path(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def add_adapters(model: nnx.Module, lora: LoraConfig, seed: int) -> list[str]:
    """Adapters on every module whose `<module path>/kernel` matches a target; returns the
    module paths. Raises ConfigError for a target that matches no dense kernel."""
    found = []
    for path, module in nnx.iter_modules(model):
        kernel = getattr(module, "kernel", None)
        if isinstance(kernel, nnx.Param) and not isinstance(module, Adapter):
            found.append((module_path(path), module, kernel))
    kernels = [f"{p}/kernel" for p, _, _ in found]
    for i, r in enumerate(lora.targets):
        if not any(re.search(r, k) for k in kernels):
            shown = ", ".join(kernels[:4]) + (", ..." if len(kernels) > 4 else "")
            raise ConfigError(f"finetune.lora.targets[{i}]: {r!r} matches no dense kernel "
                              f"(kernels: {shown or 'none'})")
    done = []
    for i, (path, module, kernel) in enumerate(found):
        if not any(re.search(r, f"{path}/kernel") for r in lora.targets):
            continue
        value = kernel[...]
        lead, n_in, _ = _dims(module, value)
        axes = tuple(kernel.get_metadata().get("logical_axes") or (None,) * value.ndim)
        shape_in = value.shape[:lead + n_in]
        fan_in = int(np.prod(value.shape[lead:lead + n_in]))
        key = jax.random.fold_in(jax.random.key(seed), i)
        a = jax.random.normal(key, shape_in + (lora.rank,), jnp.float32) / math.sqrt(fan_in)
        b = jnp.zeros(value.shape[:lead] + (lora.rank,) + value.shape[lead + n_in:], jnp.float32)
        module.__class__ = _adapted(type(module))
        module.lora_a = param(a, axes[:lead + n_in] + (None,))
        module.lora_b = param(b, axes[:lead] + (None,) + axes[lead + n_in:])
        module.lora_scale = lora.alpha / lora.rank
        module.lora_rate = lora.dropout
        module.lora_id = i
        done.append(path)
    return done


def delta(a: Any, b: Any, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """a @ b in the kernel's shape (float32 numpy), stacked leading dims kept apart."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    lead = a.ndim + b.ndim - 2 - len(kernel_shape)
    L = int(np.prod(a.shape[:lead]))
    r = a.shape[-1]
    a2 = a.reshape(L, -1, r)
    b2 = b.reshape(L, r, -1)
    return np.einsum("lir,lro->lio", a2, b2).reshape(kernel_shape)


def merge(params: dict, scale: float) -> dict:
    """The base's parameter tree with every adapter folded into its kernel (numpy)."""
    out = {}
    for k, v in params.items():
        if not isinstance(v, dict):
            out[k] = v
        elif "lora_a" in v:
            node = {n: x for n, x in v.items() if n not in ("lora_a", "lora_b")}
            kernel = np.asarray(v["kernel"], np.float32)
            node["kernel"] = kernel + scale * delta(v["lora_a"], v["lora_b"], kernel.shape)
            out[k] = merge(node, scale)
        else:
            out[k] = merge(v, scale)
    return out
