"""bigjax: JAX/Flax NNX training for large models."""
