"""Knowledge distillation as a task (`task.name: distill`): the student learns from the data's
labels and from a trained teacher's softened outputs, for classification or causal LM.

The teacher (`task.teacher`: a run dir or `hf:DIR`) is read once, on the first train step, into
shardings of the student's mesh and rules; its parameters enter the jitted step as an argument
(`step_inputs`), so its forward pass runs inside the same compiled step, it is never part of the
train state and never written into the student's checkpoints. Evaluation needs no teacher: it
scores the student on the labels alone (the hard loss), as any classifier or LM run.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels)

(Hinton et al. 2015; T^2 keeps the soft gradients' scale independent of T.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bigjax import registry
from bigjax.config import Config, TaskConfig, derived, load_config, packs_examples
from bigjax.errors import ConfigError
from bigjax.paths import run_path, run_str
from bigjax.tasks import (class_counts, classifier_logits, finalize_token_stats, macro_f1,
                          register_task, token_stats)

log = logging.getLogger("bigjax")


@dataclass(frozen=True)
class DistillConfig(TaskConfig):
    name: str = "distill"
    teacher: str = ""  # the teacher: a run dir (its latest checkpoint) or hf:DIR
    temperature: float = 2.0  # softens both distributions in the soft loss
    alpha: float = 0.5  # weight of the soft (teacher) loss; 1 - alpha weighs the labels' loss
    objective: Literal["classification", "causal_lm"] = "classification"  # the student's task
    num_labels: int = derived(0, "num_labels")  # classification: 0 = counted in the data

    def check(self, cfg: Config) -> None:
        if not self.teacher:
            raise ConfigError("task.teacher is empty; set it to the teacher's run dir or hf:DIR")
        if not self.temperature > 0:
            raise ConfigError(f"task.temperature must be positive, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"task.alpha must be in [0, 1] (1 = teacher only), got {self.alpha}")


def soft_losses(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
    """T^2 * KL(p_teacher || p_student) over the last axis, both softened by T."""
    t = teacher.astype(jnp.float32) / temperature
    s = student.astype(jnp.float32) / temperature
    p_t = jax.nn.softmax(t, -1)
    kl = (p_t * (jax.nn.log_softmax(t, -1) - jax.nn.log_softmax(s, -1))).sum(-1)
    return temperature ** 2 * kl


@dataclass(frozen=True)
class Distill:
    """The task; `teacher` (the loader) is set for training, `teacher_params` only while a step
    is traced (`bind`)."""

    objective: str
    num_labels: int
    temperature: float
    alpha: float
    teacher: "Teacher | None" = field(default=None, compare=False)
    teacher_params: Any = None
    vocab_size: int = 0  # the student's, for causal LM: both distributions span one vocabulary
    name: str = "distill"

    def step_inputs(self, mesh, rules) -> tuple[Any, Any]:
        t_vocab = getattr(self.teacher.cfg.model, "vocab_size", 0)
        if self.objective == "causal_lm" and t_vocab != self.vocab_size:
            raise ConfigError(f"task.teacher={self.teacher.source}: its vocabulary has {t_vocab} "
                              f"entries, the student's model.vocab_size={self.vocab_size}; the "
                              "token-level KL needs the same vocabulary")
        return self.teacher.load(mesh, rules)

    def bind(self, teacher_params: Any) -> "Distill":
        return dataclasses.replace(self, teacher_params=teacher_params)

    def _logits(self, model, batch, rngs):
        if self.objective == "classification":  # packed rows too: the teacher reads the same
            return classifier_logits(model, batch, rngs)
        return model(batch["inputs"], segment_ids=batch.get("segment_ids"),
                     positions=batch.get("positions"), rngs=rngs)

    def stats(self, model, batch, rngs):
        logits = self._logits(model, batch, rngs)
        if self.objective == "classification":
            labels, w = batch["labels"], batch["weights"].astype(jnp.float32)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            pred = jnp.argmax(logits, -1)
            out = {"loss_sum": (losses * w).sum(), "weight": w.sum(),
                   "correct": ((pred == labels) * w).sum(),
                   **class_counts(pred, labels, w, self.num_labels)}
        else:
            w = batch["weights"].astype(jnp.float32)
            out = token_stats(logits, batch["targets"], w)
        if self.teacher_params is None:  # evaluation: the student on the labels alone
            return out
        teacher = nnx.merge(self.teacher.spec.graphdef, self.teacher_params, self.teacher.rest,
                            copy=True)
        t_logits = jax.lax.stop_gradient(self._logits(teacher, batch, None))
        soft = (soft_losses(logits, t_logits, self.temperature) * w).sum()
        hard = out["loss_sum"]
        return {**out, "loss_sum": self.alpha * soft + (1 - self.alpha) * hard,
                "soft_loss_sum": soft, "hard_loss_sum": hard}

    def finalize(self, sums):
        w = max(sums["weight"], 1e-9)
        if self.objective == "classification":
            out = {"loss": sums["loss_sum"] / w, "accuracy": sums["correct"] / w,
                   "macro_f1": macro_f1(sums, self.num_labels)}
        else:
            out = finalize_token_stats(sums)
        if "soft_loss_sum" in sums:  # training: both parts of the loss
            out.update(soft_loss=sums["soft_loss_sum"] / w, hard_loss=sums["hard_loss_sum"] / w)
        return out


@dataclass(frozen=True)
class Teacher:
    """Where the teacher is and what it is: its config (model and head), label names, tokenizer
    directory; `spec` its graph and abstract parameters (no arrays until `load`)."""

    source: str
    cfg: Config
    labels: list[str] | None
    tokenizer_dir: str
    spec: Any
    rest: Any  # non-parameter variables (none for the Transformer families)

    def load(self, mesh, rules) -> tuple[Any, Any]:
        """(parameters read straight into their shards on `mesh`, their NamedShardings)."""
        from bigjax import mesh as mesh_lib
        from bigjax.init_from import _flat, _from_checkpoint, _from_hf, _unflat_like, resolve_step_dir
        specs = mesh_lib.param_specs(self.spec.abstract_params, self.spec.logical_axes, rules, mesh)
        shardings = mesh_lib.named(mesh, specs)
        wanted = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              self.spec.abstract_params, shardings)
        flat = _flat(wanted)
        if self.source.startswith("hf:"):
            loaded, _ = _from_hf(self.source[3:], self.cfg, flat)
        else:
            loaded, _ = _from_checkpoint(resolve_step_dir(self.source), flat)
        missing = sorted(k for k in flat if k not in loaded)
        if missing:
            raise ConfigError(f"task.teacher={self.source}: parameters missing from it: "
                              f"{', '.join(missing[:5])}")
        log.warning("distill: teacher %s loaded (%d parameters)", self.source,
                    sum(int(v.size) for v in loaded.values()))
        return _unflat_like(loaded, wanted), shardings


def _labels_of_hf(hf_dir: str) -> list[str] | None:
    id2label = json.loads((run_path(hf_dir) / "config.json").read_text(encoding="utf-8")).get(
        "id2label") or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)] or None


def read_teacher(cfg: Config) -> Teacher:
    """The teacher of a distill config; ConfigError (one line) when it is no teacher for it."""
    from bigjax.data.classification import load_label_names
    from bigjax.state import model_spec
    source, objective = cfg.task.teacher, cfg.task.objective
    if source.startswith("hf:"):
        from bigjax.hf import model_config_for
        hf_dir = source[3:]
        if not (run_path(hf_dir) / "config.json").is_file():
            raise ConfigError(f"task.teacher={source}: no config.json in '{hf_dir}' (expected a "
                              "Hugging Face model dir)")
        t_cfg = model_config_for(hf_dir)
        labels, tok_dir = _labels_of_hf(hf_dir), hf_dir
    else:
        path = run_path(source) / "config.yaml"
        if not path.is_file():
            raise ConfigError(f"task.teacher={source}: not a bigjax run dir (no config.yaml); "
                              "expected a run dir or hf:DIR")
        t_cfg = load_config(path, saved=True)
        labels, tok_dir = load_label_names(source), run_str(run_path(source) / "tokenizer")
        if t_cfg.task.name == "distill":  # a distilled student teaches as what it was trained for
            t_cfg = _as_objective(t_cfg)
    from bigjax.tasks import head
    kind = head(t_cfg) if objective == "classification" else t_cfg.task.name
    if kind != objective:
        raise ConfigError(f"task.teacher={source} is a {t_cfg.task.name} model; task.objective="
                          f"{objective} needs a {objective} teacher")
    box: dict = {}

    def shapes():
        from bigjax.models import create_model
        model = create_model(t_cfg, nnx.Rngs(params=0))
        gd, params, rest = nnx.split(model, nnx.Param, ...)
        box.update(rest=nnx.to_pure_dict(rest))
        return nnx.to_pure_dict(params)

    spec = model_spec(t_cfg)
    jax.eval_shape(shapes)
    if jax.tree.leaves(box["rest"]):
        raise ConfigError(f"task.teacher={source}: a model with non-parameter state (BatchNorm) "
                          "cannot teach yet")
    return Teacher(source, t_cfg, labels, tok_dir, spec, box["rest"])


def _as_objective(cfg: Config) -> Config:
    from bigjax.config import updated
    objective = cfg.task.objective
    changes = {"task.name": objective}
    if objective == "classification":
        changes["task.num_labels"] = cfg.task.num_labels
    return updated(cfg, changes)


def _create(cfg: Config) -> Distill:
    t = cfg.task
    if t.objective == "classification" and t.num_labels < 2:
        raise ConfigError(f"task.num_labels must be at least 2 for classification, "
                          f"got {t.num_labels}")
    return Distill(t.objective, t.num_labels, t.temperature, t.alpha, teacher=_LazyTeacher(cfg),
                   vocab_size=getattr(cfg.model, "vocab_size", 0))


class _LazyTeacher:
    """Reads the teacher only when training needs it: `eval`/`predict` of a distilled run work
    without it (it may be gone)."""

    def __init__(self, cfg: Config):
        self._cfg, self._teacher = cfg, None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._teacher is None:
            self._teacher = read_teacher(self._cfg)
        return getattr(self._teacher, name)


def _data_name(cfg: Config) -> str:
    return "distill_" + cfg.task.objective


_BASE = {"classification": "classification", "causal_lm": "lm"}  # the objective's own builder


def _build_data(cfg: Config, run_dir: str):
    """The objective's own data, tokenized by the teacher's tokenizer unless `data.tokenizer`
    says otherwise; a tokenizer or label set that differs from the teacher's is an error."""
    from bigjax.data.classification import save_label_names
    objective = cfg.task.objective
    data_cfg = cfg
    own = run_path(run_dir) / "tokenizer"
    try:
        teacher = read_teacher(cfg)
    except ConfigError:
        if not own.is_dir():
            raise
        # a student that has trained (eval, predict, compress): the teacher may be gone, and
        # training again would read it at its first step, with its own error
        data = registry.data_builder(_BASE[objective]).build(cfg, run_dir)
        data.sizes.setdefault("num_labels", 0)
        return data
    if not cfg.data.tokenizer and not own.is_dir() and not cfg.init.from_:
        if not run_path(teacher.tokenizer_dir).is_dir():
            raise ConfigError(f"task.teacher={teacher.source}: no tokenizer at "
                              f"'{teacher.tokenizer_dir}'; set data.tokenizer")
        data_cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, tokenizer=teacher.tokenizer_dir))
    data = registry.data_builder(_BASE[objective]).build(data_cfg, run_dir)
    vocab = data.tokenizer.get_vocab()
    from bigjax.data.tokenizer import load_tokenizer, save_tokenizer
    t_vocab = load_tokenizer(teacher.tokenizer_dir).get_vocab() \
        if run_path(teacher.tokenizer_dir).is_dir() else None
    if t_vocab is not None and t_vocab != vocab:
        raise ConfigError(f"task.teacher={teacher.source}: its tokenizer ({len(t_vocab)} tokens) "
                          f"differs from the student's ({len(vocab)} tokens); the teacher must "
                          "read the same token ids (leave data.tokenizer and init.from unset to "
                          "use the teacher's)")
    if packs_examples(cfg) and not getattr(teacher.cfg.model, "reads_packed_rows", False):
        raise ConfigError(f"task.teacher={teacher.source} is a model.name="
                          f"{teacher.cfg.model.name} model, which cannot read packed rows "
                          f"(data.examples_per_row={cfg.data.examples_per_row}); set "
                          "data.examples_per_row=1")
    if objective == "classification":
        names = data.info["label_names"]
        if teacher.labels is not None and teacher.labels != names:
            raise ConfigError(f"task.teacher={teacher.source}: its labels "
                              f"[{', '.join(teacher.labels)}] differ from the data's "
                              f"[{', '.join(names)}]; the teacher must score the same classes")
    data.sizes.setdefault("num_labels", 0)  # task.num_labels is derived; an LM has none
    if not own.is_dir() and jax.process_index() == 0:  # eval/predict find the run's copy
        save_tokenizer(data.tokenizer, own)
    return data


register_task("distill", DistillConfig, _create, data=_data_name)
registry.register_data("distill_classification", _build_data, batches="classification")
registry.register_data("distill_causal_lm", _build_data, batches="lm")
