"""Prepares TFDS `fashion_mnist` in ArrayRecord format offline, from the Debian package's files.

  sudo apt-get install dataset-fashion-mnist
  python -m chainjax.data.prepare fashion_mnist [--data_dir=DIR] [--source_dir=DIR]

Afterwards `tfds.data_source("fashion_mnist", data_dir=DIR)` random-accesses it
(DIR defaults to the TFDS default: $TFDS_DATA_DIR, else ~/tensorflow_datasets).
2 CPU cores: ~11 s, 42 MB on disk. Running it again is a no-op.

Why the Debian files do: Debian ships the four original `.gz` files in
/usr/share/datasets/fashion-mnist with their deflate streams untouched, but its
package build (strip-nondeterminism) rewrote each gzip header: it dropped the
original file name (FNAME) and set MTIME to the package date. Putting back the
name and the original MTIME (2017-08-31 10:50:06 UTC for train-*, 10:50:27 UTC
for t10k-*; XFL and OS were kept) gives byte-identical copies of the published
files, so TFDS's own download manager takes them from `manual_dir` and checks
them against its registered sha256 exactly as it would a download.
`--source_dir` takes a folder of the four files, as Debian ships them or as
originally published (a header that still names its file is left as it is).

TensorFlow is not needed: TFDS's FashionMNIST builder uses it only to gunzip
and to PNG-encode; a subclass reads the files with `gzip` and hands PIL images
to the same `Image` feature (PNG by Pillow; the PNG bytes differ from a
TensorFlow build, the decoded pixels do not). Features, record keys (hence
record order), shard names and dataset_info.json are TFDS's FashionMNIST's.

Offline by construction, and enforced: the files come from local disk, TFDS's
GCS lookups are off, and while the dataset is built any DNS lookup or internet
socket raises (`_no_network`), so a TFDS that wanted the network would fail
loudly rather than download.

Exit codes: 0 prepared (or already prepared), 1 cannot prepare (source files
missing or not Fashion-MNIST, or `data_dir` holds fashion_mnist in another file
format; one line says why), 2 bad arguments or flags.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Iterator

from absl import app, flags, logging

DATASET = "fashion_mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

# The four published files, with the gzip MTIME each had before Debian's build replaced it
# (found by matching TFDS's registered sha256; see the module docstring).
ORIGINAL_MTIME = {
    "train-images-idx3-ubyte.gz": 1504176606,  # 2017-08-31 10:50:06 UTC
    "train-labels-idx1-ubyte.gz": 1504176606,
    "t10k-images-idx3-ubyte.gz": 1504176627,  # 2017-08-31 10:50:27 UTC
    "t10k-labels-idx1-ubyte.gz": 1504176627,
}
FILES = tuple(ORIGINAL_MTIME)
SPLIT_FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_GZIP_MAGIC = b"\x1f\x8b\x08"  # ID1, ID2, CM=deflate
_FNAME = 0x08  # gzip FLG bit: an original file name follows the 10-byte header

EXIT_CANNOT_PREPARE = 1
EXIT_USAGE = 2

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data dir to prepare into; default: the TFDS default ($TFDS_DATA_DIR or "
    "~/tensorflow_datasets).")
_SOURCE_DIR = flags.DEFINE_string(
    "source_dir", None, f"Folder holding the four Fashion-MNIST .gz files; default: {DEBIAN_DIR} "
    f"(`sudo apt-get install {DEBIAN_PACKAGE}`).")


class PrepareError(RuntimeError):
  """The dataset cannot be prepared as asked; `str(err)` is one line saying why and what to do."""


def restore_gzip_header(data: bytes, filename: str) -> bytes:
  """Returns a Fashion-MNIST `.gz` file with the gzip header it was published with.

  Debian's build dropped the FNAME field and replaced MTIME but kept XFL, OS and
  the deflate stream, so inserting the name and the original MTIME restores the
  file byte for byte. A header that still has FNAME is the original: returned as is.

  Args:
    data: the file's bytes.
    filename: its name, one of `FILES` (says which MTIME and name to restore).

  Raises:
    PrepareError: `data` is not gzip, or its header has fields Debian's files lack.
  """
  if data[:3] != _GZIP_MAGIC or len(data) < 18:
    raise PrepareError(f"{filename} is not a gzip (deflate) file")
  flg = data[3]
  if flg & _FNAME:
    return data
  if flg:
    raise PrepareError(f"{filename}: unexpected gzip header flags {flg:#04x} (neither as published nor as "
                       f"Debian ships it)")
  name = filename.removesuffix(".gz").encode("ascii") + b"\0"
  return _GZIP_MAGIC + bytes([_FNAME]) + struct.pack("<I", ORIGINAL_MTIME[filename]) + data[8:10] + name + data[10:]


def default_data_dir() -> str:
  """The TFDS default data dir, read now (so a TFDS_DATA_DIR set after import counts)."""
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top

  return constants.get_default_data_dir()


@functools.cache
def _builder_class():
  """TFDS's FashionMNIST, reading local files without TensorFlow (built on first use: TFDS imports slowly)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.image_classification import mnist  # pylint: disable=g-import-not-at-top

  with tfds.core.registered.skip_registration():  # `tfds.builder("fashion_mnist")` stays TFDS's own

    class OfflineFashionMNIST(mnist.FashionMNIST):
      """FashionMNIST whose files come from `manual_dir` and are decoded with gzip, numpy and Pillow."""

      name = DATASET
      # dataset_info.json names TFDS's module, as a TFDS build does; the registered checksums are stated,
      # not looked up next to the builder's code (a `tfds` lookup that depends on the defining module).
      __module__ = mnist.FashionMNIST.__module__
      url_infos = mnist.FashionMNIST.url_infos

      def _split_generators(self, dl_manager):
        # `download` (no extract: that needs TensorFlow) finds each file in `manual_dir` by its registered
        # name, checks its size and sha256, and records the download size in dataset_info.json.
        paths = dl_manager.download({f: self.URL + f for f in FILES})
        return {split: self._generate_examples(paths[images], paths[labels])
                for split, (images, labels) in SPLIT_FILES.items()}

      def _generate_examples(self, images_path, labels_path):  # pylint: disable=arguments-renamed
        with gzip.open(images_path, "rb") as f:
          images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(labels_path, "rb") as f:
          labels = np.frombuffer(f.read(), np.uint8, offset=8)
        if len(images) != len(labels):
          raise PrepareError(f"{images_path} has {len(images)} images but {labels_path} {len(labels)} labels")
        for index, (image, label) in enumerate(zip(images, labels)):  # same keys as TFDS's builder
          yield index, {"image": Image.fromarray(image), "label": int(label)}

  return OfflineFashionMNIST


def _open_builder(data_dir: str, file_format: str | None = None):
  """The builder in `data_dir`; a prepared one keeps its stored format (asking another one raises)."""
  return _builder_class()(data_dir=data_dir, file_format=file_format)


def _file_format(builder) -> str:
  return getattr(builder.info.file_format, "value", builder.info.file_format)


def _looks_prepared(data_dir: str) -> bool:
  """Whether `data_dir` has this version's dataset_info.json: checked before opening a builder, which
  would warn about a missing one."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  return (epath.Path(data_dir) / DATASET / str(_builder_class().VERSION) / "dataset_info.json").exists()


def fashion_mnist_available(data_dir: str | None = None) -> bool:
  """Whether `fashion_mnist` is prepared as ArrayRecord in `data_dir` (None: the TFDS default).

  For tests and scripts to skip or stop early; never raises, never prepares.
  """
  data_dir = os.fspath(data_dir or default_data_dir())
  try:
    if not _looks_prepared(data_dir):
      return False
    builder = _open_builder(data_dir)
    return builder.is_prepared() and _file_format(builder) == "array_record"
  except Exception:  # pylint: disable=broad-except
    return False


def stage_source_files(source_dir: str, dest_dir: str, url_infos) -> None:
  """Copies the four files from `source_dir` to `dest_dir` with restored headers, checked against TFDS.

  Checking here (TFDS checks again when it reads them) turns a wrong file into one
  clear line instead of TFDS's multi-line checksum error.

  Raises:
    PrepareError: a file is missing or not the one TFDS registered.
  """
  missing = [f for f in FILES if not os.path.isfile(os.path.join(source_dir, f))]
  if missing:
    raise PrepareError(
        f"Fashion-MNIST source files not found in {source_dir} (missing {', '.join(missing)}): run "
        f"`sudo apt-get install {DEBIAN_PACKAGE}` (installs them in {DEBIAN_DIR}), or pass --source_dir=DIR "
        f"holding the four .gz files")
  expected = {info.filename: info for info in url_infos.values()}
  for filename in FILES:
    path = os.path.join(source_dir, filename)
    with open(path, "rb") as f:
      data = restore_gzip_header(f.read(), filename)
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 != expected[filename].checksum:
      raise PrepareError(f"{path} is not the Fashion-MNIST file TFDS registered (sha256 {sha256} after "
                         f"restoring its gzip header, expected {expected[filename].checksum})")
    with open(os.path.join(dest_dir, filename), "wb") as f:
      f.write(data)


@contextlib.contextmanager
def _no_network() -> Iterator[None]:
  """Within: any DNS lookup or internet (IPv4/IPv6) connection raises `ConnectionRefusedError`.

  An `OSError`, so code written to carry on offline (TFDS treats an unreachable
  GCS so) still does; code that needs the network fails. Process-wide while
  active: meant for this one-off command, not for a process doing other work.
  """
  real_connect, real_connect_ex, real_getaddrinfo = (
      socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo)

  def refuse(what):
    logging.warning("chainjax.data.prepare: refused network access (%s)", what)
    raise ConnectionRefusedError(f"chainjax.data.prepare works offline; refused network access ({what})")

  def connect(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
      refuse(f"connect {address}")
    return real_connect(sock, address)

  def connect_ex(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
      refuse(f"connect {address}")
    return real_connect_ex(sock, address)

  def getaddrinfo(host, *args, **kwargs):
    refuse(f"DNS lookup of {host}")

  socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
  try:
    yield
  finally:
    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = (
        real_connect, real_connect_ex, real_getaddrinfo)


def prepare_fashion_mnist(data_dir: str | None = None, source_dir: str | None = None) -> str:
  """Prepares `fashion_mnist` as ArrayRecord in `data_dir` from local files; returns `data_dir`.

  Args:
    data_dir: TFDS data dir; None: the TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    source_dir: folder of the four Fashion-MNIST .gz files; None: Debian's, `DEBIAN_DIR`.

  Returns:
    The data dir it is prepared in (already prepared there: nothing is done).

  Raises:
    PrepareError: the source files are missing or wrong, or `data_dir` holds
      fashion_mnist in another file format (TFRecord cannot be random-accessed).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.utils import gcs_utils  # pylint: disable=g-import-not-at-top

  data_dir = os.fspath(data_dir or default_data_dir())
  source_dir = os.fspath(source_dir or DEBIAN_DIR)
  gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access  # (already TFDS's default)
  if _looks_prepared(data_dir):
    builder = _open_builder(data_dir)
    file_format = _file_format(builder)
    if file_format != "array_record":
      raise PrepareError(f"{builder.data_dir} holds {DATASET} as {file_format}, which cannot be random-accessed: "
                         f"delete that folder and run this again, or pass another --data_dir")
    logging.info("%s is already prepared in %s", DATASET, builder.data_dir)
    return data_dir

  url_infos = _builder_class().url_infos
  if not url_infos or {i.filename for i in url_infos.values()} != set(FILES):
    raise PrepareError(f"this TFDS ({tfds.__version__}) registers other files for {DATASET} than {', '.join(FILES)}")
  with tempfile.TemporaryDirectory(prefix="chainjax_prepare_") as tmp:
    manual_dir = os.path.join(tmp, "manual")
    os.mkdir(manual_dir)
    stage_source_files(source_dir, manual_dir, url_infos)
    builder = _open_builder(data_dir, file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    with _no_network():
      builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"), download_config=config)
  return data_dir


def main(argv: list[str]) -> None:
  if argv[1:] != [DATASET]:
    print(f"chainjax.data.prepare: error: usage: python -m chainjax.data.prepare {DATASET} [--data_dir=DIR] "
          f"[--source_dir=DIR] (got: {' '.join(argv[1:]) or 'no dataset'}; only {DATASET} is supported)",
          file=sys.stderr)
    sys.exit(EXIT_USAGE)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  data_dir = _DATA_DIR.value or default_data_dir()
  if fashion_mnist_available(data_dir):
    print(f"{DATASET} is already prepared in {data_dir}; nothing to do")
    return
  start = time.time()
  try:
    prepare_fashion_mnist(data_dir, _SOURCE_DIR.value)
  except PrepareError as e:
    print(f"chainjax.data.prepare: error: {e}", file=sys.stderr)
    sys.exit(EXIT_CANNOT_PREPARE)
  print(f"Prepared {DATASET} (ArrayRecord) in {data_dir} in {time.time() - start:.0f} s; read it with "
        f"tfds.data_source({DATASET!r}, data_dir={data_dir!r})")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, but a bad flag is one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"chainjax.data.prepare: error: {str(e).splitlines()[0] if str(e) else repr(e)}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
