"""Tests of the offline Fashion-MNIST preparation: restored gzip headers, one-line errors, the prepared dataset.

Everything runs on small stand-ins the tests write themselves (`idx_files`: 60 train
and 20 test images in the original IDX/gzip format, shaped as Debian ships the real
ones), with TFDS's registered sizes and sha256 swapped for theirs, so `prepare` and
TFDS's own download manager check them exactly as they check the real files. The
same tests run again on the real files, and a few check those byte for byte against
TFDS's registered checksums; those skip where Debian's package is not installed
(`sudo apt-get install dataset-fashion-mnist`; preparing it takes ~11 s on 2 cores).
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
from typing import NamedTuple

import numpy as np
import pytest

import idx_files
from chainjax.data import prepare

HAVE_DEBIAN_FILES = all(os.path.isfile(os.path.join(prepare.DEBIAN_DIR, f)) for f in prepare.FILES)
needs_debian_files = pytest.mark.skipif(
    not HAVE_DEBIAN_FILES, reason=f"Debian package {prepare.DEBIAN_PACKAGE} is not installed (no Fashion-MNIST "
    f"files in {prepare.DEBIAN_DIR}); `sudo apt-get install {prepare.DEBIAN_PACKAGE}` to run this test")


def registered_url_infos_by_url():
  """TFDS's registered size and sha256 of each file, by url."""
  from tensorflow_datasets.image_classification import mnist  # pylint: disable=g-import-not-at-top

  return mnist.FashionMNIST.url_infos


def registered_url_infos():
  """TFDS's registered size and sha256 of each file, by file name."""
  return {info.filename: info for info in registered_url_infos_by_url().values()}


def register_checksums(mp, published):
  """Makes `prepare` and TFDS expect the files in `published` (name -> bytes as published) instead of the real
  ones: the builder's registered {url: UrlInfo}, read by both, gets their sizes and sha256."""
  builder_class = prepare._builder_class()  # pylint: disable=protected-access
  mp.setattr(builder_class, "url_infos", idx_files.url_infos(published, builder_class.url_infos))


def single_line(err) -> str:
  message = str(err)
  assert message and "\n" not in message, message
  return message


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


@pytest.mark.parametrize("filename", prepare.FILES)
def test_restore_turns_a_debian_style_file_back_into_the_published_one(tmp_path, filename):
  _, published = idx_files.write_source(tmp_path, form="debian")
  shipped = (tmp_path / filename).read_bytes()
  assert shipped != published[filename] and shipped[3] == 0  # no FNAME, another MTIME: as Debian ships them
  assert prepare.restore_gzip_header(shipped, filename) == published[filename]  # byte for byte
  assert prepare.restore_gzip_header(published[filename], filename) == published[filename]
  assert idx_files.MTIME == prepare.ORIGINAL_MTIME


@pytest.mark.parametrize("form", ["debian", "published"])
def test_staging_gives_tfds_the_published_files_from_either_form(tmp_path, form):
  _, published = idx_files.write_source(tmp_path / "source", form=form)
  (tmp_path / "manual").mkdir()
  prepare.stage_source_files(str(tmp_path / "source"), str(tmp_path / "manual"),
                             idx_files.url_infos(published, registered_url_infos_by_url()))
  assert {f: (tmp_path / "manual" / f).read_bytes() for f in prepare.FILES} == published


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


def test_files_that_are_not_the_registered_ones_are_one_line_from_the_command(tmp_path):
  idx_files.write_source(tmp_path / "source")  # valid IDX/gzip, but not what TFDS registered
  result = run_cli("fashion_mnist", f"--source_dir={tmp_path / 'source'}", f"--data_dir={tmp_path / 'data'}")
  assert result.returncode == prepare.EXIT_CANNOT_PREPARE, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "is not the Fashion-MNIST file TFDS registered" in lines[0], result.stderr
  assert str(tmp_path / "source" / "train-images-idx3-ubyte.gz") in lines[0]
  assert not (tmp_path / "data").exists()


def _regzip(path, raw):  # as Debian ships a file: what a rebuilt or edited file would look like
  path.write_bytes(idx_files.debian_gzip(idx_files.published_gzip(raw, path.name)))


def _with_header_flags(path, flg):
  data = bytearray(path.read_bytes())
  data[3] = flg
  path.write_bytes(bytes(data))


DAMAGES = {  # name -> (damage(source_dir, splits), file it concerns, what the one line says)
    "missing": (lambda d, s: (d / "t10k-labels-idx1-ubyte.gz").unlink(), "t10k-labels-idx1-ubyte.gz",
                "not found"),
    "truncated": (lambda d, s: (d / "train-images-idx3-ubyte.gz").write_bytes(
        (d / "train-images-idx3-ubyte.gz").read_bytes()[:-100]), "train-images-idx3-ubyte.gz",
                  "is not the Fashion-MNIST file TFDS registered"),
    "corrupt_stream": (lambda d, s: (d / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(
        b ^ 0xFF if i == 500 else b for i, b in enumerate((d / "t10k-images-idx3-ubyte.gz").read_bytes()))),
                       "t10k-images-idx3-ubyte.gz", "is not the Fashion-MNIST file TFDS registered"),
    "wrong_idx_magic": (lambda d, s: _regzip(d / "train-images-idx3-ubyte.gz", idx_files.idx_images(
        s["train"][0], magic=idx_files.LABELS_MAGIC)), "train-images-idx3-ubyte.gz",
                        "is not the Fashion-MNIST file TFDS registered"),
    "other_labels": (lambda d, s: _regzip(d / "t10k-labels-idx1-ubyte.gz", idx_files.idx_labels(
        (s["test"][1] + 1) % 10)), "t10k-labels-idx1-ubyte.gz", "is not the Fashion-MNIST file TFDS registered"),
    "not_gzip": (lambda d, s: (d / "train-labels-idx1-ubyte.gz").write_bytes(idx_files.idx_labels(s["train"][1])),
                 "train-labels-idx1-ubyte.gz", "not a gzip"),
    "gzip_comment": (lambda d, s: _with_header_flags(d / "t10k-images-idx3-ubyte.gz", 0x10),
                     "t10k-images-idx3-ubyte.gz", "unexpected gzip header flags 0x10"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_source_file_is_one_line_naming_it_and_nothing_is_written(tmp_path, damage):
  """Only the damage is wrong: the intact files' checksums are registered (in place of the real ones)."""
  source, data_dir = tmp_path / "source", tmp_path / "data"
  splits, published = idx_files.write_source(source)
  damage_fn, filename, says = DAMAGES[damage]
  damage_fn(source, splits)
  with pytest.MonkeyPatch.context() as mp:
    register_checksums(mp, published)
    with pytest.raises(prepare.PrepareError) as err:
      prepare.prepare_fashion_mnist(str(data_dir), str(source))
  message = single_line(err.value)
  assert says in message and filename in message, message
  assert [f for f in prepare.FILES if f in message] == [filename], message  # names that file, no other
  assert not data_dir.exists()


def test_images_and_labels_of_different_counts_are_one_error_and_a_rerun_prepares(tmp_path):
  source, data_dir = tmp_path / "source", tmp_path / "data"
  splits, published = idx_files.write_source(source, form="published")
  labels_file = "t10k-labels-idx1-ubyte.gz"
  short = dict(published, **{labels_file: idx_files.published_gzip(idx_files.idx_labels(splits["test"][1][:-1]),
                                                                   labels_file)})
  (source / labels_file).write_bytes(short[labels_file])
  with pytest.MonkeyPatch.context() as mp:
    register_checksums(mp, short)  # registered as it is: the counts are what is wrong
    with pytest.raises(prepare.PrepareError, match="has 20 images but .* 19 labels"):
      prepare.prepare_fashion_mnist(str(data_dir), str(source))
  assert not prepare.fashion_mnist_available(str(data_dir))
  (source / labels_file).write_bytes(published[labels_file])
  with pytest.MonkeyPatch.context() as mp:
    register_checksums(mp, published)
    prepare.prepare_fashion_mnist(str(data_dir), str(source))
  assert prepare.fashion_mnist_available(str(data_dir))


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


class Prepared(NamedTuple):
  data_dir: str
  attempts: list  # network accesses TFDS itself tried while preparing
  sizes: dict  # split -> number of examples
  expected: dict  # split -> (images, labels) it must hold exactly (the full train split only when small)


@pytest.fixture(scope="module", params=["synthetic", pytest.param("debian", marks=needs_debian_files)])
def prepared(request, tmp_path_factory):
  """Prepares into a fresh data dir with the guard off, recording any network access TFDS itself tries.

  synthetic: `idx_files`' 60 + 20 images, shaped as Debian ships files, their checksums registered in place
  of the real ones; debian: the real files, from Debian's package, checked against TFDS's registered ones.
  """
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
    if request.param == "synthetic":
      source_dir = str(tmp_path_factory.mktemp("source"))
      expected, published = idx_files.write_source(source_dir, form="debian")
      register_checksums(mp, published)
      sizes = {split: len(labels) for split, (_, labels) in expected.items()}
    else:
      source_dir = None  # the default: Debian's folder
      test_images, test_labels = prepare.SPLIT_FILES["test"]
      expected = {"test": (read_idx(os.path.join(prepare.DEBIAN_DIR, test_images), 16).reshape(-1, 28, 28),
                           read_idx(os.path.join(prepare.DEBIAN_DIR, test_labels), 8))}
      sizes = {"train": 60000, "test": 10000}
    mp.setattr(prepare, "_no_network", contextlib.nullcontext)
    mp.setattr(socket.socket, "connect", connect)
    mp.setattr(socket, "getaddrinfo", getaddrinfo)
    assert prepare.prepare_fashion_mnist(data_dir, source_dir) == data_dir
  return Prepared(data_dir, attempts, sizes, expected)


def test_preparing_tries_no_network(prepared):
  assert prepared.attempts == []


def test_data_source_has_the_splits_shapes_and_labels(prepared):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  assert prepare.fashion_mnist_available(prepared.data_dir)
  source = tfds.data_source("fashion_mnist", data_dir=prepared.data_dir)
  assert {split: len(source[split]) for split in source} == prepared.sizes
  info = tfds.builder("fashion_mnist", data_dir=prepared.data_dir).info
  assert {split: info.splits[split].num_examples for split in info.splits} == prepared.sizes
  assert str(info.file_format.value) == "array_record"
  for split in ("train", "test"):
    example = source[split][0]
    assert example["image"].shape == (28, 28, 1) and example["image"].dtype == np.uint8
    step = 97 if len(source[split]) > 1000 else 1  # the real splits: a sample
    labels = np.array([source[split][i]["label"] for i in range(0, len(source[split]), step)])
    assert labels.min() == 0 and labels.max() == 9


def test_each_split_holds_exactly_the_source_images_and_labels(prepared):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  source = tfds.data_source("fashion_mnist", data_dir=prepared.data_dir)
  for split, (images, labels) in prepared.expected.items():
    records = [source[split][i] for i in range(len(source[split]))]  # shuffled by TFDS: compare as sorted multisets
    got = np.stack([np.append(r["image"].reshape(-1), r["label"]) for r in records])
    want = np.concatenate([images.reshape(len(images), -1), labels[:, None]], axis=1).astype(got.dtype)
    np.testing.assert_array_equal(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])], err_msg=split)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, len(labels) // 10))


def test_second_run_is_a_no_op(prepared):
  data_dir = prepared.data_dir
  before = {p: os.stat(os.path.join(r, p)).st_mtime_ns for r, _, files in os.walk(data_dir) for p in files}
  result = run_cli("fashion_mnist", f"--data_dir={data_dir}", "--source_dir=/nonexistent")
  assert result.returncode == 0, result.stderr
  assert "already prepared" in result.stdout
  after = {p: os.stat(os.path.join(r, p)).st_mtime_ns for r, _, files in os.walk(data_dir) for p in files}
  assert after == before


def test_a_tfrecord_copy_is_refused_not_overwritten(prepared, tmp_path):
  data_dir = prepared.data_dir
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
