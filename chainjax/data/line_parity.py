"""Parity of line orientations over k images (a two-stage chain task).

Shalev-Shwartz, Shamir & Shammah 2017 ("Failures of gradient-based deep
learning"), section 3.1: an example is `k` binary 28x28 images, each showing one
straight line segment. An image's label is 1 when the segment's angle `theta`
(in [0, pi), measured from the x axis with y pointing *up*, i.e. row 0 is the
top of the image) is below pi/2, meaning the line rises to the right; the
example's label is the parity (XOR) of the `k` image labels. Trained end to end
on the parity alone, gradient descent barely moves away from chance for k >= 4;
with the image labels as an intermediate target it is easy.

The chain's stage 1 is a per-image CNN with a per-image head supervised by the
`k` image labels ("image_angle", `item_axes=1`); stage 2 combines the `k`
scores into the parity.

Sampling (every draw uniform):
  - label bit, then `theta` in [m, pi/2 - m] (label 1) or [pi/2 + m, pi - m]
    (label 0), so `theta` is uniform over [0, pi) minus margins m = 5 degrees
    around 0, pi/2 and pi. Without them a short, nearly horizontal or vertical
    segment rasterizes to a straight pixel run with no step, and its label is
    undecidable from the pixels (~3% of images with m = 0). With m = 5 degrees a
    segment of length >= 8 moves >= 0.7 px across its minor axis, which together
    with the 0.7 px half-width below always puts a step in the pixel run
    (measured: 0 undecidable images in 2M, by the sign of the pixel covariance).
  - length in [8, 20] px, long enough for the angle to be visible.
  - centre such that both endpoints lie inside the image (pixel centres are at
    integer coordinates 0..27).
A pixel is lit when its centre is within 0.7 px of the segment (a capsule), which
gives a connected line one to two pixels thick.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from chainjax.data import base

_EVAL_STREAM = 2**31 - 1  # rng stream id of the held-out set, disjoint from training steps
IMAGE_SIZE = 28
MIN_LENGTH, MAX_LENGTH = 8.0, 20.0  # segment length, px
HALF_WIDTH = 0.7  # a pixel is lit when its centre is this close to the segment, px
ANGLE_MARGIN = np.deg2rad(5.0)  # excluded around theta = 0, pi/2, pi (see the module docstring)


def rasterize(theta: np.ndarray, length: np.ndarray, centre: np.ndarray) -> np.ndarray:
  """Binary images [..., 28, 28] of segments of angle `theta`, `length` and `centre` [..., 2] (x, y up).

  Vectorised over all leading axes: the distance of every pixel centre to its
  segment is computed at once ([N, 28, 28] float32 arrays), no Python loop.
  """
  lead = theta.shape
  f32 = np.float32
  cos = np.cos(theta).astype(f32).reshape(-1, 1, 1)
  sin = np.sin(theta).astype(f32).reshape(-1, 1, 1)
  half = (0.5 * length).astype(f32).reshape(-1, 1, 1)
  cx = centre[..., 0].astype(f32).reshape(-1, 1, 1)
  cy = centre[..., 1].astype(f32).reshape(-1, 1, 1)
  x = np.arange(IMAGE_SIZE, dtype=f32)[None, None, :]  # column index
  y = np.arange(IMAGE_SIZE - 1, -1, -1, dtype=f32)[None, :, None]  # row 0 is the top: y up
  dx, dy = x - cx, y - cy  # [N, 1, 28], [N, 28, 1]
  t = np.clip(dx * cos + dy * sin, -half, half)  # [N, 28, 28] position of the nearest segment point
  dist2 = (dx - t * cos) ** 2 + (dy - t * sin) ** 2
  return (dist2 <= f32(HALF_WIDTH**2)).astype(f32).reshape(lead + (IMAGE_SIZE, IMAGE_SIZE))


class LineParityTask(base.StepTask):
  """`k` line images [k, 28, 28, 1]; stage 1 predicts each image's orientation bit, stage 2 their XOR."""

  name = "line_parity"
  input_dtype = np.dtype(np.float32)

  def __init__(self, *, num_images: int, data_seed: int, seed: int, eval_size: int):
    if num_images < 1:
      raise ValueError(f"line_parity needs num_images >= 1, got {num_images}")
    self.num_images, self.eval_size = num_images, eval_size
    self.data_seed, self.seed = data_seed, seed
    self.input_shape = (num_images, IMAGE_SIZE, IMAGE_SIZE, 1)
    self.label_specs = (
        base.LabelSpec(name="image_angle", shape=(num_images,), num_classes=0, item_axes=1),
        base.LabelSpec(name="parity", shape=()),
    )
    self._eval = self._sample(np.random.default_rng([data_seed, _EVAL_STREAM]), eval_size)

  def _sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """`n` examples: inputs [n, k, 28, 28, 1] and labels (image labels [n, k], parity [n])."""
    shape = (n, self.num_images)
    image_labels = rng.integers(0, 2, size=shape, dtype=np.int8)
    theta = ANGLE_MARGIN + rng.random(shape) * (np.pi / 2 - 2 * ANGLE_MARGIN) + (1 - image_labels) * (np.pi / 2)
    length = rng.uniform(MIN_LENGTH, MAX_LENGTH, size=shape)
    # Half extents along x and y; the centre keeps both endpoints inside [0, 27].
    extent = 0.5 * length[..., None] * np.abs(np.stack([np.cos(theta), np.sin(theta)], axis=-1))
    centre = extent + rng.random(shape + (2,)) * (IMAGE_SIZE - 1 - 2 * extent)
    inputs = rasterize(theta, length, centre)[..., None]
    parity = np.bitwise_xor.reduce(image_labels, axis=1)
    return inputs, (image_labels.astype(np.float32), parity.astype(np.float32))

  def train_batch(self, step: int, batch_size: int) -> base.Batch:
    """The training batch of `step`: a pure function of (data_seed, seed, step)."""
    inputs, labels = self._sample(np.random.default_rng([self.data_seed, 1, self.seed, step]), batch_size)
    return {"inputs": inputs, "labels": labels, "mask": np.ones((batch_size,), np.float32)}

  def eval_batches(self, batch_size: int) -> Iterator[base.Batch]:
    """The held-out set (drawn from `data_seed` only) in fixed order, the last batch padded."""
    return base.iterate_padded(*self._eval, batch_size)
