"""config.profile_steps: a jax.profiler trace of a window of updates, for TensorBoard's Profile tab."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from chainjax import config as config_lib
from chainjax import experiment
from chainjax import train

from helpers import load_config

PROFILE_DIR = os.path.join("tensorboard", "plugins", "profile")


def _traces_in(log_dir) -> list[str]:
  return glob.glob(os.path.join(str(log_dir), "plugins", "profile", "*", "*.xplane.pb"))


def _traces(workdir) -> list[str]:
  return _traces_in(os.path.join(str(workdir), "tensorboard"))


def _untimed(metrics: dict) -> dict:
  return {k: v for k, v in metrics.items() if not k.endswith("_per_sec")}


def _config(total_steps=8, **overrides):
  """A seconds-long run: one eval, one checkpoint, at its last update."""
  return load_config("default", "runlocal", total_steps=total_steps, eval_every=total_steps,
                     checkpoint_every=total_steps, log_every=2, **{"optim.warmup_steps": 1}, **overrides)


def test_trace_of_the_window_and_the_same_numbers_as_without(tmp_path, caplog):
  caplog.set_level("INFO")
  profiled = train.train_and_evaluate(_config(profile_steps="3:6"), str(tmp_path / "profiled"))
  traces = _traces(tmp_path / "profiled")
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
  assert any("Profiling updates 3..5 (config.profile_steps='3:6')" in r.message for r in caplog.records)
  assert any("Profile of updates 3..5 written to" in r.message and traces[0] in r.message for r in caplog.records)
  plain = train.train_and_evaluate(_config(), str(tmp_path / "plain"))
  assert _untimed(profiled) == _untimed(plain)
  assert "train/loss" in profiled and "eval/accuracy" in profiled
  assert not _traces(tmp_path / "plain")


def test_no_trace_when_the_window_is_outside_the_run(tmp_path):
  """A run shorter than START, and a resumed run that starts after END (a resumable change), trace nothing."""
  train.train_and_evaluate(_config(2, profile_steps="3:6"), str(tmp_path))
  assert not os.path.exists(tmp_path / PROFILE_DIR)
  # Resumed at 2, after the window (update 1): trains on to 4 without a trace or a config error.
  assert train.train_and_evaluate(_config(4, profile_steps="1:2"), str(tmp_path))["step"] == 4
  assert not os.path.exists(tmp_path / PROFILE_DIR)


def test_a_run_that_raises_mid_window_still_writes_its_trace(tmp_path):
  """Leaving the profiler's context with an error stops the trace (written, the profiler free again)."""
  profiler = train.StepProfiler("1:5", str(tmp_path), enabled=True)
  with pytest.raises(KeyboardInterrupt), profiler:
    profiler.start(1)
    with profiler.step(1):
      outputs = jnp.ones((64, 64)) @ jnp.ones((64, 64))
    assert not profiler.traced(1, outputs)
    raise KeyboardInterrupt
  assert not profiler.active and len(_traces_in(tmp_path)) == 1
  jax.profiler.start_trace(str(tmp_path / "again"))  # raises if a trace were still running
  jax.profiler.stop_trace()


@pytest.mark.parametrize("value", ["6:3", "3:3", "a:b", "0:2", "-1:2", "3", "3:", ":6", "1:2:3"])
def test_bad_value_is_one_config_error_naming_the_field(value):
  config = load_config("default", "runlocal", profile_steps=value)
  with pytest.raises(config_lib.ConfigError) as info:
    experiment.validate(config, num_devices=8)
  assert info.value.field == "profile_steps"
  assert str(info.value).startswith(f"config.profile_steps: {value!r} is not START:END with 1 <= START < END")


def test_parse():
  assert config_lib.parse_profile_steps("") is None
  assert config_lib.parse_profile_steps("3:6") == (3, 6)
