"""Model family `bag_of_words`: a bag-of-words text classifier.

    logits = classifier(drop(gelu(hidden(drop(mean of embed(input_ids) over the attention mask)))))

Every parameter names its logical axes (bigjax.models.layers Dense and Embed do), so the mesh
rules (`sharding.rules`) shard it like a built-in family: the table over vocab x embed, the
hidden layer over embed x mlp.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.config import Config, ModelConfig, derived, require_positive
from bigjax.errors import ConfigError
from bigjax.models import layers
from bigjax.models.layers import Dense, Embed
from bigjax.registry import register_model

NAME = "bag_of_words"


@dataclass(frozen=True)
class BagOfWordsConfig(ModelConfig):
    """`model:` keys of `name: bag_of_words`."""

    name: str = NAME
    vocab_size: int = derived(0, "vocab")  # 0 = the tokenizer's size, rounded up to 128s
    d_model: int = 64  # embedding size
    d_hidden: int = 128  # hidden layer between the pooled embedding and the classifier
    dropout: float = 0.0  # on the pooled embedding and the hidden layer, in training only
    init_std: float = 0.02  # normal init of every kernel and the embedding table

    def check(self, cfg: Config) -> None:
        require_positive({"model.d_model": self.d_model, "model.d_hidden": self.d_hidden})
        if self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size must be 0 (the tokenizer's size) or positive, "
                              f"got {self.vocab_size}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.init_std <= 0:
            raise ConfigError(f"model.init_std must be positive, got {self.init_std}")
        if not hasattr(cfg.task, "num_labels"):
            raise ConfigError(f"model.name={NAME} is a classifier: task.name={cfg.task.name} has "
                              "no task.num_labels (use classification or smoothed_classification)")


class BagOfWords(nnx.Module):
    def __init__(self, cfg: BagOfWordsConfig, num_labels: int, rngs: nnx.Rngs):
        if cfg.vocab_size < 1:
            raise ConfigError("model.vocab_size is 0: resolve the config against the data first "
                              "(the trainer does), or set model.vocab_size")
        if num_labels < 2:
            raise ConfigError(f"task.num_labels must be at least 2 for model.name={NAME}, "
                              f"got {num_labels} (0 means: count the labels in the data)")
        f32, std = jnp.float32, cfg.init_std
        self.embed = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), f32, std, rngs)
        self.hidden = Dense((cfg.d_model,), (cfg.d_hidden,), ("embed", "mlp"), use_bias=True,
                            dtype=f32, std=std, rngs=rngs)
        self.classifier = Dense((cfg.d_hidden,), (num_labels,), ("mlp", None), use_bias=True,
                                dtype=f32, std=std, rngs=rngs)
        self.rate = cfg.dropout

    def __call__(self, input_ids_BT: jax.Array, *, token_type_ids: jax.Array | None = None,
                 attention_mask: jax.Array | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """float32 logits B x num_labels; dropout only when `rngs` is given (training).
        `token_type_ids` are accepted for the classification task's call and ignored."""
        del token_type_ids
        x_BTD = self.embed(input_ids_BT)
        mask = (jnp.ones(input_ids_BT.shape, jnp.float32) if attention_mask is None
                else attention_mask.astype(jnp.float32))[..., None]
        pooled_BD = (x_BTD * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
        pooled_BD = layers.drop(pooled_BD, self.rate, rngs)
        h_BH = layers.drop(jax.nn.gelu(self.hidden(pooled_BD)), self.rate, rngs)
        return self.classifier(h_BH).astype(jnp.float32)


def create(cfg: Config, rngs: nnx.Rngs) -> BagOfWords:
    return BagOfWords(cfg.model, getattr(cfg.task, "num_labels", 0), rngs)


def flops_per_token(cfg: Config, n_params: int) -> float:
    """Training FLOPs per token: the table is a lookup and the mean pool is ~2 x d_model per
    token; the two dense layers run once per sequence, i.e. at 1/seq_len of the tokens."""
    m = cfg.model
    dense = float(n_params - m.vocab_size * m.d_model)
    return 6.0 * dense / cfg.train.seq_len + 6.0 * m.d_model


register_model(NAME, BagOfWordsConfig, create, flops_per_token=flops_per_token)
