"""Tests of the offline Fashion-MNIST preparation: restored gzip headers, one-line errors, the prepared dataset.

The tests that need the Fashion-MNIST files skip where Debian's package is not
installed (`sudo apt-get install dataset-fashion-mnist`); preparing runs once per
module (~11 s on 2 cores).
"""

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys

import numpy as np
import pytest

from chainjax.data import prepare

HAVE_DEBIAN_FILES = all(os.path.isfile(os.path.join(prepare.DEBIAN_DIR, f)) for f in prepare.FILES)
needs_debian_files = pytest.mark.skipif(
    not HAVE_DEBIAN_FILES, reason=f"Debian package {prepare.DEBIAN_PACKAGE} is not installed (no Fashion-MNIST "
    f"files in {prepare.DEBIAN_DIR}); `sudo apt-get install {prepare.DEBIAN_PACKAGE}` to run this test")


def registered_url_infos():
  """TFDS's registered size and sha256 of each file, by file name."""
  from tensorflow_datasets.image_classification import mnist  # pylint: disable=g-import-not-at-top

  return {info.filename: info for info in mnist.FashionMNIST.url_infos.values()}


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "chainjax.data.prepare", *args], capture_output=True, text=True,
                        timeout=300, check=False)


def read_idx(path, offset):
  with gzip.open(path, "rb") as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset)


# --- the gzip header ---


@needs_debian_files
@pytest.mark.parametrize("filename", prepare.FILES)
def test_restored_header_reproduces_the_tfds_registered_checksum(filename):
  with open(os.path.join(prepare.DEBIAN_DIR, filename), "rb") as f:
    shipped = f.read()
  restored = prepare.restore_gzip_header(shipped, filename)
  info = registered_url_infos()[filename]
  name = filename.removesuffix(".gz").encode() + b"\0"
  assert len(restored) == len(shipped) + len(name) == info.size  # only the name was missing...
  assert hashlib.sha256(restored).hexdigest() == info.checksum  # ...and the MTIME was different
  assert restored[10:10 + len(name)] == name and restored[10 + len(name):] == shipped[10:]
  assert prepare.restore_gzip_header(restored, filename) == restored  # published files pass through as is


def test_restore_inserts_name_and_mtime_and_keeps_the_stream():
  filename = "t10k-labels-idx1-ubyte.gz"
  stripped = gzip.compress(b"\x00\x00\x08\x01" + bytes(range(10)), mtime=123)  # no FNAME, like Debian's
  restored = prepare.restore_gzip_header(stripped, filename)
  assert restored[3] == 0x08  # FNAME
  assert struct.unpack("<I", restored[4:8])[0] == prepare.ORIGINAL_MTIME[filename]
  assert restored[8:10] == stripped[8:10]  # XFL, OS kept
  assert restored[10:33] == b"t10k-labels-idx1-ubyte\0"
  assert gzip.decompress(restored) == gzip.decompress(stripped)


def test_restore_rejects_what_is_not_gzip():
  with pytest.raises(prepare.PrepareError, match="not a gzip"):
    prepare.restore_gzip_header(b"PK\x03\x04 not gzip at all", "train-images-idx3-ubyte.gz")


# --- errors and defaults (no Fashion-MNIST files needed) ---


def test_missing_source_files_are_one_line_naming_the_folder_and_the_package(tmp_path):
  source, data_dir = tmp_path / "empty", tmp_path / "data"
  source.mkdir()
  result = run_cli("fashion_mnist", f"--source_dir={source}", f"--data_dir={data_dir}")
  assert result.returncode == prepare.EXIT_CANNOT_PREPARE, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert "sudo apt-get install dataset-fashion-mnist" in lines[0] and str(source) in lines[0]
  assert not data_dir.exists()


def test_wrong_source_files_are_refused_before_tfds_builds(tmp_path):
  source = tmp_path / "source"
  source.mkdir()
  for filename in prepare.FILES:
    (source / filename).write_bytes(gzip.compress(b"not fashion-mnist"))
  with pytest.raises(prepare.PrepareError, match="is not the Fashion-MNIST file TFDS registered"):
    prepare.prepare_fashion_mnist(str(tmp_path / "data"), str(source))
  assert not (tmp_path / "data").exists()


def test_only_fashion_mnist_is_accepted():
  result = run_cli("mnist")
  assert result.returncode == prepare.EXIT_USAGE
  assert "only fashion_mnist" in result.stderr


def test_default_data_dir_honors_tfds_data_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert prepare.default_data_dir() == str(tmp_path)
  assert not prepare.fashion_mnist_available()  # nothing prepared there


def test_no_network_refuses_dns_and_internet_sockets_then_restores_them():
  real_getaddrinfo = socket.getaddrinfo
  with prepare._no_network():  # pylint: disable=protected-access
    with pytest.raises(ConnectionRefusedError):
      socket.getaddrinfo("example.com", 80)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(ConnectionRefusedError):
      s.connect(("192.0.2.1", 9))  # TEST-NET-1: refused before any packet
  assert socket.getaddrinfo is real_getaddrinfo


# --- the prepared dataset ---


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Prepares into a fresh data dir with the guard off, recording any network access TFDS itself tries."""
  if not HAVE_DEBIAN_FILES:
    pytest.skip(f"Debian package {prepare.DEBIAN_PACKAGE} is not installed")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  attempts = []
  real_connect = socket.socket.connect

  def connect(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
      attempts.append(("connect", address))
      raise ConnectionRefusedError("test: offline")
    return real_connect(sock, address)

  def getaddrinfo(host, *args, **kwargs):
    attempts.append(("getaddrinfo", host))
    raise socket.gaierror("test: offline")

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(prepare, "_no_network", contextlib.nullcontext)
    mp.setattr(socket.socket, "connect", connect)
    mp.setattr(socket, "getaddrinfo", getaddrinfo)
    assert prepare.prepare_fashion_mnist(data_dir) == data_dir
  return data_dir, attempts


def test_preparing_tries_no_network(prepared):
  _, attempts = prepared
  assert attempts == []


def test_data_source_has_the_splits_shapes_and_labels(prepared):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir, _ = prepared
  assert prepare.fashion_mnist_available(data_dir)
  source = tfds.data_source("fashion_mnist", data_dir=data_dir)
  assert {split: len(source[split]) for split in source} == {"train": 60000, "test": 10000}
  for split in ("train", "test"):
    example = source[split][0]
    assert example["image"].shape == (28, 28, 1) and example["image"].dtype == np.uint8
    labels = np.array([source[split][i]["label"] for i in range(0, len(source[split]), 97)])
    assert labels.min() == 0 and labels.max() == 9


def test_test_split_holds_exactly_the_published_images_and_labels(prepared):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir, _ = prepared
  split = tfds.data_source("fashion_mnist", data_dir=data_dir)["test"]
  records = [split[i] for i in range(len(split))]  # shuffled by TFDS: compare as sorted multisets
  got = np.stack([np.append(r["image"].reshape(-1), r["label"]) for r in records])
  images = read_idx(os.path.join(prepare.DEBIAN_DIR, "t10k-images-idx3-ubyte.gz"), 16).reshape(-1, 784)
  labels = read_idx(os.path.join(prepare.DEBIAN_DIR, "t10k-labels-idx1-ubyte.gz"), 8)
  want = np.concatenate([images, labels[:, None]], axis=1).astype(got.dtype)
  np.testing.assert_array_equal(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])])
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 1000))


def test_second_run_is_a_no_op(prepared):
  data_dir, _ = prepared
  before = {p: os.stat(os.path.join(r, p)).st_mtime_ns for r, _, files in os.walk(data_dir) for p in files}
  result = run_cli("fashion_mnist", f"--data_dir={data_dir}", "--source_dir=/nonexistent")
  assert result.returncode == 0, result.stderr
  assert "already prepared" in result.stdout
  after = {p: os.stat(os.path.join(r, p)).st_mtime_ns for r, _, files in os.walk(data_dir) for p in files}
  assert after == before


def test_a_tfrecord_copy_is_refused_not_overwritten(prepared, tmp_path):
  data_dir, _ = prepared
  version_dir = os.path.join("fashion_mnist", "3.0.1")
  shutil.copytree(os.path.join(data_dir, version_dir), tmp_path / version_dir,
                  ignore=shutil.ignore_patterns("*.array_record-*"))
  info_path = tmp_path / version_dir / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  assert not prepare.fashion_mnist_available(str(tmp_path))
  with pytest.raises(prepare.PrepareError, match="holds fashion_mnist as tfrecord"):
    prepare.prepare_fashion_mnist(str(tmp_path))
