"""Grain input pipelines over random-access record sources (TFDS ArrayRecord and in-memory).

A `GrainTask` turns two record sources (train and held-out split) and a
per-example transform into the `Task` iterators the training loop reads:

  train: records -> shuffle(seed), a new order every epoch -> this process's
         positions of each global batch -> transform -> batch (drop remainder)
         -> prefetching iterator (threads)
  eval:  records in order -> this process's positions of each global batch,
         padding past the end -> transform -> batch -> iterator

Everything is index arithmetic on Grain `MapDataset`s, so the order is a pure
function of (seed, epoch, position): every process computes the same global
order and reads only its own 1/P of each global batch; the iterator's state
(Grain's `{"next_index": n}`) is all a checkpoint needs to continue with the
very next batch. An epoch is `len(train) // batch_size` global batches; the
examples past the last full batch are dropped for that epoch (the next epoch's
shuffle puts others last).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any, Iterator

import grain
import numpy as np

from chainjax.data import base

Example = dict  # {"inputs": np.ndarray, "labels": tuple[np.ndarray, ...]}
Transform = Callable[[Any], Example]  # raw record -> Example


@dataclasses.dataclass(frozen=True)
class _TrainPosition:
  """Local example k of process `shard` -> its position in the endless per-epoch-shuffled stream."""

  global_batch: int
  steps_per_epoch: int
  epoch_size: int
  shard: base.Shard

  def __call__(self, k: int) -> int:
    local = self.global_batch // self.shard.count
    step, row = divmod(k, local)
    epoch, batch_in_epoch = divmod(step, self.steps_per_epoch)
    return (epoch * self.epoch_size + batch_in_epoch * self.global_batch + self.shard.index * local + row)


@dataclasses.dataclass(frozen=True)
class _EvalPosition:
  """Local example k of process `shard` -> the held-out record it reads, or -1 for padding."""

  global_batch: int
  size: int
  shard: base.Shard

  def __call__(self, k: int) -> int:
    local = self.global_batch // self.shard.count
    batch, row = divmod(k, local)
    position = batch * self.global_batch + self.shard.index * local + row
    return position if position < self.size else -1


class _Read(grain.transforms.Map):
  """Position -> transformed example with `mask` 1; position -1 -> `padding` (mask 0)."""

  def __init__(self, records: Sequence[Any] | grain.MapDataset, transform: Transform, padding: Example | None):
    self._records, self._transform, self._padding = records, transform, padding

  def map(self, position: int) -> dict:
    if position < 0:
      return self._padding
    example = self._transform(self._records[position])
    return {"inputs": example["inputs"], "labels": tuple(example["labels"]), "mask": np.float32(1.0)}


class GrainTask(base.Task):
  """A `Task` over random-access record sources, read through Grain.

  Attributes beyond `base.Task`: `train_source`/`eval_source` (anything with
  `__len__` and `__getitem__`, e.g. `tfds.data_source(...)[split]`), `transform`
  (record -> {"inputs", "labels"}, must be deterministic and picklable), `seed`
  (the shuffle), `num_threads` and `prefetch` (Grain read options).
  """

  def __init__(self, *, name: str, train_source, eval_source, transform: Transform,
               input_shape: tuple[int, ...], input_dtype, label_specs: Sequence[base.LabelSpec], seed: int,
               num_threads: int = 4, prefetch: int = 8):
    self.name = name
    self.train_source, self.eval_source, self.transform = train_source, eval_source, transform
    self.input_shape, self.input_dtype = tuple(input_shape), np.dtype(input_dtype)
    self.label_specs = tuple(label_specs)
    self.seed, self.num_threads, self.prefetch = seed, num_threads, prefetch
    self.train_size, self.eval_size = len(train_source), len(eval_source)
    self.test_source = None  # an optional third split, evaluated once at the end of training

  def _read_options(self) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch)

  def padding_example(self) -> dict:
    """An all-zero example with mask 0, shaped like every real one."""
    labels = tuple(np.zeros(spec.shape, np.float32 if spec.is_binary else np.int32) for spec in self.label_specs)
    return {"inputs": np.zeros(self.input_shape, self.input_dtype), "labels": labels, "mask": np.float32(0.0)}

  def train_dataset(self, batch_size: int, shard: base.Shard) -> grain.MapDataset:
    """This process's training batches as an endless random-access dataset (batch n = update n)."""
    local = shard.local_size(batch_size)
    steps_per_epoch = self.train_size // batch_size
    if steps_per_epoch < 1:
      raise ValueError(f"config.batch_size: {batch_size} is larger than the {self.train_size} training "
                       f"examples of {self.name}")
    records = grain.MapDataset.source(self.train_source).shuffle(seed=self.seed % 2**32).repeat()
    position = _TrainPosition(batch_size, steps_per_epoch, self.train_size, shard)
    max_steps = (sys.maxsize - self.train_size) // batch_size  # keeps positions below Grain's endless length
    return (grain.MapDataset.range(max_steps * local)
            .map(position)
            .map(_Read(records, self.transform, None))
            .batch(local, drop_remainder=True))

  def train_iterator(self, batch_size: int, shard: base.Shard) -> grain.DatasetIterator:
    return iter(self.train_dataset(batch_size, shard).to_iter_dataset(self._read_options()))

  def eval_dataset(self, batch_size: int, shard: base.Shard, source=None) -> grain.MapDataset:
    """This process's rows of the padded held-out batches of `source` (default the eval split), in order."""
    source = self.eval_source if source is None else source
    local = shard.local_size(batch_size, "eval_batch_size")
    num_batches = -(-len(source) // batch_size)
    return (grain.MapDataset.range(num_batches * local)
            .map(_EvalPosition(batch_size, len(source), shard))
            .map(_Read(source, self.transform, self.padding_example()))
            .batch(local))

  def eval_iterator(self, batch_size: int, shard: base.Shard) -> Iterator[base.Batch]:
    return iter(self.eval_dataset(batch_size, shard).to_iter_dataset(self._read_options()))

  def test_iterator(self, batch_size: int, shard: base.Shard) -> Iterator[base.Batch] | None:
    """Like `eval_iterator` over `test_source`; None when there is no test split."""
    if self.test_source is None:
      return None
    return iter(self.eval_dataset(batch_size, shard, self.test_source).to_iter_dataset(self._read_options()))


class ArraySource:
  """An in-memory random-access source: record i is `{key: array[i] for each array}`."""

  def __init__(self, **arrays: np.ndarray):
    sizes = {len(a) for a in arrays.values()}
    if len(sizes) != 1:
      raise ValueError(f"ArraySource arrays differ in length: { {k: len(a) for k, a in arrays.items()} }")
    self._arrays = arrays
    self._size = sizes.pop()

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int) -> dict:
    return {k: a[index] for k, a in self._arrays.items()}
