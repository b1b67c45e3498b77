"""The sweep runner: a config file's `sweep(add, arg)` as runs, a results table and plots.

  python -m experiments.run --config=configs/line_parity.py --workdir=runs/lp --seeds=3 --parallel=2
  python -m experiments.run --config=configs/default.py:runlocal --workdir=runs/d --dry_run

A config file may define `sweep(add, arg=None)`: each `add(**overrides)` is one run, with dotted
field names (`add(**{"chain.mode": "decoupled", "optim.learning_rate": 3e-4})`); products of
axes are plain Python loops. Where a point needs a different shape of config (another number of
stages), `add(variant="levels=4", **overrides)` runs `get_config("levels=4")` instead of the
sweep's own arg. The runner

  * expands the sweep (each point times `--seeds` seeds: `seed` = the config's seed + 0, 1, ...),
    checks every point against the config schema before anything runs, and gives each run its own
    sub-workdir named from its overrides (`DIR/mode=decoupled,seed=1`);
  * runs each as its own `python -m chainjax.main` process, `--parallel` at a time, with its
    output in `DIR/<run>/run.log`;
  * skips runs that finished, and resumes runs that were interrupted: a killed sweep, rerun with
    the same command, continues where it stopped (each chainjax run resumes from its checkpoint).
    A run that failed is recorded with its exit code and last error line while the others go
    on, and is tried again by the next invocation;
  * prints one line per finished run (its overrides, headline metric and wall time) with the
    sweep's ETA, and at the end writes
      - `DIR/results.csv`: one row per run (sub-workdir, status, exit code, error, every override,
        steps to the target, wall seconds, then the final value of every metric of its
        `metrics.jsonl`);
      - `DIR/RESULTS.md`: one row per setting (a point without its seed): mean ± std over the
        seeds of the reported metrics, the seeds that finished, wall time;
      - `DIR/<metric>.png`: the eval curve of every setting, the mean over seeds with a min-max band
        (one panel per variant where each variant holds several settings).

What is reported comes from the config file's optional `report(arg=None)`, a dict with
`metrics` (headline first, e.g. `("eval/accuracy", "eval/stage_1/accuracy")`) and `target`
(e.g. `"eval/accuracy>=0.95"`: the first eval step that reaches it is the run's
`steps_to_target`); `--metrics` and `--target` override it. Without either, the headline is
`eval/accuracy` (else `eval/auc`, else `eval/loss`).

With `--tpu_vm=NAME --zone=ZONE` the commands go through `chainjax.launch` (the checkout copied
and installed once, then each point on the TPU VM in turn, each with its own sub-workdir, which
must be on `gs://`). `--dry_run` prints every command and runs (and writes) nothing.

`--tables_only` rewrites the tables and plots from the sub-workdirs without running anything.

Exit codes: 0 every run finished; 1 some run failed (the tables are written all the same);
2 a bad flag, config file or sweep point (one line, nothing run); 130/143 interrupted by
SIGINT/SIGTERM (the runs in flight were told to checkpoint and stop: rerun to continue).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import app, flags

from chainjax import config as config_lib
from chainjax import launch
from chainjax import metrics as metrics_lib

EXIT_FAILED_RUNS = 1
EXIT_BAD_ARGS = 2
STATUS = "sweep_status.json"  # in each sub-workdir: the runner's record of the run
LOG = "run.log"  # in each sub-workdir: the run's stdout and stderr, appended per attempt
RESULTS_CSV, RESULTS_MD = "results.csv", "RESULTS.md"
HEADLINES = ("eval/accuracy", "eval/auc", "eval/loss")
EXIT_PREEMPTED = 4  # chainjax.main's: SIGTERM, checkpoint saved (not imported: main imports jax)
POLL_S = 0.2
VARIANT = "variant"  # the `add` keyword that picks get_config's arg for one point


class SweepError(ValueError):
  """A sweep that must not start (bad config file, sweep point or flag); the message is one line."""


# ----------------------------------------------------------------------------------------------
# The sweep as data.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of the sweep: its overrides (seed included; `variant` first when the point has one),
  sub-workdir name and setting name."""

  overrides: dict
  name: str
  setting: str  # the name without the seed: runs of one setting are averaged

  @property
  def fields(self) -> dict:
    """The config field overrides (`--config.<field>=...`): the overrides without the variant."""
    return {k: v for k, v in self.overrides.items() if k != VARIANT}

  def config(self, config: str) -> str:
    """The run's `--config`: the sweep's `path[:arg]`, or `path:<variant>` for a point with a variant."""
    return f"{config.partition(':')[0]}:{self.overrides[VARIANT]}" if VARIANT in self.overrides else config


def load_config_file(config: str):
  """The module of `path[:arg]` and its arg: `configs/default.py:runlocal` -> (module, "runlocal")."""
  path, _, arg = config.partition(":")
  if not os.path.isfile(path):
    raise SweepError(f"--config={config}: {path} does not exist")
  try:
    module = config_lib.load_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f"--config={config}: loading {path} raised {type(e).__name__}: {_first_line(e)}") from e
  if not hasattr(module, "get_config"):
    raise SweepError(f"--config={config}: {path} defines no get_config(arg)")
  return module, arg


def expand(module, arg: str, seeds: int = 1) -> list[Run]:
  """The runs of `module.sweep(add, arg)`, each point times `seeds` seeds (one run per point if 1).

  Without a `sweep`, the sweep is the config itself (one point, no overrides). Each point is
  checked against the config schema (`chainjax.config.validate`), so a typo in a field name or
  value stops the sweep before any run starts.
  """
  from chainjax import errors  # pylint: disable=import-outside-toplevel

  if seeds < 1:
    raise SweepError(f"--seeds={seeds}: must be >= 1")
  points: list[dict] = []
  if hasattr(module, "sweep"):
    try:
      module.sweep(lambda **overrides: points.append(dict(overrides)), arg or None)
    except Exception as e:  # pylint: disable=broad-except
      raise SweepError(f"sweep({arg!r}) raised {type(e).__name__}: {_first_line(e)}") from e
    if not points:
      raise SweepError(f"sweep({arg!r}) added no point")
  else:
    points = [{}]
  base_seed = module.get_config(arg).seed
  runs = []
  for point in points:
    if seeds > 1 and "seed" in point:
      raise SweepError(f"the sweep point {_label(point)} sets seed; --seeds={seeds} would multiply it")
    if VARIANT in point:  # first, so that names and tables start with it
      point = {VARIANT: str(point[VARIANT]), **{k: v for k, v in point.items() if k != VARIANT}}
    for s in range(seeds):
      overrides = dict(point, seed=base_seed + s) if seeds > 1 else point
      try:
        config = module.get_config(overrides.get(VARIANT, arg))
      except Exception as e:  # pylint: disable=broad-except
        raise SweepError(f"get_config({overrides.get(VARIANT, arg)!r}) raised {type(e).__name__}: "
                         f"{_first_line(e)}") from e
      try:
        for key, value in overrides.items():
          if key != VARIANT:
            _set(config, key, value)
        config_lib.validate(config)
      except errors.ConfigError as e:
        raise SweepError(f"sweep point {_label(overrides) or '(no overrides)'}: {e}") from e
      runs.append(Run(overrides, run_name(overrides), run_name(dict(point))))
  names = [r.name for r in runs]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise SweepError(f"the sweep adds the same point twice: {duplicates[0]}")
  return runs


def _set(config, key: str, value: Any) -> None:
  """`config.<key> = value` for a dotted key, as `--config.<key>=...` would, naming a missing field."""
  from chainjax import errors  # pylint: disable=import-outside-toplevel
  node = config
  *path, last = key.split(".")
  for i, part in enumerate(path):
    if part not in node:
      raise errors.ConfigError(".".join(path[:i + 1]), "no such field")
    node = node[part]
  if last not in node:
    raise errors.ConfigError(key, "no such field")
  if isinstance(value, (list, tuple)) and isinstance(node[last], tuple):
    value = tuple(value)
  node[last] = value


def run_name(overrides: Mapping[str, Any]) -> str:
  """A sub-workdir name from the overrides: `{"chain.mode": "decoupled", "seed": 1}` -> `mode=decoupled,seed=1`.

  A variant comes as it is (`levels=4,mode=end_to_end`). Each field goes by its last dotted part
  unless two fields share it; a tuple is joined by `x`
  (`features=64x32`); characters that a path or a shell would mangle become `-`. No overrides: `base`.
  """
  if not overrides:
    return "base"
  shorts = [k.rsplit(".", 1)[-1] for k in overrides]
  parts = []
  for (key, value), short in zip(overrides.items(), shorts):
    if key == VARIANT:
      parts.append(str(value))
      continue
    field = short if shorts.count(short) == 1 else key
    text = "x".join(map(_value_text, value)) if isinstance(value, (list, tuple)) else _value_text(value)
    parts.append(f"{field}={text}")
  return re.sub(r"[^A-Za-z0-9._=,+-]", "-", ",".join(parts))


def _value_text(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(_value_text(v) for v in value) + ")"
  if isinstance(value, float):
    return repr(value)
  return str(value)


def _label(overrides: Mapping[str, Any]) -> str:
  return " ".join(f"{k}={_value_text(v)}" for k, v in overrides.items())


# ----------------------------------------------------------------------------------------------
# What is reported.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
  """`eval/accuracy>=0.95`: the first step whose metric passes `threshold` in `direction`."""

  metric: str
  op: str
  threshold: float

  @classmethod
  def parse(cls, text: str) -> Target | None:
    if not text:
      return None
    match = re.fullmatch(r"\s*([\w/.-]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", text)
    if not match:
      raise SweepError(f"target {text!r}: expected METRIC>=VALUE or METRIC<=VALUE, e.g. eval/accuracy>=0.95")
    return cls(match[1], match[2], float(match[3]))

  def reached(self, value: float) -> bool:
    return value >= self.threshold if self.op == ">=" else value <= self.threshold

  def __str__(self) -> str:
    return f"{self.metric}{self.op}{self.threshold:g}"


@dataclasses.dataclass(frozen=True)
class Report:
  """The metrics of the RESULTS.md table and plots (headline first), and the optional target."""

  metrics: tuple[str, ...] = ()
  target: Target | None = None

  @classmethod
  def of(cls, module, arg: str, metrics: str = "", target: str = "") -> Report:
    spec = module.report(arg or None) if hasattr(module, "report") else {}
    unknown = set(spec) - {"metrics", "target"}
    if unknown:
      raise SweepError(f"report() returned unknown keys {sorted(unknown)}; known: metrics, target")
    names = tuple(m for m in metrics.split(",") if m) if metrics else tuple(spec.get("metrics", ()))
    return cls(names, Target.parse(target or spec.get("target", "")))

  def columns(self, finals: Iterable[Mapping[str, float]]) -> tuple[str, ...]:
    """The reported metrics; without any, the first of HEADLINES that some run has."""
    if self.metrics:
      return self.metrics
    seen = set().union(*(set(f) for f in finals))
    return tuple(m for m in HEADLINES if m in seen)[:1]


# ----------------------------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------------------------


def main_command(config: str, workdir: str, run: Run, python: str = sys.executable) -> list[str]:
  """The local command of one run: `python -m chainjax.main --config=... --workdir=... --config.<k>=<v>`."""
  return [python, "-m", "chainjax.main", *launch.main_args_for(run.config(config), workdir, run.fields)]


def read_status(workdir: str) -> dict:
  """The runner's record of a run: {"status": "done"|"failed"|"running"|..., ...}; {} if never run."""
  try:
    with open(os.path.join(workdir, STATUS)) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return {}


def _write_status(workdir: str, status: dict) -> None:
  metrics_lib.write_atomically(os.path.join(workdir, STATUS), json.dumps(status, indent=1))


def last_error(log_text: str) -> str:
  """The line that says why a run failed: chainjax's `chainjax: error: ...`, else the last line."""
  lines = [line.strip() for line in log_text.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("chainjax: error:")]
  line = errors[-1] if errors else (lines[-1] if lines else "(no output)")
  return line[:300]


def _die_with_parent() -> None:
  """In the child, before exec: SIGTERM when the runner dies (even by SIGKILL), so that no orphan
  keeps writing a workdir that the next invocation resumes. Linux only (prctl PR_SET_PDEATHSIG)."""
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
  except (OSError, AttributeError):
    pass


class LocalRunner:
  """Runs the sweep's pending runs as `chainjax.main` processes, `parallel` at a time."""

  def __init__(self, config: str, sweep_dir: str, runs: Sequence[Run], report: Report, *, parallel: int = 1,
               out=None, clock: Callable[[], float] = time.monotonic):
    self.config, self.dir, self.runs, self.report = config, sweep_dir, list(runs), report
    self.parallel, self.out, self.clock = max(1, parallel), out or sys.stdout, clock
    self.stopping: int | None = None  # the signal that asked the sweep to stop

  def say(self, message: str) -> None:
    print(message, file=self.out, flush=True)

  def pending(self) -> list[Run]:
    return [r for r in self.runs if read_status(os.path.join(self.dir, r.name)).get("status") != "done"]

  def run(self) -> int:
    """Runs every pending run; returns the number that failed (the interrupted are not counted)."""
    pending = self.pending()
    done_before = len(self.runs) - len(pending)
    self.say(f"experiments.run: {len(self.runs)} runs, {done_before} finished before, {len(pending)} to run "
             f"({self.parallel} at a time) in {self.dir}")
    running: dict[str, tuple[Run, subprocess.Popen, float, Any]] = {}
    finished, failed, walls = done_before, 0, []
    queue = list(pending)
    previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      while queue or running:
        while queue and len(running) < self.parallel and self.stopping is None:
          run = queue.pop(0)
          running[run.name] = self._start(run)
        time.sleep(POLL_S)
        for name, (run, proc, start, log) in list(running.items()):
          code = proc.poll()
          if code is None:
            continue
          del running[name]
          log.close()
          wall = self.clock() - start
          status = self._finish(run, code, wall)
          if status["status"] == "interrupted":
            continue
          finished += 1
          walls.append(wall)
          failed += status["status"] == "failed"
          self.say(self._progress_line(run, status, finished, walls, len(queue) + len(running)))
        if self.stopping is not None and not running:
          break
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
    return failed

  def _stop(self, signum, frame) -> None:
    del frame
    if self.stopping is None:
      self.say(f"experiments.run: {signal.Signals(signum).name}: the runs in flight checkpoint and stop; "
               f"rerun the same command to continue")
    self.stopping = signum

  def _start(self, run: Run):
    workdir = os.path.join(self.dir, run.name)
    os.makedirs(workdir, exist_ok=True)
    previous = read_status(workdir)
    command = main_command(self.config, workdir, run)
    _write_status(workdir, {"status": "running", "overrides": run.overrides, "command": shlex.join(command),
                            "attempts": previous.get("attempts", 0) + 1,
                            "started": datetime.datetime.now().isoformat(timespec="seconds")})
    log = open(os.path.join(workdir, LOG), "a")  # pylint: disable=consider-using-with
    log.write(f"\n# experiments.run, attempt {previous.get('attempts', 0) + 1}: {shlex.join(command)}\n")
    log.flush()
    # Runs in the runner's own process group, so a Ctrl-C reaches every run; the runner's SIGTERM
    # handler passes a SIGTERM on.
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    return run, proc, self.clock(), log

  def _finish(self, run: Run, code: int, wall: float) -> dict:
    workdir = os.path.join(self.dir, run.name)
    status = read_status(workdir)
    status.update(exit_code=code, wall_s=round(wall + status.get("wall_s_before", 0.0), 1))
    if code == 0:
      status["status"], status["error"] = "done", ""
    elif self.stopping is not None or code in (EXIT_PREEMPTED, -signal.SIGTERM, -signal.SIGINT):
      status["status"] = "interrupted"
      status["wall_s_before"] = status["wall_s"]  # the next attempt adds to it
    else:
      with open(os.path.join(workdir, LOG), errors="replace") as f:
        status["status"], status["error"] = "failed", last_error(f.read()[-20000:])
    _write_status(workdir, status)
    return status

  def _progress_line(self, run: Run, status: dict, finished: int, walls: list[float], left: int) -> str:
    wall = launch.format_duration(status["wall_s"])
    line = f"[{finished}/{len(self.runs)}] {run.name}: {status['status']} in {wall}"
    if status["status"] == "failed":
      line += f" (exit code {status['exit_code']}): {status['error']}"
    else:
      final = final_metrics(os.path.join(self.dir, run.name))
      columns = self.report.columns([final])
      if columns and columns[0] in final:
        line += f" - {columns[0]} {final[columns[0]]:.4f}"
    if left:
      eta = sum(walls) / len(walls) * left / self.parallel
      line += f" - ETA {launch.format_duration(eta)}"
    return line


def tpu_commands(config: str, sweep_dir: str, runs: Sequence[Run], vm) -> list[list[str]]:
  """The TPU VM plan: copy and install once, then each run in turn (`chainjax.launch`'s builders)."""
  if not sweep_dir.startswith("gs://"):
    raise SweepError(f"--workdir={sweep_dir}: with --tpu_vm every run's workdir must be on gs:// (the TPU "
                     f"VM's workers share it)")
  commands = launch.copy_commands(vm) + [launch.install_command(vm)]
  return commands + [launch.sweep_run_command(vm, r.config(config), f"{sweep_dir.rstrip('/')}/{r.name}", r.fields)
                     for r in runs]


# ----------------------------------------------------------------------------------------------
# Tables and plots.
# ----------------------------------------------------------------------------------------------


def read_metrics(workdir: str) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl` ([] if none); a torn last line (a killed run) is skipped."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return []
  records = []
  for line in lines:
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def final_metrics(workdir: str) -> dict[str, float]:
  """The last value of every metric of a run (`step` included)."""
  final: dict[str, float] = {}
  for record in read_metrics(workdir):
    final.update(record)
  return final


def steps_to(records: Sequence[Mapping[str, float]], target: Target) -> int | None:
  """The first step whose record reaches the target, or None."""
  for record in records:
    if target.metric in record and target.reached(record[target.metric]):
      return int(record["step"])
  return None


def collect(sweep_dir: str, runs: Sequence[Run], report: Report) -> list[dict]:
  """One row per run: name, setting, status, exit code, error, wall, overrides, steps to target, finals."""
  rows = []
  for run in runs:
    workdir = os.path.join(sweep_dir, run.name)
    status = read_status(workdir)
    records = read_metrics(workdir)
    final = final_metrics(workdir)
    row = {"run": run.name, "setting": run.setting, "status": status.get("status", "not run"),
           "exit_code": status.get("exit_code", ""), "error": status.get("error", ""),
           "wall_s": status.get("wall_s", ""), "overrides": run.overrides, "final": final,
           "steps_to_target": steps_to(records, report.target) if report.target else None, "records": records}
    rows.append(row)
  return rows


def write_csv(path: str, rows: Sequence[dict], report: Report) -> None:
  fields = list(dict.fromkeys(k for row in rows for k in row["overrides"]))
  metrics = sorted(set().union(*(set(row["final"]) for row in rows)) - {"step"}) if rows else []
  header = ["run", "status", "exit_code", "error", *fields]
  header += [f"steps_to_{report.target}"] if report.target else []
  header += ["wall_s", "step", *metrics]
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  for row in rows:
    values = [row["run"], row["status"], row["exit_code"], row["error"]]
    values += [_value_text(row["overrides"][f]) if f in row["overrides"] else "" for f in fields]
    if report.target:
      values.append("" if row["steps_to_target"] is None else row["steps_to_target"])
    values += [row["wall_s"], row["final"].get("step", "")]
    values += [_number(row["final"].get(m)) for m in metrics]
    writer.writerow(values)
  metrics_lib.write_atomically(path, buffer.getvalue())


def _number(value) -> str:
  if value is None:
    return ""
  return f"{value:.6g}" if isinstance(value, float) else str(value)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return mean, std


def _mean_pm_std(values: Sequence[float], digits: int = 4) -> str:
  if not values:
    return "-"
  mean, std = mean_std(values)
  return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def settings(rows: Sequence[dict]) -> dict[str, list[dict]]:
  """Rows grouped by setting, in sweep order."""
  groups: dict[str, list[dict]] = {}
  for row in rows:
    groups.setdefault(row["setting"], []).append(row)
  return groups


def markdown_table(rows: Sequence[dict], report: Report) -> str:
  """One row per setting: its overrides, mean ± std over the finished seeds of each metric, wall time."""
  groups = settings(rows)
  fields = list(dict.fromkeys(k for row in rows for k in row["overrides"] if k != "seed"))
  done = [row for row in rows if row["status"] == "done"]
  columns = report.columns([row["final"] for row in done])
  header = [*fields, "seeds", *columns]
  header += [f"steps to {report.target}"] if report.target else []
  header.append("wall (s)")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for group in groups.values():
    finished = [row for row in group if row["status"] == "done"]
    cells = [_value_text(group[0]["overrides"].get(f, "")) for f in fields]
    cells.append(f"{len(finished)}/{len(group)}")
    cells += [_mean_pm_std([row["final"][c] for row in finished if c in row["final"]]) for c in columns]
    if report.target:
      steps = [row["steps_to_target"] for row in finished if row["steps_to_target"] is not None]
      text = _mean_pm_std([float(s) for s in steps], digits=0)
      cells.append(f"{text} ({len(steps)}/{len(finished)} reached)" if finished else "-")
    cells.append(_mean_pm_std([float(row["wall_s"]) for row in finished if row["wall_s"] != ""], digits=0))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def results_markdown(config: str, rows: Sequence[dict], report: Report, plots: Sequence[str]) -> str:
  statuses = [row["status"] for row in rows]
  counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
  text = [f"# Results of `{config}`", "",
          f"{len(rows)} runs ({counts}); mean ± std over the seeds that finished. "
          f"Written by `python -m experiments.run` on {datetime.date.today().isoformat()}.", "",
          markdown_table(rows, report)]
  failed = [row for row in rows if row["status"] == "failed"]
  if failed:
    text += ["Failed runs:", ""] + [f"- `{row['run']}` (exit code {row['exit_code']}): {row['error']}"
                                     for row in failed] + [""]
  if plots:
    text += ["Eval curves (mean over seeds, min-max band): " + ", ".join(f"[{p}]({p})" for p in plots), ""]
  return "\n".join(text)


def plot_curves(sweep_dir: str, rows: Sequence[dict], metric: str) -> str | None:
  """`DIR/<metric>.png`: per setting, the mean over seeds of `metric` against the step, with a
  min-max band. A sweep whose variants (`k=1`, `k=2`, ...) each hold several settings gets one
  panel per variant, each curve labelled by the rest of its overrides. Returns the file name, or None when no run has
  the metric."""
  panels: dict[str, dict[str, tuple]] = {}
  whole: dict[str, tuple] = {}  # the same curves under their whole setting's name
  for setting, group in settings(rows).items():
    per_seed = [{int(r["step"]): r[metric] for r in row["records"] if metric in r} for row in group]
    per_seed = [c for c in per_seed if c]
    if not per_seed:
      continue
    steps = sorted(set().union(*per_seed))
    values = [[c[s] for c in per_seed if s in c] for s in steps]
    overrides = {k: v for k, v in group[0]["overrides"].items() if k != "seed"}
    variant = str(overrides.pop(VARIANT, ""))
    panels.setdefault(variant, {})[run_name(overrides)] = whole[setting] = (steps, values)
  if not panels:
    return None
  if all(len(curves) == 1 for curves in panels.values()):  # the variants are the settings: one panel
    panels = {"": whole}
  colors = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(l for c in panels.values() for l in c))}
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(panels), figsize=(2.5 + 4 * len(panels), 4.2), sharey=True, squeeze=False)
  handles = {}
  for ax, (variant, curves) in zip(axes[0], panels.items()):
    for label, (steps, values) in curves.items():
      mean = [sum(v) / len(v) for v in values]
      handles[label], = ax.plot(steps, mean, label=label, color=colors[label], marker="." if len(steps) < 30 else None)
      if any(len(v) > 1 for v in values):
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=colors[label], alpha=0.2)
    ax.set_title(variant, fontsize="medium")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(metric)
  axes[0][-1].legend([handles[l] for l in colors], list(colors), fontsize="small", loc="upper left",
                     bbox_to_anchor=(1.02, 1.0))
  fig.tight_layout()
  name = re.sub(r"[^A-Za-z0-9._-]", "_", metric) + ".png"
  fig.savefig(os.path.join(sweep_dir, name), dpi=110)
  plt.close(fig)
  return name


def write_results(config: str, sweep_dir: str, runs: Sequence[Run], report: Report) -> list[dict]:
  """results.csv, RESULTS.md and the plots of the runs as they are now; returns the rows."""
  rows = collect(sweep_dir, runs, report)
  write_csv(os.path.join(sweep_dir, RESULTS_CSV), rows, report)
  columns = report.columns([row["final"] for row in rows if row["status"] == "done"])
  plots = [p for p in (plot_curves(sweep_dir, rows, c) for c in columns) if p]
  metrics_lib.write_atomically(os.path.join(sweep_dir, RESULTS_MD), results_markdown(config, rows, report, plots))
  return rows


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


# ----------------------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------------------


def _define_flags() -> None:
  flags.DEFINE_string("config", None, "config file, optionally with its variant: configs/X.py[:arg]")
  flags.DEFINE_string("workdir", None, "the sweep's folder: one sub-workdir per run, the tables and plots")
  flags.DEFINE_integer("seeds", 1, "seeds per sweep point (seed = the config's seed + 0, 1, ...)")
  flags.DEFINE_integer("parallel", 1, "runs at a time (local runs)")
  flags.DEFINE_bool("dry_run", False, "print every command; run and write nothing")
  flags.DEFINE_bool("tables_only", False, "rewrite results.csv, RESULTS.md and the plots; run nothing")
  flags.DEFINE_string("metrics", "", "comma-separated metrics of RESULTS.md and the plots (default: the "
                      "config file's report(), else eval/accuracy or eval/auc)")
  flags.DEFINE_string("target", "", "e.g. eval/accuracy>=0.95: report the first step reaching it")
  flags.DEFINE_string("tpu_vm", None, "run every point on this Cloud TPU VM through chainjax.launch")
  flags.DEFINE_string("zone", None, "the TPU VM's zone (with --tpu_vm)")
  flags.DEFINE_string("project", "", "the TPU VM's project (with --tpu_vm; default: gcloud's)")
  flags.DEFINE_string("accelerator_type", "v5litepod-8", "the TPU VM's accelerator type (with --tpu_vm)")
  flags.DEFINE_string("version", "", "the TPU VM's software version (with --tpu_vm; default: the known one)")


def _fail(message: str) -> None:
  print(f"experiments.run: error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_ARGS)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A checked sweep: its runs, what is reported, and every command (local or TPU VM)."""

  runs: list[Run]
  report: Report
  commands: list[list[str]]


def prepare(config: str, workdir: str, *, seeds: int = 1, metrics: str = "", target: str = "",
            tpu_vm: str | None = None, zone: str | None = None, project: str = "",
            accelerator_type: str = "v5litepod-8", version: str = "") -> Plan:
  """Loads and checks the sweep of `config` (SweepError, or launch.LaunchError, on bad input)."""
  module, arg = load_config_file(config)
  runs = expand(module, arg, seeds)
  report = Report.of(module, arg, metrics, target)
  if tpu_vm:
    if not zone:
      raise SweepError("--tpu_vm needs --zone")
    vm = launch.TpuVm(tpu_vm, zone, project, accelerator_type, version)
    commands = tpu_commands(config, workdir, runs, vm)
  else:
    commands = [main_command(config, os.path.join(workdir, r.name), r) for r in runs]
  return Plan(runs, report, commands)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f.config or not f.workdir:
    _fail("--config and --workdir are required, e.g. --config=configs/line_parity.py --workdir=runs/lp")
  try:
    plan = prepare(f.config, f.workdir, seeds=f.seeds, metrics=f.metrics, target=f.target, tpu_vm=f.tpu_vm,
                   zone=f.zone, project=f.project, accelerator_type=f.accelerator_type, version=f.version)
  except ValueError as e:  # SweepError, launch.LaunchError
    _fail(str(e))
  if f.dry_run:
    for command in plan.commands:
      print(shlex.join(command))
    return
  if f.tpu_vm:
      sys.exit(launch.execute(plan.commands))
  os.makedirs(f.workdir, exist_ok=True)
  failed = 0
  runner = LocalRunner(f.config, f.workdir, plan.runs, plan.report, parallel=f.parallel)
  if not f.tables_only:
    failed = runner.run()
  rows = write_results(f.config, f.workdir, plan.runs, plan.report)
  print(f"experiments.run: {sum(r['status'] == 'done' for r in rows)}/{len(rows)} runs finished; "
        f"{os.path.join(f.workdir, RESULTS_MD)}", flush=True)
  if runner.stopping is not None:
    sys.exit(128 + runner.stopping)
  sys.exit(EXIT_FAILED_RUNS if failed or any(r["status"] == "failed" for r in rows) else 0)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
