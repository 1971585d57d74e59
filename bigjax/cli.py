"""`bigjax train | eval | ...`: argument parsing only; errors print as one line with exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from bigjax.compile_cache import enable as enable_compile_cache
from bigjax.errors import BigjaxError
from bigjax.host_memory import keep_freed_host_memory, runs_on_cpu

TRAIN_HELP = """\
Train a model from a YAML config.

  bigjax train configs/gpt_tiny.yaml
  bigjax train configs/gpt_tiny.yaml train.steps=50 run.dir=runs/try
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
    bigjax train configs/gpt_tiny.yaml train.steps=50 run.dir=runs/try2 mesh.fsdp=2

(On a CPU, XLA_FLAGS simulates devices, so a mesh of several runs here too.)

Overrides are key.sub=value pairs, checked against the config schema (README: "Config keys").
Running the same command again with the same run.dir resumes from its latest checkpoint.
"""

CONVERT_HELP = """\
Convert weights between Hugging Face format and bigjax run dirs (no PyTorch needed).

  bigjax convert hf-to-bigjax path/to/hf_model runs/imported   # then init.from=runs/imported
  bigjax convert bigjax-to-hf runs/my_run exported/             # AutoModel.from_pretrained loads it
  bigjax convert bigjax-to-hf runs/my_lora adapter/ --adapter   # PeftModel.from_pretrained loads it

A LoRA run exports its adapters merged into the base, or alone in PEFT's format (--adapter).

Reads and writes config.json + model.safetensors (BERT, GPT-2, LLaMA-style) and tokenizer files.
"""


COMPRESS_HELP = """\
Quantise the linear layers' kernels of a finished run to int8, per output channel (float32
scales); embeddings, norms and biases stay float32. OUT is a run that eval and predict use
directly (dequantising inside the compiled step). Prints size on disk and the metric change on the
run's validation split.

  bigjax compress runs/minilm_sentiment --int8 runs/minilm_sentiment_int8
  bigjax eval runs/minilm_sentiment_int8
"""


PLAN_HELP = """\
Parameters, FLOPs, per-device memory and training time of a config on N devices of a type, from
abstract shapes only (no data, no devices needed; model.vocab_size must be set).

  bigjax plan configs/gpt_tiny.yaml model.vocab_size=4096 --devices 8 --device-type h100
  bigjax plan configs/gpt_tiny.yaml model.vocab_size=4096 model.d_model=4096 model.n_layers=32 \\
    model.n_heads=32 model.d_ff=11008 train.seq_len=2048 model.max_seq_len=2048 \\
    train.batch_size=256 mesh.fsdp=8 model.remat=full --devices 64 --device-type h100 --tokens 1T

Memory per device: params, grads, optimizer state (the state's shardings on the configured mesh)
and activations (a per-layer model of what the backward pass keeps); device types: h100 h200
a100 b200 v4 v5e v5p v6e cpu (this host: measured matmul peak, RAM).
"""

BENCH_HELP = """\
Time the compiled train step of a config on random batches of its shape (no data needed; set
model.vocab_size): compile time, median/min/max step time, tokens/s, TFLOP/s, MFU, memory.

  bigjax bench configs/gpt_tiny.yaml model.vocab_size=4096 --steps 20
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    bigjax bench configs/gpt_tiny.yaml model.vocab_size=4096 mesh.fsdp=2 --json
"""


GENERATE_HELP = """\
Complete prompts with a decoder: a run dir (its latest checkpoint) or hf:DIR (a Hugging Face
GPT-2 or LLaMA-style checkpoint with its tokenizer). Greedy at temperature 0, else sampled.

  bigjax generate runs/gpt_tiny "def parse(" --max-new-tokens 40
  bigjax generate hf:models/gpt2 "Once upon a time" "The capital of France" --temperature 0.8 \\
    --top-p 0.95 --seed 1 --stop "\\n\\n" --json

One prompt streams to the terminal as it is generated; --json prints one object per prompt
({"prompt", "completion", "tokens"}), in order.
"""


def _command(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose description keeps its line breaks (its examples)."""
    return sub.add_parser(name, help=help, description=description,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _group(sub, name: str, help: str):
    """A command with subcommands of its own (`bigjax data inspect`)."""
    return sub.add_parser(name, help=help).add_subparsers(
        dest=f"{name}_command", required=True, metavar="SUBCOMMAND")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bigjax", description="JAX/Flax training for large models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tr = _command(sub, "train", "train from a config", TRAIN_HELP)
    tr.add_argument("config", help="YAML config file")
    tr.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ev = _command(sub, "eval", "metrics of a run on its whole validation split",
                  "Restore RUN_DIR's latest checkpoint and print its metrics on the whole "
                  "validation split.\n\n  bigjax eval runs/minilm_sentiment")
    ev.add_argument("run_dir", help="run directory (holds config.yaml and checkpoints/)")
    ev.add_argument("overrides", nargs="*",
                    help="key.sub=value overrides, e.g. data.eval_split=other.csv")
    pr = _command(sub, "predict", "label and probability of each text or image (classification)",
                  "Print one line per text (or image file, for an image classifier): label, "
                  "probability, input.\n\n  bigjax predict runs/minilm_sentiment \"I love this "
                  "movie!\" \"What a waste of time.\"\n  bigjax predict runs/resnet18_cifar10 "
                  "cat.png ship.jpg")
    pr.add_argument("run_dir", help="run directory of a classification run")
    pr.add_argument("texts", nargs="+", help="texts (or image files) to classify")
    _generate_parser(sub)
    ck = sub.add_parser("checkpoints", help="list the checkpoints of a run",
                        description="List a run's checkpoints: step, commit time, size, the "
                                    "metrics saved with it, complete or not.")
    ck.add_argument("run_dir", help="run directory (holds checkpoints/)")
    cv = _command(sub, "convert", "Hugging Face weights <-> bigjax run dirs", CONVERT_HELP)
    cv.add_argument("direction", choices=["hf-to-bigjax", "bigjax-to-hf"])
    cv.add_argument("src", help="HF model dir (config.json + model.safetensors) or bigjax run dir")
    cv.add_argument("out", help="new output directory")
    cv.add_argument("--adapter", action="store_true",
                    help="bigjax-to-hf of a LoRA run: the adapters alone in PEFT's format "
                         "(adapter_config.json + adapter_model.safetensors), not merged weights")
    cm = _command(sub, "compress", "int8 weights of a finished run, for eval/predict/generate",
                  COMPRESS_HELP)
    cm.add_argument("run_dir", help="a finished run (its latest checkpoint is at train.steps)")
    cm.add_argument("--int8", required=True, metavar="OUT", help="new run dir to write")
    _data_parsers(sub)
    _perf_parsers(sub)
    return p


def _generate_parser(sub) -> None:
    ge = _command(sub, "generate", "complete prompts with a decoder (run dir or hf:DIR)",
                  GENERATE_HELP)
    ge.add_argument("source", help="run directory, or hf:DIR for a Hugging Face checkpoint")
    ge.add_argument("prompts", nargs="*", help="prompts to complete")
    ge.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add (64)")
    ge.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (0)")
    ge.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0 = all)")
    ge.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = all)")
    ge.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    ge.add_argument("--stop", action="append", default=[], help="stop before this text "
                    "(repeatable)")
    ge.add_argument("--json", action="store_true", help="one JSON object per prompt")


def _perf_parsers(sub) -> None:
    pl = _command(sub, "plan", "memory, FLOPs and time of a config on N devices (no devices needed)",
                  PLAN_HELP)
    pl.add_argument("config", help="YAML config file")
    pl.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    pl.add_argument("--devices", type=int, default=0, help="number of devices (default: here)")
    pl.add_argument("--device-type", default="",
                    help="h100 h200 a100 b200 v4 v5e v5p v6e cpu (default: this machine's)")
    pl.add_argument("--tokens", default="",
                    help="tokens to train on, e.g. 1e9, 300B (default: steps x batch x seq_len)")
    pl.add_argument("--mfu", type=float, default=0.4, help="MFU assumed for the time (0.4)")
    pl.add_argument("--compile", action="store_true",
                    help="also compile the step here (needs the devices) and show XLA's memory")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    be = _command(sub, "bench", "time the compiled train step on random batches", BENCH_HELP)
    be.add_argument("config", help="YAML config file")
    be.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    be.add_argument("--steps", type=int, default=10, help="timed steps (10)")
    be.add_argument("--json", action="store_true", help="print one JSON object")


def _data_parsers(sub) -> None:
    da_sub = _group(sub, "data", "inspect the input pipeline of a config")
    ins = _command(da_sub, "inspect", "first examples after each transform, and throughput",
                   "Print the first examples after every transform (decoded back to text), "
                   "tokens per example, and the loader's examples/s and tokens/s.\n\n"
                   "  bigjax data inspect configs/gpt_tiny.yaml -n 2")
    ins.add_argument("config", help="YAML config file")
    ins.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ins.add_argument("-n", "--examples", type=int, default=3, help="examples to show per stage")
    ins.add_argument("--seconds", type=float, default=2.0, help="how long to measure throughput")
    pp = _command(da_sub, "prepare", "tokenize a file corpus once into ArrayRecord shards",
                  "Tokenize data.source (a file glob) into DIR: one ArrayRecord shard of token ids "
                  "per input file and a manifest.json (tokenizer hash, documents and tokens per "
                  "shard). A rerun skips finished shards; on a cluster each process does its "
                  "share. Then train with data.source=DIR (no tokenization).\n\n"
                  "  bigjax data prepare configs/gpt_tiny.yaml 'data.source=corpus/*.jsonl' "
                  "--out corpus_tok/")
    pp.add_argument("config", help="YAML config file")
    pp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    pp.add_argument("--out", required=True, help="output directory (created; reruns resume)")
    to_sub = _group(sub, "tokenizer", "train a byte-level BPE tokenizer")
    tt = _command(to_sub, "train", "train a byte-level BPE on text files",
                  "Train a byte-level BPE (GPT-2 style) on .txt/.jsonl/.csv/.parquet files; the "
                  "output loads with AutoTokenizer.from_pretrained and as data.tokenizer.\n\n"
                  "  bigjax tokenizer train --files 'corpus/*.txt' --vocab-size 8000 --out tok/")
    tt.add_argument("--files", nargs="+", required=True, help="files or globs")
    tt.add_argument("--vocab-size", type=int, required=True, help="at least 258")
    tt.add_argument("--out", required=True, help="new output directory")
    tt.add_argument("--text-field", default="text", help="field of JSONL/CSV/Parquet rows")
    tt.add_argument("--on-bad-rows", choices=["skip", "error"], default="skip")


def _train(args) -> int:
    from bigjax.trainer import Trainer
    trainer = Trainer(args.config, args.overrides)
    metrics = trainer.train()
    if trainer.preempted:
        # 128 + signal, as if the signal had ended the process: `bigjax train ... && next` stops
        return 128 + (trainer.stop_signal or 15)
    import jax
    if metrics and jax.process_index() == 0:  # on a cluster only process 0 prints
        print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
    return 0


def _checkpoints(args) -> int:
    from bigjax.checkpoint import format_checkpoints, list_checkpoints
    infos = list_checkpoints(args.run_dir)
    print(format_checkpoints(infos) if infos else f"no checkpoints in {args.run_dir}", flush=True)
    return 0


def _eval(args) -> int:
    from bigjax.trainer import Trainer
    # the whole split, whatever the run's in-training train.eval_batches was
    trainer = Trainer.from_run(args.run_dir, ["train.eval_batches=0", *args.overrides])
    metrics = trainer.evaluate()
    print(f"step {int(trainer.state.step)}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
          flush=True)
    return 0


def _predict(args) -> int:
    from bigjax.predict import format_predictions
    from bigjax.trainer import Trainer
    trainer = Trainer.from_run(args.run_dir)
    for line in format_predictions(args.texts, trainer.predict(args.texts)):
        print(line, flush=True)
    return 0


def _generate(args) -> int:
    from bigjax.generate import Generator, print_completions
    if args.source.startswith("hf:"):
        generate = Generator.from_hf(args.source[3:]).generate
    else:
        from bigjax.trainer import Trainer
        generate = Trainer.from_run(args.source).generate
    print_completions(generate, args.prompts, json_lines=args.json,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    return 0


def _convert(args) -> int:
    from bigjax.hf import convert
    if args.adapter and args.direction == "hf-to-bigjax":
        from bigjax.errors import ConfigError
        raise ConfigError("--adapter goes with bigjax-to-hf (a LoRA run's adapters in PEFT's "
                          "format), not hf-to-bigjax")
    if args.direction == "hf-to-bigjax":
        cfg = convert.hf_to_bigjax(args.src, args.out)
        print(f"wrote run dir {args.out} (model {cfg.model.name}, task {cfg.task.name}); "
              f"use it with init.from={args.out}", flush=True)
    elif args.adapter:
        cfg = convert.bigjax_to_hf(args.src, args.out, adapter=True)
        print(f"wrote {args.out}/adapter_config.json and adapter_model.safetensors (LoRA rank "
              f"{cfg.finetune.lora.rank}); load with peft.PeftModel.from_pretrained(base, "
              f"'{args.out}')", flush=True)
    else:
        cfg = convert.bigjax_to_hf(args.src, args.out)
        print(f"wrote {args.out}/config.json and model.safetensors ({cfg.model.name}, "
              f"task {cfg.task.name})", flush=True)
    return 0


def _compress(args) -> int:
    import json

    import jax

    from bigjax import compress
    from bigjax.errors import CheckpointError
    from bigjax.paths import run_path, write_text
    from bigjax.trainer import Trainer
    src, out = args.run_dir, args.int8
    if run_path(out).exists():
        raise CheckpointError(f"'{out}' already exists; compress into a new directory")
    if compress.is_compressed(src):
        raise CheckpointError(f"'{src}' is already an int8-compressed run")
    source = Trainer.from_run(src, ["train.eval_batches=0"])
    state = source.init_state()
    step, steps = int(jax.device_get(state.step)), source.cfg.train.steps
    if step != steps:
        raise CheckpointError(f"'{src}' is not finished: its latest checkpoint is step {step} of "
                              f"train.steps={steps}; run its training to the end first")
    # the run's own final evaluation of these weights over the whole split, if it has one
    stored = source.checkpointer.read_meta(step).get("evaluation") or {}
    if stored and stored["examples"] == stored["of"] == len(source.data.eval):
        before = stored["metrics"]
        print(f"float metrics: the run's evaluation of step {step} over all {stored['of']} "
              "validation examples (its checkpoint's meta)", flush=True)
    else:
        before = source.evaluate()
    report = compress.write_int8_run(src, out, source.cfg, step, jax.device_get(state.params),
                                     jax.device_get(state.model_state))
    after = Trainer.from_run(out, ["train.eval_batches=0"]).evaluate()
    report.update(source_checkpoint_bytes=compress.dir_size(
        run_path(src) / "checkpoints" / str(step)), metrics_before=before, metrics_after=after)
    write_text(run_path(out) / compress.MARKER, json.dumps(report, indent=1))
    mb = lambda n: f"{n / 1e6:.2f} MB"
    print(f"wrote {out}: {report['quantized_kernels']} linear kernels ({report['quantized_params']:,} "
          f"of {report['params']:,} parameters) as int8, float32 scales per output channel", flush=True)
    print(f"size on disk: {mb(report['weights_bytes'])} ({compress.WEIGHTS}); float32 parameters "
          f"{mb(report['float32_params_bytes'])} "
          f"({report['float32_params_bytes'] / report['weights_bytes']:.2f}x); source checkpoint "
          f"with optimizer state {mb(report['source_checkpoint_bytes'])}", flush=True)
    print("validation: " + " ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f} ({after[k] - before[k]:+.4f})"
                                    for k in before), flush=True)
    return 0


def _data(args) -> int:
    import tempfile

    from bigjax.config import load_config
    from bigjax.data.inspect import inspect
    from bigjax.paths import run_path
    cfg = load_config(args.config, args.overrides)
    if args.data_command == "prepare":
        return _prepare(cfg, args.out)
    if cfg.data.tokenizer or (run_path(cfg.run.dir) / "tokenizer").is_dir():
        print(inspect(cfg, cfg.run.dir, args.examples, args.seconds), flush=True)
        return 0
    with tempfile.TemporaryDirectory() as tmp:  # inspecting never writes into a run dir
        print(inspect(cfg, tmp, args.examples, args.seconds), flush=True)
    return 0


def _prepare(cfg, out: str) -> int:
    import jax

    from bigjax import distributed
    from bigjax.data.prepare import prepare
    distributed.initialize(cfg.distributed)
    done = prepare(cfg, out, jax.process_index(), jax.process_count())
    rate = done["tokens"] / max(done["seconds"], 1e-9)
    print(f"process {jax.process_index()}: {done['written']} shards written, {done['skipped']} "
          f"already done, {done['tokens']} tokens in {done['seconds']:.1f} s ({rate:.0f} tokens/s)",
          flush=True)
    if "manifest" in done:
        m = done["manifest"]
        print(f"wrote {out}/manifest.json: {len(m['shards'])} shards, {m['docs']} documents, "
              f"{m['tokens']} tokens, tokenizer {m['tokenizer']}", flush=True)
    return 0


def _tokenizer(args) -> int:
    from bigjax.data.sources import RecordReader, files_for
    from bigjax.data.tokenizer import train_bpe
    reader = RecordReader(args.on_bad_rows, (args.text_field,))
    paths = [p for pattern in args.files for p in files_for(pattern)]
    texts = [str(row[args.text_field]) for p in paths for row in reader.read(p)]
    tok = train_bpe(texts, args.vocab_size, args.out)
    print(f"wrote {args.out}: {len(tok)} tokens, trained on {len(paths)} files "
          f"({reader.stats.summary()})", flush=True)
    return 0


def _config_for_sizes(args):
    from bigjax.config import load_config
    from bigjax.resolve import resolve
    return resolve(load_config(args.config, args.overrides))  # hf: sizes; no data


def _plan(args) -> int:
    import json

    import jax

    from bigjax.perf import detect_device_type
    from bigjax.plan import format_plan, make_plan, parse_tokens
    cfg = _config_for_sizes(args)
    kind = args.device_type or detect_device_type() or ""
    plan = make_plan(cfg, args.devices or jax.device_count(), kind,
                     parse_tokens(args.tokens) if args.tokens else None, args.mfu, args.compile)
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan), flush=True)
    return 0


def _bench(args) -> int:
    import json

    import jax

    from bigjax.bench import format_bench, run_bench
    result = run_bench(_config_for_sizes(args), args.steps)
    if jax.process_index() == 0:  # on a cluster every process runs the steps, one prints
        print(json.dumps(result.to_dict()) if args.json else format_bench(result), flush=True)
    return 0


# the commands that compile steps (the others need no cache, nor jax's import time)
COMPILES = ("train", "eval", "predict", "generate", "compress")
COMMANDS = {"data": _data, "tokenizer": _tokenizer, "train": _train, "checkpoints": _checkpoints,
            "eval": _eval, "predict": _predict, "convert": _convert, "plan": _plan,
            "bench": _bench, "generate": _generate, "compress": _compress}


def main(argv: list[str] | None = None) -> None:
    # before jax starts: XLA:CPU's per-step temporaries reuse pages instead of faulting them in
    # (on accelerators they live on the device; keep the host's malloc as it is there)
    if runs_on_cpu():
        keep_freed_host_memory()
    code = run(argv)
    if code in (2, 130):
        # An error or a second signal: the trainer has already let any good save finish. Don't
        # wait for orbax's remaining threads (an unfinished tmp dir is ignored on resume), nor
        # let tensorstore print tracebacks of a failed write into closed event loops at exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides after options (`plan CONFIG --devices 8 mesh.fsdp=2`) are overrides too
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "bench":  # its compile_s times a compile, not a read of the cache
            import jax
            jax.config.update("jax_enable_compilation_cache", False)
        elif args.command in COMPILES:
            enable_compile_cache()
        return COMMANDS[args.command](args)
    except BigjaxError as e:
        print(f"bigjax: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as e:
        print(f"bigjax: interrupted: {e}", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        from bigjax.distributed import exit_if_peer_lost
        from bigjax.resume import rerun_advice
        advice = (lambda: rerun_advice(args.config, args.overrides)) if args.command == "train" \
            else None
        # on a cluster: one line and exit now, not a wait for a dead peer
        exit_if_peer_lost(e, advice)
        raise


if __name__ == "__main__":
    main()
