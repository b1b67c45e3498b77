"""A stack of pre-LN transformer encoder blocks, used as a feature extractor (as BERT is).

Input [B, T, D] (D = model dim, taken from the input); a learned position
embedding is added before the first block, and a final LayerNorm follows the last.
Dropout (when `dropout_rate > 0` and `train`) is applied to the embedded input,
the attention weights, and the attention and MLP outputs before each residual add.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from chainjax.errors import ConfigError
from chainjax.stages import init as init_lib

POOLS = ("none", "mean", "first")

_gelu = functools.partial(jax.nn.gelu, approximate=False)  # the erf form BERT uses


def _fold(key: jax.Array | None, i: int) -> jax.Array | None:
  """A distinct dropout key for layer `i`, or None when there is no key."""
  return None if key is None else jax.random.fold_in(key, i)


class EncoderBlock(nnx.Module):
  """x + Dropout(MHA(LN(x))), then x + Dropout(MLP(LN(x))) with a gelu MLP."""

  def __init__(self, dim: int, *, num_heads: int, mlp_dim: int, dropout_rate: float, rngs: nnx.Rngs,
               kernel_init: init_lib.Initializer | None = None):
    self.dropout_rate = dropout_rate
    init = init_lib.init_kwargs(kernel_init)  # q, k, v, out and both MLP kernels
    self.attn_norm = nnx.LayerNorm(dim, rngs=rngs)
    # keep_rngs=False: the dropout key comes with each call instead of living in the
    # module. broadcast_dropout=False: Flax's default shares one attention-dropout
    # mask across the batch and heads; BERT draws one per example and head.
    self.attn = nnx.MultiHeadAttention(num_heads=num_heads, in_features=dim, dropout_rate=dropout_rate,
                                       broadcast_dropout=False, decode=False, keep_rngs=False, **init, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, mlp_dim, **init, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_dim, dim, **init, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> jax.Array:
    stochastic = train and self.dropout_rate > 0
    # MultiHeadAttention draws its key from an RngStream (it does not take a raw key),
    # so wrap this call's key in a fresh, local one.
    attn_rngs = nnx.RngStream(_fold(key, 0), tag="dropout") if stochastic else None
    y = self.attn(self.attn_norm(x), deterministic=not stochastic, rngs=attn_rngs)
    x = x + self.dropout(y, deterministic=not stochastic, rngs=_fold(key, 1))
    y = self.mlp_out(_gelu(self.mlp_in(self.mlp_norm(x))))
    return x + self.dropout(y, deterministic=not stochastic, rngs=_fold(key, 2))


class Transformer(nnx.Module):
  """Position embedding, `num_layers` pre-LN encoder blocks, final LayerNorm, then `pool`.

  `kernel_init` (None = Flax's defaults) sets every attention and MLP kernel; the
  position embedding keeps its BERT init N(0, 0.02^2), since it is an additive bias
  on the input rather than a kernel with a fan-in.
  """

  def __init__(self, dim: int, *, num_layers: int, num_heads: int, mlp_dim: int, dropout_rate: float, pool: str,
               max_len: int, rngs: nnx.Rngs, kernel_init: init_lib.Initializer | None = None):
    self.pool = pool
    self.dropout_rate = dropout_rate
    self.position_embedding = nnx.Param(nnx.initializers.normal(stddev=0.02)(rngs.params(), (max_len, dim)))
    self.dropout = nnx.Dropout(dropout_rate)
    self.blocks = nnx.List([
        EncoderBlock(dim, num_heads=num_heads, mlp_dim=mlp_dim, dropout_rate=dropout_rate, rngs=rngs,
                     kernel_init=kernel_init)
        for _ in range(num_layers)
    ])
    self.final_norm = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> jax.Array:
    stochastic = train and self.dropout_rate > 0
    if stochastic and key is None:
      raise ValueError("transformer stage: train=True with dropout_rate > 0 needs a dropout `key`")
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      x = x.astype(jnp.float32)
    x = x + self.position_embedding[: x.shape[-2]]  # [B, T, D]
    x = self.dropout(x, deterministic=not stochastic, rngs=_fold(key, 0))
    for i, block in enumerate(self.blocks):
      x = block(x, train=train, key=_fold(key, i + 1))
    x = self.final_norm(x)
    if self.pool == "mean":
      return x.mean(axis=-2)  # [B, D]
    if self.pool == "first":
      return x[..., 0, :]  # [B, D]
    return x


def build(cfg, in_shape: tuple[int, ...], in_dtype, *, rngs: nnx.Rngs, path: str) -> Transformer:
  """The encoder of a validated `transformer` stage config; the input must be [T, D] per example."""
  del in_dtype  # integer inputs are cast to float32 (put an embedding stage first for tokens)
  if len(in_shape) < 2:
    raise ConfigError(f"{path}.type",
                      f"transformer needs a per-example input [T, D] (rank >= 2), got shape {in_shape}")
  length, dim = in_shape[-2:]
  if length > cfg.max_len:
    raise ConfigError(f"{path}.max_len", f"input length {length} exceeds max_len={cfg.max_len}")
  if dim % cfg.num_heads:
    raise ConfigError(f"{path}.num_heads", f"model dim {dim} (the input's last axis) is not divisible by "
                      f"num_heads={cfg.num_heads}")
  return Transformer(dim, num_layers=cfg.num_layers, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
                     dropout_rate=cfg.dropout_rate, pool=cfg.pool, max_len=cfg.max_len, rngs=rngs,
                     kernel_init=init_lib.kernel_init(cfg.init))
