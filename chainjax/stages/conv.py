"""A small CNN stage: 'SAME' convolutions, each with optional BatchNorm, relu and 2x2 pooling.

Any axes between the batch axis and [H, W, C] (e.g. the k images of one example)
are folded into the batch, so the same CNN is applied to every image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from chainjax.errors import ConfigError
from chainjax.stages import init as init_lib

POOLS = ("max", "avg", "none")
NORMS = ("none", "batch")


class ConvNet(nnx.Module):
  """Conv(kernel_size, 'SAME') -> [BatchNorm] -> relu -> [2x2 pool] per entry of `features`."""

  def __init__(self, in_channels: int, *, features: tuple[int, ...], kernel_size: int, pool: str, norm: str,
               rngs: nnx.Rngs, kernel_init: init_lib.Initializer | None = None):
    self.pool = pool
    widths = (in_channels,) + tuple(features)
    # With BatchNorm right after, a conv bias would be cancelled by the mean subtraction.
    self.convs = nnx.List([
        nnx.Conv(a, b, kernel_size=(kernel_size, kernel_size), padding="SAME", use_bias=norm == "none",
                 **init_lib.init_kwargs(kernel_init), rngs=rngs)
        for a, b in zip(widths[:-1], widths[1:])
    ])
    self.norms = nnx.List([nnx.BatchNorm(b, rngs=rngs) for b in widths[1:]] if norm == "batch" else [])

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> jax.Array:
    del key  # no dropout in this stage
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      x = x.astype(jnp.float32)
    lead = x.shape[:-3]  # [B, *items]
    x = x.reshape((-1,) + x.shape[-3:])  # [B * items, H, W, C]
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if self.norms:
        x = self.norms[i](x, use_running_average=not train)
      x = jax.nn.relu(x)
      if self.pool == "max":
        x = max_pool_2x2(x) if train else nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
      elif self.pool == "avg":
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
    return x.reshape(lead + x.shape[1:])  # [B, *items, H', W', C']


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2, 'VALID' (an odd last row or column is dropped) of [N, H, W, C], as a reshape
  and a max over the two window axes.

  The same values as `nnx.max_pool` (a max is exact), and the same gradient wherever a window's maximum is
  unique (a tie splits the gradient evenly where `max_pool`'s gives it to one element; after a relu the
  usual tie is between zeros, whose gradient the relu stops anyway). Why: `max_pool` lowers to
  `reduce_window`, whose gradient is XLA's select-and-scatter, slow on CPU; this form's gradient is an
  elementwise compare and multiply (the Fashion-MNIST CNN's train step 1.37x faster on the 2-core CPU).
  Used in training; inference keeps `nnx.max_pool`, which TFLite converts to its MAX_POOL_2D.
  """
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def build(cfg, in_shape: tuple[int, ...], in_dtype, *, rngs: nnx.Rngs, path: str) -> ConvNet:
  """The CNN of a validated `conv` stage config; the input must be [..., H, W, C]."""
  del in_dtype  # integer images are cast to float32
  if len(in_shape) < 3:
    raise ConfigError(f"{path}.type",
                      f"conv needs a per-example input [..., H, W, C] (rank >= 3), got shape {in_shape}")
  height, width = in_shape[-3:-1]
  if cfg.pool != "none" and min(height, width) < 2 ** len(cfg.features):
    raise ConfigError(f"{path}.features",
                      f"{len(cfg.features)} conv layers with 2x2 pooling need H, W >= {2 ** len(cfg.features)}, "
                      f"got input shape {in_shape}")
  return ConvNet(in_shape[-1], features=tuple(cfg.features), kernel_size=cfg.kernel_size, pool=cfg.pool,
                 norm=cfg.norm, rngs=rngs, kernel_init=init_lib.kernel_init(cfg.init))
