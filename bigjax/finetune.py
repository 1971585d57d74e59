"""LoRA runs (`finetune.lora`): checkpoints hold the adapters (and `modules_to_save`) alone; the
frozen base comes back from `init.from` on every start, and its fingerprint, recorded in each
checkpoint's metadata, must match the one the adapters were trained on.

The fingerprint is, per frozen parameter, its sum of squares and of absolute values, reduced on
the devices (no host copy of the base, any mesh); float32 reductions in another order differ by
~1e-6 relative, another base by far more, so they are compared at a relative 1e-4.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from bigjax.config import Config
from bigjax.errors import CheckpointError
from bigjax.init_from import load_init_params
from bigjax.optim import LORA_PARAMS, flat_paths, join, subtree
from bigjax.state import TrainState

RTOL = 1e-4


def is_lora(cfg: Config) -> bool:
    return cfg.finetune.lora.rank > 0


def saved_paths(cfg: Config, abstract_params: Any) -> list[str]:
    """The parameter paths a LoRA checkpoint holds: the adapters and `modules_to_save`."""
    keep = cfg.finetune.lora.modules_to_save
    return [p for p in flat_paths(abstract_params)
            if p.rsplit("/", 1)[-1] in LORA_PARAMS or any(re.search(r, p) for r in keep)]


def stored(cfg: Config, state: TrainState, saved: list[str]) -> TrainState:
    """What a checkpoint of this run holds (the whole state unless LoRA)."""
    return state.replace(params=subtree(state.params, saved)) if is_lora(cfg) else state


def fingerprint(params: Any, saved: list[str]) -> dict[str, list[float]]:
    base = subtree(params, [p for p in flat_paths(params) if p not in set(saved)])
    stats = jax.jit(lambda t: jax.tree.map(
        lambda x: jnp.stack([jnp.sum(jnp.square(x)), jnp.sum(jnp.abs(x))]), t))(base)
    return {k: [float(v) for v in jax.device_get(x)] for k, x in flat_paths(stats).items()}


def check_base(meta: dict, current: dict[str, list[float]], source: str, where: str) -> None:
    """Raise CheckpointError when the adapters in `where` were trained on another base."""
    recorded = meta.get("lora_base") or {}
    theirs = recorded.get("fingerprint") or {}
    was = recorded.get("source", "?")
    if set(theirs) != set(current):
        raise CheckpointError(
            f"{where} holds LoRA adapters for a base with other parameters (trained on "
            f"init.from={was}); set init.from to that base")
    for path, stats in current.items():
        if not all(math.isclose(a, b, rel_tol=RTOL) for a, b in zip(stats, theirs[path])):
            raise CheckpointError(
                f"{where} holds LoRA adapters trained on init.from={was}, but init.from={source} "
                f"has other weights (first difference: {path}); set init.from to the base the "
                f"adapters were trained on")


def with_base(cfg: Config, fresh: TrainState) -> TrainState:
    """A fresh state with the base's parameters read from `init.from`."""
    return fresh.replace(params=load_init_params(cfg, cfg.init.from_, fresh.params))


def restored_onto(base: TrainState, restored: TrainState) -> TrainState:
    """The restored adapters (and their optimizer state) on the freshly loaded base."""
    params = join(base.params, base.params, restored.params)
    return restored.replace(params=params)
