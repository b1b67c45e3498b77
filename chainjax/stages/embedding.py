"""A token embedding stage: int tokens [B, ...] -> [B, ..., F]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chainjax.config import ConfigError


class Embedding(nnx.Module):
  """A learned table of `vocab_size` vectors of size `features`."""

  def __init__(self, *, vocab_size: int, features: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(num_embeddings=vocab_size, features=features, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> jax.Array:
    del train, key  # no dropout or batch statistics in this stage
    return self.embed(x)


def build(cfg, in_shape: tuple[int, ...], in_dtype, *, rngs: nnx.Rngs, path: str) -> Embedding:
  """The embedding of a validated `embedding` stage config; the input must hold integer tokens."""
  del in_shape  # any token layout works
  if not jnp.issubdtype(np.dtype(in_dtype), jnp.integer):
    raise ConfigError(f"{path}.type", f"embedding needs integer token inputs, got dtype {np.dtype(in_dtype)}")
  return Embedding(vocab_size=cfg.vocab_size, features=cfg.features, rngs=rngs)
