"""Config validation: one line naming the field, exit code 2, and an untouched workdir."""

import math
import os
import re
import subprocess
import sys

import ml_collections
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
  message = _error(ml_collections.ConfigDict(config))
  assert message.startswith("config.chain.consistency_weight: must be of type float")


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


# --------------------------------------------------------------------------------------------
# validate(): a bad value of every field is refused, naming the field.
# --------------------------------------------------------------------------------------------

DEVICES = 8  # as the default configs are validated in test_default_config_is_valid_in_every_mode

# (field path, bad value, expected start of the one-line message). The starting point is
# configs/default.py (3 MLP stages level1..3, warmup_cosine over 3000 updates, batch 256, adam),
# which is valid; each row changes one field and nothing else.
BAD_VALUES = [
    ("seed", -1, "config.seed: must be >= 0, got -1"),
    ("divergence_factor", -1.0, "config.divergence_factor: must be >= 0, got -1.0"),
    ("divergence_factor", 0.5, "config.divergence_factor: must be > 1 (or 0 = off), got 0.5"),
    ("batch_size", -256, "config.batch_size: must be > 0, got -256"),  # -256 % 8 == 0: not caught by divisibility
    ("batch_size", 0, "config.batch_size: must be > 0, got 0"),
    ("batch_size", 100, "config.batch_size: 100 is not divisible by the 8 devices"),
    ("batch_size", 2.5, "config.batch_size: must be of type int, got 2.5"),
    ("eval_batch_size", -1024, "config.eval_batch_size: must be > 0, got -1024"),
    ("eval_batch_size", 0, "config.eval_batch_size: must be > 0, got 0"),
    ("eval_batch_size", 100, "config.eval_batch_size: 100 is not divisible by the 8 devices"),
    ("total_steps", 0, "config.total_steps: must be > 0, got 0"),
    ("total_steps", -1, "config.total_steps: must be > 0, got -1"),
    ("num_epochs", -1, "config.num_epochs: must be >= 0, got -1"),
    ("num_epochs", 2, "config.num_epochs: the parity task is an endless stream with no epochs"),
    ("eval_every", 0, "config.eval_every: must be > 0, got 0"),
    ("eval_every", -500, "config.eval_every: must be > 0, got -500"),
    ("checkpoint_every", 0, "config.checkpoint_every: must be > 0, got 0"),
    ("checkpoint_every", -1, "config.checkpoint_every: must be > 0, got -1"),
    ("log_every", 0, "config.log_every: must be > 0, got 0"),
    ("log_every", -1, "config.log_every: must be > 0, got -1"),
    ("max_to_keep", 0, "config.max_to_keep: must be > 0, got 0"),
    ("max_to_keep", -3, "config.max_to_keep: must be > 0, got -3"),
    ("data.name", "", "config.data.name: is empty"),
    ("data.name", "no_such_dataset", "config.data.name: 'no_such_dataset' is neither a TFDS dataset nor prepared"),
    ("data.seed", -1, "config.data.seed: must be >= 0, got -1"),
    ("data.eval_size", 0, "config.data.eval_size: must be > 0, got 0"),
    ("data.d", 0, "config.data.d: must be > 0, got 0"),
    ("data.levels", 0, "config.data.levels: must be > 0, got 0"),
    ("data.num_images", 0, "config.data.num_images: must be > 0, got 0"),
    ("data.num_threads", -1, "config.data.num_threads: must be >= 0, got -1"),
    ("data.prefetch", -1, "config.data.prefetch: must be >= 0, got -1"),
    ("data.cache", "yes", "config.data.cache: must be of type bool, got 'yes'"),
    ("data.vocab_size", 0, "config.data.vocab_size: must be > 0, got 0"),
    ("data.max_len", 0, "config.data.max_len: must be > 0, got 0"),
    ("data.padding", "middle", "config.data.padding: 'middle' is not one of: pre, post"),
    ("data.truncating", "middle", "config.data.truncating: 'middle' is not one of: pre, post"),
    ("data.train_size", 0, "config.data.train_size: must be > 0, got 0"),
    ("chain.mode", "greedy", "config.chain.mode: 'greedy' is not one of: end_to_end, deep_supervision, decoupled, "
     "progressive"),
    ("chain.loss_weights", (1.0, 1.0), "config.chain.loss_weights: has 2 entries for 3 stages"),
    ("chain.loss_weights", (1.0, -1.0, 1.0), "config.chain.loss_weights: must be"),
    ("chain.consistency_weight", -0.1, "config.chain.consistency_weight: must be >= 0, got -0.1"),
    ("chain.phase_steps", (100, 100, 100), "config.chain.phase_steps: needs one budget per stage (3) summing"),
    ("chain.phase_steps", (1000, 0, 2000), "config.chain.phase_steps: must be positive ints"),
    ("optim.optimizer", "rmsprop", "config.optim.optimizer: 'rmsprop' is not one of: adam, adamw, sgd, lamb, "
     "adafactor, lion"),
    ("optim.learning_rate", 0.0, "config.optim.learning_rate: must be > 0, got 0.0"),
    ("optim.learning_rate", -0.1, "config.optim.learning_rate: must be > 0, got -0.1"),
    ("optim.schedule", "step", "config.optim.schedule: 'step' is not one of: constant, warmup_cosine"),
    ("optim.warmup_steps", -1, "config.optim.warmup_steps: must be >= 0, got -1"),
    ("optim.warmup_steps", 3000, "config.optim.warmup_steps: must be < the 3000 updates of this run"),
    ("optim.end_lr_factor", -0.1, "config.optim.end_lr_factor: must be >= 0, got -0.1"),
    # learning_rate is the peak: a final LR above it is no decay (warmup_cosine would rise to 1.5x the peak).
    ("optim.end_lr_factor", 1.5, "config.optim.end_lr_factor: must be in [0, 1], got 1.5"),
    ("optim.decay_rate", 0.0, "config.optim.decay_rate: must be in (0, 1], got 0.0"),
    ("optim.decay_rate", 1.5, "config.optim.decay_rate: must be in (0, 1], got 1.5"),
    ("optim.steps_per_epoch", -1, "config.optim.steps_per_epoch: must be >= 0, got -1"),
    ("optim.boundaries", (-1,), "config.optim.boundaries: must be update counts (ints >= 0), got (-1,)"),
    ("optim.boundaries", (20, 10), "config.optim.boundaries: must be strictly increasing, got (20, 10)"),
    ("optim.scales", (-0.5,), "config.optim.scales: must be"),
    ("optim.scales", (0.5,), "config.optim.scales: has 1 entries for 0 boundaries"),
    ("optim.plateau_metric", "loss", "config.optim.plateau_metric: 'loss' must name an eval metric"),
    ("optim.plateau_mode", "lower", "config.optim.plateau_mode: 'lower' is not one of: min, max"),
    ("optim.plateau_factor", 0.0, "config.optim.plateau_factor: must be in (0, 1], got 0.0"),
    ("optim.plateau_factor", 1.5, "config.optim.plateau_factor: must be in (0, 1], got 1.5"),
    ("optim.plateau_patience", 0, "config.optim.plateau_patience: must be > 0, got 0"),
    ("optim.plateau_min_scale", -0.1, "config.optim.plateau_min_scale: must be >= 0, got -0.1"),
    ("optim.plateau_min_scale", 1.5, "config.optim.plateau_min_scale: must be in [0, 1], got 1.5"),
    ("optim.plateau_min_delta", -0.1, "config.optim.plateau_min_delta: must be >= 0, got -0.1"),
    ("optim.b1", 1.0, "config.optim.b1: must be in [0, 1), got 1.0"),
    ("optim.b1", -0.1, "config.optim.b1: must be in [0, 1), got -0.1"),
    ("optim.b2", 1.0, "config.optim.b2: must be in [0, 1), got 1.0"),
    ("optim.b2", -0.1, "config.optim.b2: must be in [0, 1), got -0.1"),
    ("optim.eps", 0.0, "config.optim.eps: must be > 0, got 0.0"),
    ("optim.mu_dtype", "float16", "config.optim.mu_dtype: 'float16' is not one of: , float32, bfloat16"),
    ("optim.momentum", 1.0, "config.optim.momentum: must be in [0, 1), got 1.0"),
    ("optim.momentum", -0.1, "config.optim.momentum: must be >= 0, got -0.1"),
    ("optim.nesterov", "yes", "config.optim.nesterov: must be of type bool, got 'yes'"),
    ("optim.weight_decay", -0.1, "config.optim.weight_decay: must be >= 0, got -0.1"),
    ("optim.weight_decay", 0.1, "config.optim.weight_decay: adam has no weight decay"),
    ("optim.grad_clip_norm", -1.0, "config.optim.grad_clip_norm: must be >= 0, got -1.0"),
    ("optim.accum_steps", 0, "config.optim.accum_steps: must be > 0, got 0"),
    ("optim.accum_steps", -1, "config.optim.accum_steps: must be > 0, got -1"),
    ("optim.accum_steps", 3, "config.optim.accum_steps: batch_size=256 must split into accum_steps=3"),
    ("optim.accum_impl", "pmap", "config.optim.accum_impl: 'pmap' is not one of: scan, optax"),
    ("optim.lr_decay_per_stage", 0.0, "config.optim.lr_decay_per_stage: must be in (0, 1], got 0.0"),
    ("optim.lr_decay_per_stage", 1.5, "config.optim.lr_decay_per_stage: must be in (0, 1], got 1.5"),
    ("optim.per_stage.level1.optimizer", "rmsprop", "config.optim.per_stage.level1.optimizer: 'rmsprop' is not one of"),
    ("optim.per_stage.level1.learning_rate", 0.0, "config.optim.per_stage.level1.learning_rate: must be > 0, or -1.0"),
    ("optim.per_stage.level1.learning_rate", -0.5, "config.optim.per_stage.level1.learning_rate: must be > 0, or -1.0"),
    ("optim.per_stage.level1.schedule", "cyclic", "config.optim.per_stage.level1.schedule: 'cyclic' is not one of"),
    ("optim.per_stage.level1.weight_decay", -0.5, "config.optim.per_stage.level1.weight_decay: must be >= 0, or -1.0"),
    ("optim.per_stage.level1.weight_decay", 0.1,
     "config.optim.per_stage.level1.weight_decay: adam has no weight decay"),
    ("optim.per_stage.level1.frozen", "yes", "config.optim.per_stage.level1.frozen: must be of type bool"),
    ("early_stopping.metric", "accuracy", "config.early_stopping.metric: 'accuracy' must name an eval metric"),
    ("early_stopping.metric", "eval/top5", "config.early_stopping.metric: 'eval/top5' is not an eval metric of "
     "this chain; allowed: eval/loss, eval/accuracy, eval/auc, eval/stage_1/loss"),
    ("early_stopping.mode", "lower", "config.early_stopping.mode: 'lower' is not one of: max, min"),
    ("early_stopping.patience", -1, "config.early_stopping.patience: must be >= 0, got -1"),
    ("early_stopping.min_delta", -0.1, "config.early_stopping.min_delta: must be >= 0, got -0.1"),
    ("mesh.model", 0, "config.mesh.model: must be > 0, got 0"),
    ("mesh.model", -1, "config.mesh.model: must be > 0, got -1"),
    ("mesh.model", 3, "config.mesh.model: 3 does not divide the 8 devices"),
    ("precision.policy", "compute=float8", "config.precision.policy: precision policy: unknown dtype 'float8'"),
    ("precision.loss_scale", "dynamic:foo=1", "config.precision.loss_scale: loss scale 'dynamic:foo=1': bad"),
]

# Fields with no bad value validate() could know: free-form strings read only by the data
# pipeline of a TFDS dataset (a wrong one surfaces when the dataset is opened), and the stage
# list, whose entries have their own schema (tests/test_stages.py: validate_stage_config).
NOT_IN_TABLE = {
    "data.data_dir": "any directory or gs:// path; '' = the TFDS default",
    "data.split_train": "a TFDS split name, checked when a TFDS dataset is opened",
    "data.split_eval": "a TFDS split name, checked when a TFDS dataset is opened",
    "data.split_test": "a TFDS split name or '' (none)",
    "chain.stages": "stage configs: stages.validate_stage_config (tests/test_stages.py)",
}


def _leaf_fields(node=None, prefix=""):
  """Every leaf of base_config() as a dotted path; `optim.per_stage.<stage>.*` from stage_optim()."""
  if node is None:
    node = config_lib.base_config()
  for key, value in node.items():
    field = f"{prefix}{key}"
    if field == "optim.per_stage":
      yield from _leaf_fields(config_lib.stage_optim(), "optim.per_stage.<stage>.")
    elif isinstance(value, ml_collections.ConfigDict):
      yield from _leaf_fields(value, field + ".")
    else:
      yield field


def _get_default(field):
  """The base_config() default of a `_leaf_fields` path."""
  node = config_lib.base_config()
  if field.startswith("optim.per_stage.<stage>."):
    return config_lib.stage_optim()[field.rsplit(".", 1)[1]]
  for part in field.split("."):
    node = node[part]
  return node


def _table_field(field):
  return re.sub(r"^optim\.per_stage\.[^.]+\.", "optim.per_stage.<stage>.", field)


def test_bad_value_table_covers_every_field():
  """A field added to base_config() without a bad-value row (or a reason in NOT_IN_TABLE) fails here."""
  fields = set(_leaf_fields())
  covered = {_table_field(field) for field, _, _ in BAD_VALUES}
  assert covered <= fields, f"table rows for fields base_config() does not have: {sorted(covered - fields)}"
  assert set(NOT_IN_TABLE) <= fields, sorted(set(NOT_IN_TABLE) - fields)
  missing = sorted(fields - covered - set(NOT_IN_TABLE))
  assert not missing, f"no bad-value row in BAD_VALUES for: {missing}"
  numeric = {f for f in fields if isinstance(_get_default(f), (int, float)) and not isinstance(_get_default(f), bool)}
  assert {"batch_size", "optim.learning_rate", "optim.per_stage.<stage>.learning_rate"} <= numeric
  assert numeric <= covered, sorted(numeric - covered)  # no number is exempt: each has a row


def _set(config, field, value):
  """Sets one dotted field. A ConfigDict refuses a value of another type itself, so such a value
  goes in through a plain dict, as a config built without base_config() could hold it."""
  *path, last = field.split(".")
  node = config
  for part in path:
    node = node[part]
  try:
    node[last] = value
    return config
  except TypeError:
    tree = config.to_dict()
    node = tree
    for part in path:
      node = node[part]
    node[last] = value
    return ml_collections.ConfigDict(tree)


@pytest.mark.parametrize("field,value,expected", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_validate_rejects_bad_value(field, value, expected):
  """validate(), called directly, refuses the value with one line that starts with `config.<field>:`."""
  config = _set(default.get_config(), field, value)  # valid as it comes (test_default_config_is_valid_...)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config, num_devices=DEVICES)
  message = str(info.value)
  assert info.value.field == field, message
  assert "\n" not in message and message.startswith(expected), message


def _float_fields():
  """Every float field of base_config() and of a per-stage entry, and the tuples of floats."""
  fields = [f for f in _leaf_fields() if isinstance(_get_default(f), float) and not isinstance(_get_default(f), bool)]
  fields = [f.replace("<stage>", "level1") for f in fields]
  return fields + ["chain.loss_weights", "optim.scales"]


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("field", _float_fields())
def test_validate_rejects_non_finite_floats(field, bad):
  """inf and nan are refused in every float field (a NaN compares False with every bound, and +inf passes
  every lower bound: an infinite learning rate, eps or min_delta is no setting)."""
  config = default.get_config()
  config.optim.optimizer = "adamw"  # so that a weight decay is allowed and only its value is judged
  value = bad
  if field == "chain.loss_weights":
    value = (1.0, bad, 1.0)
  elif field == "optim.scales":
    config.optim.boundaries, value = (100,), (bad,)
  config = _set(config, field, value)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config, num_devices=DEVICES)
  assert info.value.field == field, str(info.value)
  assert str(info.value).startswith(f"config.{field}: must be"), str(info.value)


# --------------------------------------------------------------------------------------------
# The command line: exit code 2, one line, the workdir untouched.
# --------------------------------------------------------------------------------------------


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
