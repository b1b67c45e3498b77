"""Gradient-signal diagnostics (`--mode=diagnose`): the estimator against known answers, the modes' gradients
against their definitions, checkpoints, and the command line."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from chainjax import chain as chain_lib
from chainjax import config as config_lib
from chainjax import data as data_lib
from chainjax import diagnostics
from chainjax import experiment
from chainjax import train

REPO = helpers.REPO


# --------------------------------------------------------------------------------------------
# The estimator on synthetic gradients with a known mean and covariance.
# --------------------------------------------------------------------------------------------


def _stats(gradients) -> diagnostics.GradientStats:
  stats = diagnostics.GradientStats(gradients.shape[1])
  for g in gradients:
    stats.add(g)
  return stats


def test_estimator_is_the_sample_mean_and_spread_and_matches_the_analytic_snr():
  """g_b = mu + z_b, z_b ~ N(0, I_d): E||g - mu||^2 = d, the true SNR is ||mu||^2 / d."""
  rng = np.random.default_rng(0)
  d, n, true_snr = 4000, 50, 0.05
  mu = np.full(d, math.sqrt(true_snr))  # ||mu||^2 = true_snr * d
  g = mu + rng.standard_normal((n, d))
  stats = _stats(g)
  np.testing.assert_allclose(stats.mean, g.mean(0), rtol=0, atol=1e-12)
  assert stats.signal == pytest.approx(float(np.sum(g.mean(0) ** 2)), rel=1e-12)
  assert stats.noise == pytest.approx(float(np.sum(g.var(0, ddof=1))), rel=1e-10)
  # Analytic values within 5 standard deviations of their sampling error.
  assert abs(stats.noise / d - 1) < 5 * math.sqrt(2 / (d * (n - 1)))
  signal_sd = math.sqrt(4 * true_snr * d / n + 2 * d / n**2)  # Var ||g_bar||^2 for g_bar ~ N(mu, I/n)
  assert abs(stats.signal - (true_snr * d + d / n)) < 5 * signal_sd
  out = stats.summary()
  assert out["snr"] == pytest.approx(stats.signal / stats.noise, rel=1e-12)
  assert out["snr_unbiased"] == pytest.approx(out["snr"] - 1 / n, rel=1e-12)
  assert abs(out["snr_unbiased"] - true_snr) < 5 * signal_sd / d + 0.01 * true_snr
  assert abs(out["snr"] - (true_snr + 1 / n)) < 5 * signal_sd / d + 0.01 * true_snr  # the plain one: + 1/N
  assert out["snr_db"] == pytest.approx(10 * math.log10(out["snr"]), rel=1e-12)
  assert out["log10_snr"] == pytest.approx(math.log10(out["snr"]), rel=1e-12)
  assert out["snr_unbiased_db"] == pytest.approx(10 * math.log10(out["snr_unbiased"]), rel=1e-12)

  # No signal: the plain SNR sits at the noise floor 1/N, the corrected one at 0 (to sqrt(2/d)/N).
  stats = _stats(rng.standard_normal((n, d)))
  out = stats.summary()
  assert abs(out["snr"] - 1 / n) < 5 * math.sqrt(2 / d) / n + 5 / n * math.sqrt(2 / (d * (n - 1)))
  assert abs(out["snr_unbiased"]) < 5 * math.sqrt(2 / d) / n + 5 / n * math.sqrt(2 / (d * (n - 1)))
  if out["snr_unbiased"] <= 0:
    assert out["snr_unbiased_db"] is None and out["log10_snr_unbiased"] is None


def test_the_corrected_signal_is_unbiased_and_the_plain_one_is_not():
  """Over 4000 replicates of N=4 batches in d=3: mean(S - V/N) = ||mu||^2, mean(S) = ||mu||^2 + tr(Sigma)/N."""
  rng = np.random.default_rng(1)
  reps, n, sigma = 4000, 4, np.array([1.0, 2.0, 0.5])
  mu = np.array([0.3, -0.2, 0.1])
  signals, corrected = [], []
  for _ in range(reps):
    stats = _stats(mu + sigma * rng.standard_normal((n, 3)))
    signals.append(stats.signal)
    corrected.append(stats.signal - stats.noise / n)
  truth, trace = float(mu @ mu), float(np.sum(sigma**2))
  sd = np.std(corrected) / math.sqrt(reps)
  assert abs(np.mean(corrected) - truth) < 4 * sd
  assert abs(np.mean(signals) - (truth + trace / n)) < 4 * np.std(signals) / math.sqrt(reps)
  assert np.mean(signals) - truth > 20 * sd  # the bias the correction removes is plain at this size


def test_float64_accumulation_keeps_a_tiny_spread_on_a_large_mean():
  """Float32 gradients with mean 1e3 and spread 1e-3 (SNR 1e12): Welford in float64 recovers the spread,
  where a float32 sum of squares loses it entirely."""
  rng = np.random.default_rng(2)
  g = (1e3 + 1e-3 * rng.standard_normal((64, 100))).astype(np.float32)
  stats = _stats(g)
  exact = float(np.sum(g.astype(np.float64).var(0, ddof=1)))
  assert stats.noise == pytest.approx(exact, rel=1e-6)
  naive = float(np.sum((g**2).sum(0, dtype=np.float32) - 64 * g.mean(0, dtype=np.float32) ** 2)) / 63
  assert not abs(naive - exact) < 0.5 * exact


def test_snr_fields_of_degenerate_cases():
  assert diagnostics.snr_fields(0.0, 0.0, 4)["snr"] is None  # a stage with no gradient at all
  out = diagnostics.snr_fields(1.0, 4.0, 8)
  assert out["snr"] == 0.25 and out["snr_db"] == pytest.approx(-6.0206, abs=1e-4) and out["log10_snr"] == \
      pytest.approx(math.log10(0.25))
  assert out["snr_unbiased"] == 0.125
  below = diagnostics.snr_fields(1.0, 16.0, 8)  # 1/16 - 1/8 < 0: no resolved signal
  assert below["snr_unbiased"] == -0.0625 and below["snr_unbiased_db"] is None
  assert diagnostics.snr_fields(float("nan"), 1.0, 4)["signal"] is None
  with pytest.raises(ValueError, match="at least 2 batches"):
    _stats(np.zeros((1, 3))).noise  # pylint: disable=expression-not-assigned


# --------------------------------------------------------------------------------------------
# The modes' gradients on a tiny chain, against their definitions.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  """default:runlocal (3 MLP stages on 64-bit parity) at initialization, and 4 of its training batches."""
  config = helpers.load_config("default", "runlocal")
  exp = experiment.Experiment(config)
  state = exp.init_state()
  return exp, state, diagnostics.training_batches(exp, 0, 4, config.batch_size)


def _own_loss_gradients(exp, state, batch, key, stage):
  """d/dparams of the loss of `stage`'s head alone, on the chain without any cut (written here, not
  through `ChainLoss`): what `decoupled` and `progressive` give that stage, and one term of the others."""
  def loss(params):
    model = nnx.merge(exp.graphdef, params, state.rest, copy=True)
    out = model(batch["inputs"], mode="deep_supervision", train=True, key=key)
    return jnp.mean(chain_lib.per_example_loss(exp.loss_fn.losses[stage], out.predictions[stage],
                                               batch["labels"][stage]))
  return diagnostics.stage_vectors(jax.device_get(jax.jit(jax.grad(loss))(state.params)), exp.stage_names)


def test_each_mode_gives_each_stage_the_gradient_of_its_own_losses(tiny):
  exp, state, batches = tiny
  names = exp.stage_names
  assert exp.loss_fn.weights == (1.0, 1.0, 1.0) and exp.loss_fn.consistency_weight == 0
  batch = exp.put_batch(batches[0])
  key = jax.random.key(7)
  own = [_own_loss_gradients(exp, state, batch, key, i) for i in range(3)]
  modes = ("end_to_end", "deep_supervision", "decoupled", "progressive")
  grads = {}
  for obj in diagnostics.objectives(modes, 3):
    tree = diagnostics.gradient_fn(exp, obj)(state.params, state.rest, batch, key)
    grads[obj.mode, obj.phase] = diagnostics.stage_vectors(jax.device_get(tree), names)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for s in names:
    close(grads["end_to_end", 0][s], own[2][s])  # only the last loss, through every stage
    close(grads["deep_supervision", 0][s], sum(own[i][s] for i in range(3)))  # every loss, through every stage
  for i, s in enumerate(names):
    close(grads["decoupled", 0][s], own[i][s])  # its own loss only: downstream losses never reach it
    close(grads["progressive", i][s], own[i][s])  # phase i: stage i on its own loss ...
    for other in names:
      if other != s:  # ... and nothing else moves
        assert not np.any(grads["progressive", i][other])
  # The modes differ where they should: stage 1 sees only the last loss end to end, only its own decoupled.
  first = names[0]
  cosine = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
  assert np.linalg.norm(grads["end_to_end", 0][first]) > 0
  assert abs(cosine(grads["end_to_end", 0][first], grads["decoupled", 0][first])) < 0.5
  # The last stage gets its own loss in every mode.
  close(grads["end_to_end", 0][names[2]], grads["decoupled", 0][names[2]])


def test_estimate_rows_agree_across_modes_where_the_gradients_do(tiny):
  exp, state, batches = tiny
  rows = diagnostics.estimate(exp, state.params, state.rest, batches, tuple(chain_lib.MODES))
  table = {(r["mode"], r["phase"], r["stage"]): r for r in rows}
  names = exp.stage_names
  expected = {(m, 0, s) for m in ("end_to_end", "deep_supervision", "decoupled") for s in names}
  expected |= {("progressive", i, s) for i, s in enumerate(names)}
  expected |= {("progressive_finetune", i, s) for i, s in enumerate(names)}
  expected |= {("progressive_finetune", 3, s) for s in names}
  assert set(table) == expected and len(rows) == len(expected)
  same = lambda a, b: all(a[k] == pytest.approx(b[k], rel=1e-5) for k in ("signal", "noise", "snr"))
  for i, s in enumerate(names):
    assert same(table["progressive", i, s], table["decoupled", 0, s])
    assert table["progressive_finetune", i, s] == {**table["progressive", i, s], "mode": "progressive_finetune"}
    assert {k: v for k, v in table["progressive_finetune", 3, s].items() if k not in ("mode", "phase")} == \
        {k: v for k, v in table["end_to_end", 0, s].items() if k not in ("mode", "phase")}
  last = names[2]
  assert same(table["end_to_end", 0, last], table["deep_supervision", 0, last])
  assert same(table["end_to_end", 0, last], table["decoupled", 0, last])
  first = names[0]
  assert not same(table["end_to_end", 0, first], table["decoupled", 0, first])
  assert table["decoupled", 0, first]["loss_terms"] == list(names)
  assert table["decoupled", 0, first]["gradient_stops_before"] == list(names[1:])
  assert table["end_to_end", 0, first]["loss_terms"] == [last]
  assert table["end_to_end", 0, first]["gradient_stops_before"] == []
  assert table["end_to_end", 0, first]["num_params"] == sum(
      int(np.prod(x.shape)) for p, x in jax.tree.leaves_with_path(state.params) if chain_lib.stage_of_path(p) == first)

  # The rows are GradientStats of the per-batch gradients, and the batches are the run's first ones.
  key = jax.random.fold_in(jax.random.key(exp.config.seed), 1)
  obj = diagnostics.objectives(("decoupled",), 3)[0]
  fn = diagnostics.gradient_fn(exp, obj)
  stats = diagnostics.GradientStats(table["decoupled", 0, first]["num_params"])
  stream = exp.task.train_iterator(exp.config.batch_size, data_lib.Shard.of_this_process())
  for b in range(len(batches)):
    run_batch = next(stream)
    np.testing.assert_array_equal(run_batch["inputs"], batches[b]["inputs"])
    tree = fn(state.params, state.rest, exp.put_batch(run_batch), jax.random.fold_in(key, b))
    stats.add(diagnostics.stage_vectors(jax.device_get(tree), names)[first])
  for field, value in stats.summary().items():
    assert table["decoupled", 0, first][field] == pytest.approx(value, rel=1e-9), field


def test_modes_are_resolved_and_checked():
  config = helpers.load_config("default", "runlocal")
  assert diagnostics.resolve_modes(config) == (tuple(chain_lib.MODES), {})
  config.diagnostics.modes = ("decoupled, end_to_end",)  # one comma-separated string from the command line
  assert diagnostics.resolve_modes(config) == (("decoupled", "end_to_end"), {})
  config.diagnostics.modes = ("greedy",)
  with pytest.raises(config_lib.ConfigError, match=r"^config\.diagnostics\.modes: 'greedy' is not one of: "
                     r"end_to_end, deep_supervision, decoupled, progressive, progressive_finetune$"):
    diagnostics.resolve_modes(config)
  config.diagnostics.modes = ("end_to_end,end_to_end",)
  with pytest.raises(config_lib.ConfigError, match=r"^config\.diagnostics\.modes: names a mode twice"):
    diagnostics.resolve_modes(config)
  config.diagnostics.modes = ()
  config.chain.stages[1].head.enabled = False  # stage 2 without a head: decoupled and progressive cannot train it
  modes, skipped = diagnostics.resolve_modes(config)
  assert modes == ("end_to_end", "deep_supervision") and set(skipped) == {"decoupled", "progressive",
                                                                           "progressive_finetune"}
  assert "chain.stages[1] has no head" in skipped["decoupled"]
  config.diagnostics.modes = ("progressive",)
  with pytest.raises(config_lib.ConfigError, match=r"^config\.diagnostics\.modes: progressive mode trains every "
                     r"stage on its own head"):
    diagnostics.resolve_modes(config)


# --------------------------------------------------------------------------------------------
# Checkpoints and the command line.
# --------------------------------------------------------------------------------------------


def _diagnose(workdir, **overrides):
  config = helpers.load_config("default", "runlocal", **{"diagnostics.num_batches": 3,
                                                         "diagnostics.modes": ("end_to_end,decoupled",), **overrides})
  return diagnostics.diagnose(config, str(workdir))


def test_diagnose_at_initialization_and_at_checkpoints(tmp_path):
  workdir = tmp_path / "run"
  init = _diagnose(workdir)  # no checkpoint: the initial parameters
  assert (init["step"], init["source"], init["first_batch"], init["batch_size"]) == (0, "initialization", 0, 64)
  assert len(init["rows"]) == 6 and init["modes"] == ["end_to_end", "decoupled"]
  saved = json.loads((workdir / "diagnostics" / "snr.json").read_text())
  assert saved["rows"] == init["rows"] and not list((workdir / "diagnostics").glob("*.tmp"))
  with pytest.raises(config_lib.ConfigError, match=r"^config\.diagnostics\.step: .* has no checkpoint at step 2; "
                     r"its checkpoints: none"):
    _diagnose(workdir, **{"diagnostics.step": 2})

  config = helpers.load_config("default", "runlocal", total_steps=4, checkpoint_every=2, eval_every=4, log_every=2,
                               **{"optim.warmup_steps": 1})
  train.train_and_evaluate(config, str(workdir))
  assert helpers.checkpoint_steps(workdir) == [2, 4]
  latest = _diagnose(workdir)
  assert (latest["step"], latest["source"], latest["first_batch"]) == (4, "checkpoint", 4)
  at_2 = _diagnose(workdir, **{"diagnostics.step": 2})
  assert at_2["step"] == 2 and at_2["source"] == "checkpoint"
  assert _diagnose(workdir, **{"diagnostics.step": 0})["rows"] == init["rows"]  # initialization on request
  assert _diagnose(workdir)["rows"] == latest["rows"]  # deterministic
  assert all(a["signal"] != b["signal"] for a, b in zip(at_2["rows"], latest["rows"]))
  with pytest.raises(config_lib.ConfigError, match=r"^config\.diagnostics\.step: .* has no checkpoint at step 3; "
                     r"its checkpoints: 2, 4 \(-1 = the newest, 0 = the initial parameters\)$"):
    _diagnose(workdir, **{"diagnostics.step": 3})


def _main(workdir, *flags):
  return subprocess.run(
      [sys.executable, "-m", "chainjax.main", "--config=configs/default.py:runlocal", f"--workdir={workdir}",
       "--mode=diagnose", *flags], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})


def test_diagnose_command_writes_a_row_per_mode_and_stage(tmp_path):
  workdir = tmp_path / "run"
  proc = _main(workdir, "--config.diagnostics.num_batches=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((workdir / "diagnostics" / "snr.json").read_text())
  stages = ["level1", "level2", "level3"]
  assert report["modes"] == list(chain_lib.MODES) and report["stages"] == stages
  assert report["num_batches"] == 3 and report["noise_floor"] == pytest.approx(1 / 3)
  assert report["step"] == 0 and report["source"] == "initialization"
  pairs = {(r["mode"], r["stage"]) for r in report["rows"]}
  assert pairs == {(m, s) for m in chain_lib.MODES for s in stages}
  assert len(report["rows"]) == 18  # progressive_finetune: its greedy phases and its fine-tuning phase
  for row in report["rows"]:
    assert row["noise"] > 0 and row["snr"] == pytest.approx(row["signal"] / row["noise"])
    assert row["snr_db"] == pytest.approx(10 * math.log10(row["snr"]))
  table = [line for line in proc.stdout.splitlines() if line.startswith("  ") and "level" in line]
  assert len(table) == 18


@pytest.mark.parametrize("flag,expected", [
    ("--config.diagnostics.num_batches=1", "config.diagnostics.num_batches: must be >= 2"),
    ("--config.diagnostics.modes=end_to_end,greedy", "config.diagnostics.modes: 'greedy' is not one of"),
    ("--config.diagnostics.step=7", "config.diagnostics.step: "),
])
def test_diagnose_command_rejects_a_bad_value_with_exit_2(tmp_path, flag, expected):
  workdir = tmp_path / "run"
  proc = _main(workdir, flag)
  lines = [line for line in proc.stderr.splitlines() if line.startswith("chainjax: error:")]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert not (workdir / "diagnostics").exists()
