"""Registries of model families, tasks and data builders, by the names configs use.

Each entry is registered by the module that defines it (`register_model(...)` at import). bigjax's
own entries are plug-ins like any other: the lookups import them, and every Python entry point of
the group `bigjax.plugins` in the installed packages, the first time a name is looked up. A
user's package adds a family, a task or a data builder with one entry point, e.g. in its
pyproject.toml:

    [project.entry-points."bigjax.plugins"]
    my_models = "my_package.models"       # a module that calls register_* when imported

This module knows names only; it imports no model, task or data code itself.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any, Callable

from bigjax.errors import ConfigError, first_line

ENTRY_POINT_GROUP = "bigjax.plugins"
BUILTINS = ("bigjax.models.gpt", "bigjax.models.bert", "bigjax.tasks", "bigjax.data.lm",
            "bigjax.data.mlm", "bigjax.data.classification",
            "bigjax.models.cnn", "bigjax.models.resnet", "bigjax.tasks_image",
            "bigjax.data.images",  # images: CNNs and ResNets
            "bigjax.models.rnn", "bigjax.distill")


@dataclass(frozen=True)
class ModelFamily:
    """`config`: the family's `model:` schema (a frozen dataclass deriving from
    `bigjax.config.ModelConfig`); `create(cfg, rngs)`: the nnx.Module for a whole Config (a head
    may depend on the task); `flops_per_token(cfg, n_params)`: training FLOPs per token for MFU
    (None: 6 x parameters)."""

    name: str
    config: type
    create: Callable[..., Any]
    flops_per_token: Callable[..., float] | None = None


@dataclass(frozen=True)
class TaskKind:
    """`config`: the `task:` schema (derives from `bigjax.config.TaskConfig`); `create(cfg)`: the
    Task (loss and metrics); `data`: the name of the data builder that makes its batches, or a
    function of the Config that names it (a task over another task's batches, as distillation)."""

    name: str
    config: type
    create: Callable[..., Any]
    data: str | Callable[..., str]

    def data_name(self, cfg: Any) -> str:
        return self.data(cfg) if callable(self.data) else self.data


@dataclass(frozen=True)
class DataBuilder:
    """`build(cfg, run_dir) -> bigjax.data.types.Data`: train and eval examples, tokenizer, sizes;
    `batches`: the kind of batches it makes when they are those of a builtin builder
    ("classification", "mlm", "lm"), which picks the model's head; "" = its own name."""

    name: str
    build: Callable[..., Any]
    batches: str = ""


_ENTRIES: dict[str, dict[str, Any]] = {"model": {}, "task": {}, "data builder": {}}
_loaded = False


def _check_schema(kind: str, name: str, config: type, base_name: str) -> None:
    if not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
        raise TypeError(f"{kind} '{name}': config must be a frozen dataclass deriving from "
                        f"bigjax.config.{base_name}")


def register_model(name: str, config: type, create: Callable[..., Any], *,
                   flops_per_token: Callable[..., float] | None = None) -> ModelFamily:
    _check_schema("model", name, config, "ModelConfig")
    entry = ModelFamily(name, config, create, flops_per_token)
    _ENTRIES["model"][name] = entry
    return entry


def register_task(name: str, config: type, create: Callable[..., Any], *,
                  data: str | Callable[..., str]) -> TaskKind:
    _check_schema("task", name, config, "TaskConfig")
    entry = TaskKind(name, config, create, data)
    _ENTRIES["task"][name] = entry
    return entry


def register_data(name: str, build: Callable[..., Any], *, batches: str = "") -> DataBuilder:
    entry = DataBuilder(name, build, batches or name)
    _ENTRIES["data builder"][name] = entry
    return entry


def load_plugins() -> None:
    """Import bigjax's own entries and every installed `bigjax.plugins` entry point, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # first: a plug-in that looks a name up while it loads must not recurse
    for module in BUILTINS:
        importlib.import_module(module)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
            if callable(loaded):  # an entry point may name a function that registers
                loaded()
        except Exception as e:
            raise ConfigError(f"bigjax plug-in '{ep.name}' ({ep.value}, entry point group "
                              f"{ENTRY_POINT_GROUP}) failed to load: {first_line(e)}")


def lookup(kind: str, name: str, key: str) -> Any:
    """The entry `name` of `kind` ("model", "task", "data builder"); `key` names the config key
    for the error (e.g. model.name)."""
    load_plugins()
    entries = _ENTRIES[kind]
    if name not in entries:
        raise ConfigError(f"{key}: unknown {kind} '{name}' (known: {', '.join(sorted(entries))}; "
                          f"a plug-in registers more through the '{ENTRY_POINT_GROUP}' entry points)")
    return entries[name]


def names(kind: str) -> list[str]:
    load_plugins()
    return sorted(_ENTRIES[kind])


def model(name: str) -> ModelFamily:
    return lookup("model", name, "model.name")


def task(name: str) -> TaskKind:
    return lookup("task", name, "task.name")


def data_builder(name: str) -> DataBuilder:
    return lookup("data builder", name, "the data builder of the task")
