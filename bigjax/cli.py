"""`bigjax train | eval | ...`: argument parsing only; errors print as one line with exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from bigjax.errors import BigjaxError

TRAIN_HELP = """\
Train a model from a YAML config.

  bigjax train configs/gpt_tiny.yaml
  bigjax train configs/gpt_tiny.yaml train.steps=50 run.dir=runs/try mesh.fsdp=2

Overrides are key.sub=value pairs, checked against the config schema (README: "Config keys").
Running the same command again with the same run.dir resumes from its latest checkpoint.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bigjax", description="JAX/Flax training for large models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tr = sub.add_parser("train", help="train from a config", description=TRAIN_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("config", help="YAML config file")
    tr.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return p


def _train(args) -> int:
    from bigjax.trainer import Trainer
    trainer = Trainer(args.config, args.overrides)
    metrics = trainer.train()
    if metrics:
        print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
    return 0


COMMANDS = {"train": _train}


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BigjaxError as e:
        print(f"bigjax: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as e:
        print(f"bigjax: interrupted: {e}", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    main()
