"""A tiny TFDS image-classification dataset, built in ArrayRecord format by the tests themselves.

8x8x1 uint8 images whose class (3 classes) is the brightest third of the image, so a
chain can learn it; `train` has 50 examples, `test` 13 and `empty` 0. Features are plain
tensors, so building it needs neither TensorFlow nor an image codec. Once built,
`tfds.builder("chainjax_tiny_images", data_dir=...)` opens it from its files, in any process.
"""

import numpy as np
import tensorflow_datasets as tfds

NAME = "chainjax_tiny_images"
SIZES = {"train": 50, "test": 13}


class ChainjaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """Images of 3 bright bands; the label is the band."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=3),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(name, size) for name, size in SIZES.items()}

  def _generate_examples(self, split, size):
    rng = np.random.default_rng(list(SIZES).index(split))
    for i in range(size):
      label = int(rng.integers(3))
      image = rng.integers(0, 80, (8, 8, 1), dtype=np.uint8)
      image[:, 3 * label: 3 * label + 2] += 170
      yield i, {"image": image, "label": label}


def build(data_dir) -> str:
  """Builds the dataset under `data_dir` (a no-op when it is there); returns `data_dir` as a string."""
  ChainjaxTinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return str(data_dir)
