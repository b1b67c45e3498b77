"""An export folder of `--mode=export`, read back and run: `load(W/export)(instances)`.

Only the StableHLO artifact (`model.stablehlo`) and `manifest.json` (its format: `chainjax.export`) are
read; neither TensorFlow nor the workdir is needed. `chainjax.serve` and `python -m chainjax.predict
--export_dir` answer through it.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
from etils import epath

EXPORT_DIR = "export"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
STABLEHLO = "model.stablehlo"



class Exported:
  """An export folder's StableHLO model, runnable without TensorFlow or the workdir.

  `exported(instances)` -> {output name: numpy array with one row per instance}. Instances are model
  inputs (nested lists or an array), raw uint8 images for image models, or strings for text models
  (tokenized with the export's vocabulary, as in training). Requests are padded to power-of-two batch
  sizes up to `max_batch` (larger ones run in chunks), so a new request size rarely compiles.
  """

  def __init__(self, directory: str, manifest: dict, exported, max_batch: int = 256):
    self.directory, self.manifest, self._exported = directory, manifest, exported
    self.input_shape = tuple(manifest["input"]["shape"][1:])
    self.input_dtype = np.dtype(manifest["input"]["dtype"])
    self.output_names = tuple(o["name"] for o in manifest["outputs"])
    if max_batch < 1:
      raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    self.max_batch = max_batch
    self._call = jax.jit(exported.call)
    self._tokenize = None
    text = manifest["preprocessing"].get("text")
    if text:
      from chainjax.data import text as text_lib  # pylint: disable=import-outside-toplevel
      vocab = text_lib.Vocabulary.load(epath.Path(directory) / text["vocabulary"])
      self._tokenize = text_lib.Tokenize(vocab, "text", "label", text["max_len"], 1, text["padding"],
                                         text["truncating"])

  @property
  def step(self) -> int:
    return self.manifest["step"]

  def preprocess(self, instances) -> np.ndarray:
    """`instances` as the model's input array [N, *input shape], or one ValueError naming the problem."""
    shape, dtype = self.input_shape, self.input_dtype
    expected = f"[N, {', '.join(map(str, shape))}] {dtype.name}"
    if isinstance(instances, (str, bytes)):
      raise ValueError("instances: got one string; pass a list of examples")
    if isinstance(instances, (list, tuple)) and any(isinstance(v, (str, bytes)) for v in instances):
      if self._tokenize is None:
        raise ValueError(f"instances: strings, but the model takes {expected}")
      bad = next((i for i, t in enumerate(instances) if not isinstance(t, (str, bytes))), None)
      if bad is not None:
        raise ValueError(f"instances[{bad}]: {type(instances[bad]).__name__}, not a string; a text batch is a "
                         "list of strings")
      from chainjax.data import text as text_lib  # pylint: disable=import-outside-toplevel
      return np.stack([self._tokenize.ids(text_lib.as_text(t)) for t in instances])
    try:
      x = np.asarray(instances)
    except ValueError as e:
      raise ValueError(f"instances: not an array ({str(e).splitlines()[0]})") from None
    if x.ndim == 0 or not x.shape[0]:
      raise ValueError(f"instances: empty batch (shape {x.shape}); the model takes {expected}")
    if x.shape[1:] != shape:
      raise ValueError(f"instances: shape {x.shape}; the model takes {expected}")
    image = self.manifest["preprocessing"].get("image")
    if image and x.dtype == np.uint8:
      return x.astype(np.float32) * np.float32(image["scale"])
    if x.dtype.kind not in "biuf" or not np.can_cast(x.dtype, dtype, "same_kind"):
      raise ValueError(f"instances: dtype {x.dtype}; the model takes {expected}")
    x = x.astype(dtype)
    if self._tokenize is not None and (x.min() < 0 or x.max() >= self._tokenize.vocab.size):
      raise ValueError(f"instances: word ids must be in [0, {self._tokenize.vocab.size}), got [{x.min()}, {x.max()}]")
    return x

  def bucket(self, n: int) -> int:
    size = 1
    while size < n:
      size *= 2
    return min(size, self.max_batch)

  def __call__(self, instances) -> dict[str, np.ndarray]:
    x = self.preprocess(instances)
    parts = []
    for start in range(0, len(x), self.max_batch):
      chunk = x[start:start + self.max_batch]
      padded = np.zeros((self.bucket(len(chunk)),) + chunk.shape[1:], chunk.dtype)
      padded[:len(chunk)] = chunk
      parts.append({k: np.asarray(v)[:len(chunk)] for k, v in self._call(padded).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}


def load(export_dir: str, max_batch: int = 256) -> Exported:
  """The export in `export_dir` (written by `--mode=export`); one ValueError for what is missing or wrong."""
  directory = epath.Path(export_dir)
  path = directory / MANIFEST
  if not path.is_file():
    raise ValueError(f"{path} does not exist: run `python -m chainjax.main --config=... --workdir=W --mode=export` "
                     "first and pass W/export")
  try:
    manifest = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path} is not readable JSON: {str(e).splitlines()[0]}") from None
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format_version {manifest.get('format_version')!r}; this chainjax reads "
                     f"{FORMAT_VERSION}: export again with this version")
  model = directory / STABLEHLO
  if not model.is_file():
    raise ValueError(f"{model} does not exist: the export is incomplete; export again")
  data = model.read_bytes()
  recorded = manifest.get("files", {}).get(STABLEHLO, {}).get("sha256")
  if recorded and hashlib.sha256(data).hexdigest() != recorded:
    raise ValueError(f"{model} does not match its sha256 in {MANIFEST} (changed or truncated after the export); "
                     "export again")
  try:
    exported = jax.export.deserialize(bytearray(data))
  except Exception as e:  # pylint: disable=broad-except  (flatbuffers and MLIR raise what they raise)
    raise ValueError(f"{model} cannot be read by JAX {jax.__version__} ({type(e).__name__}: "
                     f"{(str(e).strip().splitlines() or [''])[0][:200]}); export again") from None
  return Exported(os.fspath(directory), manifest, exported, max_batch)


__all__ = ["EXPORT_DIR", "Exported", "FORMAT_VERSION", "MANIFEST", "STABLEHLO", "load"]
