"""The optax chain from the config: optimizer, schedule, clipping, decoupled weight decay mask.

Weight decay is decoupled everywhere (p <- p - lr * wd * p, applied after the moment/momentum
transform, never fed through it), and skips parameters whose path matches `optimizer.no_decay`
(regexes over paths like `layer_0/attn/query/bias`; by default biases, norm scales, embeddings).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from bigjax.config import OptimizerConfig
from bigjax.mesh import path_str


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


def decay_mask(o: OptimizerConfig, params: Any) -> Any:
    patterns = [re.compile(p) for p in o.no_decay]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.search(path_str(path)) for p in patterns), params)


def make_optimizer(o: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(o, total_steps)
    mask = lambda params: decay_mask(o, params)
    if o.name == "adamw":
        moments = optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps)
    elif o.name == "sgd":
        moments = (optax.trace(decay=o.momentum, nesterov=o.nesterov) if o.momentum
                   else optax.identity())
    else:  # rmsprop
        moments = optax.scale_by_rms(decay=o.decay, eps=o.eps)
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    parts.append(moments)
    if o.weight_decay:
        parts.append(optax.add_decayed_weights(o.weight_decay, mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts), schedule
