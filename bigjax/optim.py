"""The optax chain from the config: optimizer, schedule, clipping, decoupled weight decay, and the
per-parameter rules (big_vision's style: regexes over parameter paths like `layer_0/attn/query/kernel`).

Weight decay is decoupled everywhere (p <- p - lr * wd * m * p, applied after the moment/momentum
transform, never fed through it); m is 0 where a path matches `optimizer.no_decay` (by default
biases, norm scales, embeddings), else the first matching `optimizer.wd_multipliers` value (1 when
none matches). `optimizer.lr_multipliers` scale the whole update, decay included. Frozen parameters
(`optimizer.frozen`, and everything but the adapters under LoRA) are not the optimizer's at all:
the step differentiates and updates only the trainable subtree (`trainable_tree`), so they have no
gradient and no optimizer state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import optax

from bigjax.config import Config, OptimizerConfig
from bigjax.errors import ConfigError
from bigjax.mesh import path_str

LORA_PARAMS = ("lora_a", "lora_b")  # the adapter parameters' names (bigjax.models.lora)


def make_schedule(o: OptimizerConfig, total_steps: int) -> optax.Schedule:
    end = o.lr * o.min_lr_ratio
    warm = o.warmup_steps
    if o.schedule == "constant":
        main = optax.constant_schedule(o.lr)
    elif o.schedule == "cosine":
        main = optax.cosine_decay_schedule(o.lr, max(total_steps - warm, 1), alpha=o.min_lr_ratio)
    else:
        main = optax.linear_schedule(o.lr, end, max(total_steps - warm, 1))
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warm), main], [warm])


def _first(rules: dict[str, float], path: str, default: float = 1.0) -> float:
    for pattern, m in rules.items():
        if re.search(pattern, path):
            return m
    return default


def decay_factor(o: OptimizerConfig, path: str) -> float:
    """The multiplier of `optimizer.weight_decay` for one parameter path (0: not decayed)."""
    if any(re.search(p, path) for p in o.no_decay):
        return 0.0
    return _first(o.wd_multipliers, path)


def decay_mask(o: OptimizerConfig, params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decay_factor(o, path_str(path)) > 0, params)


def _per_path(fn: Callable[[str, jax.Array, Any], jax.Array]) -> optax.GradientTransformation:
    """A stateless transform that maps each (path, update, param) to a new update."""
    def update(updates, state, params=None):
        if params is None:
            params = jax.tree.map(lambda _: None, updates)
        new = jax.tree_util.tree_map_with_path(lambda p, u, w: fn(path_str(p), u, w), updates,
                                               params, is_leaf=lambda x: x is None)
        return new, state
    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax's clip (u * min(1, max_norm / |u|), |u| the norm of all updates together), as one
    scalar factor: a multiply XLA folds into each optimizer fusion that reads the gradient, where
    optax's select of u or u / |u| * max_norm made it write a copy of every gradient first. The
    step passes `grad_norm` when it already has the norm (from the unscaled gradient, so that no
    reduction reads a scaled copy either); the state is optax's (empty), so checkpoints match."""
    def update(updates, state, params=None, *, grad_norm=None, **extra):
        norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        factor = jnp.minimum(1.0, max_norm / norm)  # a zero norm: inf -> 1
        return jax.tree.map(lambda u: u * factor.astype(u.dtype), updates), state
    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def decoupled_decay(o: OptimizerConfig) -> optax.GradientTransformation:
    def fn(path, u, p):
        m = o.weight_decay * decay_factor(o, path)
        return u if m == 0 else u + m * p
    return _per_path(fn)


def lr_multipliers(o: OptimizerConfig) -> optax.GradientTransformation:
    def fn(path, u, _):
        m = _first(o.lr_multipliers, path)
        return u if m == 1 else u * m
    return _per_path(fn)


def make_optimizer(o: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The transform of the trainable parameters (the step never hands it a frozen one)."""
    schedule = make_schedule(o, total_steps)
    if o.name == "adamw":
        moments = optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps)
    elif o.name == "sgd":
        moments = (optax.trace(decay=o.momentum, nesterov=o.nesterov) if o.momentum
                   else optax.identity())
    else:  # rmsprop
        moments = optax.scale_by_rms(decay=o.decay, eps=o.eps)
    parts = [clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    parts.append(moments)
    if o.weight_decay:
        parts.append(decoupled_decay(o))
    parts.append(optax.scale_by_learning_rate(schedule))
    if o.lr_multipliers:
        parts.append(lr_multipliers(o))
    return optax.chain(*parts), schedule


# ---- which parameters train ---------------------------------------------------------------
def flat_paths(tree: Any) -> dict[str, Any]:
    """`a/b/c` path -> leaf, in the tree's order."""
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return out


def subtree(tree: Any, keep: Iterable[str]) -> dict:
    """The nested dict of `tree`'s leaves whose paths are in `keep` ({} for none)."""
    keep = set(keep)
    return _nest({k: v for k, v in flat_paths(tree).items() if k in keep})


def join(full_like: Any, *parts: dict) -> Any:
    """`full_like`'s tree with its leaves taken from `parts` (disjoint subtrees that cover it)."""
    flat: dict[str, Any] = {}
    for part in parts:
        flat.update(flat_paths(part))
    paths, treedef = jax.tree_util.tree_flatten_with_path(full_like)
    return jax.tree_util.tree_unflatten(treedef, [flat[path_str(p)] for p, _ in paths])


@dataclass(frozen=True)
class ParamRules:
    """What the per-parameter rules of a config select: the trainable paths (in tree order), and
    one start-up line per rule saying what it matched."""

    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    lines: tuple[str, ...]

    @property
    def all_trainable(self) -> bool:
        return not self.frozen


def _matched(key: str, pattern: str, paths: list[str]) -> list[str]:
    hits = [p for p in paths if re.search(pattern, p)]
    if not hits:
        shown = ", ".join(paths[:4]) + (", ..." if len(paths) > 4 else "")
        raise ConfigError(f"{key}: {pattern!r} matches no parameter (paths look like {shown})")
    return hits


def _line(key: str, hits: list[str], what: str = "") -> str:
    shown = ", ".join(hits[:3]) + (f" and {len(hits) - 3} more" if len(hits) > 3 else "")
    return f"{key}{what}: {len(hits)} parameters ({shown})"


def param_rules(cfg: Config, abstract_params: Any) -> ParamRules:
    """Raises ConfigError for a rule that matches no parameter."""
    o, lora = cfg.optimizer, cfg.finetune.lora
    paths = list(flat_paths(abstract_params))
    lines = []
    frozen: set[str] = set()
    if lora.rank:
        adapters = [p for p in paths if p.rsplit("/", 1)[-1] in LORA_PARAMS]
        saved = set()
        for i, r in enumerate(lora.modules_to_save):
            hits = _matched(f"finetune.lora.modules_to_save[{i}]", r, paths)
            saved.update(hits)
            lines.append(_line(f"finetune.lora.modules_to_save[{i}] {r!r}", hits))
        frozen.update(p for p in paths if p not in saved and p not in adapters)
        lines.append(f"finetune.lora: {len(adapters) // 2} adapters of rank {lora.rank}; "
                     f"base frozen ({len(frozen)} parameters)")
    for i, r in enumerate(o.frozen):
        hits = _matched(f"optimizer.frozen[{i}]", r, paths)
        frozen.update(hits)
        lines.append(_line(f"optimizer.frozen[{i}] {r!r}", hits))
    for key in ("lr_multipliers", "wd_multipliers"):
        claimed: set[str] = set()
        for r, m in getattr(o, key).items():
            hits = _matched(f"optimizer.{key}[{r!r}]", r, paths)
            first = [h for h in hits if h not in claimed]  # the first matching rule wins
            claimed.update(hits)
            lines.append(_line(f"optimizer.{key}[{r!r}]", first, f" x{m:g}"))
    trainable = tuple(p for p in paths if p not in frozen)
    if not trainable:
        raise ConfigError("optimizer.frozen (with finetune.lora) leaves no parameter to train")
    return ParamRules(trainable, tuple(p for p in paths if p in frozen), tuple(lines))
