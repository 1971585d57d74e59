"""From `data.*` config to train/eval example sources and the tokenizer: the task names its data
builder (bigjax.registry), and the builder does the rest."""

from __future__ import annotations

from bigjax import registry
from bigjax.config import Config
from bigjax.data.types import Data


def build_data(cfg: Config, run_dir: str) -> Data:
    builder = registry.data_builder(registry.task(cfg.task.name).data_name(cfg))
    return builder.build(cfg, run_dir)
