"""The parity task: a fixed subset per data seed, XOR-tree labels, deterministic batches."""

import numpy as np

from chainjax.data import parity


def make(**kw):
  args = dict(d=16, levels=3, data_seed=0, seed=0, eval_size=100)
  args.update(kw)
  return parity.ParityTask(**args)


def test_xor_tree_levels_match_direct_parities():
  task = make()
  batch = task.train_batch(0, 64)
  bits = (batch["inputs"] > 0).astype(np.int64)  # +-1 -> {0, 1}
  sub = bits[:, task.subset]  # [B, 8]
  level1, level2, answer = batch["labels"]
  np.testing.assert_array_equal(level1, sub[:, 0::2] ^ sub[:, 1::2])
  np.testing.assert_array_equal(level2[:, 0], sub[:, :4].sum(1) % 2)
  np.testing.assert_array_equal(level2[:, 1], sub[:, 4:].sum(1) % 2)
  np.testing.assert_array_equal(answer, sub.sum(1) % 2)
  assert [s.shape for s in task.label_specs] == [(4,), (2,), ()]
  assert set(np.unique(batch["inputs"])) == {-1.0, 1.0}


def test_batches_are_a_pure_function_of_seed_and_step():
  a, b = make(), make()
  np.testing.assert_array_equal(a.train_batch(7, 32)["inputs"], b.train_batch(7, 32)["inputs"])
  assert not np.array_equal(a.train_batch(7, 32)["inputs"], a.train_batch(8, 32)["inputs"])
  assert not np.array_equal(a.train_batch(7, 32)["inputs"], make(seed=1).train_batch(7, 32)["inputs"])


def test_subset_and_eval_set_fixed_by_data_seed_only():
  a, b, c = make(), make(seed=5), make(data_seed=1)
  np.testing.assert_array_equal(a.subset, b.subset)
  assert len(a.subset) == 8 and len(set(a.subset)) == 8
  eval_a = next(a.eval_batches(100))["inputs"]
  np.testing.assert_array_equal(eval_a, next(b.eval_batches(100))["inputs"])
  assert not np.array_equal(eval_a, next(c.eval_batches(100))["inputs"])


def test_eval_batches_cover_the_held_out_set_once_with_padding():
  batches = list(make(eval_size=100).eval_batches(32))
  assert len(batches) == 4
  assert sum(b["mask"].sum() for b in batches) == 100
  np.testing.assert_array_equal(batches[-1]["mask"], [1.0] * 4 + [0.0] * 28)


def test_labels_are_balanced():
  answer = make(d=64).train_batch(0, 4096)["labels"][-1]
  assert abs(answer.mean() - 0.5) < 0.03
