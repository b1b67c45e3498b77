"""`chainjax.export`: every artifact reloads and answers as the JAX model does; StableHLO without TensorFlow."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import logging as absl_logging

import helpers
import processes
import tiny_tfds
from chainjax import export
from chainjax import predict
from chainjax import train
from chainjax.data import base
from chainjax.data import text

tf = pytest.importorskip("tensorflow", reason="the export extra: pip install -e '.[dev,export]'")


def _run(tmp_path_factory, name, config, tflite=tuple(export.TFLITE)):
  workdir = str(tmp_path_factory.mktemp(name) / "run")
  train.train_and_evaluate(config, workdir)
  levels = lambda: (absl_logging.get_verbosity(), absl_logging.get_absl_logger().level, logging.getLogger().level)
  before = levels()
  manifest = export.export_workdir(config, workdir, tflite=tflite)
  # TensorFlow's SavedModel walk sets absl's verbosity and leaves it: later INFO lines (the tests that
  # read the training log) would vanish.
  assert levels() == before
  return workdir, manifest


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
  """The default config, 1000 updates: it solves the task (mlp stages, binary heads): (workdir, manifest)."""
  return _run(tmp_path_factory, "parity", helpers.load_config("default", total_steps=1000, eval_every=1000,
                                                              checkpoint_every=1000, log_every=1000))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """fashion_mnist_cnn (conv stages, 3-class heads) on a tiny TFDS set; no early exit after conv1 (a head that
  may exit but never does), at 0.4 after conv2."""
  tmp = tmp_path_factory.mktemp("tfds")
  return _run(tmp_path_factory, "images", helpers.load_config("fashion_mnist_cnn", "runlocal", total_steps=4, **{
      "data.name": tiny_tfds.NAME, "data.data_dir": tiny_tfds.build(tmp),
      "inference.stage_exit_threshold": (1.0, 0.4)}))


# The text models convert to float TFLite only (what the text test reads): their integer conversions
# took 30 s of the two fixtures; the integer kinds are checked on the parity and image runs.
@pytest.fixture(scope="module")
def lstm(tmp_path_factory):
  """imdb_lstm on synthetic sentences (embedding + lstm stages, text)."""
  return _run(tmp_path_factory, "lstm", helpers.load_config("imdb_lstm", "runlocal", total_steps=10,
                                                            **{"data.train_size": 2000}), tflite=("float",))


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
  """text_transformer:runlocal (embedding + transformer + mlp stages)."""
  return _run(tmp_path_factory, "transformer", helpers.load_config(
      "text_transformer", "runlocal", total_steps=10, **{"optim.warmup_steps": 2}), tflite=("float",))


def _eval_inputs(predictor, n=256):
  batches = predictor.experiment.task.eval_iterator(predictor.experiment.config.eval_batch_size, base.Shard())
  return np.concatenate([np.asarray(b["inputs"])[np.asarray(b["mask"]) > 0] for b in batches])[:n]


def _tflite(path, x):
  interpreter = tf.lite.Interpreter(model_path=path)
  interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], x.shape)
  interpreter.allocate_tensors()
  return interpreter.get_signature_runner("serving_default")(inputs=x)


def _assert_close(out, reference, names, rtol=1e-5, atol=1e-6):
  for name in names:
    np.testing.assert_allclose(np.asarray(out[name]), np.asarray(reference[name]), rtol=rtol, atol=atol, err_msg=name)


def _reference(predictor, x):
  out = predictor.with_exit_impl("full")(x)  # every head's probabilities, as the exported function gives them
  return {**{f"probabilities_{k}": v for k, v in out.stages.items()}, "classes": out.classes,
          "exit_stage": out.exit_stages}


@pytest.mark.slow
@pytest.mark.parametrize("run", ["parity", "images"])
def test_every_artifact_answers_as_jax(run, request):
  workdir, manifest = request.getfixturevalue(run)
  directory = os.path.join(workdir, export.EXPORT_DIR)
  predictor = predict.Predictor.from_workdir(workdir)
  x = _eval_inputs(predictor)
  reference = _reference(predictor, x)
  names = [o["name"] for o in manifest["outputs"]]
  assert set(names) == set(reference) and manifest["input"] == {
      "name": "inputs", "shape": [None, *predictor.experiment.task.input_shape], "dtype": "float32"}
  assert manifest["errors"] == {} and manifest["step"] == predictor.step
  for name, info in manifest["files"].items():  # every file as listed
    assert os.path.getsize(os.path.join(directory, name)) == info["bytes"]

  _assert_close(export.load(directory)(x), reference, names)  # StableHLO
  served = tf.saved_model.load(os.path.join(directory, export.SAVED_MODEL)).signatures["serving_default"]
  _assert_close({k: v.numpy() for k, v in served(inputs=tf.constant(x)).items()}, reference, names)
  _assert_close(_tflite(os.path.join(directory, export.TFLITE["float"]), x), reference, names)
  for kind in ("dynamic_int8", "int8"):
    out = _tflite(os.path.join(directory, export.TFLITE[kind]), x)
    agree = np.mean(out["classes"] == reference["classes"])
    assert agree >= (0.99 if run == "parity" else 0.75), (kind, agree)
    # conv1's +inf threshold is not in the int8 model (quantized, every example would clear it)
    exits = np.mean(out["exit_stage"] == reference["exit_stage"])
    assert exits >= 0.9 and not np.any(out["exit_stage"] == 1), (kind, exits)
  if run == "images":  # early exit chooses the head in every artifact (exit_stage is compared above)
    assert manifest["exit_thresholds"] == {"conv2": 0.4}


@pytest.mark.slow
def test_text_models_take_raw_strings_in_the_saved_model_and_every_stage_type_exports(lstm, transformer):
  for workdir, manifest in (lstm, transformer):
    directory = os.path.join(workdir, export.EXPORT_DIR)
    predictor = predict.Predictor.from_workdir(workdir)
    source = predictor.experiment.task.eval_source
    texts = [text.as_text(source[i]["text"]) for i in range(64)]
    texts += ["Not GOOD,  not good at ALL!<br />Don't... 'quoted' rock'n'roll ''twice'' 42 x_y", "", "film"]
    reference = _reference(predictor, texts)
    names = [o["name"] for o in manifest["outputs"]]
    assert manifest["preprocessing"]["text"]["max_len"] == predictor.experiment.task.transform.max_len
    assert [n for n in manifest["files"] if n.endswith(".tflite")] == [export.TFLITE["float"]]  # as asked
    assert {s["type"] for s in manifest["stages"]} <= {"embedding", "lstm", "transformer", "mlp"}
    _assert_close(export.load(directory)(texts), reference, names)
    signatures = tf.saved_model.load(os.path.join(directory, export.SAVED_MODEL)).signatures
    out = signatures["serving_default"](inputs=tf.constant(texts))
    _assert_close({k: v.numpy() for k, v in out.items()}, reference, names)
    ids = np.stack([predictor.experiment.task.transform.ids(t) for t in texts])
    by_ids = signatures["serving_ids"](inputs=tf.constant(ids))
    _assert_close({k: v.numpy() for k, v in by_ids.items()}, reference, names)
    _assert_close(_tflite(os.path.join(directory, export.TFLITE["float"]), ids), reference, names)
  types = {s["type"] for _, m in (lstm, transformer) for s in m["stages"]}
  assert types == {"embedding", "lstm", "transformer", "mlp"}  # conv: the image run, mlp also the parity run


def test_the_in_graph_tokenizer_is_the_training_tokenizer(lstm):
  workdir, _ = lstm
  tokenize = predict.Predictor.from_workdir(workdir).experiment.task.transform
  words = tokenize.vocab.words
  table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
      tf.constant(words), tf.constant(np.arange(2, len(words) + 2), tf.int64)), default_value=1)
  texts = ["A  b", "", "'lead trail'", "it's  'it''s'", "<BR/>x<br >y", "UPPER lower 123abc", " ".join(words[:80])]
  for padding in ("pre", "post"):
    for truncating in ("pre", "post"):
      graph = export.make_tf_tokenizer(tf, table, 12, padding, truncating)(tf.constant(texts)).numpy()
      python = type(tokenize)(tokenize.vocab, "text", "label", 12, 1, padding, truncating)
      np.testing.assert_array_equal(graph, np.stack([python.ids(t) for t in texts]), err_msg=(padding, truncating))


def test_request_sizes_give_the_outputs_of_one_batch(parity):
  workdir, _ = parity
  model = export.load(os.path.join(workdir, export.EXPORT_DIR), max_batch=256)
  x = _eval_inputs(predict.Predictor.from_workdir(workdir), 300)
  whole = export.load(os.path.join(workdir, export.EXPORT_DIR), max_batch=512)(x)
  parts = [model(x[:1]), model(x[1:4]), model(x[4:])]  # 1, 3 and 296 (= 256 + 40)
  for name, value in whole.items():
    np.testing.assert_allclose(np.concatenate([p[name] for p in parts]), value, rtol=1e-6, atol=1e-7)
  cases = [(np.zeros((2, 63), np.float32), r"^instances: shape \(2, 63\); the model takes \[N, 64\] float32$"),
           (np.zeros((0, 64), np.float32), r"^instances: empty batch"),
           (["a", "b"], r"^instances: strings, but the model takes \[N, 64\] float32$"),
           (np.zeros((2, 64), np.complex64), r"^instances: dtype complex64"),
           ("abc", r"^instances: got one string")]
  for instances, message in cases:
    with pytest.raises(ValueError, match=message):
      model(instances)


def test_stablehlo_runs_without_tensorflow(parity):
  workdir, _ = parity
  x = _eval_inputs(predict.Predictor.from_workdir(workdir), 5)
  np.save(os.path.join(workdir, "x.npy"), x)
  script = ("import sys, json, numpy as np; from chainjax import exported; "
            "out = exported.load(sys.argv[1])(np.load(sys.argv[2])); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'; "
            "print(json.dumps(out['classes'].tolist()))")
  proc = subprocess.run([sys.executable, "-c", script, os.path.join(workdir, export.EXPORT_DIR),
                         os.path.join(workdir, "x.npy")], env=processes.env(1), capture_output=True, text=True,
                        timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.splitlines()[-1]) == predict.Predictor.from_workdir(workdir)(x).classes.tolist()


def test_export_command_and_its_errors(parity, tmp_path):
  workdir, manifest = parity
  with pytest.raises(ValueError, match=r"manifest.json does not exist: run `python -m chainjax.main .*--mode=export"):
    export.load(str(tmp_path))
  with pytest.raises(ValueError, match=r"^tflite: 'int4' not among float, dynamic_int8, int8$"):
    export.export_workdir(helpers.load_config("default"), workdir, tflite=("float", "int4"))
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / export.MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
  with pytest.raises(ValueError, match=r"format_version 99; this chainjax reads 1"):
    export.load(str(broken))
  (broken / export.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match=r"model.stablehlo does not exist: the export is incomplete"):
    export.load(str(broken))
  stablehlo = (os.path.join(workdir, export.EXPORT_DIR, export.STABLEHLO))
  with open(stablehlo, "rb") as f:
    (broken / export.STABLEHLO).write_bytes(f.read()[:1000])  # truncated
  with pytest.raises(ValueError, match=r"model.stablehlo does not match its sha256 in manifest.json"):
    export.load(str(broken))
  unchecked = {**manifest, "files": {}}  # an export whose manifest records no checksum: JAX's own error, one line
  (broken / export.MANIFEST).write_text(json.dumps(unchecked))
  with pytest.raises(ValueError, match=r"model.stablehlo cannot be read by JAX .*; export again$"):
    export.load(str(broken))
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = subprocess.run([sys.executable, "-m", "chainjax.main", "--config=configs/default.py:runlocal",
                         f"--workdir={empty}", "--mode=export"], cwd=helpers.REPO, env=processes.env(1),
                        capture_output=True, text=True, timeout=240)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("chainjax: error: ") and "no checkpoint" in proc.stderr
  assert not os.path.exists(empty / export.EXPORT_DIR) and os.listdir(empty) == []
