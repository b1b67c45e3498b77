"""Config validation: one line naming the field, exit code 2, and an untouched workdir."""

import math
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from chainjax import chain as chain_lib
from chainjax import config as config_lib
from chainjax import experiment
from chainjax import stages
from helpers import override

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import default  # noqa: E402


@pytest.mark.parametrize("mode", ["end_to_end", "deep_supervision", "decoupled", "progressive",
                                  "progressive_finetune"])
def test_default_config_is_valid_in_every_mode(mode):
  experiment.validate(default.get_config(f"mode={mode}"), num_devices=8)
  experiment.validate(default.get_config(f"mode={mode},runlocal"), num_devices=8)


@pytest.mark.parametrize("arg", ["", "runlocal"])
def test_every_point_of_the_default_sweep_is_valid(arg):
  points = []
  default.sweep(lambda **overrides: points.append(overrides), arg)
  assert {p["chain.mode"] for p in points} == set(chain_lib.MODES)
  for point in points:
    experiment.validate(override(default.get_config(arg), **point), num_devices=8)


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
    experiment.validate(config, num_devices)
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
  config.chain.stages[1].loss = "mse"  # not a loss of the chain (`chain.LOSSES`)
  assert _error(config).startswith("config.chain.stages[1].loss: 'mse' is not allowed; allowed: '', 'softmax_ce', "
                                   "'sigmoid_bce', 'hinge'")


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
    ("profile_steps", "6:3", "config.profile_steps: '6:3' is not START:END with 1 <= START < END"),
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
    ("chain.finetune_steps", -1, "config.chain.finetune_steps: must be >= 0, got -1"),
    ("compress.qat.rules", ("stages/nothing/.* w=8 a=8",), "config.compress.qat.rules: "),
    ("compress.qat.rules", ("stages/level1/.* w=9",), "config.compress.qat.rules: rule 0, 'stages/level1/.* w=9': "),
    ("compress.prune.sparsity", 1.0, "config.compress.prune.sparsity: must be in [0, 1), got 1.0"),
    ("compress.prune.stage_sparsity", (0.5, 0.5), "config.compress.prune.stage_sparsity: has 2 entries for 3 stages"),
    ("compress.prune.stage_sparsity", (0.5, -0.1, 0.5), "config.compress.prune.stage_sparsity: must be fractions"),
    ("compress.prune.initial_sparsity", -0.1, "config.compress.prune.initial_sparsity: must be in [0, 1)"),
    ("compress.prune.begin_step", -1, "config.compress.prune.begin_step: must be >= 0, got -1"),
    ("compress.prune.end_step", -2, "config.compress.prune.end_step: must be >= 0, or -1"),
    ("compress.prune.frequency", 0, "config.compress.prune.frequency: must be > 0, got 0"),
    ("compress.prune.power", 0.0, "config.compress.prune.power: must be > 0, got 0.0"),
    ("compress.prune.scope", "stage", "config.compress.prune.scope: 'stage' is not one of: layerwise, global"),
    ("compress.prune.n_m", "4:2", "config.compress.prune.n_m: '4:2' is not N:M with 0 < N < M"),
    ("compress.init_from", "/nonexistent/run", "config.compress.init_from: /nonexistent/run is not a directory"),
    ("compress.qat.start_step", -1, "config.compress.qat.start_step: must be >= 0, got -1"),
    ("compress.qat.boundary_bits", 1, "config.compress.qat.boundary_bits: must be 0 (float) or in 2..8, got 1"),
    ("compress.qat.boundary_bits", 9, "config.compress.qat.boundary_bits: must be 0 (float) or in 2..8, got 9"),
    ("compress.ptq_bits", (8, 9), "config.compress.ptq_bits: widths must be in 2..8, got 9"),
    ("compress.ptq_bits", (), "config.compress.ptq_bits: is empty"),
    ("compress.ptq_bits", (4.5,), "config.compress.ptq_bits: entries must be of type int, got (4.5,)"),
    ("compress.ptq_bits", (4, 4), "config.compress.ptq_bits: names a width twice"),
    ("compress.sensitivity", 1, "config.compress.sensitivity: must be of type bool"),
    ("compress.sensitivity_sparsity", (0.5, 1.0), "config.compress.sensitivity_sparsity: sparsities must be in [0, 1)"),
    ("compress.sensitivity_sparsity", (-0.5,), "config.compress.sensitivity_sparsity: sparsities must be in [0, 1)"),
    ("inference.exit_threshold", 1.5, "config.inference.exit_threshold: must be in [0, 1] (1.0 = no early exit)"),
    ("inference.exit_threshold", -0.1, "config.inference.exit_threshold: must be in [0, 1]"),
    ("inference.stage_exit_threshold", (0.9,), "config.inference.stage_exit_threshold: has 1 entries: give one per "
     "stage before the last (2), or none"),
    ("inference.report_thresholds", (), "config.inference.report_thresholds: must be thresholds in [0, 1], at least one"),
    ("inference.report_thresholds", (0.5, 2.0), "config.inference.report_thresholds: must be thresholds in [0, 1]"),
    ("inference.stage_exit_threshold", (0.9, 1.1), "config.inference.stage_exit_threshold: thresholds must be in "
     "[0, 1], got (0.9, 1.1)"),
    # --mode=diagnose; an unknown mode name is refused by diagnostics.resolve_modes (tests/test_diagnostics.py).
    ("diagnostics.modes", (1,), "config.diagnostics.modes: entries must be chain mode names (str), got (1,)"),
    ("diagnostics.modes", ("end_to_end", "end_to_end"), "config.diagnostics.modes: names a mode twice"),
    ("diagnostics.num_batches", 1, "config.diagnostics.num_batches: must be >= 2 (the spread of the per-batch "
     "gradients needs two batches), got 1"),
    ("diagnostics.batch_size", -8, "config.diagnostics.batch_size: must be >= 0 (0 = the run's batch_size), got -8"),
    ("diagnostics.batch_size", 100, "config.diagnostics.batch_size: 100 is not divisible by the 8 devices"),
    ("diagnostics.step", -2, "config.diagnostics.step: must be >= 0, or -1 (the newest checkpoint), got -2"),
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
    # Accepted by the parser alone once, refused only when the optimizer was built: now by validate().
    ("precision.loss_scale", "dynamic:period=-1", "config.precision.loss_scale: loss scale 'dynamic:period=-1': "
     "period must be an integer >= 1, got -1"),
    ("precision.loss_scale", "static:0", "config.precision.loss_scale: loss scale 'static:0': scale must be a "
     "finite number > 0, got 0.0"),
    ("precision.loss_scale", "dynamic:initial_scale=1,min_scale=2", "config.precision.loss_scale: loss scale "
     "'dynamic:initial_scale=1,min_scale=2': initial_scale (1.0) is below min_scale (2.0)"),
    # Seeds: jax.random.key takes an int64, the data streams a uint32 range is kept to.
    ("seed", 2**32, "config.seed: must be in [0, 4294967295], got 4294967296"),
    ("data.seed", 2**64, "config.data.seed: must be in [0, 4294967295], got 18446744073709551616"),
    # Memory (on any machine: 10**12 examples are terabytes).
    ("batch_size", 10**12, "config.batch_size: one train batch (1000000000000 examples of 288 bytes"),
    ("eval_batch_size", 10**12, "config.eval_batch_size: one eval batch (1000000000000 examples of 288 bytes"),
    ("data.d", 10**12, "config.data.d: one example (inputs (1000000000000,) float32 + labels + mask, "
     "data.d=1000000000000) is"),
    ("data.eval_size", 10**12, "config.data.eval_size: the held-out set (1000000000000 examples of 288 bytes"),
    ("chain.loss_weights", ("(1.0,nan,1.0)",), "config.chain.loss_weights: could not parse '(1.0,nan,1.0)' as a "
     "tuple of numbers"),
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
    experiment.validate(config, num_devices=DEVICES)
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
    experiment.validate(config, num_devices=DEVICES)
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


# --------------------------------------------------------------------------------------------
# Preflight: what fails before (or instead of) a run, with one line and exit code 2.
# --------------------------------------------------------------------------------------------


def _run_cli(tmp_path, *args, config="configs/default.py:runlocal", workdir=None):
  """`python -m chainjax.main --config=<config> --workdir=<workdir> <args>`: (process, workdir, error lines)."""
  workdir = tmp_path / "workdir" if workdir is None else workdir
  proc = subprocess.run(
      [sys.executable, "-m", "chainjax.main", f"--config={config}", f"--workdir={workdir}", *args],
      cwd=REPO, capture_output=True, text=True, timeout=180,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  lines = [l for l in proc.stderr.splitlines() if l.startswith("chainjax: error:")]
  return proc, workdir, lines


def _assert_one_line_exit_2(proc, lines, *expected):
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for text in expected:
    assert text in lines[0], lines[0]


@pytest.mark.parametrize("override,expected", [
    # Memory: the estimate of one batch (inputs + labels) or of an example against host memory (8 CPU devices).
    ("--config.batch_size=1000000000", ["config.batch_size:", "train batch", "bytes", "host memory"]),
    ("--config.eval_batch_size=1000000000", ["config.eval_batch_size:", "eval batch", "bytes", "host memory"]),
    ("--config.data.d=1000000000", ["data.d=1000000000", "bytes", "host memory"]),
    # Loss-scale strings the optimizer builder would refuse: refused by validate() with the same code.
    ("--config.precision.loss_scale=dynamic:period=-1", ["config.precision.loss_scale:", "period must be"]),
    ("--config.precision.loss_scale=static:0", ["config.precision.loss_scale:", "scale must be a finite number > 0"]),
    ("--config.precision.loss_scale=dynamic:initial_scale=1,min_scale=2",
     ["config.precision.loss_scale:", "initial_scale (1.0) is below min_scale (2.0)"]),
    # A seed JAX cannot take (jax.random.key: int64) and a tuple ml_collections could not parse.
    ("--config.seed=18446744073709551616", ["config.seed: must be in [0, 4294967295], got 18446744073709551616"]),
    ("--config.chain.loss_weights=(1.0,nan,1.0)",
     ["config.chain.loss_weights: could not parse '(1.0,nan,1.0)' as a tuple of numbers"]),
    # An override of a stage that does not exist: the known stage names, on one line.
    ("--config.optim.per_stage.nosuch.frozen=True",
     ["--config.optim.per_stage.nosuch.frozen: 'nosuch' is not a stage name; stages: level1, level2, level3"]),
    ("--config.optim.nosuch=1", ["--config.optim.nosuch: 'nosuch' is not a field of config.optim; known fields:"]),
])
def test_cli_preflight_refuses_with_one_line(tmp_path, override, expected):
  proc, workdir, lines = _run_cli(tmp_path, override)
  _assert_one_line_exit_2(proc, lines, *expected)
  assert not workdir.exists()


@pytest.mark.parametrize("config,expected", [
    ("configs/nosuch.py", ["--config=configs/nosuch.py:", "No such file or directory"]),
    ("configs/default.py:nosuchvariant",
     ["--config=configs/default.py:nosuchvariant: unknown config argument 'nosuchvariant'; allowed: mode, runlocal"]),
    ("configs/default.py:runlocal=maybe",
     ["--config=configs/default.py:runlocal=maybe: config argument 'runlocal' must be true or false", "'maybe'"]),
])
def test_cli_refuses_a_bad_config_file_or_variant_before_jax_starts(tmp_path, config, expected):
  proc, workdir, lines = _run_cli(tmp_path, config=config)
  _assert_one_line_exit_2(proc, lines, *expected)
  assert "JAX" not in proc.stderr  # main() logs "JAX <version> on ..." once JAX is up: it never got there
  assert not workdir.exists()


def test_cli_refuses_a_workdir_that_cannot_be_created_or_written(tmp_path):
  """A file, a path below a file, a folder in a pseudo-filesystem: one line naming the workdir, before JAX starts."""
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  for workdir, reason in [(a_file, "is not a directory"), (a_file / "below", "is not a directory"),
                          ("/proc/chainjax_no_such_dir", "cannot create")]:
    proc, _, lines = _run_cli(tmp_path, workdir=workdir)
    _assert_one_line_exit_2(proc, lines, f"--workdir={workdir}:", reason)
    assert "JAX" not in proc.stderr
  assert a_file.read_text() == "not a directory"
  assert not os.path.exists("/proc/chainjax_no_such_dir")


def test_workdir_preflight_leaves_no_trace_and_passes_gs_paths(tmp_path):
  from chainjax import main as main_lib

  fresh = tmp_path / "new" / "workdir"
  assert main_lib.workdir_problem(str(fresh)) is None
  assert not (tmp_path / "new").exists()  # the folders it created to probe are removed again
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "keep").write_text("x")
  assert main_lib.workdir_problem(str(existing)) is None
  assert sorted(os.listdir(existing)) == ["keep"]
  assert main_lib.workdir_problem("gs://some-bucket/runs/x") is None  # not probed: no local folder is made
  assert not os.path.exists("gs:")
  assert "is not a directory" in main_lib.workdir_problem(str(existing / "keep"))
  # A folder that exists but takes no files (procfs refuses even root).
  assert main_lib.workdir_problem("/proc").startswith("--workdir=/proc: cannot write in it:")


@pytest.mark.parametrize("arg,expected", [
    ("runlocal", {"mode": "deep_supervision", "runlocal": True}),
    ("runlocal=TRUE", {"mode": "deep_supervision", "runlocal": True}),
    ("runlocal=yes", {"mode": "deep_supervision", "runlocal": True}),
    ("runlocal=1", {"mode": "deep_supervision", "runlocal": True}),
    ("runlocal=False", {"mode": "deep_supervision", "runlocal": False}),
    ("runlocal=no,mode=decoupled", {"mode": "decoupled", "runlocal": False}),
    ("runlocal=0", {"mode": "deep_supervision", "runlocal": False}),
])
def test_parse_arg_reads_bools(arg, expected):
  assert config_lib.parse_arg(arg, mode="deep_supervision", runlocal=False) == expected


@pytest.mark.parametrize("arg,words", [
    ("runlocal=maybe", ["'runlocal'", "true or false", "'maybe'"]),
    ("runlocal=tru", ["'runlocal'", "'tru'"]),
    ("steps=many", ["'steps'", "int", "'many'"]),
    ("nosuch", ["unknown config argument 'nosuch'", "allowed: mode, runlocal, steps"]),
])
def test_parse_arg_refuses_malformed_values(arg, words):
  with pytest.raises(ValueError) as info:
    config_lib.parse_arg(arg, mode="deep_supervision", runlocal=False, steps=10)
  for word in words:
    assert word in str(info.value)


@pytest.mark.parametrize("field", ["seed", "data.seed"])
def test_seeds_must_fit_32_bits(field):
  config = _set(default.get_config(), field, 2**32 - 1)
  experiment.validate(config, num_devices=DEVICES)  # the largest seed is accepted
  config = _set(default.get_config(), field, 2**32)
  message = _error(config, DEVICES)
  assert message == f"config.{field}: must be in [0, 4294967295], got 4294967296"


@pytest.mark.parametrize("field", ["chain.loss_weights", "chain.phase_steps", "optim.boundaries", "optim.scales"])
def test_an_unparsed_tuple_string_is_named_as_such(field):
  """ml_collections turns `--config.x='(1.0,nan,1.0)'` into the 1-tuple ('(1.0,nan,1.0)',)."""
  config = _set(default.get_config(), field, ("(1.0,nan,1.0)",))
  message = _error(config, DEVICES)
  assert message == f"config.{field}: could not parse '(1.0,nan,1.0)' as a tuple of numbers"


def test_unknown_per_stage_name_is_one_clean_line():
  config = default.get_config()
  config.optim.per_stage.nosuch = config_lib.stage_optim(frozen=True)
  message = _error(config, DEVICES)
  assert message == "config.optim.per_stage.nosuch: 'nosuch' is not a stage name; stages: level1, level2, level3"


# Memory estimates: the machine is replaced by a fixed one, so the numbers below hold anywhere.
_EXAMPLE = 64 * 4 + (4 + 2 + 1) * 4 + 4  # default parity example: 64 float32 inputs, 7 labels, the mask = 288 bytes


def _machine(monkeypatch, host, device=None):
  monkeypatch.setattr(experiment, "available_memory", lambda: (host, device))


def test_batch_larger_than_host_memory_is_refused(monkeypatch):
  _machine(monkeypatch, host=10**9)
  config = default.get_config()
  config.batch_size = 8 * 10**6
  message = _error(config, DEVICES)
  assert message.startswith(f"config.batch_size: one train batch (8000000 examples of {_EXAMPLE} bytes: "
                            "inputs (64,) float32 + labels + mask) needs 2304000000 bytes (2.3 GB), more than the "
                            "1000000000 bytes (1.0 GB) of host memory"), message
  config = default.get_config()
  config.eval_batch_size = 8 * 10**6
  assert _error(config, DEVICES).startswith("config.eval_batch_size: one eval batch (8000000 examples")


def test_per_device_batch_larger_than_device_memory_is_refused(monkeypatch):
  _machine(monkeypatch, host=10**12, device=10**8)
  config = default.get_config()
  config.batch_size = 8 * 10**6  # 10**6 per device: 288 MB on a device of 100 MB
  message = _error(config, DEVICES)
  assert message.startswith(f"config.batch_size: one train batch (8000000 examples of {_EXAMPLE} bytes"), message
  assert f"needs {10**6 * _EXAMPLE} bytes (0.3 GB) per device, more than the 100000000 bytes (0.1 GB) of " \
         "device memory" in message, message


def test_example_too_large_for_one_per_device_names_its_size_field(monkeypatch):
  _machine(monkeypatch, host=10**9)
  config = default.get_config()
  config.data.d = 10**8  # 400 MB per example: 8 devices x 1 example is already 3.2 GB
  message = _error(config, DEVICES)
  assert message.startswith("config.data.d: one example (inputs (100000000,) float32 + labels + mask, data.d="
                            "100000000) is 400000032 bytes (0.4 GB)"), message
  assert "1000000000 bytes (1.0 GB) of host memory" in message


def test_held_out_set_larger_than_host_memory_is_refused(monkeypatch):
  _machine(monkeypatch, host=10**9)
  config = default.get_config()
  config.data.eval_size = 8 * 10**6
  assert _error(config, DEVICES).startswith(
      f"config.data.eval_size: the held-out set (8000000 examples of {_EXAMPLE} bytes")


def test_parameters_and_optimizer_state_larger_than_memory_are_refused(monkeypatch):
  _machine(monkeypatch, host=4 * 10**6)  # the batches fit; 8 replicas of params + adam state do not
  config = default.get_config()
  config.batch_size, config.eval_batch_size, config.data.eval_size = 8, 8, 8
  message = _error(config, DEVICES)
  assert message.startswith("config.chain.stages: the parameters ("), message
  assert "and the adam state need" in message and "more than the 4000000 bytes (0.0 GB) of host memory" in message


def test_memory_estimate_is_cheap_and_real_memory_is_read():
  import time

  host, device = experiment.available_memory()
  assert host > 10**8 and (device is None or device > 0)
  start = time.perf_counter()
  experiment.validate(default.get_config(), num_devices=DEVICES)
  assert time.perf_counter() - start < 10  # shapes only: nothing is allocated or compiled


def test_progressive_mode_refuses_early_stopping():
  config = default.get_config("mode=progressive,runlocal")
  config.early_stopping.metric = "eval/accuracy"
  with pytest.raises(config_lib.ConfigError, match=r"^config.early_stopping.metric: progressive mode trains one "
                     r"stage per phase"):
    experiment.validate(config, num_devices=8)


def test_a_model_sharded_kernel_that_does_not_split_is_an_error():
  config = default.get_config("runlocal")
  config.mesh.model = 2
  config.chain.stages[1].shard = "model"
  config.chain.stages[1].features = 255
  with pytest.raises(config_lib.ConfigError, match=r"^config.chain.stages\[1\].shard: 'model' splits kernels along "
                     r"their output axis, but stages/level2/body/.* has 255 outputs, not divisible by mesh.model=2"):
    experiment.validate(config, num_devices=8)
  config.chain.stages[1].features = 256
  experiment.validate(config, num_devices=8)


def test_cli_refuses_a_workdir_on_a_read_only_mount(tmp_path):
  """A read-only tmpfs (mounting needs root, as CI runs): one line naming the workdir, before JAX starts."""
  mount = tmp_path / "ro"
  mount.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                                         capture_output=True).returncode != 0:
    pytest.skip("mounting a read-only tmpfs needs root")
  try:
    for workdir in (mount, mount / "run"):
      proc, _, lines = _run_cli(tmp_path, workdir=workdir)
      _assert_one_line_exit_2(proc, lines, f"--workdir={workdir}:", "Read-only file system")
      assert "JAX" not in proc.stderr
  finally:
    subprocess.run(["umount", str(mount)], check=True)
