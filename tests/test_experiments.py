"""`experiments.run`: a config's sweep as runs, tables and plots; a killed sweep resumes; failures are recorded."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

import helpers
import processes
from experiments import run as runner

SWEEP = os.path.join(helpers.REPO, "tests", "fixtures", "sweep_config.py")
TIMEOUT_S = 900


def _runner(*args, **kwargs):
  return subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=helpers.REPO, env=processes.env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _finish(proc):
  out, err = proc.communicate(timeout=TIMEOUT_S)
  return proc.returncode, out, err


def test_a_sweep_expands_into_named_checked_runs():
  module, arg = runner.load_config_file(f"{SWEEP}:with_failure")
  runs = runner.expand(module, arg, seeds=2)
  assert [r.name for r in runs] == ["mode=end_to_end,seed=0", "mode=end_to_end,seed=1", "mode=decoupled,seed=0",
                                    "mode=decoupled,seed=1", "mode=no_such_mode,seed=0", "mode=no_such_mode,seed=1"]
  assert runs[3].overrides == {"chain.mode": "decoupled", "seed": 1} and runs[3].setting == "mode=decoupled"
  assert [r.name for r in runner.expand(module, "", seeds=1)] == ["mode=end_to_end", "mode=decoupled"]
  assert runner.run_name({"optim.learning_rate": 3e-4, "optim.per_stage.a.learning_rate": 1e-3, "x.y": (1, 2)}) \
      == "optim.learning_rate=0.0003,optim.per_stage.a.learning_rate=0.001,y=1x2"

  def sweep_of(*points):
    return type("Module", (), {"get_config": staticmethod(module.get_config),
                               "sweep": staticmethod(lambda add, arg: [add(**p) for p in points])})

  run, = runner.expand(sweep_of({"chain.mode": "decoupled", "variant": "k=2"}), "ignored")
  assert (run.name, run.setting, run.fields) == ("k=2,mode=decoupled", "k=2,mode=decoupled", {"chain.mode": "decoupled"})
  assert runner.main_command(f"{SWEEP}:ignored", "/w", run, python="python")[3:] == [
      f"--config={SWEEP}:k=2", "--workdir=/w", "--config.chain.mode=decoupled"]
  with pytest.raises(runner.SweepError, match=r"sweep point chain\.modes=x: config\.chain\.modes: no such field"):
    runner.expand(sweep_of({"chain.modes": "x"}), "")
  with pytest.raises(runner.SweepError, match=r"config\.optim\.learning_rate"):
    runner.expand(sweep_of({"optim.learning_rate": -1.0}), "")
  with pytest.raises(runner.SweepError, match=r"sets seed; --seeds=3 would multiply it"):
    runner.expand(sweep_of({"seed": 4}), "", seeds=3)
  with pytest.raises(runner.SweepError, match=r"the same point twice: mode=decoupled"):
    runner.expand(sweep_of({"chain.mode": "decoupled"}, {"chain.mode": "decoupled"}), "")
  with pytest.raises(runner.SweepError, match=r"added no point"):
    runner.expand(sweep_of(), "")
  with pytest.raises(runner.SweepError, match=r"expected METRIC>=VALUE"):
    runner.Target.parse("eval/accuracy=0.9")


@pytest.mark.parametrize("config", sorted(f for f in os.listdir(os.path.join(helpers.REPO, "configs"))
                                           if f.endswith(".py")))
def test_every_shipped_config_sweeps_at_least_two_axes(config):
  """Modes (or the variant that stands for them) and at least one size or rate axis; every point checked."""
  module, arg = runner.load_config_file(os.path.join(helpers.REPO, "configs", config))
  runs = runner.expand(module, arg)
  axes = {key: {runner.run_name({key: r.overrides.get(key)}) for r in runs} for r in runs for key in r.overrides}
  varied = sorted(key for key, values in axes.items() if len(values) > 1)
  assert len(varied) >= 2 and ("chain.mode" in varied or "variant" in varied), varied
  assert len(runs) >= 4


@pytest.mark.parametrize("paper", sorted(d for d in os.listdir(os.path.join(helpers.REPO, "experiments"))
                                          if os.path.isfile(os.path.join(helpers.REPO, "experiments", d, "config.py"))))
def test_every_reproduction_sweeps_checked_runs_with_a_target(paper):
  """A reproduction's sweep expands (every point checked against the schema) and reports a target."""
  module, arg = runner.load_config_file(os.path.join(helpers.REPO, "experiments", paper, "config.py"))
  runs = runner.expand(module, arg, seeds=3)
  assert len(runs) >= 6 and len({r.name for r in runs}) == len(runs)
  report = runner.Report.of(module, arg)
  assert report.metrics and report.target is not None


def _png_size(path):
  with open(path, "rb") as f:
    header = f.read(24)
  assert header[:8] == b"\x89PNG\r\n\x1a\n"
  return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_curves_get_a_panel_per_variant_when_each_variant_holds_several_settings(tmp_path):
  def rows(points):
    return [{"setting": runner.run_name(p), "overrides": {**p, "seed": 0},
             "records": [{"step": s, "eval/accuracy": 0.5 + s / 10} for s in (1, 2, 3)]} for p in points]
  modes = [{"variant": f"k={k}", "chain.mode": m} for k in (1, 2, 3) for m in ("end_to_end", "decoupled")]
  for name, points in {"panels": modes, "one": [{"variant": f"k={k}"} for k in (1, 2, 3)],
                       "plain": [{"chain.mode": m} for m in ("end_to_end", "decoupled")]}.items():
    os.makedirs(tmp_path / name)
    assert runner.plot_curves(str(tmp_path / name), rows(points), "eval/accuracy") == "eval_accuracy.png"
    assert runner.plot_curves(str(tmp_path / name), rows(points), "eval/loss") is None
  width = {name: _png_size(tmp_path / name / "eval_accuracy.png")[0] for name in ("panels", "one", "plain")}
  assert width["one"] == width["plain"] and width["panels"] > 2 * width["plain"], width


def test_the_markdown_table_is_mean_and_std_over_the_seeds_that_finished():
  def row(setting, seed, status, accuracy, steps):
    return {"run": f"{setting},seed={seed}", "setting": setting, "status": status, "exit_code": 0, "error": "",
            "wall_s": 10.0 + seed, "overrides": {"chain.mode": setting, "seed": seed},
            "final": {"step": 100, "eval/accuracy": accuracy} if status == "done" else {},
            "steps_to_target": steps, "records": []}
  rows = [row("a", 0, "done", 0.5, 40), row("a", 1, "done", 0.7, None), row("a", 2, "failed", None, None),
          row("b", 0, "done", 0.9, 20)]
  table = runner.markdown_table(rows, runner.Report(("eval/accuracy",), runner.Target.parse("eval/accuracy>=0.6")))
  assert table.splitlines() == [
      "| chain.mode | seeds | eval/accuracy | steps to eval/accuracy>=0.6 | wall (s) |",
      "|---|---|---|---|---|",
      "| a | 2/3 | 0.6000 ± 0.1414 | 40 (1/2 reached) | 10 ± 1 |",  # std with n - 1: sqrt(0.02)
      "| b | 1/1 | 0.9000 | 20 (1/1 reached) | 10 |"]
  assert runner.mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(1.2909944))
  assert runner.last_error("I1201 step 3\nchainjax: error: config.x: bad\nTraceback...\n") == \
      "chainjax: error: config.x: bad"
  assert runner.last_error("Traceback\n  File x\nKeyError: 'y'\n\n") == "KeyError: 'y'"


def test_dry_run_prints_every_command_and_bad_input_is_one_line(tmp_path):
  code, out, err = _finish(_runner(f"--config={SWEEP}", f"--workdir={tmp_path}/sweep", "--seeds=2", "--dry_run"))
  assert code == 0, err
  commands = out.strip().splitlines()
  assert len(commands) == 4 and all(" -m chainjax.main --config=" in c for c in commands)
  assert f"--workdir={tmp_path}/sweep/mode=decoupled,seed=1 --config.chain.mode=decoupled --config.seed=1" \
      in commands[3]
  assert not os.path.exists(tmp_path / "sweep")
  code, out, err = _finish(_runner(f"--config={SWEEP}", f"--workdir={tmp_path}/sweep", "--seeds=0"))
  assert (code, err) == (2, "experiments.run: error: --seeds=0: must be >= 1\n")
  assert not os.path.exists(tmp_path / "sweep")

  lines = [" ".join(c) for c in runner.prepare(SWEEP, "gs://b/s", tpu_vm="tpu", zone="z").commands]
  assert lines[0].startswith("git -C ") and "tpu-vm scp" in lines[1] and "pip install" in lines[2]
  assert len(lines) == 5 and "--workdir=gs://b/s/mode=end_to_end" in lines[3] and "tpu-vm ssh tpu" in lines[4]
  for kwargs, message in [(dict(workdir="gs://b/s", tpu_vm="tpu"), "--tpu_vm needs --zone"),
                          (dict(tpu_vm="t", zone="z"), "must be on gs://"),
                          (dict(config=f"{SWEEP}.missing"), "does not exist"),
                          (dict(target="acc"), "expected METRIC>=VALUE")]:
    kwargs = {"config": SWEEP, "workdir": str(tmp_path), **kwargs}
    with pytest.raises(ValueError, match=message):
      runner.prepare(kwargs.pop("config"), kwargs.pop("workdir"), **kwargs)


def _processes_with(text: str) -> list[int]:
  """Pids whose command line contains `text`."""
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if text.encode() in f.read():
          pids.append(int(pid))
    except OSError:  # gone, or not a process (/proc/dma)
      continue
  return pids


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_a_failing_run_is_recorded(tmp_path):
  sweep_dir = str(tmp_path / "sweep")
  args = (f"--config={SWEEP}:with_failure", f"--workdir={sweep_dir}", "--seeds=2", "--parallel=2")
  first = _runner(*args)
  finished_runs = lambda: [n for n in os.listdir(sweep_dir)
                           if runner.read_status(os.path.join(sweep_dir, n)).get("status") == "done"] \
      if os.path.isdir(sweep_dir) else []
  deadline = time.monotonic() + TIMEOUT_S
  while not finished_runs() and time.monotonic() < deadline and first.poll() is None:
    time.sleep(0.2)
  assert finished_runs(), first.communicate()
  first.kill()  # SIGKILL: the runner cannot pass anything on; its runs get SIGTERM from the kernel
  first.communicate(timeout=TIMEOUT_S)
  done = finished_runs()  # read after the kill: the other parallel run may have finished meanwhile
  assert 1 <= len(done) < 6
  deadline = time.monotonic() + 120
  while _processes_with(f"--workdir={sweep_dir}/") and time.monotonic() < deadline:
    time.sleep(0.5)
  assert not _processes_with(f"--workdir={sweep_dir}/"), "runs outlived the killed runner"
  finished = {n: os.path.getmtime(os.path.join(sweep_dir, n, "metrics.jsonl")) for n in done}

  code, out, err = _finish(_runner(*args))
  assert code == 1, err  # two runs failed
  assert f"{len(done)} finished before" in out.splitlines()[0], out
  for name, mtime in finished.items():  # not run again
    assert os.path.getmtime(os.path.join(sweep_dir, name, "metrics.jsonl")) == mtime
    assert runner.read_status(os.path.join(sweep_dir, name))["attempts"] == 1
  progress = [line for line in out.splitlines() if line.startswith("[")]
  assert len(progress) == 6 - len(done) and all(" in " in line for line in progress), out
  assert any("failed in" in line and "config.chain.mode: 'no_such_mode' is not one of" in line for line in progress)

  with open(os.path.join(sweep_dir, runner.RESULTS_CSV)) as f:
    rows = list(csv.DictReader(f))
  assert [(r["run"], r["status"], r["chain.mode"], r["seed"]) for r in rows] == [
      ("mode=end_to_end,seed=0", "done", "end_to_end", "0"), ("mode=end_to_end,seed=1", "done", "end_to_end", "1"),
      ("mode=decoupled,seed=0", "done", "decoupled", "0"), ("mode=decoupled,seed=1", "done", "decoupled", "1"),
      ("mode=no_such_mode,seed=0", "failed", "no_such_mode", "0"),
      ("mode=no_such_mode,seed=1", "failed", "no_such_mode", "1")]
  for r in rows[:4]:
    assert r["step"] == "4" and r["exit_code"] == "0" and float(r["wall_s"]) > 0
    assert 0.0 <= float(r["eval/accuracy"]) <= 1.0 and r["steps_to_eval/accuracy>=0"] == "2"
    accuracies = [m["eval/accuracy"] for m in runner.read_metrics(os.path.join(sweep_dir, r["run"]))]
    assert float(r["eval/accuracy"]) == pytest.approx(accuracies[-1], rel=1e-5)
  assert rows[4]["exit_code"] == "2" and rows[4]["error"].startswith("chainjax: error: config.chain.mode")
  with open(os.path.join(sweep_dir, runner.RESULTS_MD)) as f:
    results = f.read()
  lines = [line for line in results.splitlines() if line.startswith("| ")]
  assert lines[0] == ("| chain.mode | seeds | eval/accuracy | eval/stage_1/accuracy | steps to eval/accuracy>=0 | "
                      "wall (s) |")
  accuracies = [float(r["eval/accuracy"]) for r in rows[:2]]
  mean, std = runner.mean_std(accuracies)
  assert lines[1].startswith(f"| end_to_end | 2/2 | {mean:.4f} ± {std:.4f} | ")
  assert lines[3].startswith("| no_such_mode | 0/2 | - |")
  assert "`mode=no_such_mode,seed=1` (exit code 2)" in results
  assert os.path.getsize(os.path.join(sweep_dir, "eval_accuracy.png")) > 1000
