"""The training loop: end-to-end runs, logging, early stopping, NaN stop, exact resume."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from chainjax import config as config_lib
from chainjax import metrics as metrics_lib
from chainjax import errors
from chainjax import train

import processes
from helpers import assert_trees_equal, checkpoint_steps, final_state, load_config, override


@pytest.mark.parametrize("mode", ["end_to_end", "deep_supervision", "decoupled", "progressive"])
def test_runlocal_parity_every_mode(tmp_path, mode):
  config = load_config("default", f"mode={mode},runlocal", total_steps=20, eval_every=10, checkpoint_every=10)
  final = train.train_and_evaluate(config, str(tmp_path))
  records = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [10, 20]
  for key in ("train/loss", "train/steps_per_sec", "train/examples_per_sec", "train/lr/level1", "train/lr/level3",
              "train/grad_norm/level1", "train/param_norm/level2", "train/update_norm/level3", "eval/loss",
              "eval/accuracy", "eval/stage_1/accuracy", "eval/stage_3/loss"):
    assert np.isfinite(records[-1][key]), key
  assert final["step"] == 20 and final["eval/accuracy"] == records[-1]["eval/accuracy"]
  assert json.load(open(tmp_path / "config.json"))["chain"]["mode"] == mode
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
  assert checkpoint_steps(tmp_path) == [10, 20]


@pytest.mark.slow
def test_chain_learns_parity_that_end_to_end_cannot(tmp_path):
  """The embedded default's claim, on a smaller instance: d=32, 8-bit subset, 800 updates."""
  results = {}
  for mode in ("deep_supervision", "end_to_end"):
    config = load_config("default", f"mode={mode}", total_steps=800, eval_every=400, checkpoint_every=800,
                         **{"data.d": 32, "data.eval_size": 2048})
    results[mode] = train.train_and_evaluate(config, str(tmp_path / mode))["eval/accuracy"]
  assert results["deep_supervision"] >= 0.95, results
  assert results["end_to_end"] < 0.65, results


def test_resume_from_checkpoint_is_bit_identical_and_finished_run_does_no_more(tmp_path):
  config = load_config("default", "runlocal", total_steps=40, eval_every=10, checkpoint_every=20)
  full = tmp_path / "full"
  final_full = train.train_and_evaluate(config, str(full))
  # An interrupted run: only the step-20 checkpoint and the metrics up to step 30 made it to disk.
  cut = tmp_path / "cut"
  shutil.copytree(full, cut)
  shutil.rmtree(cut / "checkpoints" / "40")
  final_resumed = train.train_and_evaluate(config, str(cut))
  assert_trees_equal(final_state(full)["tree"], final_state(cut)["tree"])
  untimed = lambda m: {k: v for k, v in m.items() if not k.endswith("_per_sec")}
  assert untimed(final_resumed) == untimed(final_full)
  assert [r["step"] for r in metrics_lib.read_metrics(str(cut))] == [10, 20, 30, 40]
  # Re-running a finished run trains no more and reports the same final metrics.
  before = sorted(os.listdir(full / "checkpoints")), open(full / "metrics.jsonl").read()
  assert train.train_and_evaluate(config, str(full)) == final_full
  assert (sorted(os.listdir(full / "checkpoints")), open(full / "metrics.jsonl").read()) == before


def test_corrupt_latest_checkpoint_falls_back_to_previous_good_one(tmp_path):
  config = load_config("default", "runlocal", total_steps=40, eval_every=20, checkpoint_every=20)
  good = tmp_path / "good"
  train.train_and_evaluate(config, str(good))
  bad = tmp_path / "bad"
  shutil.copytree(good, bad)
  for f in (bad / "checkpoints" / "40" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"")  # truncate the array data of the newest checkpoint
  train.train_and_evaluate(config, str(bad))  # resumes from 20 and re-trains 20 -> 40
  assert_trees_equal(final_state(good)["tree"], final_state(bad)["tree"])
  assert len(os.listdir(tmp_path / "bad" / "corrupt_checkpoints")) == 1


def test_early_stopping_stops_after_patience_evals(tmp_path):
  # eval/loss falls, so in "max" mode it never improves after the first eval: stop at 10 + 2 * 10.
  config = load_config("default", "runlocal", total_steps=60, eval_every=10, checkpoint_every=50,
                       **{"early_stopping.metric": "eval/loss", "early_stopping.mode": "max",
                          "early_stopping.patience": 2})
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == 30
  assert checkpoint_steps(tmp_path) == [30]
  assert train.train_and_evaluate(config, str(tmp_path))["step"] == 30  # finished: stays stopped


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  config = load_config("default", "runlocal", total_steps=60, eval_every=10, checkpoint_every=10, log_every=1,
                       **{"optim.optimizer": "sgd", "optim.learning_rate": 1e30, "optim.schedule": "constant"})
  with pytest.raises(errors.NonFiniteLossError) as info:
    train.train_and_evaluate(config, str(tmp_path))
  match = re.search(r"NaN/inf at train step (\d+);", str(info.value))
  assert match and 1 <= int(match.group(1)) <= 10, str(info.value)
  # log_every=1 checks every step: the run stopped before its first checkpoint (step 10) could hold NaNs.
  assert not os.path.exists(tmp_path / "checkpoints") or checkpoint_steps(tmp_path) == []


def _diverging_config(**overrides):
  # Adam at LR 100 from step 6 on (a piecewise schedule): the loss leaves its first value behind at
  # once but stays finite, which the NaN check alone never flags.
  return load_config("default", "runlocal", total_steps=40, eval_every=20, checkpoint_every=5, log_every=5,
                     **{"optim.schedule": "piecewise_constant", "optim.learning_rate": 1e-3,
                        "optim.boundaries": (6,), "optim.scales": (1e5,), **overrides})


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  with pytest.raises(errors.DivergedError) as info:
    train.train_and_evaluate(_diverging_config(), str(tmp_path))
  assert isinstance(info.value, errors.NonFiniteLossError)  # the same exit code (3) as NaN
  match = re.search(r"diverged at train step (\d+): (\S+) is more than config.divergence_factor=1000 times its "
                    r"first logged value (\S+);", str(info.value))
  assert match, str(info.value)
  step, loss, first = int(match.group(1)), float(match.group(2)), float(match.group(3))
  assert step in (10, 15, 20) and loss > 1000 * first
  assert checkpoint_steps(tmp_path) == [5]  # saved before the LR jumped; nothing diverged was kept


def test_divergence_check_off_with_zero(tmp_path):
  final = train.train_and_evaluate(_diverging_config(divergence_factor=0.0), str(tmp_path))
  assert final["step"] == 40 and checkpoint_steps(tmp_path)[-1] == 40


def test_runlocal_line_parity(tmp_path):
  """Per-image CNN stage with per-image head, its k scores passed to the parity stage: in 20 updates
  of deep supervision the per-image head already learns (parity needs longer)."""
  config = load_config("line_parity", "runlocal", eval_every=10)
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == 20
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [10, 20]
  assert final["eval/accuracy"] == final["eval/stage_2/accuracy"]  # the headline is the last stage's
  eval_size = config.data.eval_size
  correct = final["eval/stage_2/accuracy"] * eval_size  # an exact count over the eval set
  assert correct == pytest.approx(round(correct), abs=1e-3)
  # Stage 1 (one line image -> its bit): its eval loss falls between the evals, and its accuracy is
  # above chance by more than 3 standard deviations of a coin on eval_size examples.
  assert records[1]["eval/stage_1/loss"] < records[0]["eval/stage_1/loss"]
  assert final["eval/stage_1/accuracy"] > 0.5 + 3 * 0.5 / eval_size ** 0.5


def test_per_stage_overrides_from_the_config(tmp_path):
  """A frozen stage stays bit-identical through the whole loop; another stage's LR is its own."""
  config = load_config("default", "runlocal", total_steps=20, eval_every=20, checkpoint_every=20,
                       **{"optim.schedule": "constant"})
  config.optim.per_stage.level1.frozen = True
  config.optim.per_stage.level2.learning_rate = 0.01
  record = train.train_and_evaluate(config, str(tmp_path))
  assert record["train/lr/level1"] == 0.0 and record["train/lr/level2"] == 0.01
  assert record["train/lr/level3"] == config.optim.learning_rate
  assert record["train/update_norm/level1"] == 0.0 and record["train/update_norm/level2"] > 0.0
  from flax import nnx
  from chainjax import chain as chain_lib, data as data_lib
  initial = nnx.to_pure_dict(nnx.state(chain_lib.build_chain(config, data_lib.get_task(config),
                                                             rngs=nnx.Rngs(config.seed)), nnx.Param))
  final = final_state(tmp_path)["tree"]["params"]["stages"]
  got, want = jax.tree.leaves(jax_tree_values(final["level1"])), jax.tree.leaves(initial["stages"]["level1"])
  assert len(got) == len(want) == 4  # body kernel/bias, head kernel/bias
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def jax_tree_values(tree):
  """Orbax restores nnx.State leaves as {"value": array}: strip that level."""
  if isinstance(tree, dict):
    if set(tree) == {"value"}:
      return tree["value"]
    return {k: jax_tree_values(v) for k, v in tree.items()}
  return tree


def _unfinished_run(tmp_path, **overrides):
  """A 40-step run cut after its step-20 checkpoint (as a kill would leave it)."""
  config = load_config("default", "runlocal", total_steps=40, eval_every=10, checkpoint_every=20, **overrides)
  train.train_and_evaluate(config, str(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints" / "40")
  return config


def test_a_finished_run_given_more_steps_trains_on(tmp_path, caplog):
  import logging
  config = load_config("default", "runlocal", total_steps=20, eval_every=10, checkpoint_every=10)
  train.train_and_evaluate(config, str(tmp_path))
  caplog.set_level(logging.INFO)
  final = train.train_and_evaluate(override(config, total_steps=30), str(tmp_path))
  assert final["step"] == 30 and checkpoint_steps(tmp_path)[-1] == 30
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == [10, 20, 30]
  assert any("total_steps changed from 20 to 30: training on from step 20" in r.getMessage() for r in caplog.records)
  assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 30


@pytest.mark.parametrize("field,value", [("chain.mode", "decoupled"), ("seed", 7), ("optim.learning_rate", 0.5)])
def test_a_changed_config_on_resume_stops_before_anything_is_written(tmp_path, field, value):
  config = _unfinished_run(tmp_path)
  before = (tmp_path / "config.json").read_text(), (tmp_path / "metrics.jsonl").read_text()
  with pytest.raises(config_lib.ConfigError) as info:
    train.train_and_evaluate(override(config, **{field: value}), str(tmp_path))
  assert str(info.value).startswith(f"config.{field}: differs from the config of the checkpoint at step 20")
  assert "--allow_config_change" in str(info.value) and "\n" not in str(info.value)
  assert ((tmp_path / "config.json").read_text(), (tmp_path / "metrics.jsonl").read_text()) == before
  assert checkpoint_steps(tmp_path) == [20]


def test_allowed_config_change_is_recorded_in_later_checkpoints(tmp_path):
  config = _unfinished_run(tmp_path)
  changed = override(config, seed=7, eval_every=20)  # eval_every may change freely: not recorded
  final = train.train_and_evaluate(changed, str(tmp_path), allow_config_change=True)
  assert final["step"] == 40
  meta = json.loads((tmp_path / "checkpoints" / "40" / "metadata" / "metadata").read_text())
  assert meta["config_changes"] == [{"step": 20, "changes": {"seed": [0, 7]}}]
  assert meta["config"]["seed"] == 7 and len(meta["config_hash"]) == 64


def test_resume_rejects_fewer_steps_and_a_changed_shape_in_one_line(tmp_path):
  config = _unfinished_run(tmp_path)
  for fewer in (15, 20):  # 20: an unfinished run would end without training, eval or a finished checkpoint
    with pytest.raises(config_lib.ConfigError, match=rf"^config.total_steps: {fewer} is not above step 20, where "):
      train.train_and_evaluate(override(config, total_steps=fewer), str(tmp_path))
  wider = load_config("default", "runlocal", total_steps=40, eval_every=10, checkpoint_every=20)
  wider.chain.stages[0].features = 2 * wider.chain.stages[0].features
  with pytest.raises(config_lib.ConfigError) as info:
    train.train_and_evaluate(wider, str(tmp_path), allow_config_change=True)
  assert str(info.value).startswith("config.chain: the checkpoint does not fit this config: ")
  assert "\n" not in str(info.value)


def test_logged_learning_rate_is_the_one_of_the_last_applied_update(tmp_path):
  """float16 compute with a large initial loss scale: the first updates overflow and are skipped, and
  a skipped update does not advance the schedule, so the logged LR is the schedule's value at the
  number of applied updates (warmup_linear: 10 warmup updates to 1e-3, then down to 0 at update 20)."""
  config = load_config("default", "runlocal", total_steps=20, eval_every=20, checkpoint_every=20, **{
      "precision.loss_scale": "dynamic:initial_scale=1048576,period=1000", "optim.schedule": "warmup_linear",
      "optim.warmup_steps": 10, "optim.learning_rate": 1e-3,
      "precision.policy": "params=float32,compute=float16,output=float32"})
  final = train.train_and_evaluate(config, str(tmp_path))
  skipped = int(final["train/skipped_steps"])
  assert skipped >= 1
  last_update = 19 - skipped
  expected = 1e-3 * (1 - (last_update - 10) / 10)
  for stage in ("level1", "level2", "level3"):
    assert final[f"train/lr/{stage}"] == pytest.approx(expected, rel=1e-5)


def test_progressive_phases_keep_the_loss_scale(tmp_path):
  """The dynamic scale doubles after every 2 finite updates; a fresh optimizer per phase must not reset it:
  after 30 updates in 3 phases it is 1024 * 2**15, not 1024 * 2**5."""
  config = load_config("default", "mode=progressive,runlocal", total_steps=30, eval_every=30, checkpoint_every=30,
                       **{"precision.loss_scale": "dynamic:initial_scale=1024,period=2"})
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["train/skipped_steps"] == 0
  assert final["train/loss_scale"] == 1024 * 2 ** 15


def test_early_stopping_skips_a_nan_metric_with_a_warning(caplog):
  import logging
  stopper = train.EarlyStopping("eval/auc", "max", patience=1)
  assert not stopper.update(10, {"eval/auc": 0.7})
  with caplog.at_level(logging.WARNING):
    assert not stopper.update(20, {"eval/auc": float("nan")})
  assert (stopper.best, stopper.best_step, stopper.bad_evals) == (0.7, 10, 0)
  assert any("Early stopping skips this eval: eval/auc is nan" in r.getMessage() for r in caplog.records)
  assert stopper.update(30, {"eval/auc": 0.6})  # a real non-improvement still counts


def test_an_unwritable_config_json_is_one_line_and_a_finished_run_never_writes_it(tmp_path):
  config = load_config("default", "runlocal", total_steps=20, eval_every=20, checkpoint_every=20)
  final = train.train_and_evaluate(config, str(tmp_path / "done"))
  for run in ("done", "fresh"):
    (tmp_path / run).mkdir(exist_ok=True)
    if (tmp_path / run / "config.json").exists():
      (tmp_path / run / "config.json").unlink()
    (tmp_path / run / "config.json").mkdir()  # a folder where the file goes
  assert train.train_and_evaluate(config, str(tmp_path / "done")) == final  # finished: nothing to write
  with pytest.raises(errors.WorkdirError, match=r"^--workdir=.*fresh: cannot write .*config.json: Is a directory$"):
    train.train_and_evaluate(config, str(tmp_path / "fresh"))


def test_config_changes_ignore_intervals_data_paths_and_fields_newer_than_the_checkpoint():
  config = load_config("default", "runlocal")
  saved = train.config_record(config)[0]
  del saved["divergence_factor"]  # a checkpoint of a chainjax without this field
  changed = override(load_config("default", "runlocal"), eval_batch_size=512, **{"data.num_threads": 1})
  changes = train.config_changes(saved, changed)
  assert set(changes) == {"eval_batch_size", "data.num_threads"}  # the missing field has its default
  assert set(changes) <= set(train.RESUMABLE_CHANGES)
  assert train.config_changes(saved, override(changed, divergence_factor=10.0))["divergence_factor"] == (None, 10.0)


def test_progressive_finetune_trains_stage_by_stage_then_every_stage_end_to_end(tmp_path):
  """Phases of 10 updates: 21-30 move only the last stage; 31-40 (fine-tuning) move every stage's body."""
  config = load_config("default", "mode=progressive_finetune,runlocal", total_steps=40, eval_every=10,
                       checkpoint_every=10, max_to_keep=4, **{"chain.finetune_steps": 10})
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == 40 and checkpoint_steps(tmp_path) == [10, 20, 30, 40]
  params = {step: final_state(tmp_path, step)["tree"]["params"]["stages"] for step in (20, 30, 40)}

  def moved(a, b, stage, part):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a[stage][part]),
                                                            jax.tree.leaves(b[stage][part])))

  for stage in ("level1", "level2"):
    assert moved(params[20], params[30], stage, "body") == 0.0 and moved(params[20], params[30], stage, "head") == 0.0
    assert moved(params[30], params[40], stage, "body") > 0.0
    assert moved(params[30], params[40], stage, "head") == 0.0  # only the last loss counts when fine-tuning
  assert moved(params[20], params[30], "level3", "body") > 0.0 and moved(params[30], params[40], "level3", "head") > 0.0


def test_progressive_mode_refuses_a_new_length_on_resume(tmp_path):
  """The phases split total_steps: a new length would move the boundaries and retrain a finished stage."""
  config = load_config("default", "mode=progressive,runlocal", total_steps=30, eval_every=10, checkpoint_every=10)
  train.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match=r"^config.total_steps: differs from the config of the checkpoint"):
    train.train_and_evaluate(override(config, total_steps=60), str(tmp_path))


def test_a_checkpoint_written_before_the_train_state_was_a_named_tuple_resumes(tmp_path):
  """`tests/fixtures/checkpoint_v1`: step 20 of a 40-step run, written by chainjax at 44ba8be (the train state
  a dict). Resuming it reaches the parameters that run had at step 40 (up to 1 vs 8 device summation order)."""
  fixture = os.path.join(os.path.dirname(__file__), "fixtures")
  workdir = tmp_path / "run"
  shutil.copytree(os.path.join(fixture, "checkpoint_v1"), workdir, ignore=shutil.ignore_patterns("*.npz"))
  config = load_config("../tests/fixtures/resume_config")
  final = train.train_and_evaluate(config, str(workdir))
  assert final["step"] == 40 and checkpoint_steps(workdir) == [20, 40]
  expected = np.load(os.path.join(fixture, "checkpoint_v1", "final_params.npz"))
  got = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
         for path, v in jax.tree.leaves_with_path(final_state(workdir)["tree"]["params"])}
  assert sorted(got) == sorted(expected.files)
  restored = final_state(workdir, 20)["tree"]["params"]
  start = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
           for path, v in jax.tree.leaves_with_path(restored)}
  for name in expected.files:
    assert np.max(np.abs(got[name] - start[name])) > 1e-4, name  # the 20 resumed updates moved it
    np.testing.assert_allclose(got[name], expected[name], atol=2e-6, err_msg=name)


def test_throughput_counts_train_steps_only(tmp_path, monkeypatch):
  """Every eval and checkpoint save moves train.py's clock 100 s on (a virtual clock, not a sleep): counted,
  they would hold steps_per_sec under 0.1; uncounted, 10 updates take well under 10 s even on a loaded
  machine, so steps_per_sec stays above 1."""
  import time
  import types

  from chainjax import checkpoint as checkpoint_lib
  from chainjax import experiment as experiment_lib

  offset = [0.0]
  monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0]))

  def taking_100_s(fn):
    def slow(*args, **kwargs):
      offset[0] += 100.0
      return fn(*args, **kwargs)
    return slow

  monkeypatch.setattr(experiment_lib.Experiment, "evaluate", taking_100_s(experiment_lib.Experiment.evaluate))
  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", taking_100_s(checkpoint_lib.Checkpointer.save))
  config = load_config("default", "runlocal", total_steps=20, eval_every=10, checkpoint_every=10)
  train.train_and_evaluate(config, str(tmp_path))
  records = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [10, 20] and offset[0] >= 400.0  # 2 evals and 2 saves were timed
  for record in records:  # 9 and 10 timed updates per interval
    assert record["train/steps_per_sec"] > 1.0, record["train/steps_per_sec"]
    assert record["train/examples_per_sec"] == pytest.approx(record["train/steps_per_sec"] * config.batch_size)


LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # once per program JAX lowers (cache hit or not)


def test_no_program_is_compiled_again_after_the_first_step_and_eval(tmp_path):
  """50 updates and 2 evals: every program the loop runs (the step, the eval, the checks, the checkpoint
  save) is lowered by the first step, eval and save; from update 27 to the end, through the second eval
  and the last save, nothing is. A step that recompiled (a changing shape, dtype, sharding or a Python
  value traced as a constant) would lower once per call."""
  config = override(load_config("default"), total_steps=50, eval_every=25, checkpoint_every=25, log_every=5,
                  **{"optim.warmup_steps": 5})
  lowerings, at_heartbeat = [], []
  listener = lambda event, duration, **kwargs: lowerings.append(event) if event == LOWERING_EVENT else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    train.train_and_evaluate(config, str(tmp_path), heartbeat=lambda: at_heartbeat.append(len(lowerings)))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  eval_batches = -(-config.data.eval_size // config.eval_batch_size)
  assert len(at_heartbeat) == 50 + 2 * eval_batches  # one heartbeat per update and per eval batch
  after_update_26 = at_heartbeat[26 + eval_batches - 1]
  assert at_heartbeat[0] > 0  # the first update compiled (the listener sees lowering)
  assert len(lowerings) == after_update_26, (after_update_26, len(lowerings))


def test_the_persistent_compilation_cache_is_filled_read_and_can_be_turned_off(tmp_path, monkeypatch):
  """--compilation_cache_dir: the first run stores its compiled programs there; a second run of the same
  config (another workdir) adds none, as it loads them; '' turns the cache off. Both say so in the log,
  with the time to the first update. Every program is cached (JAX's 1 s minimum compile time off), so a
  program compiled in about 1 s cannot be left out of the first run and stored by the second."""
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  cache = tmp_path / "cache"
  first = processes.run(tmp_path / "a", f"--compilation_cache_dir={cache}")
  entries = sorted(os.listdir(cache))
  assert entries and f"compilation cache: {cache}." in first.stderr()
  second = processes.run(tmp_path / "b", f"--compilation_cache_dir={cache}")
  assert sorted(os.listdir(cache)) == entries
  off = processes.run(tmp_path / "c", "--compilation_cache_dir=")
  assert "compilation cache: off." in off.stderr() and sorted(os.listdir(cache)) == entries
  for job in (first, second, off):
    assert re.search(r"First update done \d+\.\d s after start", job.stderr())
