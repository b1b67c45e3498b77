"""Mesh, shardings and host-to-device input for data parallelism.

One mesh over every global device with a `data` axis (batches are split along
it) and a `model` axis of size 1 (left for sharding large stages). The train
state is replicated; `jax.jit` with these shardings lets XLA insert the
gradient all-reduce. No `jax.pmap`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (`data`, `model`) mesh, model axis of size 1, over `devices` (default: all global devices).

  A subset of devices (e.g. `jax.devices()[:1]`) gives tests and benchmarks a smaller mesh in
  the same process; training always uses the default.
  """
  count = jax.device_count() if devices is None else len(devices)
  return jax.make_mesh((count, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Every device holds the whole array (the train state)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split along `data`."""
  return NamedSharding(mesh, P("data"))


def process_slice(global_batch_size: int) -> slice:
  """The rows of a global batch that this process feeds."""
  per_process = global_batch_size // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def put_batch(global_batch, mesh: jax.sharding.Mesh):
  """Host numpy global batch -> global jax arrays sharded along `data` (each process sends its rows)."""
  sharding = batch_sharding(mesh)

  def put(x: np.ndarray) -> jax.Array:
    local = x[process_slice(x.shape[0])]
    return jax.make_array_from_process_local_data(sharding, local, x.shape)

  return jax.tree.map(put, global_batch)
