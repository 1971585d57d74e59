"""Helpers for the spine tests: a tiny GPT config and a few steps run through the real step."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding

from bigjax import mesh as mesh_lib
from bigjax.config import load_config
from bigjax.optim import make_optimizer
from bigjax.state import init_state, model_spec, state_shardings
from bigjax.step import jit_train_step, make_train_step, with_activation_sharding
from bigjax.tasks import make_task

TINY = ["model.vocab_size=64", "model.d_model=32", "model.n_heads=4", "model.d_ff=64",
        "model.n_layers=2", "model.max_seq_len=16", "train.seq_len=16", "train.batch_size=16",
        "train.steps=10", "optimizer.lr=0.01", "optimizer.weight_decay=0.1"]


def tiny_config(*overrides: str):
    return load_config(None, TINY + list(overrides))


def random_batches(cfg, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    B, T, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
    out = []
    for _ in range(n):
        # learnable: each sequence counts up from a random start with a random stride
        start, stride = rng.integers(0, V, (B, 1)), rng.integers(1, 4, (B, 1))
        tokens = ((start + stride * np.arange(T + 1)) % V).astype(np.int32)
        seg = np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                    "weights": (rng.random((B, T)) > 0.1).astype(np.float32),
                    "segment_ids": seg, "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))})
    return out


class Run:
    """The pieces the trainer builds, without data or logging."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.mesh = mesh_lib.make_mesh(cfg.mesh)
        self.tx, self.schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
        self.spec = model_spec(cfg)
        self.abstract, self.shardings = state_shardings(cfg, self.spec, self.tx, self.mesh)
        self.batch_sharding = NamedSharding(
            self.mesh, mesh_lib.batch_spec(cfg.sharding.rules, self.mesh, 2))
        step = make_train_step(self.spec, make_task(cfg), self.tx, self.schedule,
                               grad_accum=cfg.train.grad_accum, seed=cfg.seed)
        self.step = jit_train_step(with_activation_sharding(step, self.mesh, cfg.sharding.rules),
                                   self.shardings, self.batch_sharding)

    def init(self):
        return init_state(self.cfg, self.tx, self.shardings)

    def losses(self, batches) -> tuple[list[float], object]:
        state = self.init()
        losses = []
        for b in batches:
            state, m = self.step(state, jax.device_put(b, self.batch_sharding))
            losses.append(float(m["loss_sum"]) / float(m["weight"]))
        return losses, state
