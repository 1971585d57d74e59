"""bigjax: JAX/Flax NNX training for large models.

The public API, imported on first use (so `import bigjax.config` stays light):

    from bigjax import Trainer, load_config, resolve, build
    from bigjax import register_model, register_task, register_data   # plug-ins
"""

from __future__ import annotations

import importlib

_API = {
    "Trainer": "bigjax.trainer", "load_config": "bigjax.config", "Config": "bigjax.config",
    "resolve": "bigjax.resolve", "build": "bigjax.build", "Components": "bigjax.build",
    "register_model": "bigjax.registry", "register_task": "bigjax.registry",
    "register_data": "bigjax.registry",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'bigjax' has no attribute '{name}'")
