"""Small stand-ins for the four Fashion-MNIST files, written as they were published: IDX in gzip.

IDX (http://yann.lecun.com/exdb/mnist/): a big-endian header, magic 0x00000803 then
the count, rows and columns for images, magic 0x00000801 then the count for labels,
followed by the uint8 pixels (row-major) or labels. Each file is gzip'd as Zalando
published it (FNAME set, the original MTIME) or as Debian ships it (no FNAME, the
package date as MTIME). `url_infos` states their sizes and sha256 the way TFDS
registers the real files', so `chainjax.data.prepare` can be run on them unchanged.
"""

import gzip
import hashlib
import io
import os
import struct

import numpy as np

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
ROWS = COLS = 28
DEBIAN_MTIME = 1590192000  # 2020-05-23 00:00 UTC, the package's date: what Debian's build wrote instead
SPLIT_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
MTIME = {"train-images-idx3-ubyte.gz": 1504176606, "train-labels-idx1-ubyte.gz": 1504176606,
         "t10k-images-idx3-ubyte.gz": 1504176627, "t10k-labels-idx1-ubyte.gz": 1504176627}


def idx_images(images: np.ndarray, magic: int = IMAGES_MAGIC) -> bytes:
  n, rows, cols = images.shape
  return struct.pack(">IIII", magic, n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = LABELS_MAGIC) -> bytes:
  return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def published_gzip(raw: bytes, filename: str) -> bytes:
  """`raw` gzip'd as the published files are: FNAME (the name less `.gz`) and their MTIME."""
  buf = io.BytesIO()
  with gzip.GzipFile(filename=filename, mode="wb", fileobj=buf, mtime=MTIME[filename]) as f:  # FNAME: no .gz
    f.write(raw)
  data = buf.getvalue()
  assert data[3] == 0x08 and data[10:10 + len(filename) - 2] == filename[:-3].encode() + b"\0"
  return data


def debian_gzip(published: bytes) -> bytes:
  """What Debian's build (strip-nondeterminism) made of a published file: FNAME dropped, MTIME replaced;
  XFL, OS and the deflate stream kept."""
  assert published[3] == 0x08
  end_of_name = published.index(b"\0", 10) + 1
  return published[:3] + b"\0" + struct.pack("<I", DEBIAN_MTIME) + published[8:10] + published[end_of_name:]


def make_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`n` distinct random 28x28 images (none equal to its transpose) and labels covering all 10 classes."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, ROWS, COLS), dtype=np.uint8)
  labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
  return images, labels


def write_source(source_dir, sizes=None, form: str = "debian", seed: int = 0):
  """Writes the four files in `form` ("debian" or "published") into `source_dir`.

  Returns:
    (splits, published): splits[split] = (images, labels) as written; published[filename] = the
    published-form bytes (what `prepare.restore_gzip_header` must give back).
  """
  sizes = sizes or {"train": 60, "test": 20}
  os.makedirs(source_dir, exist_ok=True)
  splits, published = {}, {}
  for i, (split, (images_file, labels_file)) in enumerate(SPLIT_FILES.items()):
    images, labels = splits[split] = make_split(sizes[split], seed + i)
    published[images_file] = published_gzip(idx_images(images), images_file)
    published[labels_file] = published_gzip(idx_labels(labels), labels_file)
  for filename, data in published.items():
    with open(os.path.join(source_dir, filename), "wb") as f:
      f.write(debian_gzip(data) if form == "debian" else data)
  return splits, published


def url_infos(published: dict[str, bytes], registered):
  """`registered` (TFDS's {url: UrlInfo} for Fashion-MNIST) with each file's size and sha256 replaced by
  those of `published` (same urls and file names)."""
  from tensorflow_datasets.core.download import checksums  # pylint: disable=g-import-not-at-top

  return {url: checksums.UrlInfo(size=len(published[info.filename]),
                                 checksum=hashlib.sha256(published[info.filename]).hexdigest(),
                                 filename=info.filename)
          for url, info in registered.items()}
