"""The loop: builds everything from the config, then trains with progress, logging, evaluation,
checkpoint cadence and signal handling. The Python API (`Trainer(...).train()`) and the CLI share it.

The host never waits for the device to log: metrics of a logged step are fetched only after the
next step has been dispatched (nanodo's trick).
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from bigjax import distributed
from bigjax import mesh as mesh_lib
from bigjax.checkpoint import Checkpointer, abstract_with_shardings, unwritable_reason
from bigjax.config import Config, load_config, save_config, to_dict
from bigjax.data.loader import TrainLoader, eval_batches
from bigjax.data.pipeline import build_data
from bigjax.errors import CheckpointError, ConfigError
from bigjax.optim import make_optimizer
from bigjax.perf import flops_per_token, peak_flops
from bigjax.report import Reporter, plot_losses
from bigjax.state import TrainState, count_params, init_state, model_spec, state_shardings
from bigjax.step import (jit_eval_step, jit_train_step, make_eval_step, make_train_step,
                         with_activation_sharding)
from bigjax.tasks import make_task

__version__ = "0.1.0"


def prepare_run_dir(path: str) -> str:
    reason = unwritable_reason(path)
    if reason:
        raise ConfigError(f"run.dir '{path}' is not writable: {reason}")
    return os.path.abspath(path)


def _pad_vocab(n: int, multiple: int = 128) -> int:
    # A round vocabulary shards evenly over the tensor axis and fills matmul tiles.
    return int(math.ceil(n / multiple) * multiple)


class Trainer:
    """`Trainer(config_or_path, overrides).train()`; `.evaluate()` returns validation metrics."""

    def __init__(self, config: Config | str | os.PathLike | None = None,
                 overrides: list[str] | None = None, *, saved: bool = False):
        """`saved`: the config is a run's own config.yaml (`from_run`), whose sizes are already
        resolved: the `init.from: hf:` source is not read again (it may be gone), and the data
        only on first use (`predict` needs the saved tokenizer, not the training files)."""
        cfg = config if isinstance(config, Config) else load_config(config, overrides)
        if cfg.init.from_.startswith("hf:") and not saved:  # sizes from the HF config.json
            from bigjax.config import validate
            from bigjax.hf import apply_hf_model_config
            apply_hf_model_config(cfg, cfg.init.from_[3:])
            validate(cfg)
        self.cfg = cfg
        distributed.initialize(cfg.distributed)
        self.mesh = mesh_lib.make_mesh(cfg.mesh)
        self._check_batch()
        self.run_dir = prepare_run_dir(cfg.run.dir)
        self._data = None
        if not saved or cfg.model.vocab_size == 0 or (cfg.task.name == "classification"
                                                      and cfg.task.num_labels == 0):
            self.data  # bad data fails here; sizes that come from the data are needed now
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = _pad_vocab(len(self.data.tokenizer))
        self.task = make_task(cfg)
        self.tx, self.schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
        self.spec = model_spec(cfg)
        self.abstract, self.shardings = state_shardings(cfg, self.spec, self.tx, self.mesh)
        rules = cfg.sharding.rules
        # rank-1 spec: splits the leading (batch) axis of every batch array, whatever its rank
        # (classification labels are (B,), token arrays (B, T))
        self.batch_sharding = NamedSharding(self.mesh, mesh_lib.batch_spec(rules, self.mesh, 1))
        self.n_params = count_params(self.spec.abstract_params)
        step = make_train_step(self.spec, self.task, self.tx, self.schedule,
                               grad_accum=cfg.train.grad_accum, seed=cfg.seed)
        self.train_step = jit_train_step(with_activation_sharding(step, self.mesh, rules),
                                         self.shardings, self.batch_sharding)
        self.eval_step = jit_eval_step(
            with_activation_sharding(make_eval_step(self.spec, self.task), self.mesh, rules),
            self.shardings, self.batch_sharding)
        self.checkpointer: Checkpointer | None = None
        self.state: TrainState | None = None
        self._stop_requested = False
        self.stop_signal: int | None = None  # the signal that stopped train() early, if any
        self.preempted = False
        self._watchdog = distributed.hang_watchdog(0)  # armed by train() after its first step

    @property
    def data(self):
        """Train and eval sources and the tokenizer."""
        if self._data is None:
            self._data = build_data(self.cfg, self.run_dir)
        return self._data

    def _tokenizer(self):
        own = os.path.join(self.run_dir, "tokenizer")
        if self._data is None and os.path.isdir(own):  # what training saved (or was given)
            from bigjax.data.tokenizer import load_tokenizer
            return load_tokenizer(own)
        return self.data.tokenizer

    def _check_batch(self) -> None:
        t = self.cfg.train
        div = mesh_lib.batch_divisor(self.cfg.sharding.rules, self.mesh)
        micro = t.batch_size // t.grad_accum
        if micro % div:
            raise ConfigError(
                f"train.batch_size={t.batch_size} (micro-batch {micro} with grad_accum={t.grad_accum}) "
                f"is not divisible by the batch-sharded mesh axes data*fsdp={div}")

    # ---- state -------------------------------------------------------------------------------
    def _meta(self, step: int) -> dict[str, Any]:
        return {"step": step, "config": to_dict(self.cfg), "bigjax_version": __version__,
                "mesh": dict(self.mesh.shape), "process_count": jax.process_count()}

    def _restore_or_init(self) -> tuple[TrainState, dict | None]:
        """Resume from the newest usable checkpoint of the run, else init (and `init.from`).

        Never silently starts from scratch over checkpoints: `never` refuses a run dir that holds
        some, and damaged or foreign ones raise (checkpoint.py) rather than fall through to init.
        """
        ckpt = self.checkpointer
        policy = self.cfg.checkpoint.resume
        if policy == "never" and ckpt.all_steps():
            raise CheckpointError(
                f"checkpoint.resume=never but {ckpt.directory} already holds checkpoints (steps "
                f"{ckpt.all_steps()}); use a new run.dir, or resume=auto to continue from them")
        restored = None
        if policy != "never":
            target = abstract_with_shardings(self.abstract, self.shardings)
            restored = ckpt.restore_latest(target, to_dict(self.cfg)["model"])
        # each process chose from its own view of the checkpoints
        distributed.agree("resume_step", str(restored.step if restored else 0),
                          self.cfg.distributed.timeout_s)
        if restored is not None:
            return restored.state, restored.data_state
        if policy == "must":
            raise CheckpointError(
                f"checkpoint.resume=must but {ckpt.directory} holds no checkpoint")
        state = init_state(self.cfg, self.tx, self.shardings)
        if self.cfg.init.from_:
            from bigjax.init_from import load_init_params
            params = load_init_params(self.cfg, self.cfg.init.from_, state.params)
            # The optimizer state was built from the fresh params; adam's moments are zeros either
            # way, so only the params change.
            state = state.replace(params=params)
        return state, None

    def init_state(self) -> TrainState:
        if self.state is None:
            self.checkpointer = self.checkpointer or Checkpointer(self.run_dir, self.cfg.checkpoint)
            self.state, self._data_state = self._restore_or_init()
        return self.state

    # ---- evaluation --------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Validation metrics over the whole eval split (padding rows carry no weight)."""
        state = self.init_state()
        sums: dict[str, float] = {}
        batches = eval_batches(self.data.eval, self.cfg.train.batch_size // self.cfg.train.grad_accum,
                               sharding=self.batch_sharding, process_index=jax.process_index(),
                               process_count=jax.process_count(), limit=self.cfg.train.eval_batches)
        pending = []
        for batch in batches:
            pending.append(self.eval_step(state.params, state.model_state, batch))
        for i, stats in enumerate(pending):  # fetched in order: each one is progress
            for k, v in jax.device_get(stats).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            self._watchdog.beat(f"evaluation batch {i + 1}")
        return {f"eval_{k}": v for k, v in self.task.finalize(sums).items()}

    # ---- a finished run ------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, overrides: list[str] | None = None) -> "Trainer":
        """The trainer of an existing run, restoring its latest checkpoint (eval, predict)."""
        path = os.path.join(run_dir, "config.yaml")
        if not os.path.isfile(path):
            raise CheckpointError(f"'{run_dir}' is not a bigjax run dir (no config.yaml in it)")
        cfg = load_config(path, [f"run.dir={os.path.abspath(run_dir)}", "checkpoint.resume=must",
                                 *(overrides or [])])
        return cls(cfg, saved=True)

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        """(label name, probability) of the most likely class for each text."""
        from bigjax.data.classification import load_label_names
        from bigjax.predict import predict_texts, probs_fn
        if self.cfg.task.name != "classification":
            raise ConfigError(f"predict needs a classification run; this one has "
                              f"task.name={self.cfg.task.name}")
        state = self.init_state()
        if not hasattr(self, "_probs_fn"):
            fn = with_activation_sharding(probs_fn(self.spec), self.mesh, self.cfg.sharding.rules)
            self._probs_fn = jit_eval_step(fn, self.shardings, self.batch_sharding)
        names = load_label_names(self.run_dir) or [str(i) for i in range(self.cfg.task.num_labels)]
        return predict_texts(self._probs_fn, state.params, state.model_state, self._tokenizer(),
                             list(texts), names, seq_len=self.cfg.train.seq_len,
                             batch_size=self.cfg.train.batch_size,
                             multiple=mesh_lib.batch_divisor(self.cfg.sharding.rules, self.mesh),
                             batch_sharding=self.batch_sharding)

    # ---- training ----------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}): aborted "
                                    f"without a new checkpoint")
        self._stop_requested = True
        self.stop_signal = signum
        print(f"bigjax: {signal.Signals(signum).name} received: finishing this step, then saving "
              f"a checkpoint (a second signal aborts at once)", flush=True)

    def _install_signal_handlers(self) -> dict:
        """SIGTERM/SIGINT stop the loop after the current step with a checkpoint.

        On several processes SIGTERM stays with JAX's preemption notifier, whose sync point
        (`reached_preemption`) makes every process save the same step; SIGINT is forwarded to it.
        """
        if jax.process_count() == 1:
            return {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        forward = lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM)
        return {signal.SIGINT: signal.signal(signal.SIGINT, forward)}

    def train(self) -> dict[str, float]:
        cfg, t = self.cfg, self.cfg.train
        state = self.init_state()
        self.checkpointer.check_writable()  # fail now, not at the first save after hours of steps
        start = int(jax.device_get(state.step))
        save_config(cfg, os.path.join(self.run_dir, "config.yaml")) if jax.process_index() == 0 else None
        loader = TrainLoader(self.data.train, t.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
                             sharding=self.batch_sharding, process_index=jax.process_index(),
                             process_count=jax.process_count(), workers=cfg.data.workers,
                             threads=cfg.data.threads)
        if self._data_state:
            loader.restore(self._data_state)
        report = Reporter(self.run_dir, t.steps, start, t.progress)
        if start:
            report.message(f"resumed from step {start} ({self.checkpointer.directory})")
        report.message(f"model: {self.n_params / 1e6:.2f}M parameters, mesh {dict(self.mesh.shape)}, "
                       f"{len(self.data.train)} training examples")
        tokens_per_step = t.batch_size * t.seq_len
        flops_tok = flops_per_token(cfg, self.n_params)
        peak = peak_flops(cfg)
        last: dict[str, float] = {}
        if start == 0 and start < t.steps:
            last = self.evaluate()
            report.log({"step": 0, **last})
            report.message(f"step 0: eval_loss {last['eval_loss']:.4f}")
            self.checkpointer.check_metrics(last)  # a wrong keep_best_metric fails now, not later

        handlers = self._install_signal_handlers()
        pending: tuple[int, Any] | None = None
        t_last, step_last = time.perf_counter(), start
        preempted = False
        try:
            step = start
            while step < t.steps:
                batch = next(loader)
                state, metrics = self.train_step(state, batch)
                step += 1
                if step == start + 1:  # compiled and dispatched: from here on, steps are progress
                    self._watchdog = distributed.hang_watchdog(cfg.distributed.hang_timeout_s)
                self._watchdog.beat(f"step {step}")
                if pending is not None:  # the previous logged step: fetched while this one runs
                    t_last, step_last = self._log(report, pending, t_last, step_last,
                                                  tokens_per_step, flops_tok, peak)
                    pending = None
                if step % t.log_every == 0 or step == t.steps:
                    pending = (step, metrics)
                self.state = state
                evaluated = bool(t.eval_every and step % t.eval_every == 0 and step < t.steps)
                if evaluated:
                    last = self.evaluate()
                    report.log({"step": step, **last})
                    report.message(f"step {step}: eval_loss {last['eval_loss']:.4f}")
                every = cfg.checkpoint.every
                # keep_best ranks evaluated checkpoints, so every evaluation gets one
                best = evaluated and cfg.checkpoint.keep_best_metric
                if ((every and step % every == 0) or best) and step < t.steps:
                    self.checkpointer.save(step, state, loader.state(), self._meta(step),
                                           metrics=last if evaluated else None, force=True)
                if self._stop_requested or self.checkpointer.reached_preemption(step):
                    preempted = step < t.steps
                    break
            if pending is not None:
                self._log(report, pending, t_last, step_last, tokens_per_step, flops_tok, peak)
            if not preempted:
                last = self.evaluate()
                report.log({"step": step, **last})
                # every metric of the task (perplexity for LMs, accuracy and macro F1 for classifiers)
                report.message(f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in last.items()))
            self._watchdog.stop()  # a final save may take long on slow storage
            if step not in self.checkpointer.all_steps():
                self.checkpointer.save(step, state, loader.state(), self._meta(step),
                                       metrics=None if preempted else last, force=True)
            self.checkpointer.wait()
            if preempted:
                report.message(f"stopped by signal at step {step}; checkpoint complete in "
                               f"{self.checkpointer.directory}/{step}; run the same command to resume")
        except (CheckpointError, KeyboardInterrupt):
            raise  # a failed write, or a second signal: nothing in flight worth waiting for
        except Exception:
            try:  # a save in flight is still good: let it complete before the error ends the run
                self.checkpointer.wait()
            except CheckpointError:
                pass
            raise
        finally:
            self._watchdog.stop()
            for s, h in handlers.items():
                signal.signal(s, h)
            report.close()
            loader.close()  # stops data.workers processes and frees their shared memory
        if jax.process_index() == 0:
            plot_losses(self.run_dir)
        self.preempted = preempted
        return last

    def _log(self, report: Reporter, pending, t_last: float, step_last: int, tokens_per_step: int,
             flops_tok: float, peak: float) -> tuple[float, int]:
        step, metrics = pending
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        dt = (now - t_last) / max(step - step_last, 1)
        w = max(m.pop("weight"), 1e-9)
        finals = self.task.finalize({**m, "weight": w})
        row = {"step": step, **finals, "grad_norm": m["grad_norm"], "lr": m["lr"],
               "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
               "tokens_per_s_per_device": tokens_per_step / dt / jax.device_count()}
        if peak > 0:
            row["mfu"] = flops_tok * row["tokens_per_s"] / peak
        report.log(row)
        report.progress(step, {"loss": f"{finals['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"})
        return now, step
