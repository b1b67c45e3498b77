"""The benchmarks time the trainer's step: same state as `train_and_evaluate` after 3 updates; each one runs.

`benchmarks/common.py` is the one code path every benchmark runs steps through (`StepBench.run`):
three updates through it must end exactly where three updates of `train.train_and_evaluate` end,
fed the same batches (the trainer's input iterator). The smoke tests run each benchmark script at
its smallest setting, in a fresh process (the scripts own their flags and device counts), and
check that it prints its ratio line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import helpers
import tiny_tfds

REPO = helpers.REPO
sys.path.insert(0, REPO)  # benchmarks/ is not a package that is installed

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from chainjax import train  # pylint: disable=g-import-not-at-top,wrong-import-position


def _flat(tree) -> dict[str, np.ndarray]:
  """{"stages/level1/.../kernel": array} for an nnx.State or the nested dict a checkpoint restores to
  (which spells each variable's value as a last "value" key)."""
  key = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  out = {}
  for path, leaf in jax.tree.leaves_with_path(tree):
    names = [key(k) for k in path]
    out["/".join(names[:-1] if names[-1] == "value" else names)] = np.asarray(leaf)
  return out


@pytest.mark.parametrize("overrides", [
    {},
    # One update = 2 calls with a shared denominator: the benchmarks' copy of the trainer's micro-batch loop.
    pytest.param({"optim.accum_steps": 2, "optim.accum_impl": "optax"}, marks=pytest.mark.slow),
], ids=["plain", "optax_accum"])
def test_benchmark_step_matches_trainer_step(tmp_path, overrides):
  settings = dict(total_steps=3, checkpoint_every=3, eval_every=3, log_every=3,
                  **{"data.eval_size": 256, "optim.warmup_steps": 1},
                  **overrides)
  bench = common.StepBench(helpers.load_config("default", "runlocal", **settings))
  bench.run(bench.train_batches(3))  # the trainer's first 3 batches, through the benchmarks' update loop
  train.train_and_evaluate(helpers.load_config("default", "runlocal", **settings), str(tmp_path))

  final = helpers.final_state(tmp_path)
  assert final["step"] == 3 and int(jax.device_get(bench.state.step)) == 3
  ours, theirs = _flat(jax.device_get(bench.state.params)), _flat(final["tree"]["params"])
  assert sorted(ours) == sorted(theirs) and ours
  for name, value in ours.items():  # the same program on the same inputs: bit-identical
    np.testing.assert_array_equal(value, theirs[name], err_msg=name)
  initial = _flat(jax.device_get(bench.exp.init_state().params))
  assert any(not np.array_equal(initial[name], value) for name, value in ours.items())  # the updates moved them


def _run(script: str, *args: str, devices: int | None = 2) -> str:
  """Runs benchmarks/<script> (a fresh process; `devices` fake CPU devices unless None); its stdout."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_ENABLE_ASYNC_DISPATCH="false")
  if devices is not None:
    kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=240, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_optim_overhead_smoke():
  out = _run("optim_overhead.py", "--steps=2", "--repeats=1", "--batch_size=16", "--width=8",
             "--variants=plain,multisteps")
  assert re.search(r"^plain fp32 step\s+[\d.]+\s+1\.00x", out, re.M), out
  assert re.search(r"^accum_steps=4, optax\.MultiSteps\s+[\d.]+\s+[\d.]+x", out, re.M), out


def test_input_pipeline_smoke():
  out = _run("input_pipeline.py", f"--config={os.path.join(REPO, 'configs', 'line_parity.py')}:runlocal",
             "--steps=2", "--repeats=1")
  assert re.search(r"train from memory\s+[\d.]+ steps/s\s+1\.00x", out), out
  assert re.search(r"train, uncached\s+[\d.]+ steps/s\s+[\d.]+x", out), out
  assert re.search(r"^target: the config's pipeline >= 0\.95x from memory: [\d.]+x", out, re.M), out


def test_scaling_smoke():
  out = _run("scaling.py", "--steps=2", "--repeats=1", "--per_device_batch=4", "--width=8", "--counts=1,2",
             devices=None)  # the benchmark sets each worker's device count itself
  rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+[\d.]+\s+[\d.]+\s+\d+\s+([\d.]+)x$", out, re.M)
  assert [(n, batch) for n, batch, _ in rows] == [("1", "4"), ("2", "8")], out
  assert rows[0][2] == "1.00", out


def test_compression_smoke(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # Fashion-MNIST is not prepared there: skipped, in one line
  out = _run("compression_costs.py", "--quick", "--configs=default,fashion_mnist_cnn")
  assert re.search(r"^fashion_mnist_cnn: skipped, its data is not prepared: .*chainjax\.data\.prepare fashion_mnist",
                   out, re.M), out
  rows = re.findall(r"^  (\S.*?)\s+[\d.,]+ (?:ms|B)\s+[\d.,]+ (?:ms|B)\s+([\d.]+)x\s+(report|<=([\d.]+)x (PASS|MISS))$",
                    out, re.M)
  assert [row[0] for row in rows] == ["QAT w8a8 train step vs float", "pruned 0.8 train step vs dense",
                                      "PTQ int8 eval vs float eval", "int8 bytes vs float32",
                                      "int4 bytes vs float32"], out
  assert rows[2][2] == "report", out
  for _, ratio, _, target, verdict in rows[3:]:  # bytes are exact: their targets must hold (timings are not checked)
    assert float(ratio) <= float(target) and verdict == "PASS", out


def test_cnn_step_smoke(tmp_path):
  """Ours against the same model compiled with Flax's max_pool, on the tests' tiny image set; --explain."""
  out_json = tmp_path / "rows.json"
  out = _run("cnn_step.py", "--quick", "--explain", f"--data_name={tiny_tfds.NAME}",
             f"--data_dir={tiny_tfds.build(tmp_path / 'tfds')}", f"--json={out_json}", devices=1)
  (row,) = json.loads(out_json.read_text())
  ops = row["top_operations"]  # --explain: a profile of our step, read back, its XLA operations named
  assert 1 <= len(ops) <= 10 and 0 < sum(op["share"] for op in ops) <= 1 + 1e-9
  assert [op["ms_per_update"] for op in ops] == sorted((op["ms_per_update"] for op in ops), reverse=True)
  assert any("conv_general_dilated" in op["what"] for op in ops), ops
  assert "Top operations of fashion_mnist_cnn step" in out
  assert row["model"] == "fashion_mnist_cnn b128" and row["unit"] == "examples/s"
  assert row["ours"] > 0 and row["baseline"] > 0 and row["ratio"] == pytest.approx(row["ours"] / row["baseline"])
  assert row["min"] <= row["ours"] <= row["max"] and row["gflops"] > 0


def _suite(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600, check=False)


def test_the_suite_collects_every_benchmarks_rows_into_one_table(tmp_path):
  out_json = tmp_path / "suite.json"
  proc = _suite("--quick", "--only=optim_overhead,lstm_step", "--nopeers", f"--json={out_json}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out_json.read_text())
  assert [r["benchmark"] for r in rows] == ["machine"] + ["lstm_step"] * 2 + ["optim_overhead"] * 4
  assert rows[0]["unit"] == "GFLOP/s" and rows[0]["ours"] > 0
  for r in rows[1:]:
    assert r["ratio"] == pytest.approx(r["ours"] / r["baseline"]) and r["baseline_name"], r
    if r["target"] is not None:
      assert r["met"] == (r["ratio"] >= r["target"] if r["better"] == "higher" else r["ratio"] <= r["target"]), r
  assert [r["model"] for r in rows if r["benchmark"] == "lstm_step"] == ["imdb_lstm b16", "imdb_lstm b64"]
  assert "| benchmark | row | ours | min-max | unit | baseline | baseline is | ratio | target |" in proc.stdout
  assert proc.stdout.count("\n| lstm_step |") == 2 and proc.stdout.count("\n| optim_overhead |") == 4


def test_the_suite_names_an_unknown_benchmark_in_one_line():
  proc = _suite("--only=lstm_step,nope")
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
      "benchmarks.run: --only: unknown benchmark 'nope'; known: lstm_step, cnn_step"), proc.stderr


def test_model_rows_are_compared_with_their_pytorch_peers():
  from benchmarks import run  # pylint: disable=import-outside-toplevel
  ours = [{"benchmark": "cnn_step", "model": "fashion_mnist_cnn b128", "ours": 600.0},
          {"benchmark": "optim_overhead", "ours": 2.0}]
  peers = [{"name": "fashion_mnist_cnn b128", "examples_per_sec": 400.0, "min": 390.0, "max": 410.0,
            "torch": "2.13.0", "threads": 2}]
  (row,) = run.against_peers(ours, peers)
  assert row["ratio"] == 1.5 and row["target"] == run.PEER_TARGET and row["met"]
  assert "PyTorch 2.13.0 (2 threads): 400 (390-410)" == row["baseline_name"]
