"""Helpers for the spine tests: a tiny GPT config and a few steps run through the real step."""

from __future__ import annotations

import jax
import numpy as np

from bigjax import mesh as mesh_lib
from bigjax.build import build
from bigjax.config import load_config

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
    """The pieces the trainer builds (bigjax.build), without data or logging."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.mesh = mesh_lib.make_mesh(cfg.mesh)
        self.parts = build(cfg, self.mesh)
        self.spec, self.tx, self.shardings = self.parts.spec, self.parts.tx, self.parts.shardings
        self.abstract, self.batch_sharding = self.parts.abstract, self.parts.batch_sharding
        self.step = self.parts.train_step

    def init(self):
        return self.parts.init_state()

    def losses(self, batches) -> tuple[list[float], object]:
        state = self.init()
        losses = []
        for b in batches:
            state, m = self.step(state, jax.device_put(b, self.batch_sharding))
            losses.append(float(m["loss_sum"]) / float(m["weight"]))
        return losses, state
