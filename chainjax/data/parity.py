"""Bit-subset parity with intermediate XOR-tree labels (a chain task).

The input is `d` random bits (as +-1 floats). A subset of `2**levels` bit
positions, fixed by the task seed, determines the answer: its parity. The chain's
stage `i` is supervised by level `i` of the XOR tree over the subset bits (level 1:
XORs of consecutive pairs, level 2: XORs of those, ..., level `levels`: the answer).

End-to-end gradient descent needs on the order of `d**k` examples to find a
`k`-sparse parity (Shalev-Shwartz et al. 2017, section 2.1); with the
intermediate labels every stage only has to learn 2-bit XORs of its input, which
is easy (Wies et al. 2023, "Sub-task decomposition enables learning in
sequence to sequence tasks").
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from chainjax.data import base

_EVAL_STREAM = 2**31 - 1  # rng stream id of the held-out set, disjoint from training steps


class ParityTask(base.StepTask):
  """`d`-bit inputs; stage `i` predicts the `2**(levels-i)` XORs of tree level `i`."""

  name = "parity"
  input_dtype = np.dtype(np.float32)

  def __init__(self, *, d: int, levels: int, data_seed: int, seed: int, eval_size: int):
    if levels < 1 or 2**levels > d:
      raise ValueError(f"parity needs 1 <= levels and 2**levels <= d, got d={d} levels={levels}")
    self.d, self.levels, self.eval_size = d, levels, eval_size
    self.data_seed, self.seed = data_seed, seed
    rng = np.random.default_rng([data_seed, 0])
    self.subset = np.sort(rng.choice(d, size=2**levels, replace=False))
    self.input_shape = (d,)
    self.label_specs = tuple(
        base.LabelSpec(name=f"level_{i}", shape=() if i == levels else (2 ** (levels - i),))
        for i in range(1, levels + 1)
    )
    self._eval = self._sample(np.random.default_rng([data_seed, _EVAL_STREAM]), eval_size)

  def xor_tree(self, bits: np.ndarray) -> tuple[np.ndarray, ...]:
    """Labels of every tree level for {0,1} bits [B, d]; the last is [B], the others [B, width]."""
    level = bits[:, self.subset]
    labels = []
    for _ in range(self.levels):
      level = np.bitwise_xor(level[:, 0::2], level[:, 1::2])
      labels.append(level.astype(np.float32))
    labels[-1] = labels[-1][:, 0]
    return tuple(labels)

  def _sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    bits = rng.integers(0, 2, size=(n, self.d), dtype=np.int8)
    return (2.0 * bits - 1.0).astype(np.float32), self.xor_tree(bits)

  def train_batch(self, step: int, batch_size: int) -> base.Batch:
    inputs, labels = self._sample(np.random.default_rng([self.data_seed, 1, self.seed, step]), batch_size)
    return {"inputs": inputs, "labels": labels, "mask": np.ones((batch_size,), np.float32)}

  def eval_batches(self, batch_size: int) -> Iterator[base.Batch]:
    return base.iterate_padded(*self._eval, batch_size)
