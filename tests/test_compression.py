"""`--mode=compress` (`chainjax.compression`): PTQ of a trained workdir, the report, sensitivity, bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import helpers
from chainjax import compression
from chainjax import experiment
from chainjax import train
from chainjax.compress import ptq
from chainjax.errors import ConfigError, WorkdirError

QAT_RULES = ("stages/level2/.* w=4 a=8",)


def _config(**overrides):
  return helpers.load_config("default", "runlocal", **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished float run of default:runlocal and its final metrics (copied by each test that writes)."""
  workdir = tmp_path_factory.mktemp("float") / "run"
  return str(workdir), train.train_and_evaluate(_config(), str(workdir))


@pytest.fixture(scope="module")
def trained_qat(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("qat") / "run"
  return str(workdir), train.train_and_evaluate(_config(**{"compress.qat.rules": QAT_RULES}), str(workdir))


def _copy(src, tmp_path) -> str:
  dst = str(tmp_path / "run")
  shutil.copytree(src, dst)
  return dst


def test_report_holds_bytes_and_metrics_per_stage_and_the_float_metrics_are_the_runs(trained, tmp_path):
  workdir = _copy(trained[0], tmp_path)
  report = compression.compress(_config(), workdir)
  assert report == json.loads(open(os.path.join(workdir, "compress", "report.json")).read())
  assert report["step"] == 60 and report["split"] == "eval" and report["metric"] == "eval/auc"
  assert set(report["stages"]) == {"level1", "level2", "level3"}
  assert set(report["metrics"]) == {"float", "ptq_int8", "ptq_int4"}
  for key in ("eval/auc", "eval/accuracy", "eval/loss"):  # same parameters, same set as the run's last eval
    assert report["metrics"]["float"][key] == pytest.approx(trained[1][key], abs=1e-6)
  total = report["total"]
  assert total["float32"] == 4 * total["params"]
  assert 0.25 < total["int8"] / total["float32"] <= 0.27 and 0.125 < total["int4"] / total["float32"] <= 0.15
  assert total == ptq.total_bytes(report["stages"])
  assert abs(report["metrics"]["ptq_int8"]["eval/loss"] - report["metrics"]["float"]["eval/loss"]) < 1e-3
  for bits in (8, 4):  # the integers, saved as the step they come from
    assert os.listdir(os.path.join(workdir, "compress", f"int{bits}")) == ["60"]


def test_ptq_metrics_are_those_of_the_integer_weights_and_are_read_back_without_requantizing(trained, tmp_path,
                                                                                             monkeypatch):
  workdir = _copy(trained[0], tmp_path)
  first = compression.compress(_config(), workdir)
  exp = experiment.Experiment(_config())
  _, state, _ = exp.restore(workdir, params_only=True)
  for bits in (8, 4):  # the report's PTQ metrics = the float chain on the integers' values
    fake = state._replace(params=ptq.fake_quantize_params(state.params, bits))
    by_hand = exp.evaluate(fake, exp.task.eval_iterator(exp.config.eval_batch_size, _shard()))
    assert first["metrics"][f"ptq_int{bits}"] == pytest.approx(by_hand, abs=1e-6)

  def no_saving(*args, **kwargs):
    raise AssertionError("quantized and saved again")

  monkeypatch.setattr(compression.checkpoint_lib.Checkpointer, "save", no_saving)
  again = compression.compress(_config(), workdir)
  assert again["metrics"] == first["metrics"]


def _shard():
  from chainjax import data
  return data.Shard.of_this_process()


def test_sensitivity_quantizes_and_prunes_one_stage_at_a_time(trained, tmp_path):
  workdir = _copy(trained[0], tmp_path)
  config = _config(**{"compress.sensitivity": True, "compress.sensitivity_sparsity": (0.5, 0.9)})
  report = compression.compress(config, workdir)
  rows = report["sensitivity"]
  assert [(r["stage"], r["setting"]) for r in rows] == [
      (s, k) for s in ("level1", "level2", "level3") for k in ("int8", "int4", "prune50", "prune90")]
  reference = report["metrics"]["float"]
  for row in rows:
    assert row["drop"] == pytest.approx(reference["eval/auc"] - row["metric"])
    assert row["loss_increase"] == pytest.approx(row["loss"] - reference["eval/loss"])
  # Pruning 90% of one stage's kernels moves the metric more than int8 does, in every stage.
  drop = {(r["stage"], r["setting"]): abs(r["drop"]) for r in rows}
  assert all(drop[(s, "prune90")] > drop[(s, "int8")] for s in ("level1", "level2", "level3")), drop
  with open(os.path.join(workdir, "compress", "sensitivity.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_qat_run_reports_its_fake_quantized_metrics(trained_qat, tmp_path):
  workdir = _copy(trained_qat[0], tmp_path)
  report = compression.compress(_config(**{"compress.qat.rules": QAT_RULES}), workdir)
  assert set(report["metrics"]) == {"float", "qat", "ptq_int8", "ptq_int4"}
  assert report["metrics"]["qat"]["eval/auc"] == pytest.approx(trained_qat[1]["eval/auc"], abs=1e-6)
  assert report["metrics"]["float"]["eval/loss"] != report["metrics"]["qat"]["eval/loss"]


def test_a_qat_checkpoint_with_a_float_config_is_one_error_and_writes_nothing(trained_qat, tmp_path):
  workdir = _copy(trained_qat[0], tmp_path)
  with pytest.raises(ConfigError, match=r"compress\.qat\.rules: the checkpoint .* was trained with rules="):
    compression.compress(_config(), workdir)
  assert not os.path.exists(os.path.join(workdir, "compress"))


def test_resuming_a_qat_checkpoint_as_float_training_names_the_qat_rules(trained_qat, tmp_path):
  """Even with allow_config_change, the observers in the checkpoint do not fit a float chain: one error naming
  compress.qat.rules, and the checkpoints stay as they were."""
  workdir = _copy(trained_qat[0], tmp_path)
  before = helpers.checkpoint_steps(workdir)
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(_config(total_steps=80), workdir, allow_config_change=True)
  assert error.value.field == "compress.qat.rules" and "input_quant" in str(error.value)
  assert helpers.checkpoint_steps(workdir) == before


@pytest.mark.parametrize("field,value,expected", [
    ("compress.ptq_bits", (9,), "compress.ptq_bits: widths must be in 2..8, got 9"),
    ("compress.ptq_bits", (), "compress.ptq_bits: is empty"),
    ("compress.sensitivity_sparsity", (0.5, 1.0), "compress.sensitivity_sparsity: sparsities must be in [0, 1)"),
])
def test_bad_compress_fields_name_the_field_and_write_nothing(trained, tmp_path, field, value, expected):
  with pytest.raises(ConfigError) as error:
    compression.compress(_config(**{field: value}), trained[0])
  assert expected in str(error.value)
  assert not os.path.exists(os.path.join(trained[0], "compress"))


def test_cli_without_a_checkpoint_exits_2_with_one_line_and_creates_nothing(tmp_path):
  workdir = tmp_path / "never-trained"
  proc = subprocess.run(
      [sys.executable, "-m", "chainjax.main", "--config=configs/default.py:runlocal", f"--workdir={workdir}",
       "--mode=compress"], cwd=helpers.REPO, capture_output=True, text=True, timeout=180,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  lines = [l for l in proc.stderr.splitlines() if l.startswith("chainjax: error:")]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1 and f"--workdir={workdir} has no checkpoint to compress" in lines[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()
  with pytest.raises(WorkdirError):
    compression.compress(_config(), str(workdir))


def test_integers_of_other_parameters_are_replaced_not_read(trained, tmp_path):
  """The saved integers are keyed by the float parameters' fingerprint: after the checkpoint changes at the same
  step (here: its parameters scaled), PTQ quantizes the new parameters again and replaces the old integers."""
  workdir = _copy(trained[0], tmp_path)
  first = compression.compress(_config(), workdir)
  other = str(tmp_path / "other")
  train.train_and_evaluate(_config(seed=1), other)  # another model, same shapes, same step
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  shutil.copytree(os.path.join(other, "checkpoints"), os.path.join(workdir, "checkpoints"))
  again = compression.compress(_config(seed=1), workdir)
  assert again["source"] != first["source"] and again["step"] == first["step"]
  assert again["metrics"]["ptq_int8"] != first["metrics"]["ptq_int8"]
  fresh = compression.compress(_config(seed=1), other)  # the same parameters, quantized in a workdir of their own
  assert fresh["metrics"]["ptq_int8"] == again["metrics"]["ptq_int8"]
  assert fresh["metrics"]["ptq_int4"] == again["metrics"]["ptq_int4"]
