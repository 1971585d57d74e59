"""Model registry: config name -> constructor. A new family registers itself here."""

from __future__ import annotations

from typing import Callable

from flax import nnx

from bigjax.config import Config
from bigjax.errors import ConfigError

ModelFactory = Callable[[Config, nnx.Rngs], nnx.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register(name: str):
    def wrap(fn: ModelFactory) -> ModelFactory:
        _REGISTRY[name] = fn
        return fn
    return wrap


def create_model(cfg: Config, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.model.name not in _REGISTRY:
        raise ConfigError(
            f"model.name: unknown model '{cfg.model.name}' (known: {', '.join(sorted(_REGISTRY))})"
        )
    return _REGISTRY[cfg.model.name](cfg, rngs)


def known_models() -> list[str]:
    return sorted(_REGISTRY)


@register("gpt")
def _gpt(cfg: Config, rngs: nnx.Rngs) -> nnx.Module:
    from bigjax.models.gpt import GPT
    return GPT(cfg.model, rngs)


@register("bert")
def _bert(cfg: Config, rngs: nnx.Rngs) -> nnx.Module:
    from bigjax.models.bert import build_bert
    return build_bert(cfg, rngs)
