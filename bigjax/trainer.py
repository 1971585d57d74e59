"""The loop: builds everything from the config, then trains with progress, logging, evaluation,
checkpoint cadence and signal handling. The Python API (`Trainer(...).train()`) and the CLI share it.

The host never waits for the device to log: metrics of a logged step are fetched only after the
next step has been dispatched (nanodo's trick). Nor does the device wait for the host's input:
right after a step is dispatched the loader reads the next batches and starts their transfer, so
each step's batch is on the devices before the step is dispatched.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import jax

from bigjax import distributed, finetune, registry
from bigjax import mesh as mesh_lib
from bigjax.build import build
from bigjax.checkpoint import Checkpointer, abstract_with_shardings, unwritable_reason
from bigjax.compress import int8_components, is_compressed, load_state as load_int8_state
from bigjax.config import (Config, eval_batch_size, example_len, load_config, save_config,
                           to_dict)
from bigjax.data.loader import eval_batches
from bigjax.data.pipeline import build_data
from bigjax.data.stream_loader import make_train_loader
from bigjax.data.types import Data
from bigjax.errors import CheckpointError, ConfigError
from bigjax.paths import run_path, run_str
from bigjax.perf import flops_per_token, mfu, peak
from bigjax.report import Reporter, plot_losses, stage
from bigjax.resolve import resolve
from bigjax.state import TrainState
from bigjax.tasks import head

__version__ = "0.1.0"
PREFETCH = 2  # batches read and put on the devices ahead of the step that consumes them


def prepare_run_dir(path: str) -> str:
    """The run dir as the string everything else joins onto: absolute if local, `file://`
    stripped, `gs://` / `s3://` kept (bigjax.paths)."""
    reason = unwritable_reason(run_path(path))
    if reason:
        raise ConfigError(f"run.dir '{path}' is not writable: {reason}")
    return run_str(path)


class Trainer:
    """`Trainer(config_or_path, overrides).train()`; `.evaluate()` returns validation metrics."""

    def __init__(self, config: Config | str | os.PathLike | None = None,
                 overrides: list[str] | None = None, *, resolved: bool = False):
        """`resolved`: the config is a run's own config.yaml (`from_run`): every derived size is
        in it, so it is not resolved again (an `init.from: hf:` source may be gone) and the data
        is read only on first use (`predict` needs the saved tokenizer, not the training files)."""
        cfg = config if isinstance(config, Config) else load_config(config, overrides)
        distributed.initialize(cfg.distributed)
        self.mesh = mesh_lib.make_mesh(cfg.mesh)
        mesh_lib.check_batch(cfg.train, cfg.sharding.rules, self.mesh)  # before reading any data
        self.run_dir = prepare_run_dir(cfg.run.dir)
        self._data = None
        if not resolved:
            stage("reading the data and preparing the tokenizer", cfg.train.progress)
            self._data = build_data(cfg, self.run_dir)  # bad data fails here
        self.cfg = cfg if resolved else resolve(cfg, self._data)
        self.parts = build(self.cfg, self.mesh)
        # a compressed run (`bigjax compress`): int8 weights, dequantised inside the jitted steps
        self.int8 = resolved and is_compressed(self.run_dir)
        if self.int8:
            self.parts = int8_components(self.parts)
        self.checkpointer: Checkpointer | None = None
        self.state: TrainState | None = None
        self._stop_requested = False
        self.stop_signal: int | None = None  # the signal that stopped train() early, if any
        self.preempted = False
        self._watchdog = distributed.hang_watchdog(0)  # armed by train() after its first step

    @property
    def data(self) -> Data:
        """Train and eval sources and the tokenizer."""
        if self._data is None:
            self._data = build_data(self.cfg, self.run_dir)
        return self._data

    @property
    def n_params(self) -> int:
        return self.parts.n_params

    def _tokenizer(self):
        own = run_path(self.run_dir) / "tokenizer"
        if self._data is None and own.is_dir():  # what training saved (or was given)
            from bigjax.data.tokenizer import load_tokenizer
            return load_tokenizer(own)
        return self.data.tokenizer

    # ---- state -------------------------------------------------------------------------------
    def _meta(self, step: int, evaluation: dict[str, float] | None = None) -> dict[str, Any]:
        meta = {"step": step, "config": to_dict(self.cfg), "bigjax_version": __version__,
                "mesh": dict(self.mesh.shape), "process_count": jax.process_count()}
        if evaluation is not None:  # these weights' metrics: `compress` reports them, not re-run
            scored, total = self.eval_coverage
            meta["evaluation"] = {"metrics": evaluation, "examples": scored, "of": total}
        if finetune.is_lora(self.cfg):  # the base the adapters belong to (bigjax.finetune)
            meta["lora_base"] = {"source": self.cfg.init.from_, "fingerprint": self._base_print}
        return meta

    def _save(self, step: int, state: TrainState, data_state: dict,
              metrics: dict[str, float] | None = None, **kw) -> None:
        self.checkpointer.save(step, finetune.stored(self.cfg, state, self._saved_paths),
                               data_state, self._meta(step, metrics), metrics=metrics, **kw)

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
        lora = finetune.is_lora(self.cfg)
        self._saved_paths = finetune.saved_paths(self.cfg, self.parts.abstract.params)
        if policy != "never":
            target = finetune.stored(self.cfg, abstract_with_shardings(
                self.parts.abstract, self.parts.shardings), self._saved_paths)
            restored = ckpt.restore_latest(target, to_dict(self.cfg))
        # each process chose from its own view of the checkpoints
        distributed.agree("resume_step", str(restored.step if restored else 0),
                          self.cfg.distributed.timeout_s)
        if lora:  # the frozen base comes from init.from every time; checkpoints lack it
            base = finetune.with_base(self.cfg, self.parts.init_state())
            self._base_print = finetune.fingerprint(base.params, self._saved_paths)
            if restored is not None:
                finetune.check_base(restored.meta, self._base_print, self.cfg.init.from_,
                                    f"checkpoint step {restored.step} in {ckpt.directory}")
                return finetune.restored_onto(base, restored.state), restored.data_state
        if restored is not None:
            return restored.state, restored.data_state
        if policy == "must":
            raise CheckpointError(
                f"checkpoint.resume=must but {ckpt.directory} holds no checkpoint")
        if lora:
            return base, None
        state = self.parts.init_state()
        if self.cfg.init.from_:
            from bigjax.init_from import load_init_model_state, load_init_params
            params = load_init_params(self.cfg, self.cfg.init.from_, state.params)
            model_state = load_init_model_state(self.cfg, self.cfg.init.from_, state.model_state)
            # The optimizer state was built from the fresh params; adam's moments are zeros either
            # way, so only the params (and BatchNorm statistics) change.
            state = state.replace(params=params, model_state=model_state)
        return state, None

    def init_state(self) -> TrainState:
        if self.state is None and self.int8:
            self.state = load_int8_state(self.run_dir, self.parts)
        if self.state is None:
            self.checkpointer = self.checkpointer or Checkpointer(self.run_dir, self.cfg.checkpoint)
            self.state, self._data_state = self._restore_or_init()
        return self.state

    def _host_batch(self):
        """The task's host-side batch edit (tasks.Task), in a single-process run only: with
        several, each would decide on its own rows and the processes could run different
        programs."""
        return getattr(self.parts.task, "host_batch", None) if jax.process_count() == 1 else None

    # ---- evaluation --------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Validation metrics over the eval split, or its first `train.eval_batches` batches
        (padding rows carry no weight); `eval_coverage` says how many examples were scored."""
        state = self.init_state()
        sums: dict[str, float] = {}
        batch = eval_batch_size(self.cfg)  # packed classification: texts of about a row's tokens
        limit = self.cfg.train.eval_batches
        total = len(self.data.eval)
        self.eval_coverage = (min(total, limit * batch) if limit else total, total)
        batches = eval_batches(self.data.eval, batch, sharding=self.parts.batch_sharding,
                               process_index=jax.process_index(),
                               process_count=jax.process_count(), limit=limit,
                               host_batch=self._host_batch())
        pending = []
        for batch in batches:
            pending.append(self.parts.eval_step(state.params, state.model_state, batch))
        for i, stats in enumerate(pending):  # fetched in order: each one is progress
            for k, v in jax.device_get(stats).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            self._watchdog.beat(f"evaluation batch {i + 1}")
        return {f"eval_{k}": v for k, v in self.parts.task.finalize(sums).items()}

    # ---- a finished run ------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, overrides: list[str] | None = None) -> "Trainer":
        """The trainer of an existing run, restoring its latest checkpoint (eval, predict)."""
        path = run_path(run_dir) / "config.yaml"
        if not path.is_file():
            raise CheckpointError(f"'{run_dir}' is not a bigjax run dir (no config.yaml in it)")
        cfg = load_config(path, [f"run.dir={run_str(run_dir)}", "checkpoint.resume=must",
                                 *(overrides or [])], saved=True)
        return cls(cfg, resolved=True)

    def predict(self, texts: list) -> list[tuple[str, float]]:
        """(label name, probability) of the most likely class for each text; for an image
        classifier, each image: a path or an H x W (x C) array of raw pixels (0..255)."""
        from bigjax.data.classification import load_label_names
        from bigjax.predict import predict_texts, probs_fn
        if registry.task(self.cfg.task.name).data == "images":
            return self._predict_images(list(texts))
        if head(self.cfg) != "classification":
            raise ConfigError(f"predict needs a classification run; this one has "
                              f"task.name={self.cfg.task.name}")
        state = self.init_state()
        if not hasattr(self, "_probs_fn"):
            self._probs_fn = self.parts.jit_eval(probs_fn(self.parts.spec))
        names = load_label_names(self.run_dir) or [str(i) for i in range(self.cfg.task.num_labels)]
        return predict_texts(self._probs_fn, state.params, state.model_state, self._tokenizer(),
                             list(texts), names, seq_len=example_len(self.cfg),
                             batch_size=self.cfg.train.batch_size,
                             multiple=mesh_lib.batch_divisor(self.cfg.sharding.rules, self.mesh),
                             batch_sharding=self.parts.batch_sharding)

    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: tuple[str, ...] = (),
                 stream=None) -> list:
        """Completions of a decoder run (bigjax/generate.py: `Completion` per prompt, in order):
        greedy at temperature 0, else sampled; `stream(text)` gets one prompt's text as it
        comes. Compiled once per bucket of prompt and output lengths."""
        from bigjax.generate import Generator
        state = self.init_state()
        if getattr(self, "_generator", None) is None:
            self._generator = Generator.from_components(self.parts, state.params,
                                                        state.model_state, self._tokenizer())
        # training donates the state every step: the generator reads the current one
        self._generator.params, self._generator.model_state = state.params, state.model_state
        return self._generator.generate(prompts, max_new_tokens, temperature, top_k, top_p, seed,
                                        stop, stream)

    def _predict_images(self, items: list) -> list[tuple[str, float]]:
        from bigjax.data.images import load_meta
        from bigjax.predict import image_probs_fn, predict_images
        meta = load_meta(self.run_dir)
        if meta is None:
            raise CheckpointError(f"{self.run_dir} has no image_data.json (class names and "
                                  "normalisation, written by training); train with this bigjax")
        state = self.init_state()
        if not hasattr(self, "_image_probs_fn"):
            self._image_probs_fn = self.parts.jit_eval(image_probs_fn(self.parts.spec))
        return predict_images(self._image_probs_fn, state.params, state.model_state, items, meta,
                              batch_size=self.cfg.train.batch_size,
                              multiple=mesh_lib.batch_divisor(self.cfg.sharding.rules, self.mesh),
                              batch_sharding=self.parts.batch_sharding)

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

    def _evaluate_and_log(self, report: Reporter, step: int, every_metric: bool) -> dict[str, float]:
        """Evaluate, log the row, print it; a partial evaluation (`train.eval_batches`) says how
        many of the split's examples it scored, in the row and on the line."""
        metrics = self.evaluate()
        scored, total = self.eval_coverage
        partial = {"eval_examples": scored, "eval_split_examples": total} if scored < total else {}
        report.log({"step": step, **metrics, **partial})
        # every metric of the task (perplexity for LMs, accuracy and macro F1 for classifiers)
        shown = metrics if every_metric else {"eval_loss": metrics["eval_loss"]}
        note = f" (partial: {scored} of {total} validation examples)" if partial else ""
        report.message(f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in shown.items()) + note)
        if self.cfg.train.sample_prompts:  # what the model writes so far
            from bigjax.generate import write_samples
            samples = self.generate(self.cfg.train.sample_prompts, self.cfg.train.sample_new_tokens)
            if report.active:
                write_samples(self.run_dir, step, samples, report.tb)
        return metrics

    def train(self) -> dict[str, float]:
        cfg, t = self.cfg, self.cfg.train
        if self.int8:
            raise ConfigError(f"{self.run_dir} is an int8-compressed run (bigjax compress): eval, "
                              "predict and generate use it; train its source run instead")
        stage("restoring or initialising the train state", t.progress)
        state = self.init_state()
        self.checkpointer.check_writable()  # fail now, not at the first save after hours of steps
        start = int(jax.device_get(state.step))
        save_config(cfg, run_path(self.run_dir) / "config.yaml") if jax.process_index() == 0 else None
        loader = make_train_loader(
            self.data.train, t.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
            sharding=self.parts.batch_sharding, process_index=jax.process_index(),
            process_count=jax.process_count(), workers=cfg.data.workers,
            threads=cfg.data.threads, prefetch=PREFETCH, host_batch=self._host_batch())
        if self._data_state:
            loader.restore(self._data_state)
        report = Reporter(self.run_dir, t.steps, start, t.progress)
        if start:
            report.message(f"resumed from step {start} ({self.checkpointer.directory})")
        report.message(f"model: {self.n_params / 1e6:.2f}M parameters, mesh {dict(self.mesh.shape)}; "
                       f"data: {self.data.summary or f'{len(self.data.train)} training examples'}")
        for line in self.parts.rules.lines:  # what each per-parameter rule matched
            report.message(line)
        tokens_per_step = t.batch_size * t.seq_len
        flops_tok = flops_per_token(cfg, self.n_params)
        peak_info = peak(cfg)
        peak_total = peak_info.total
        report.message(f"MFU against {peak_info.source}" if peak_total > 0 else
                       f"MFU not reported: {peak_info.source}")
        last: dict[str, float] = {}
        # step 0 starts the curve of periodic evaluations; with eval_every 0 only the final one
        # counts (a MiniLM finetune's full split: ~15 s), unless keep_best needs its metric now
        if start == 0 and start < t.steps and (t.eval_every or cfg.checkpoint.keep_best_metric):
            report.stage("evaluating step 0 (compiling the eval step)")
            last = self._evaluate_and_log(report, 0, every_metric=False)
            self.checkpointer.check_metrics(last)  # a wrong keep_best_metric fails now, not later

        handlers = self._install_signal_handlers()
        pending: tuple[int, Any, dict] | None = None
        t_last, step_last = time.perf_counter(), start
        preempted = False
        try:
            step = start
            report.stage("compiling the train step")
            while step < t.steps:
                batch = next(loader)
                state, metrics = self.parts.train_step(state, batch)
                step += 1
                if step < t.steps:  # while the device computes: the next batches to the devices
                    loader.prefetch()
                if step == start + 1:  # compiled and dispatched: from here on, steps are progress
                    self._watchdog = distributed.hang_watchdog(cfg.distributed.hang_timeout_s)
                    report.stage("training")
                self._watchdog.beat(f"step {step}")
                if pending is not None:  # the previous logged step: fetched while this one runs
                    t_last, step_last = self._log(report, pending, t_last, step_last,
                                                  tokens_per_step, flops_tok, peak_total)
                    pending = None
                if step % t.log_every == 0 or step == t.steps:
                    pending = (step, metrics, loader.metrics())  # counts of this step's batches
                self.state = state
                evaluated = bool(t.eval_every and step % t.eval_every == 0 and step < t.steps)
                if evaluated:
                    last = self._evaluate_and_log(report, step, every_metric=False)
                every = cfg.checkpoint.every
                # keep_best ranks evaluated checkpoints, so every evaluation gets one
                best = evaluated and cfg.checkpoint.keep_best_metric
                if ((every and step % every == 0) or best) and step < t.steps:
                    with self._watchdog.holding(f"the checkpoint of step {step}"):
                        self._save(step, state, loader.state(),
                                   metrics=last if evaluated else None, force=True)
                if self._stop_requested or self.checkpointer.reached_preemption(step):
                    preempted = step < t.steps
                    break
            if pending is not None:
                self._log(report, pending, t_last, step_last, tokens_per_step, flops_tok,
                          peak_total)
            if not preempted:
                last = self._evaluate_and_log(report, step, every_metric=True)
            self._watchdog.stop()  # a final save may take long on slow storage
            if step not in self.checkpointer.all_steps():
                self._save(step, state, loader.state(), metrics=None if preempted else last,
                           force=True)
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
        step, metrics, loader_counts = pending
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        dt = (now - t_last) / max(step - step_last, 1)
        w = max(m.pop("weight"), 1e-9)
        finals = self.parts.task.finalize({**m, "weight": w})
        row = {"step": step, **finals, "grad_norm": m["grad_norm"], "lr": m["lr"],
               "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
               "tokens_per_s_per_device": tokens_per_step / dt / jax.device_count()}
        if peak > 0:  # at most 1: above it, the peak was measured low (a busy CPU)
            row["mfu"] = mfu(flops_tok * row["tokens_per_s"], peak)
        row.update(loader_counts)  # a mixture's tokens per source, up to this step
        report.log(row)
        report.progress(step, {"loss": f"{finals['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"})
        return now, step
