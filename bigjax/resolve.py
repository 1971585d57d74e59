"""`resolve`: what the user wrote -> the full, frozen config that a run saves as config.yaml.

The only place that fills in values: model sizes from an `init.from: hf:DIR` checkpoint's
config.json, and the fields a schema marks `derived` (bigjax.config.derived) from the sizes its
data builder reports (the tokenizer's vocabulary, the label count). Nothing after it changes the
config; a saved run's config is already resolved and is not resolved again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from bigjax.config import Config, updated
from bigjax.data.types import Data
from bigjax.errors import ConfigError

VOCAB_MULTIPLE = 128  # a round vocabulary shards evenly over the tensor axis and fills matmul tiles


def pad_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return int(math.ceil(n / multiple) * multiple)


def derived_values(cfg: Config, sizes: dict[str, int]) -> dict[str, Any]:
    """`{"section.key": value}` for every `derived` field still at its default."""
    out: dict[str, Any] = {}
    for section in ("model", "task"):
        schema = getattr(cfg, section)
        for f in dataclasses.fields(schema):
            source = f.metadata.get("derived")
            if source is None or getattr(schema, f.name) != f.default:
                continue
            if source not in sizes:
                raise ConfigError(f"{section}.{f.name} is 0 (take it from the data) but the data "
                                  f"builder reports no '{source}'; set {section}.{f.name}")
            value = sizes[source]
            out[f"{section}.{f.name}"] = pad_vocab(value) if source == "vocab" else value
    return out


def resolve(cfg: Config, data: Data | None = None) -> Config:
    """The resolved config; `data` (from `bigjax.data.pipeline.build_data`) supplies the derived
    sizes (without it they stay as written)."""
    if cfg.init.from_.startswith("hf:"):
        from bigjax.hf import hf_model_values
        cfg = updated(cfg, hf_model_values(cfg, cfg.init.from_[3:]))
    if data is not None:
        changes = derived_values(cfg, data.sizes)
        if changes:
            cfg = updated(cfg, changes)
    return cfg
