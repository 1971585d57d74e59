"""A tiny encoder with BERT's call signature, so task and Trainer tests do not depend on the size
(or the progress) of the real BERT: embeddings, one tensor-parallel MLP, a masked mean pool."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.config import Config, ModelConfig, derived
from bigjax.models.layers import Dense, Embed
from bigjax.registry import register_model

NAME = "standin_encoder"


@dataclass(frozen=True)
class StandinConfig(ModelConfig):
    name: str = NAME
    vocab_size: int = derived(0, "vocab")
    d_model: int = 32
    d_ff: int = 64
    dropout: float = 0.0


class StandinEncoder(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        m, D = cfg.model, cfg.model.d_model
        self.task = cfg.task.name
        self.embed = Embed(m.vocab_size, D, ("vocab", "embed"), jnp.float32, 0.1, rngs)
        self.up = Dense((D,), (m.d_ff,), ("embed", "mlp"), use_bias=True, dtype=jnp.float32,
                        std=0.1, rngs=rngs)
        self.down = Dense((m.d_ff,), (D,), ("mlp", "embed"), use_bias=True, dtype=jnp.float32,
                          std=0.1, rngs=rngs)
        self.classifier = nnx.data(
            Dense((D,), (cfg.task.num_labels,), ("embed", None), use_bias=True,
                  dtype=jnp.float32, std=0.1, rngs=rngs)
            if self.task == "classification" else None)
        self.dropout = nnx.Dropout(m.dropout)

    def __call__(self, input_ids_BT, *, token_type_ids=None, attention_mask=None, rngs=None,
                 masked_positions=None):
        x = self.embed(input_ids_BT)
        x = x + self.down(jax.nn.gelu(self.up(x)))
        x = self.dropout(x, deterministic=rngs is None, rngs=rngs)
        if self.task == "masked_lm":
            if masked_positions is not None:
                x = jnp.take_along_axis(x, masked_positions[:, :, None], axis=1)
            return self.embed.attend(x).astype(jnp.float32)
        m = (attention_mask if attention_mask is not None
             else jnp.ones(input_ids_BT.shape)).astype(jnp.float32)[..., None]
        pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        return self.classifier(pooled).astype(jnp.float32)


register_model(NAME, StandinConfig, lambda cfg, rngs: StandinEncoder(cfg, rngs))
