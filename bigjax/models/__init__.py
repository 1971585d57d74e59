"""Model families. Each one is a file that defines its `model:` schema and module and registers
them (bigjax.registry.register_model); `create_model` builds the configured one."""

from __future__ import annotations

from flax import nnx

from bigjax import registry
from bigjax.config import Config


def create_model(cfg: Config, rngs: nnx.Rngs) -> nnx.Module:
    return registry.model(cfg.model.name).create(cfg, rngs)


def known_models() -> list[str]:
    return registry.names("model")
