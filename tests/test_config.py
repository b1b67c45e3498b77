"""Config validation: one line naming the field, exit code 2, and an untouched workdir."""

import os
import subprocess
import sys

import pytest

from chainjax import config as config_lib
from chainjax import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import default  # noqa: E402


@pytest.mark.parametrize("mode", ["end_to_end", "deep_supervision", "decoupled", "progressive"])
def test_default_config_is_valid_in_every_mode(mode):
  config_lib.validate(default.get_config(f"mode={mode}"), num_devices=8)
  config_lib.validate(default.get_config(f"mode={mode},runlocal"), num_devices=8)


def test_every_default_field_is_typed():
  """ml_collections cannot override a None field from the command line."""
  def walk(node, prefix=""):
    for key, value in node.items():
      assert value is not None, f"{prefix}{key} is None"
      if hasattr(value, "items"):
        walk(value, f"{prefix}{key}.")
  walk(default.get_config().to_dict())


def _error(config, num_devices=1) -> str:
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config, num_devices)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_unknown_field():
  config = default.get_config()
  config.optim.learning_rat = 0.1
  assert _error(config).startswith("config.optim.learning_rat: unknown field; known fields here:")


def test_wrong_type_in_unlocked_config():
  config = default.get_config().to_dict()
  config["chain"]["consistency_weight"] = "high"
  import ml_collections
  message = _error(ml_collections.ConfigDict(config))
  assert message.startswith("config.chain.consistency_weight: must be of type float")


@pytest.mark.parametrize("field,value,expected", [
    ("optim.learning_rate", -0.1, "config.optim.learning_rate: must be > 0"),
    ("chain.mode", "greedy", "config.chain.mode: 'greedy' is not one of: end_to_end, deep_supervision"),
    ("optim.optimizer", "rmsprop", "config.optim.optimizer: 'rmsprop' is not one of: adam, adamw, sgd"),
    ("data.name", "no_such_dataset", "config.data.name: 'no_such_dataset' is neither a TFDS dataset nor prepared"),
    ("early_stopping.metric", "accuracy", "config.early_stopping.metric: 'accuracy' must name an eval metric"),
    ("early_stopping.metric", "eval/top5", "config.early_stopping.metric: 'eval/top5' is not an eval metric of "
     "this chain; allowed: eval/loss, eval/accuracy, eval/auc, eval/stage_1/loss"),
    ("precision.policy", "compute=float8", "config.precision.policy: precision policy: unknown dtype 'float8'"),
    ("precision.loss_scale", "dynamic:foo=1", "config.precision.loss_scale: loss scale 'dynamic:foo=1': bad"),
    ("optim.accum_steps", 3, "config.optim.accum_steps: batch_size=256 must split into accum_steps=3"),
    ("chain.loss_weights", (1.0, 1.0), "config.chain.loss_weights: has 2 entries for 3 stages"),
    ("chain.phase_steps", (100, 100, 100), "config.chain.phase_steps: needs one budget per stage (3) summing"),
])
def test_bad_values_name_the_field(field, value, expected):
  config = default.get_config()
  *path, last = field.split(".")
  node = config
  for part in path:
    node = node[part]
  node[last] = value
  assert _error(config).startswith(expected)


def test_batch_size_must_divide_device_count():
  config = default.get_config()
  config.batch_size = 100
  assert _error(config, num_devices=8).startswith("config.batch_size: 100 is not divisible by the 8 devices")


def test_stage_list_must_fit_task():
  config = default.get_config()
  config.data.levels = 2
  assert _error(config).startswith("config.chain.stages: the parity task has 2 stage labels (level_1, level_2); "
                                   "got 3 stages")
  config = default.get_config()
  config.chain.stages[0] = stages.stage_config("conv", name="level1")
  assert _error(config).startswith("config.chain.stages[0]")
  config = default.get_config()
  config.chain.stages[1].loss = "softmax_ce"
  assert _error(config).startswith("config.chain.stages[1].loss: 'softmax_ce' does not fit label 'level_2'")


def _run_main(tmp_path, *overrides):
  workdir = tmp_path / "workdir"
  proc = subprocess.run(
      [sys.executable, "-m", "chainjax.main", "--config=configs/default.py", f"--workdir={workdir}", *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  return proc, workdir


@pytest.mark.parametrize("override,expected", [
    ("--config.optim.learning_rate=-1e-3", "config.optim.learning_rate: must be > 0"),
    ("--config.chain.mode=greedy", "config.chain.mode: 'greedy' is not one of"),
    ("--config.batch_size=100", "config.batch_size: 100 is not divisible by the 8 devices"),
    ("--config.batch_size=big", "batch_size"),
    ("--config.optim.learning_rat=0.1", "learning_rat"),
    ("--config.data.levels=4", "config.chain.stages: the parity task has 4 stage labels"),
])
def test_cli_rejects_bad_config_with_exit_2_and_leaves_workdir_untouched(tmp_path, override, expected):
  proc, workdir = _run_main(tmp_path, override)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("chainjax: error:")]
  assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
  assert not workdir.exists()
