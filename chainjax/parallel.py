"""Mesh, shardings and host-to-device input for data parallelism.

One mesh over every global device with a `data` axis (batches are split along
it) and a `model` axis (`config.mesh.model`, default 1). The train state is
replicated, except the kernels of stages that ask for it (`shard="model"` in the
stage config), whose output axis is split along `model`; `jax.jit` with these
shardings lets XLA insert the gradient all-reduce and the model-parallel
collectives. No `jax.pmap`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def make_mesh(devices: Sequence[jax.Device] | None = None, model: int = 1) -> jax.sharding.Mesh:
  """A (`data`, `model`) mesh over `devices` (default: all global devices), `model` devices per model replica.

  A subset of devices (e.g. `jax.devices()[:1]`) gives tests and benchmarks a smaller mesh in
  the same process; training always uses all devices.
  """
  count = jax.device_count() if devices is None else len(devices)
  if count % model:
    raise ValueError(f"config.mesh.model: {model} does not divide the {count} devices")
  return jax.make_mesh((count // model, model), ("data", "model"), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def param_shardings(params: Any, mesh: jax.sharding.Mesh, shard: Callable[[tuple, jax.Array], bool]) -> Any:
  """Per-leaf shardings: a leaf with `shard(path, leaf)` and an output axis divisible by the `model`
  axis is split along `model` on its last axis (a kernel's output features); the rest is replicated."""
  model = mesh.shape["model"]

  def sharding(path, leaf):
    if model > 1 and leaf.ndim >= 2 and leaf.shape[-1] % model == 0 and shard(path, leaf):
      return NamedSharding(mesh, P(*([None] * (leaf.ndim - 1)), "model"))
    return NamedSharding(mesh, P())

  return jax.tree.map_with_path(sharding, params)


def like_params(tree: Any, params: Any, params_shardings: Any, mesh: jax.sharding.Mesh) -> Any:
  """Shardings for an optimizer state: a leaf shaped like a model-sharded parameter gets its
  sharding (moments follow their parameters), every other leaf is replicated."""
  by_shape = {}
  for leaf, sh in zip(jax.tree.leaves(params), jax.tree.leaves(params_shardings)):
    if sh.spec != P():
      by_shape[leaf.shape] = sh
  return jax.tree.map(lambda x: by_shape.get(getattr(x, "shape", None), NamedSharding(mesh, P())), tree)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Every device holds the whole array (the train state)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split along `data`."""
  return NamedSharding(mesh, P("data"))


def put_local_batch(local_batch, mesh: jax.sharding.Mesh, global_batch_size: int):
  """This process's rows of a global batch (numpy) -> global jax arrays sharded along `data`."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x, (global_batch_size,) + x.shape[1:]),
      local_batch)


class DispatchWindow:
  """Keeps at most `depth` dispatched programs running ahead of Python.

  `add(outputs)` after each jitted call; once more than `depth` calls are pending, it
  waits for the oldest one's outputs. Pass outputs that are not donated later (a step's
  metrics, not its state).

  Why: JAX dispatches asynchronously, so a loop without a host sync queues programs
  without bound. XLA's CPU client runs each device's share of a multi-device program on a
  pool with one thread per device and admits at most 32 programs in flight per device; a
  launch past that limit blocks its pool thread on a semaphore. With 8 devices, launches of
  later steps then hold pool threads while some participants of an earlier step's
  all-reduce wait for one, and every thread waits for ever (8 fake CPU devices hung within
  about 100 unsynchronized steps). A window of a couple of programs keeps accelerators just
  as busy: the device still has the next program queued while Python prepares the one after.
  """

  def __init__(self, depth: int = 2):
    if depth < 1:
      raise ValueError(f"depth must be >= 1, got {depth}")
    self.depth = depth
    self._pending: collections.deque = collections.deque()

  def add(self, outputs: Any) -> None:
    self._pending.append(outputs)
    while len(self._pending) > self.depth:
      jax.block_until_ready(self._pending.popleft())

  def wait(self) -> None:
    """Waits for every pending program."""
    while self._pending:
      jax.block_until_ready(self._pending.popleft())

  def __len__(self) -> int:
    return len(self._pending)

