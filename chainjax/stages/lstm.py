"""An LSTM stage over the second-to-last axis: [B, ..., T, F_in] -> [B, ..., F] or [B, ..., T, F]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from chainjax.errors import ConfigError
from chainjax.stages import init as init_lib

OUTPUTS = ("last", "sequence")


class LSTM(nnx.Module):
  """A unidirectional LSTM (Flax default inits: lecun-normal input, orthogonal recurrent kernel).

  `kernel_init` sets the input kernel [F_in, 4F] and `recurrent_kernel_init` the
  recurrent kernel [F, 4F] (the four gates side by side); None keeps Flax's default.
  """

  def __init__(self, in_features: int, *, features: int, output: str, rngs: nnx.Rngs,
               kernel_init: init_lib.Initializer | None = None,
               recurrent_kernel_init: init_lib.Initializer | None = None):
    self.features = features
    self.output = output
    # rngs=False: the RNN keeps no RNG stream (it would only seed the carry, which
    # we set to zeros ourselves), so the module holds parameters only.
    cell = nnx.OptimizedLSTMCell(in_features, features, **init_lib.init_kwargs(kernel_init),
                                 **init_lib.init_kwargs(recurrent_kernel_init, "recurrent_kernel_init"), rngs=rngs)
    self.rnn = nnx.RNN(cell, return_carry=True, rngs=False)

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> jax.Array:
    del train, key  # no dropout or batch statistics in this stage
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      x = x.astype(jnp.float32)
    zeros = jnp.zeros(x.shape[:-2] + (self.features,), x.dtype)
    (_, h_last), h_seq = self.rnn(x, initial_carry=(zeros, zeros))  # carry is (c, h)
    return h_last if self.output == "last" else h_seq


def build(cfg, in_shape: tuple[int, ...], in_dtype, *, rngs: nnx.Rngs, path: str) -> LSTM:
  """The LSTM of a validated `lstm` stage config; the input must be [..., T, F]."""
  del in_dtype  # integer inputs are cast to float32
  if len(in_shape) < 2:
    raise ConfigError(f"{path}.type",
                      f"lstm needs a per-example input [T, F] (rank >= 2), got shape {in_shape}; "
                      "put an embedding stage first for tokens")
  return LSTM(in_shape[-1], features=cfg.features, output=cfg.output, rngs=rngs,
              kernel_init=init_lib.kernel_init(cfg.init),
              recurrent_kernel_init=init_lib.kernel_init(cfg.recurrent_init))
