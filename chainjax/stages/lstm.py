"""An LSTM stage over the second-to-last axis: [B, ..., T, F_in] -> [B, ..., F] or [B, ..., T, F].

Two implementations of one computation (Flax's `nnx.OptimizedLSTMCell`: gates i, f, g, o side by side
in the kernels' last axis, y = x W_i + (h W_h + b), i, f, o = sigmoid, g = tanh, c' = f c + i g,
h' = o tanh(c'), zero initial state) over one parameter tree, `rnn/cell/dense_i/kernel` [F_in, 4F] and
`rnn/cell/dense_h/{kernel [F, 4F], bias [4F]}` (checkpoints, pruning, PTQ and export read these paths):

* "fast" (the default): `lstm_sequence`. The input projection x W_i of all time steps is one matmul
  outside the scan, and a `jax.custom_vjp` replaces autodiff of the scan. Autodiff's backward scan
  also carries the per-step weight-gradient accumulation (a [F, 4F] and a [F_in, 4F] outer product
  and add per step) and the input's gradient; here the backward scan runs only the recurrence
  (dh -> d gates -> dh_prev = d gates W_h^T, and dc), and dW_i, dW_h, db and dx are single
  matmuls/sums over all time steps after it. Forward and backward compute in the dtype of the
  (promoted) parameters and input, as the cell does (bf16 under a bf16 compute policy); only the
  weight-gradient sums over time accumulate in float32 before the cast back.
* "scan": `nnx.RNN(cell)`, the reference. It is also what runs whenever `dense_i` or `dense_h` is
  not a plain `nnx.Linear`, i.e. after QAT (`compress/quant.py`) wrapped them, so fake quantization
  of the kernels and the inputs still applies.

Why a constructor flag and no config field: a new stage field would make every existing run's
`config.json` fail validation (stage configs are checked complete) and change its config hash.
Tests and benchmarks pick the implementation with `LSTM(..., impl=...)` or by building a chain
inside `with implementation("scan"):`.

Speed (benchmarks/lstm_step.py, which also measures why batch 16 trailed PyTorch further than batch 64):
the imdb_lstm train step (T = 256, 2 CPU cores, 1 device) is 1.90x faster with "fast" at batch 16, 1.11x at 64.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from chainjax.errors import ConfigError
from chainjax.stages import init as init_lib

OUTPUTS = ("last", "sequence")
IMPLS = ("fast", "scan")

_IMPL = contextvars.ContextVar("chainjax_lstm_impl", default="fast")


@contextlib.contextmanager
def implementation(impl: str) -> Iterator[None]:
  """LSTM stages constructed inside (without an explicit `impl`) use `impl` ("fast" or "scan")."""
  if impl not in IMPLS:
    raise ValueError(f"LSTM impl {impl!r}: allowed {', '.join(IMPLS)}")
  token = _IMPL.set(impl)
  try:
    yield
  finally:
    _IMPL.reset(token)


# --------------------------------------------------------------------------------------------
# The fast computation: time-major [T, N, F_in] inputs, zero initial state.
# --------------------------------------------------------------------------------------------


def _matmul(a: jax.Array, w: jax.Array) -> jax.Array:
  """a [..., K] @ w [K, M] (as `nnx.Linear`: contracting a's last axis with w's first)."""
  return jax.lax.dot_general(a, w, (((a.ndim - 1,), (0,)), ((), ())))


def _cell_step(xw_t, wh, b, c, h):
  """One step of `nnx.OptimizedLSTMCell` given x_t W_i: the new (c, h) and the gate activations."""
  y = xw_t + (_matmul(h, wh) + b)  # the cell's order of additions: dense_i(x) + dense_h(h)
  i, f, g, o = jnp.split(y, 4, axis=-1)
  i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
  c = f * c + i * g
  h = o * jnp.tanh(c)
  return c, h, (i, f, g, o)


def _forward(x, wi, wh, b, output: str, save: bool):
  """The LSTM over time-major x [T, N, F_in]: (output, residuals or None)."""
  n, features = x.shape[1], wh.shape[0]
  xw = _matmul(x, wi)  # [T, N, 4F]: every step's input projection in one matmul
  zeros = jnp.zeros((n, features), x.dtype)

  def step(carry, xw_t):
    c, h = carry
    c, h, gates = _cell_step(xw_t, wh, b, c, h)
    if save:
      return (c, h), (h, c) + gates
    return (c, h), (h if output == "sequence" else None)

  (_, h_last), ys = jax.lax.scan(step, (zeros, zeros), xw)
  if not save:
    return (h_last if output == "last" else ys), None
  hs = ys[0]
  return (h_last if output == "last" else hs), (x, wi, wh, ys)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lstm_time_major(x, wi, wh, b, output):
  return _forward(x, wi, wh, b, output, save=False)[0]


def _lstm_fwd(x, wi, wh, b, output):
  return _forward(x, wi, wh, b, output, save=True)


def _shift_in_zeros(a: jax.Array) -> jax.Array:
  """a[t - 1] at t, zeros at t = 0 (the state before each step; the initial state is zero)."""
  return jnp.concatenate([jnp.zeros_like(a[:1]), a[:-1]], axis=0)


def _lstm_bwd(output, residuals, ct):
  """The backward recurrence in a reverse scan; every weight and input gradient as one contraction after it."""
  x, wi, wh, (hs, cs, i, f, g, o) = residuals
  dtype = x.dtype
  c_prev = _shift_in_zeros(cs)
  wh_t = wh.T

  def step(carry, xs):
    dh_rec, dc_rec = carry  # from step t + 1: d gates W_h^T, and dc_{t+1} f_{t+1}
    dh_out, c, cp, i, f, g, o = xs
    dh = dh_rec if dh_out is None else dh_rec + dh_out
    tc = jnp.tanh(c)
    dc = dc_rec + dh * o * (1 - tc * tc)
    dy = jnp.concatenate([dc * g * i * (1 - i), dc * cp * f * (1 - f), dc * i * (1 - g * g),
                          dh * tc * o * (1 - o)], axis=-1)  # d pre-activations [N, 4F], gate order i, f, g, o
    return (_matmul(dy, wh_t), dc * f), dy  # c_t = f_t c_{t-1} + ...: dc_{t-1} gets dc_t f_t

  if output == "last":
    init, dh_outs = (ct.astype(dtype), jnp.zeros_like(ct, dtype)), None
  else:
    init, dh_outs = (jnp.zeros_like(ct[0], dtype), jnp.zeros_like(ct[0], dtype)), ct.astype(dtype)
  _, dys = jax.lax.scan(step, init, (dh_outs, cs, c_prev, i, f, g, o), reverse=True)  # [T, N, 4F]

  over_time = ((0, 1), (0, 1))  # contract time and batch
  f32 = jnp.float32
  dwi = jax.lax.dot_general(x, dys, (over_time, ((), ())), preferred_element_type=f32).astype(wi.dtype)
  dwh = jax.lax.dot_general(_shift_in_zeros(hs), dys, (over_time, ((), ())),
                            preferred_element_type=f32).astype(wh.dtype)
  db = jnp.sum(dys, axis=(0, 1), dtype=f32).astype(dtype)
  dx = _matmul(dys, wi.T)
  return dx, dwi, dwh, db


_lstm_time_major.defvjp(_lstm_fwd, _lstm_bwd)


def lstm_sequence(x: jax.Array, wi: jax.Array, wh: jax.Array, b: jax.Array, *, output: str = "last") -> jax.Array:
  """`nnx.RNN(nnx.OptimizedLSTMCell)` from a zero state over x [..., T, F_in], with a hand-written VJP.

  `wi` [F_in, 4F] is `dense_i.kernel`, `wh` [F, 4F] `dense_h.kernel` and `b` [4F] `dense_h.bias`.
  Returns the last h [..., F] (output="last") or every h [..., T, F] ("sequence"). Computes in the
  promoted dtype of the four (as the cell's `nnx.Linear` layers do); differentiable in all four.
  """
  if output not in OUTPUTS:
    raise ValueError(f"output={output!r}: allowed {', '.join(OUTPUTS)}")
  dtype = jnp.result_type(x, wi, wh, b)
  lead, (steps, in_features) = x.shape[:-2], x.shape[-2:]
  features = wh.shape[0]
  n = math.prod(lead)  # also a symbolic batch dimension (jax.export)
  xt = jnp.swapaxes(x.astype(dtype).reshape((n, steps, in_features)), 0, 1)  # time-major [T, N, F_in]
  out = _lstm_time_major(xt, wi.astype(dtype), wh.astype(dtype), b.astype(dtype), output)
  if output == "last":
    return out.reshape(lead + (features,))
  return jnp.swapaxes(out, 0, 1).reshape(lead + (steps, features))


# --------------------------------------------------------------------------------------------
# The stage.
# --------------------------------------------------------------------------------------------


class LSTM(nnx.Module):
  """A unidirectional LSTM (Flax default inits: lecun-normal input, orthogonal recurrent kernel).

  `kernel_init` sets the input kernel [F_in, 4F] and `recurrent_kernel_init` the
  recurrent kernel [F, 4F] (the four gates side by side); None keeps Flax's default.
  `impl`: "fast" (`lstm_sequence`) or "scan" (`nnx.RNN`); None takes the one set by
  `implementation(...)` ("fast" outside it). Both read the same `rnn/cell` parameters; "fast"
  falls back to `nnx.RNN` when the cell's layers are not plain `nnx.Linear` (QAT-wrapped).
  """

  def __init__(self, in_features: int, *, features: int, output: str, rngs: nnx.Rngs,
               kernel_init: init_lib.Initializer | None = None,
               recurrent_kernel_init: init_lib.Initializer | None = None, impl: str | None = None):
    impl = _IMPL.get() if impl is None else impl
    if impl not in IMPLS:
      raise ValueError(f"LSTM impl {impl!r}: allowed {', '.join(IMPLS)}")
    self.features = features
    self.output = output
    self.impl = impl
    # rngs=False: the RNN keeps no RNG stream (it would only seed the carry, which
    # we set to zeros ourselves), so the module holds parameters only.
    cell = nnx.OptimizedLSTMCell(in_features, features, **init_lib.init_kwargs(kernel_init),
                                 **init_lib.init_kwargs(recurrent_kernel_init, "recurrent_kernel_init"), rngs=rngs)
    self.rnn = nnx.RNN(cell, return_carry=True, rngs=False)

  def uses_fast_path(self) -> bool:
    """Whether a call runs `lstm_sequence`: impl "fast" and both cell layers plain `nnx.Linear`."""
    cell = self.rnn.cell
    return self.impl == "fast" and type(cell.dense_i) is nnx.Linear and type(cell.dense_h) is nnx.Linear

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> jax.Array:
    del train, key  # no dropout or batch statistics in this stage
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      x = x.astype(jnp.float32)
    if self.uses_fast_path():
      cell = self.rnn.cell
      return lstm_sequence(x, cell.dense_i.kernel[...], cell.dense_h.kernel[...], cell.dense_h.bias[...],
                           output=self.output)
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
