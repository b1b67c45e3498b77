"""`chainjax.predict`: inference on a trained workdir (float and PTQ weights, text, buckets, bad input)."""

import json
import os
import re
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import PIL.Image
import pytest

import helpers
import processes
import tiny_tfds
from chainjax import compression
from chainjax import early_exit
from chainjax import predict
from chainjax import train
from chainjax.data import base
from chainjax.data import text


def _listing(workdir) -> dict:
  """Every file and folder under `workdir` with its size and modification time."""
  out = {}
  for root, dirs, files in os.walk(workdir):
    for name in dirs + files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, workdir)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
  return out


def _eval_set(predictor):
  """The run's held-out set as (inputs, labels of every stage), padding dropped."""
  exp = predictor.experiment
  batches = list(exp.task.eval_iterator(exp.config.eval_batch_size, base.Shard()))
  keep = np.concatenate([b["mask"] for b in batches]) > 0
  inputs = np.concatenate([b["inputs"] for b in batches])[keep]
  labels = [np.concatenate([b["labels"][i] for b in batches])[keep] for i in range(exp.num_stages)]
  return inputs, labels


def _metrics_at(workdir, step) -> dict:
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return next(row for row in rows if row["step"] == step)


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
  """default:runlocal, 60 updates, checkpoints at 30 and 60: (workdir, final metrics)."""
  workdir = str(tmp_path_factory.mktemp("parity") / "run")
  return workdir, train.train_and_evaluate(helpers.load_config("default", "runlocal"), workdir)


@pytest.fixture(scope="module")
def compressed_run(parity_run, tmp_path_factory):
  """A copy of `parity_run` after `--mode=compress` (int8 and int4 integers): (workdir, report)."""
  workdir = str(tmp_path_factory.mktemp("compressed") / "run")
  shutil.copytree(parity_run[0], workdir)
  return workdir, compression.compress(helpers.load_config("default", "runlocal"), workdir)


def test_final_classes_reproduce_the_runs_eval_accuracy_at_every_step(parity_run):
  workdir, final = parity_run
  predictor = predict.Predictor.from_workdir(workdir)
  inputs, labels = _eval_set(predictor)
  out = predictor(inputs)
  assert predictor.step == 60 and len(inputs) == 512
  assert np.mean(out.classes == labels[-1]) == final["eval/accuracy"]
  assert {k: v.shape for k, v in out.stages.items()} == {"level1": (512, 4), "level2": (512, 2), "level3": (512,)}
  for p in out.stages.values():  # binary heads: sigmoid of each logit
    assert np.all((p > 0) & (p < 1))
  np.testing.assert_array_equal(out.probabilities, out.stages["level3"])
  np.testing.assert_array_equal(out.classes, out.probabilities > 0.5)

  earlier = predict.Predictor.from_workdir(workdir, step=30)
  out_30 = earlier(inputs)
  assert earlier.step == 30 and not np.array_equal(out_30.probabilities, out.probabilities)
  assert np.mean(out_30.classes == labels[-1]) == _metrics_at(workdir, 30)["eval/accuracy"]


def test_request_sizes_pad_to_a_few_buckets_each_compiled_once(parity_run):
  workdir, _ = parity_run
  predictor = predict.Predictor.from_workdir(workdir)
  assert jax.device_count() == 8 and predictor.bucket_sizes == (8, 16, 32, 64, 128, 256)
  x = _eval_set(predictor)[0][:316]
  compiles = []
  listener = lambda event, *args, **kwargs: compiles.append(event) if event.endswith("backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    parts = [predictor(x[:3]), predictor(x[3:8]), predictor(x[8:15])]
    assert predictor.compiled_sizes == (8,) and len(compiles) == 1  # 3, 5 and 7 examples: one program
    parts += [predictor(x[15:16]), predictor(x[16:316])]  # 1 and 300 (= 256 + 44, padded to 64)
    assert predictor.compiled_sizes == (8, 64, 256) and len(compiles) == 3
    chunked = predictor(x)
    assert len(compiles) == 3
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  whole = predict.Predictor.from_workdir(workdir, max_batch=512)(x)  # one batch of 316 padded to 512
  for out in (chunked, jax.tree.map(lambda *a: np.concatenate(a), *parts)):
    np.testing.assert_array_equal(out.classes, whole.classes)
    for name in whole.stages:
      np.testing.assert_allclose(out.stages[name], whole.stages[name], rtol=1e-6, atol=1e-7)


def test_int8_weights_are_the_compressed_integers_and_agree_with_float(compressed_run, parity_run):
  workdir, report = compressed_run
  before = _listing(workdir)
  float_out = predict.Predictor.from_workdir(workdir)
  int8 = predict.Predictor.from_workdir(workdir, weights="int8")
  inputs, labels = _eval_set(int8)
  out, reference = int8(inputs), float_out(inputs)
  assert np.mean(out.classes == labels[-1]) == report["metrics"]["ptq_int8"]["eval/accuracy"]
  assert np.mean(out.classes == reference.classes) >= 0.97  # 60 updates: many logits near 0
  assert not np.array_equal(out.probabilities, reference.probabilities)  # the integers, not the floats
  int4 = predict.Predictor.from_workdir(workdir, weights="int4")
  assert np.mean(int4(inputs).classes == labels[-1]) == report["metrics"]["ptq_int4"]["eval/accuracy"]
  assert _listing(workdir) == before  # read-only: nothing created, written or moved
  with pytest.raises(ValueError, match=r"int8 does not exist; run `python -m chainjax.main .*--mode=compress` first"):
    predict.Predictor.from_workdir(parity_run[0], weights="int8")
  with pytest.raises(ValueError, match=r"weights='fp16': use 'float' or the integers of --mode=compress"):
    predict.Predictor.from_workdir(workdir, weights="fp16")


def test_a_text_model_takes_raw_strings_with_the_runs_vocabulary(tmp_path):
  workdir = str(tmp_path / "lstm")
  config = helpers.load_config("imdb_lstm", "runlocal", total_steps=10, **{"data.train_size": 2000})
  final = train.train_and_evaluate(config, workdir)
  before = _listing(workdir)
  predictor = predict.Predictor.from_workdir(workdir)
  source = predictor.experiment.task.eval_source
  records = [source[i] for i in range(len(source))]
  texts = [text.as_text(r["text"]) for r in records]
  out = predictor(texts)
  assert out.classes.shape == (256,) and list(out.stages) == ["classifier"]
  assert np.mean(out.classes == np.array([r["label"] for r in records])) == final["eval/accuracy"]
  ids = np.stack([predictor.experiment.task.transform.ids(t) for t in texts[:5]])
  np.testing.assert_array_equal(predictor(ids).probabilities, out.probabilities[:5])
  np.testing.assert_array_equal(predictor([t.encode() for t in texts[:5]]).probabilities, out.probabilities[:5])
  assert predictor(["Not GOOD, not good at all!"]).probabilities.shape == (1,)
  with pytest.raises(ValueError, match=r"^inputs: got one str; pass a batch, e.g. a list of strings$"):
    predictor("a good film")
  with pytest.raises(ValueError, match=r"^inputs\[1\]: int, not a string"):
    predictor(["a good film", 3])
  with pytest.raises(ValueError, match=r"^inputs: dtype float64; the synthetic_sentiment model takes \[N, 64\] int32"):
    predictor(np.zeros((2, 64)))
  assert _listing(workdir) == before


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
  """fashion_mnist_cnn (3 conv stages, each with a head of the same 3 classes) on a tiny TFDS set, 4 updates."""
  tmp_path = tmp_path_factory.mktemp("images")
  workdir = str(tmp_path / "run")
  config = helpers.load_config("fashion_mnist_cnn", "runlocal", total_steps=4, **{
      "data.name": tiny_tfds.NAME, "data.data_dir": tiny_tfds.build(tmp_path / "tfds")})
  return workdir, train.train_and_evaluate(config, workdir)


def test_multiclass_heads_give_softmax_probabilities_and_raw_images_are_scaled_as_in_training(image_run):
  workdir, final = image_run
  predictor = predict.Predictor.from_workdir(workdir)
  inputs, labels = _eval_set(predictor)
  out = predictor(inputs)
  assert {k: v.shape for k, v in out.stages.items()} == {"conv1": (13, 3), "conv2": (13, 3), "conv3": (13, 3)}
  for p in out.stages.values():
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(out.classes, out.probabilities.argmax(axis=-1))
  assert np.mean(out.classes == labels[-1]) == final["eval/accuracy"]
  source = predictor.experiment.task.eval_source
  images = np.stack([source[i]["image"] for i in range(len(source))])  # uint8, as stored
  raw = predictor(images)
  np.testing.assert_array_equal(raw.classes, out.classes)
  np.testing.assert_allclose(raw.probabilities, out.probabilities, atol=1e-6)


def test_bad_requests_and_workdirs_are_one_clear_error(parity_run, tmp_path):
  workdir, _ = parity_run
  predictor = predict.Predictor.from_workdir(workdir)
  empty, unsaved = tmp_path / "empty", tmp_path / "unsaved"  # unsaved: a run stopped before its first checkpoint
  empty.mkdir()
  unsaved.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), unsaved / "config.json")
  cases = [
      (lambda: predictor(np.zeros((4, 63), np.float32)), r"^inputs: shape \(4, 63\); the parity model takes "
       r"\[N, 64\] float32$"),
      (lambda: predictor(np.zeros(64, np.float32)), r"add a batch axis, inputs\[None\]"),
      (lambda: predictor(np.zeros((0, 64), np.float32)), r"^inputs: empty batch \(shape \(0, 64\)\)"),
      (lambda: predictor([]), r"^inputs: empty batch"),
      (lambda: predictor(np.zeros((2, 64), np.complex64)), r"^inputs: dtype complex64; the parity model takes"),
      (lambda: predictor(["a", "b"]), r"^inputs: strings, but the parity model takes float32 arrays"),
      (lambda: predict.Predictor.from_workdir(str(tmp_path / "missing")), r"missing does not exist$"),
      (lambda: predict.Predictor.from_workdir(str(empty)), r"config.json does not exist: .* is not the "
       r"workdir of a chainjax run$"),
      (lambda: predict.Predictor.from_workdir(workdir, step=31), r"has no checkpoint at step 31; its steps: "
       r"\[30, 60\]$"),
  ]
  cases.append((lambda: predict.Predictor.from_workdir(str(unsaved)), r"has no checkpoint \(no .*/checkpoints/"
                r"<step> folder\): train it first$"))
  for call, message in cases:
    with pytest.raises(ValueError, match=message) as error:
      call()
    assert "\n" not in str(error.value)
  assert predictor(np.ones((2, 64), np.float64)).classes.shape == (2,)  # float64 casts to float32


def _with_exit(workdir, threshold=1.0, stage=()):
  config = predict.load_config(workdir)
  config.inference.exit_threshold, config.inference.stage_exit_threshold = threshold, stage
  return config


def test_early_exit_thresholds_one_and_zero_and_every_implementation_agrees(image_run):
  workdir, _ = image_run
  inputs, labels = _eval_set(predict.Predictor.from_workdir(workdir))
  whole = predict.Predictor.from_workdir(workdir, config=_with_exit(workdir, 1.0))(inputs)
  np.testing.assert_array_equal(whole.exit_stages, 3)  # threshold 1.0: the whole chain
  np.testing.assert_array_equal(whole.classes, whole.stages["conv3"].argmax(-1))

  first = predict.Predictor.from_workdir(workdir, config=_with_exit(workdir, 0.0))(inputs)
  np.testing.assert_array_equal(first.exit_stages, 1)  # threshold 0: every example leaves at stage 1
  np.testing.assert_array_equal(first.classes, whole.stages["conv1"].argmax(-1))
  np.testing.assert_allclose(first.stages["conv1"], whole.stages["conv1"], rtol=1e-6, atol=1e-7)
  assert np.isnan(first.stages["conv2"]).all() and np.isnan(first.stages["conv3"]).all()  # never computed

  # Thresholds between the stage-1 and stage-2 confidences of the eval examples: some leave at 1, some at 2.
  c1, c2 = (np.asarray(predict.confidence(whole.stages[s], False)) for s in ("conv1", "conv2"))
  t1, t2 = float(np.median(c1)), float(np.median(c2))
  config = _with_exit(workdir, stage=(t1, t2))
  expected = np.where(c1 >= t1, 1, np.where(c2 >= t2, 2, 3))
  assert (expected == 1).any() and (expected > 1).any()
  results = {impl: predict.Predictor.from_workdir(workdir, config=config, exit_impl=impl)(inputs)
             for impl in predict.EXIT_IMPLS}
  for impl, out in results.items():
    np.testing.assert_array_equal(out.exit_stages, expected, err_msg=impl)
    np.testing.assert_array_equal(np.bincount(out.exit_stages, minlength=4)[1:].sum(), len(inputs))
    for stage, name in enumerate(("conv1", "conv2", "conv3"), 1):
      chosen = expected == stage
      np.testing.assert_array_equal(out.classes[chosen], whole.stages[name][chosen].argmax(-1), err_msg=impl)
      reached = expected >= stage
      np.testing.assert_allclose(out.stages[name][reached], whole.stages[name][reached], rtol=1e-6, atol=1e-7)
  assert np.isnan(results["compact"].stages["conv3"][expected < 3]).all()
  assert not np.isnan(results["full"].stages["conv3"]).any()


def test_early_exit_needs_heads_that_answer_the_last_task(parity_run, image_run):
  workdir, _ = parity_run
  with pytest.raises(ValueError, match=r"^config.inference.stage_exit_threshold: stage level1 predicts 'level_1', "
                     r"not the last stage's 'level_3' \(another task\); its threshold must be 1.0 \(no exit\)$"):
    predict.Predictor.from_workdir(workdir, config=_with_exit(workdir, stage=(0.9, 1.0)))
  # One threshold for the whole chain applies to the heads that answer the last task: none here.
  out = predict.Predictor.from_workdir(workdir, config=_with_exit(workdir, 0.0))(np.zeros((3, 64), np.float32))
  np.testing.assert_array_equal(out.exit_stages, 3)
  with pytest.raises(ValueError, match=r"^exit_impl='sorted': use one of compact, mask, full$"):
    predict.Predictor.from_workdir(image_run[0], exit_impl="sorted")


def test_early_exit_report_curve_is_exact_and_written(image_run, parity_run):
  workdir, _ = image_run
  config = _with_exit(workdir)
  config.inference.report_thresholds = (0.0, 0.5, 1.0)
  result = early_exit.report(config, workdir)
  predictor = predict.Predictor.from_workdir(workdir)
  _, inputs, labels = early_exit.held_out_set(predictor)
  n, whole = len(inputs), predictor(inputs)
  rows = {row["threshold"]: row for row in result["rows"]}
  assert list(rows) == ["full", 0.0, 0.5, 1.0] and result["exit_stages"] == ["conv1", "conv2"]
  for row in rows.values():
    assert sum(row["exits"]) == n
  assert rows["full"]["accuracy"] == rows[1.0]["accuracy"] == np.mean(whole.classes == labels)
  assert rows[1.0]["exits"] == [0, 0, n] and rows[1.0]["mean_stages"] == 3.0
  assert rows[0.0]["exits"] == [n, 0, 0] and rows[0.0]["mean_stages"] == 1.0
  assert rows[0.0]["accuracy"] == np.mean(whole.stages["conv1"].argmax(-1) == labels)
  halfway = predict.Predictor.from_workdir(workdir, config=_with_exit(workdir, 0.5))(inputs)  # the predictor agrees
  assert rows[0.5]["exits"] == np.bincount(halfway.exit_stages, minlength=4)[1:].tolist()
  assert rows[0.5]["accuracy"] == np.mean(halfway.classes == labels)
  assert all(rows["full"][f"full_ms_batch{b}"] > 0 and rows[0.5][f"mask_ms_batch{b}"] > 0 for b in (1, 256))
  saved = json.loads(open(os.path.join(workdir, "early_exit", "curve.json")).read())
  assert saved["rows"] == json.loads(json.dumps(result["rows"]))
  assert open(os.path.join(workdir, "early_exit", "curve.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"

  parity = parity_run[0]
  config = _with_exit(parity)
  config.inference.report_thresholds = (0.5,)
  result = early_exit.report(config, parity)
  assert result["exit_stages"] == [] and "every example runs the whole chain" in result["note"]
  assert [row["mean_stages"] for row in result["rows"]] == [3.0, 3.0]


def _flags(**values):
  defaults = dict(workdir=None, export_dir=None, input=None, output=None, step=None, weights="float",
                  exit_threshold=None)
  return types.SimpleNamespace(**{**defaults, **values})


def test_predict_command_on_arrays_texts_and_images(parity_run, image_run, tmp_path, capsys):
  workdir, _ = parity_run
  predictor = predict.Predictor.from_workdir(workdir)
  x = _eval_set(predictor)[0][:5]
  np.save(tmp_path / "x.npy", x)
  np.savez(tmp_path / "x.npz", inputs=x, other=x[:1])
  expected = predictor(x)
  assert predict.predict_main(_flags(workdir=workdir, input=str(tmp_path / "x.npy"))) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 5
  for line, cls, p in zip(lines, expected.classes, expected.probabilities):  # index, class, its probability
    index, prediction, probability, stage = line.split("\t")
    assert int(prediction) == cls and float(probability) == pytest.approx(p if cls else 1 - p, abs=1e-6)
    assert stage == "stage 3 (level3)"
  out = tmp_path / "out.jsonl"
  assert predict.predict_main(_flags(workdir=workdir, input=str(tmp_path / "x.npz"), output=str(out))) == 0
  assert capsys.readouterr().out == f"5 predictions written to {out}\n"
  rows = [json.loads(line) for line in open(out)]
  assert [r["example"] for r in rows] == ["0", "1", "2", "3", "4"] and [r["prediction"] for r in rows] == \
      expected.classes.tolist()
  np.testing.assert_allclose([r["probabilities"]["level1"] for r in rows], expected.stages["level1"], atol=1e-6)

  images_dir = image_run[0]
  images = predict.Predictor.from_workdir(images_dir)
  folder = tmp_path / "images"
  folder.mkdir()
  source = images.experiment.task.eval_source
  raw = np.stack([source[i]["image"] for i in range(4)])
  for i, image in enumerate(raw):
    PIL.Image.fromarray(image[..., 0]).save(folder / f"{i:02d}.png")
  (folder / "notes.txt").write_text("not an image")
  assert predict.predict_main(_flags(workdir=images_dir, input=str(folder), exit_threshold=0.0)) == 0
  lines = capsys.readouterr().out.splitlines()
  from_arrays = images(raw)
  assert [line.split("\t")[0] for line in lines] == ["00.png", "01.png", "02.png", "03.png"]
  assert [int(line.split("\t")[1]) for line in lines] == from_arrays.stages["conv1"].argmax(-1).tolist()  # all exit at 1
  assert all(line.endswith("stage 1 (conv1)") for line in lines)

  bad = [(_flags(workdir=workdir, input=str(tmp_path / "missing.npy")), r"missing.npy does not exist"),
         (_flags(workdir=workdir, input=str(folder)), r"no image|shape"),
         (_flags(workdir=str(tmp_path / "nowhere"), input=str(tmp_path / "x.npy")), r"nowhere does not exist"),
         (_flags(workdir=images_dir, input=str(tmp_path / "x.npy")), r"inputs: shape \(5, 64\)"),
         (_flags(workdir=workdir, input=str(out)), r"use a .npy or .npz array or a folder of images")]
  np.save(tmp_path / "empty.npy", np.zeros((0, 64), np.float32))
  bad.append((_flags(workdir=workdir, input=str(tmp_path / "empty.npy")), r"holds no example"))
  for values, message in bad:
    assert predict.predict_main(values) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chainjax.predict: error: ") and re.search(message, err), err


def test_predict_command_line(parity_run, tmp_path):
  workdir, _ = parity_run
  np.save(tmp_path / "x.npy", np.zeros((3, 64), np.float32))
  run = lambda name: subprocess.run(  # one device: a run trained on 8 serves on 1
      [sys.executable, "-m", "chainjax.predict", f"--workdir={workdir}", f"--input={tmp_path / name}"],
      cwd=helpers.REPO, env=processes.env(1), capture_output=True, text=True, timeout=240)
  ok = run("x.npy")
  assert ok.returncode == 0 and len(ok.stdout.splitlines()) == 3, ok.stderr[-3000:]
  assert all(line.split("\t")[1] in ("0", "1") for line in ok.stdout.splitlines())
  bad = run("y.npy")
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith("y.npy does not exist"), bad.stderr
