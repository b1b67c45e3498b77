"""Tests of the line-orientation parity task: determinism, shapes, and labels that match the pixels."""


import numpy as np
import pytest

from chainjax.data import line_parity

K = 3


def make(seed=0, data_seed=7, eval_size=100, num_images=K):
  return line_parity.LineParityTask(num_images=num_images, data_seed=data_seed, seed=seed, eval_size=eval_size)


def pixel_covariance(images: np.ndarray) -> np.ndarray:
  """Covariance of lit pixel coordinates (x = column, y = up) per image [N, 28, 28] -> [N]."""
  size = images.shape[-1]
  y, x = np.meshgrid(np.arange(size - 1, -1, -1), np.arange(size), indexing="ij")
  w = images.astype(np.float64)
  n = w.sum((1, 2))
  mx = (w * x).sum((1, 2)) / n
  my = (w * y).sum((1, 2)) / n
  return (w * (x - mx[:, None, None]) * (y - my[:, None, None])).sum((1, 2)) / n


def test_train_batch_is_a_pure_function_of_seeds_and_step():
  a, b = make().train_batch(5, 32), make().train_batch(5, 32)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  for la, lb in zip(a["labels"], b["labels"]):
    np.testing.assert_array_equal(la, lb)
  other_step = make().train_batch(6, 32)
  other_seed = make(seed=1).train_batch(5, 32)
  assert not np.array_equal(a["inputs"], other_step["inputs"])
  assert not np.array_equal(a["inputs"], other_seed["inputs"])


def test_eval_set_depends_on_data_seed_only():
  a = list(make(seed=0).eval_batches(64))
  b = list(make(seed=123).eval_batches(64))
  c = list(make(data_seed=8).eval_batches(64))
  for ba, bb in zip(a, b):
    np.testing.assert_array_equal(ba["inputs"], bb["inputs"])
    np.testing.assert_array_equal(ba["labels"][1], bb["labels"][1])
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
  # The held-out set is not the training stream of any step-0 batch.
  assert not np.array_equal(a[0]["inputs"], make().train_batch(0, 64)["inputs"])


def test_shapes_dtypes_mask_and_pixels():
  task = make()
  assert task.input_shape == (K, 28, 28, 1)
  stage1, stage2 = task.label_specs
  assert (stage1.name, stage1.shape, stage1.num_classes, stage1.item_axes) == ("image_angle", (K,), 0, 1)
  assert (stage2.name, stage2.shape, stage2.num_classes) == ("parity", (), 0)
  batch = task.train_batch(0, 64)
  images_labels, parity = batch["labels"]
  assert batch["inputs"].shape == (64, K, 28, 28, 1) and batch["inputs"].dtype == np.float32
  assert images_labels.shape == (64, K) and images_labels.dtype == np.float32
  assert parity.shape == (64,) and parity.dtype == np.float32
  np.testing.assert_array_equal(batch["mask"], np.ones(64, np.float32))
  assert batch["mask"].dtype == np.float32
  assert set(np.unique(batch["inputs"])) == {0.0, 1.0}
  lit = batch["inputs"].sum(axis=(2, 3, 4))  # [B, k]
  assert lit.min() > 4 and lit.max() < 28 * 3  # a line, not a blob


def test_labels_are_balanced():
  images_labels, parity = make().train_batch(0, 4096)["labels"]
  assert abs(images_labels.mean() - 0.5) < 0.03
  assert abs(parity.mean() - 0.5) < 0.03


def test_parity_is_xor_of_image_labels_and_image_labels_match_pixels():
  batch = make().train_batch(3, 2048)
  images_labels, parity = batch["labels"]
  np.testing.assert_array_equal(parity, images_labels.sum(axis=1) % 2)
  cov = pixel_covariance(batch["inputs"][..., 0].reshape(-1, 28, 28))
  rises_right = (cov > 0).astype(np.float32)
  agreement = np.mean((rises_right == images_labels.reshape(-1)) & (cov != 0))
  assert agreement >= 0.99, agreement


def test_angle_label_convention():
  # theta = 30 degrees rises to the right (y up): lit pixels top right and bottom left, label 1.
  image = line_parity.rasterize(np.array([np.pi / 6]), np.array([20.0]), np.array([[13.5, 13.5]]))[0]
  rows, cols = np.nonzero(image)
  assert rows[np.argmax(cols)] < rows[np.argmin(cols)]  # rightmost pixel is higher (smaller row)


@pytest.mark.parametrize("eval_size,batch_size", [(100, 32), (96, 32), (5, 8)])
def test_eval_batches_cover_eval_set_once(eval_size, batch_size):
  batches = list(make(eval_size=eval_size).eval_batches(batch_size))
  assert len(batches) == -(-eval_size // batch_size)
  assert all(b["inputs"].shape == (batch_size, K, 28, 28, 1) for b in batches)
  masks = np.concatenate([b["mask"] for b in batches])
  assert masks.sum() == eval_size
  np.testing.assert_array_equal(masks[:eval_size], 1.0)  # padding only at the end
  np.testing.assert_array_equal(masks[eval_size:], 0.0)
  assert np.all(np.concatenate([b["inputs"] for b in batches])[eval_size:] == 0)
