"""Typed configuration: dataclass schema, safe YAML loading, `a.b=value` overrides, validation.

Every key is a dataclass field with a comment; unknown keys and wrong types are rejected with
one line naming the key and what would be accepted (a `ConfigError`, exit code 2 in the CLI).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from bigjax.errors import ConfigError, first_line
from bigjax.paths import REMOTE_SCHEMES, run_dir_problem, run_path, write_text


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # run directory: a local path, file:///abs/path, gs://BUCKET/PATH or s3://BUCKET/PATH


@dataclass(frozen=True)
class ModelConfig:
    """The base of every family's `model:` schema; a family (bigjax/models/, or a plug-in) derives
    its own keys from it and registers it (bigjax.registry.register_model)."""

    name: str = "gpt"  # registry name: gpt, bert, or a plug-in's

    def check(self, cfg: "Config") -> None:
        """Checks that involve this section (and others); raise ConfigError."""


@dataclass(frozen=True)
class TaskConfig:
    """The base of every task's `task:` schema (bigjax/tasks.py, or a plug-in's)."""

    name: str = "causal_lm"  # registry name: causal_lm, masked_lm, classification, or a plug-in's

    def check(self, cfg: "Config") -> None:
        """Checks that involve this section (and others); raise ConfigError."""


def derived(default: Any, source: str, **kw) -> Any:
    """A field that `resolve` fills from the data when left at its default: `source` is a size the
    data builder reports (`vocab`: the tokenizer's size, padded; `num_labels`: classes in the data)."""
    return field(default=default, metadata={"derived": source, **kw})


@dataclass(frozen=True)
class SourceWeight:
    """One corpus of an LM mixture (`data.sources`)."""

    source: str = ""  # a file glob or tfds:NAME[/CONFIG], as data.source
    weight: float = 1.0  # relative share of the training windows


@dataclass(frozen=True)
class DataConfig:
    source: str = "builtin:pydocs"  # builtin:pydocs | tfds:NAME[/CONFIG] | sklearn:digits or an image folder (images) | file glob (.txt/.jsonl/.csv/.parquet)
    dir: str = ""  # tensorflow-datasets data dir ("" = tfds default); bigjax never downloads
    split: str = "train"  # tfds split for training (slices like train[:90%] work)
    eval_split: str = ""  # tfds split, or a file glob for file sources; "" = hold out val_fraction
    val_fraction: float = 0.05
    text_field: str = "text"
    label_field: str = "label"
    tokenizer: str = ""  # local Hugging Face tokenizer dir; "" = train a byte-level BPE on the data
    vocab_size: int = 4096  # for a tokenizer that bigjax trains
    max_chars: int = 4_000_000  # cap on the builtin corpus size
    pack: bool = True  # LM: concatenate documents and cut fixed-length windows; false = pad each
    # classification: up to this many texts share one training row of train.seq_len tokens
    # (segment ids keep them apart; train.batch_size counts rows); 1 = one padded text per row
    examples_per_row: int = 1
    # classification with examples_per_row > 1: each text truncated to this many tokens ([CLS]
    # and [SEP] included) and evaluated padded to it; 0 = train.seq_len
    max_example_len: int = 0
    on_bad_rows: Literal["skip", "error"] = "skip"  # rows not UTF-8/JSON: skip and count, or fail
    shuffle: bool = True
    workers: int = 0  # grain worker processes; 0 = in the main process
    threads: int = 0  # grain reader threads per process; 0 = grain's default (16)
    # LM: read, tokenize and pack per process as training goes (file globs, tfds); auto = stream
    # file globs above 64 MB and tfds splits above 100k records
    stream: Literal["auto", True, False] = "auto"
    tokenizer_sample_chars: int = 20_000_000  # streaming: the BPE bigjax trains sees this many chars
    shuffle_windows: int = 1024  # streaming: windows shuffled together in one seeded block
    # LM mixture, streamed: [{source: ..., weight: ...}, ...] replaces data.source
    sources: list[SourceWeight] = field(default_factory=list)
    # images (task image_classification): folders and tfds image datasets
    image_size: int = 0  # resize every image to N x N; 0 = keep (all images must be one size)
    crop_padding: int = 0  # training: random crop of the image zero-padded by N pixels; 0 = off
    flip: bool = False  # training: random horizontal flip
    pixel_mean: list[float] = field(default_factory=list)  # per channel, of x/255; [] = from the data
    pixel_std: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global batch (all processes, all micro-batches)
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per step; batch_size must be divisible by it
    log_every: int = 10
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 0  # 0 = the whole validation split
    peak_tflops: float = 0.0  # per device, for MFU; 0 = measure a matmul at start-up
    progress: bool = True
    # decoders: greedy completions of these prompts at every evaluation, written to
    # samples.jsonl in the run dir and to TensorBoard (README "Generation")
    sample_prompts: list[str] = field(default_factory=list)
    sample_new_tokens: int = 32


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "sgd", "rmsprop"] = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.0  # decoupled: p <- p - lr * wd * p
    no_decay: list[str] = field(default_factory=lambda: [r"bias$", r"scale$", r"embedding$"])
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    decay: float = 0.9  # rmsprop
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio
    clip_norm: float = 0.0  # global-norm clipping; 0 = off
    # per-parameter rules, regexes searched in parameter paths (`layer_0/attn/query/kernel`);
    # each must match some parameter. frozen: no gradient, no optimizer state, never changes
    frozen: list[str] = field(default_factory=list)
    # {regex: m}: the update (decay included) times m; the first matching regex wins
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    # {regex: m}: weight decay times m where decay applies; the first matching regex wins
    wd_multipliers: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1 = all devices left over
    fsdp: int = 1
    tensor: int = 1
    # data parallelism across hosts/slices; the other axes stay inside one (mesh.data then
    # counts per host), so only the gradient reduction crosses the slow network
    dcn_data: int = 1


DEFAULT_RULES: list[list[Any]] = [
    ["batch", ["data", "fsdp"]],
    ["vocab", "tensor"],
    ["embed", "fsdp"],
    ["heads", "tensor"],
    ["kv_heads", "tensor"],
    ["mlp", "tensor"],
    ["kv", None],
    ["length", None],
]


@dataclass(frozen=True)
class ShardingConfig:
    # Ordered (logical axis, mesh axis | [mesh axes] | null). The first rule for a logical axis
    # whose mesh axes are not used yet by the same array wins (MaxText-style fallbacks).
    rules: list[list[Any]] = field(default_factory=lambda: [list(r) for r in DEFAULT_RULES])


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # steps; 0 = only at the end
    keep: int = 3  # the latest `keep` checkpoints always stay (resume needs them)
    # auto = resume from the newest usable checkpoint if any; must = fail without one;
    # never = start fresh and refuse a run dir that already holds checkpoints
    resume: Literal["auto", "must", "never"] = "auto"
    async_save: bool = True  # write in background threads; the loop blocks only to copy arrays
    # an eval metric (eval_loss, ...): also save at every evaluation and keep the best `keep_best`
    keep_best_metric: str = ""
    keep_best_mode: Literal["min", "max"] = "min"
    keep_best: int = 1


@dataclass(frozen=True)
class InitConfig:
    from_: str = field(default="", metadata={"key": "from"})  # run dir, checkpoint dir[@step], hf:DIR, torchvision:FILE


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0 = no LoRA; else adapters of this rank on the `targets` kernels
    alpha: float = 16.0  # the adapter's update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input in training
    # regexes over module paths (`layer_0/attn/query`) of the dense layers that get adapters
    targets: list[str] = field(default_factory=lambda: [r"attn/(query|value)$"])
    # regexes over parameter paths trained (and saved) in full besides the adapters: a head the
    # base lacks (PEFT's modules_to_save), e.g. ["^classifier/"]
    modules_to_save: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FinetuneConfig:
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class DistributedConfig:
    coordinator: str = ""  # host:port of process 0; "" = from the environment; auto = JAX detects
    num_processes: int = 0  # 0 = from the environment (BIGJAX_NUM_PROCESSES, SLURM, ...)
    process_id: int = -1  # -1 = from the environment
    timeout_s: int = 300  # longest wait for a process that never joins or died (join, heartbeat)
    # longest time without a training step or evaluation batch (after the first step) before a
    # process ends itself: a hung peer keeps the heartbeat alive; 0 = never
    hang_timeout_s: int = 1800


@dataclass(frozen=True)
class Config:
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=lambda: _default("model"),
                               metadata={"registry": "model"})
    task: TaskConfig = field(default_factory=lambda: _default("task"), metadata={"registry": "task"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    init: InitConfig = field(default_factory=InitConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {value!r}")
        return _from_dict(tp, value, where + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: got {value!r}, expected {_describe(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: got {value!r}, expected a list")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: got {value!r}, expected a mapping")
        key_tp, item_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, f"{where} key"): _coerce(v, item_tp, f"{where}[{k!r}]")
                for k, v in value.items()}
    if origin in (typing.Union, types.UnionType) or tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: got {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: got {value!r}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: got {value!r}, expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: got {value!r}, expected a string")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - schema bug


def _schema(kind: str, name: Any) -> type:
    from bigjax import registry  # names only; the entries import this module
    if not isinstance(name, str):
        raise ConfigError(f"{kind}.name: got {name!r}, expected a registered name")
    return registry.lookup(kind, name, f"{kind}.name").config


def _default(kind: str) -> Any:
    return _schema(kind, {"model": "gpt", "task": "causal_lm"}[kind])()


def _elsewhere(kind: str, key: str) -> list[str]:
    """The other registered names of `kind` whose schema has `key` (for a hint)."""
    from bigjax import registry
    return [n for n in registry.names(kind)
            if key in {_key(f) for f in dataclasses.fields(_schema(kind, n))}]


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            family = ""
            if prefix in ("model.", "task.") and issubclass(cls, (ModelConfig, TaskConfig)):
                kind = prefix[:-1]
                name = getattr(cls, "name", "")
                others = [n for n in _elsewhere(kind, str(key)) if n != name]
                family = f" for {kind} '{name}'" + (
                    f" (a key of {kind} {', '.join(others)})" if others else "")
                hint = "" if others else hint
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{family}{hint} "
                f"(known: {', '.join(sorted(fields))})"
            )
        f = fields[key]
        if "registry" in f.metadata:  # the section's schema is the one its name registered
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key}: expected a mapping of keys, got {value!r}")
            kind = f.metadata["registry"]
            schema = _schema(kind, value.get("name", _default(kind).name))
            kwargs[f.name] = _from_dict(schema, value, prefix + key + ".")
        else:
            kwargs[f.name] = _coerce(value, hints[f.name], prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-able data, with the YAML key names."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, list):
            v = [to_dict(x) if dataclasses.is_dataclass(x) else x for x in v]
        out[_key(f)] = to_dict(v) if dataclasses.is_dataclass(v) else v
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if value is None and raw.strip().lower() not in ("null", "~", "none"):
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[path[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, *,
                saved: bool = False) -> Config:
    """Load a YAML config (or the defaults), apply `key.sub=value` overrides, check it.

    `saved`: a run's own config.yaml, valid for the bigjax that wrote it. Keys its model family or
    task no longer has are dropped rather than refused: runs written before the per-family
    schemas saved every Transformer key for every family (`model.positions` for a BERT), inert
    there."""
    data = read_config_data(path, overrides)
    if saved:
        for kind in ("model", "task"):
            section = data.get(kind)
            if isinstance(section, dict) and isinstance(section.get("name"), str):
                known = {_key(f) for f in dataclasses.fields(_schema(kind, section["name"]))}
                data[kind] = {k: v for k, v in section.items() if k in known}
    return from_data(data)


def read_config_data(path: str | os.PathLike | None, overrides: list[str] | None = None) -> dict:
    """The YAML mapping with the overrides applied, not yet checked against any schema (needs
    neither the registry nor JAX: `bigjax.resume` reads run.dir from it)."""
    data: dict = {}
    if path is not None:
        file = run_path(path, absolute=False)  # a run's own config.yaml may be on object storage
        if not file.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            with file.open("r", encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {first_line(e)}")
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys")
    return apply_overrides(data, list(overrides or []))


def from_data(data: dict) -> Config:
    """A checked Config from plain data (a YAML mapping)."""
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


def updated(cfg: Config, changes: dict[str, Any]) -> Config:
    """A new, checked Config with `{"section.key": value}` changed (configs are frozen). A changed
    `model.name` or `task.name` switches the section to that entry's schema, keeping the values
    of the keys both schemas have."""
    data = to_dict(cfg)
    for kind in ("model", "task"):  # a new name: keep only the keys the new schema has
        name = changes.get(f"{kind}.name", data[kind]["name"])
        if name != data[kind]["name"]:
            known = {_key(f) for f in dataclasses.fields(_schema(kind, name))}
            data[kind] = {k: v for k, v in data[kind].items() if k in known}
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return from_data(data)


def require_positive(values: dict[str, int]) -> None:
    for key, value in values.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")


def validate(cfg: Config) -> None:
    """Checks that need no devices (mesh and shape checks live in mesh.py); then the model's and
    the task's own (`ModelConfig.check`, `TaskConfig.check`)."""
    t, o = cfg.train, cfg.optimizer
    problem = run_dir_problem(cfg.run.dir)
    if problem:
        raise ConfigError(f"run.dir='{cfg.run.dir}': {problem}")
    if cfg.distributed.hang_timeout_s < 0:
        raise ConfigError(f"distributed.hang_timeout_s must be 0 (never) or a number of seconds, "
                          f"got {cfg.distributed.hang_timeout_s}")
    if cfg.checkpoint.every < 0:
        raise ConfigError(f"checkpoint.every must be 0 (only at the end) or a number of steps, "
                          f"got {cfg.checkpoint.every}")
    _validate_data(cfg.data)
    _validate_packing(cfg)
    require_positive({
        "train.steps": t.steps, "train.batch_size": t.batch_size, "train.seq_len": t.seq_len,
        "train.grad_accum": t.grad_accum, "train.log_every": t.log_every,
        "train.sample_new_tokens": t.sample_new_tokens,
        "checkpoint.keep": cfg.checkpoint.keep, "distributed.timeout_s": cfg.distributed.timeout_s,
        "checkpoint.keep_best": cfg.checkpoint.keep_best,
    })
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}"
        )
    if o.lr <= 0:
        raise ConfigError(f"optimizer.lr must be positive, got {o.lr}")
    for mesh_key in ("fsdp", "tensor", "dcn_data"):
        if getattr(cfg.mesh, mesh_key) < 1:
            raise ConfigError(f"mesh.{mesh_key} must be at least 1")
    if cfg.mesh.data == 0 or cfg.mesh.data < -1:
        raise ConfigError(f"mesh.data must be -1 (the remaining devices) or at least 1")
    for i, rule in enumerate(cfg.sharding.rules):
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError(
                f"sharding.rules[{i}]: expected [logical_axis, mesh_axis | [mesh_axes] | null], "
                f"got {rule!r}"
            )
    _validate_rules(cfg)
    cfg.model.check(cfg)
    cfg.task.check(cfg)


def _validate_rules(cfg: Config) -> None:
    """Regexes compile, multipliers are not negative, LoRA sizes make sense (whether each rule
    matches a parameter is checked when the model is built)."""
    o, lora = cfg.optimizer, cfg.finetune.lora
    named = [(f"optimizer.frozen[{i}]", r) for i, r in enumerate(o.frozen)]
    for key in ("lr_multipliers", "wd_multipliers"):
        for r, m in getattr(o, key).items():
            named.append((f"optimizer.{key}[{r!r}]", r))
            if m < 0:
                raise ConfigError(f"optimizer.{key}[{r!r}] must be 0 or more, got {m}")
    named += [(f"finetune.lora.{k}[{i}]", r) for k in ("targets", "modules_to_save")
              for i, r in enumerate(getattr(lora, k))]
    for key, r in named:
        try:
            re.compile(r)
        except re.error as e:
            raise ConfigError(f"{key}: {r!r} is not a regular expression ({e})")
    if lora.rank < 0:
        raise ConfigError(f"finetune.lora.rank must be 0 (off) or at least 1, got {lora.rank}")
    if lora.rank:
        if not 0 <= lora.dropout < 1:
            raise ConfigError(f"finetune.lora.dropout must be in [0, 1), got {lora.dropout}")
        if not lora.targets:
            raise ConfigError("finetune.lora.targets is empty: give regexes of the dense layers "
                              "that get adapters, e.g. ['attn/(query|value)$']")
        if not cfg.init.from_:
            raise ConfigError("finetune.lora needs init.from (the base model the adapters "
                              "train on: a run dir or hf:DIR)")


def _validate_data(d: DataConfig) -> None:
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    for key in ("workers", "threads"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key} must be 0 or more, got {getattr(d, key)}")
    for i, part in enumerate(d.sources):
        if not part.source:
            raise ConfigError(f"data.sources[{i}].source is empty (expected a file glob or "
                              "tfds:NAME)")
        if part.source.startswith(("builtin:", "sklearn:")):
            raise ConfigError(f"data.sources[{i}].source: {part.source} cannot be streamed in a "
                              "mixture (expected a file glob or tfds:NAME)")
        if not part.weight >= 0 or part.weight == float("inf"):
            raise ConfigError(f"data.sources[{i}].weight must be a finite number >= 0, got "
                              f"{part.weight} (source {part.source})")
    if d.sources and not sum(p.weight for p in d.sources) > 0:
        raise ConfigError("data.sources: every weight is 0; give at least one source a "
                          "positive weight")
    if d.sources and d.stream is False:
        raise ConfigError("data.sources (a mixture) is streamed; leave data.stream at auto or "
                          "true")
    if d.sources and d.eval_split:
        raise ConfigError("data.sources: data.eval_split is not supported with a mixture; each "
                          "source holds out data.val_fraction of its files")
    for key in ("tokenizer_sample_chars", "shuffle_windows"):
        if getattr(d, key) < 1:
            raise ConfigError(f"data.{key} must be at least 1, got {getattr(d, key)}")
    for key in ("image_size", "crop_padding"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key} must be 0 or more, got {getattr(d, key)}")
    if len(d.pixel_mean) != len(d.pixel_std):
        raise ConfigError(f"data.pixel_mean and data.pixel_std need one value per channel each, "
                          f"got {len(d.pixel_mean)} and {len(d.pixel_std)}")
    if any(v <= 0 for v in d.pixel_std):
        raise ConfigError(f"data.pixel_std must be positive, got {d.pixel_std}")
    scheme = d.source.split(":", 1)[0] if ":" in d.source else ""
    # a one-letter scheme is a Windows drive, one with "/" a path with a colon in it
    # gs:// and s3:// name a prepared dir (`bigjax data prepare --out URI`); data/sources.py
    # says so when such a URI holds no manifest
    if len(scheme) > 1 and "/" not in scheme and scheme not in ("builtin", "tfds", "sklearn",
                                                                  *REMOTE_SCHEMES):
        raise ConfigError(f"data.source '{d.source}': unknown scheme (expected builtin:pydocs, "
                          "tfds:NAME[/CONFIG], sklearn:digits, a file path/glob or a prepared "
                          "dir's gs:// or s3:// URI)")


def _validate_packing(cfg: Config) -> None:
    d, seq_len = cfg.data, cfg.train.seq_len
    if d.examples_per_row < 1:
        raise ConfigError(f"data.examples_per_row must be at least 1 (1 = no packing), got "
                          f"{d.examples_per_row}")
    if d.max_example_len < 0:
        raise ConfigError(f"data.max_example_len must be 0 (= train.seq_len) or more, got "
                          f"{d.max_example_len}")
    if d.max_example_len and d.examples_per_row == 1:
        raise ConfigError(f"data.max_example_len={d.max_example_len} applies to packed rows only; "
                          "set data.examples_per_row > 1 (texts per row), or leave it 0 and set "
                          "train.seq_len")
    if d.max_example_len > seq_len:
        raise ConfigError(f"data.max_example_len={d.max_example_len} exceeds train.seq_len="
                          f"{seq_len}, the row length it is packed into; at most {seq_len}")
    if d.examples_per_row == 1:
        return
    if example_len(cfg) < 3:
        raise ConfigError(f"data.max_example_len={example_len(cfg)} leaves no room for a token "
                          "between [CLS] and [SEP]; at least 3")
    from bigjax import registry  # names only, as _schema
    try:
        batches = registry.data_builder(registry.task(cfg.task.name).data_name(cfg)).batches
    except ConfigError:  # an unknown builder fails where the data is built, with its own message
        batches = "classification"
    if batches != "classification":
        raise ConfigError(f"data.examples_per_row={d.examples_per_row} packs classification "
                          f"texts, but task.name={cfg.task.name} reads {batches} batches (LM "
                          "documents are packed by data.pack); set data.examples_per_row=1")
    if not getattr(cfg.model, "reads_packed_rows", False):
        able = [n for n in registry.names("model")
                if getattr(registry.model(n).config, "reads_packed_rows", False)]
        raise ConfigError(f"data.examples_per_row={d.examples_per_row} packs several texts per "
                          f"row, which model.name={cfg.model.name} cannot read apart (no segment "
                          f"ids); packing works with model.name {' or '.join(able)}, or set "
                          "data.examples_per_row=1")


def packs_examples(cfg: Config) -> bool:
    """Classification training rows hold several texts each (`data.examples_per_row` > 1)."""
    return cfg.data.examples_per_row > 1


def example_len(cfg: Config) -> int:
    """Tokens of one classification text as the model reads it: `data.max_example_len` when
    packing (0 = train.seq_len), else `train.seq_len`. Also the longest position a packed row
    needs, since positions restart at 0 in each text."""
    return (cfg.data.max_example_len or cfg.train.seq_len) if packs_examples(cfg) \
        else cfg.train.seq_len


def compute_dtype(cfg: Config) -> str:
    """The model's compute dtype (a plug-in family's config may have none: float32)."""
    return getattr(cfg.model, "dtype", None) or "float32"


def eval_batch_size(cfg: Config) -> int:
    """Examples per evaluation batch: one micro-batch of training rows, times the texts of
    `example_len` that fit one row when packing, so evaluation batches hold about as many
    tokens as training ones (evaluation stays unpacked: one padded text per row)."""
    rows = cfg.train.batch_size // cfg.train.grad_accum
    return rows * max(1, round(cfg.train.seq_len / example_len(cfg))) if packs_examples(cfg) \
        else rows


def init_run_dir(source: str) -> str:
    """The run dir behind an `init.from` value (run dir, its checkpoints dir or one step dir, with
    optional `@step`; not hf:), from the path alone: where the source's tokenizer and labels are."""
    path = run_path(source.partition("@")[0], absolute=False)
    if path.name.isdigit() and path.parent.name == "checkpoints":
        path = path.parent
    return str(path.parent if path.name == "checkpoints" else path)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Whole or not at all (write-then-rename), on any epath backend."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
