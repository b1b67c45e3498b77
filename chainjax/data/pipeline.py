"""Grain input pipelines over random-access record sources (TFDS ArrayRecord and in-memory).

A `GrainTask` turns two record sources (train and held-out split) and a
per-example transform into the `Task` iterators the training loop reads:

  train: update n -> this process's positions in global batch n of an endless
         stream that Grain shuffles with the seed, a new order every epoch ->
         one batched read of those records -> transform each -> stack
         -> prefetching iterator (threads)
  eval:  batch b -> this process's positions in global batch b, in order,
         padding past the end -> batched read -> transform -> stack -> iterator

Everything is index arithmetic on Grain `MapDataset`s, so the order is a pure
function of (seed, epoch, position): every process computes the same global
order and reads only its own 1/P of each global batch; the iterator's state
(Grain's `{"next_index": n}`) is all a checkpoint needs to continue with the
very next batch. Reading a whole batch per element (ArrayRecord's batched
`__getitems__`) costs a quarter of per-example reads through Grain. An epoch is `len(train) // batch_size` global batches; the
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


def _read_batch(source, indices: Sequence[int], transform: Transform) -> list[dict]:
  """Records `indices` of `source` (one batched read when the source has one), transformed."""
  indices = [int(i) for i in indices]
  records = source.__getitems__(indices) if hasattr(source, "__getitems__") else [source[i] for i in indices]
  out = []
  for record in records:
    example = transform(record)
    out.append({"inputs": example["inputs"], "labels": tuple(example["labels"]), "mask": np.float32(1.0)})
  return out


def _stack(examples: list[dict]) -> base.Batch:
  return {"inputs": np.stack([e["inputs"] for e in examples]),
          "labels": tuple(np.stack(ls) for ls in zip(*(e["labels"] for e in examples))),
          "mask": np.array([e["mask"] for e in examples], np.float32)}


@dataclasses.dataclass(frozen=True)
class _TrainBatch:
  """Update `step` -> this process's rows of its global batch, read from the per-epoch-shuffled stream.

  Global batch `step` of epoch e holds stream positions e * N + j * B + [0, B), where
  j is the batch's index within its epoch (an epoch is N // B batches; the rest of the
  epoch's permutation is dropped); process p of P reads positions p * B/P + [0, B/P).
  """

  source: Any
  order: grain.MapDataset  # stream position -> record index (a new permutation every epoch)
  transform: Transform
  global_batch: int
  shard: base.Shard

  def __call__(self, step: int) -> base.Batch:
    epoch_size = len(self.source)
    epoch, batch_in_epoch = divmod(step, epoch_size // self.global_batch)
    local = self.global_batch // self.shard.count
    first = epoch * epoch_size + batch_in_epoch * self.global_batch + self.shard.index * local
    return _stack(_read_batch(self.source, [self.order[p] for p in range(first, first + local)], self.transform))


@dataclasses.dataclass(frozen=True)
class _EvalBatch:
  """Eval batch `b` -> this process's rows of global batch b of `source` in order, padded past its end."""

  source: Any
  transform: Transform
  global_batch: int
  shard: base.Shard
  padding: dict

  def __call__(self, b: int) -> base.Batch:
    local = self.global_batch // self.shard.count
    first = b * self.global_batch + self.shard.index * local
    indices = [i for i in range(first, first + local) if i < len(self.source)]
    examples = _read_batch(self.source, indices, self.transform) if indices else []
    return _stack(examples + [self.padding] * (local - len(examples)))


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

  def save(self, workdir: str) -> None:
    """Writes what the task derived from its data and must keep (e.g. a vocabulary); nothing here."""
    del workdir

  def _read_options(self) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch)

  def padding_example(self) -> dict:
    """An all-zero example with mask 0, shaped like every real one."""
    labels = tuple(np.zeros(spec.shape, np.float32 if spec.is_binary else np.int32) for spec in self.label_specs)
    return {"inputs": np.zeros(self.input_shape, self.input_dtype), "labels": labels, "mask": np.float32(0.0)}

  def train_dataset(self, batch_size: int, shard: base.Shard) -> grain.MapDataset:
    """This process's training batches as an endless random-access dataset: element n is update n's."""
    shard.local_size(batch_size)
    if self.train_size // batch_size < 1:
      raise ValueError(f"config.batch_size: {batch_size} is larger than the {self.train_size} training "
                       f"examples of {self.name}")
    order = grain.MapDataset.range(self.train_size).shuffle(seed=self.seed % 2**32).repeat()
    max_steps = (sys.maxsize - self.train_size) // batch_size  # positions stay below Grain's endless length
    return grain.MapDataset.range(max_steps).map(
        _TrainBatch(self.train_source, order, self.transform, batch_size, shard))

  def train_iterator(self, batch_size: int, shard: base.Shard) -> grain.DatasetIterator:
    return iter(self.train_dataset(batch_size, shard).to_iter_dataset(self._read_options()))

  def eval_dataset(self, batch_size: int, shard: base.Shard, source=None) -> grain.MapDataset:
    """This process's rows of the padded held-out batches of `source` (default the eval split), in order."""
    source = self.eval_source if source is None else source
    shard.local_size(batch_size, "eval_batch_size")
    num_batches = -(-len(source) // batch_size)
    return grain.MapDataset.range(num_batches).map(
        _EvalBatch(source, self.transform, batch_size, shard, self.padding_example()))

  def eval_iterator(self, batch_size: int, shard: base.Shard) -> Iterator[base.Batch]:
    return iter(self.eval_dataset(batch_size, shard).to_iter_dataset(self._read_options()))

  def test_iterator(self, batch_size: int, shard: base.Shard) -> Iterator[base.Batch] | None:
    """Like `eval_iterator` over `test_source`; None when there is no test split."""
    if self.test_source is None:
      return None
    return iter(self.eval_dataset(batch_size, shard, self.test_source).to_iter_dataset(self._read_options()))


class CachedSource:
  """Keeps every record it has read in memory, so each is read and decoded once (`config.data.cache`).

  For datasets that fit in host memory (Fashion-MNIST: 60000 decoded 28x28 images,
  ~60 MB), as `tf.data`'s `cache()`: the first epoch reads and decodes, later epochs and
  evals only index. Each process caches the records it reads (its shard). Reads from
  several prefetch threads at once may decode a record twice; both copies are equal.
  """

  def __init__(self, source):
    self._source = source
    self._records: dict[int, Any] = {}

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list:
    missing = sorted({int(i) for i in indices} - self._records.keys())
    if missing:
      read = (self._source.__getitems__(missing) if hasattr(self._source, "__getitems__")
              else [self._source[i] for i in missing])
      self._records.update(zip(missing, read))
    return [self._records[int(i)] for i in indices]


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
