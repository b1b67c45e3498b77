"""A token embedding stage: int tokens [B, ...] -> [B, ..., F]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chainjax.errors import ConfigError
from chainjax.stages import init as init_lib


class Embedding(nnx.Module):
  """A learned table of `vocab_size` vectors of size `features`."""

  def __init__(self, *, vocab_size: int, features: int, rngs: nnx.Rngs,
               embedding_init: init_lib.Initializer | None = None):
    self.embed = nnx.Embed(num_embeddings=vocab_size, features=features,
                           **init_lib.init_kwargs(embedding_init, "embedding_init"), rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> jax.Array:
    del train, key  # no dropout or batch statistics in this stage
    return self.embed(x)


def build(cfg, in_shape: tuple[int, ...], in_dtype, *, rngs: nnx.Rngs, path: str) -> Embedding:
  """The embedding of a validated `embedding` stage config; the input must hold integer tokens."""
  del in_shape  # any token layout works
  if not jnp.issubdtype(np.dtype(in_dtype), jnp.integer):
    raise ConfigError(f"{path}.type", f"embedding needs integer token inputs, got dtype {np.dtype(in_dtype)}")
  # The table [V, F] is read by lookup, so each row is one output vector: F counts as
  # fan-in and V as fan-out, as in Flax's default (variance 1/F) and PyTorch. With
  # the Dense-of-one-hot reading (fan-in V) he/lecun would shrink with the vocabulary.
  embedding_init = init_lib.kernel_init(cfg.init, in_axis=-1, out_axis=0)
  return Embedding(vocab_size=cfg.vocab_size, features=cfg.features, rngs=rngs, embedding_init=embedding_init)
