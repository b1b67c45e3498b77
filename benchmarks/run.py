"""The benchmark suite: every benchmark's rows in one table, each against a baseline measured in the same run.

  python -m benchmarks.run [--quick] [--json=FILE] [--only=models,optim_overhead,...] [--nopeers] [--explain]

from the repository root. Each benchmark runs in its own fresh process (`benchmarks/<name>.py --json`),
one after the other, so that none shares the machine's cores or JAX's state with another:

  lstm_step          the imdb_lstm step (batch 16 and 64, length 256): the fast LSTM against the plain
                     `nnx.RNN(OptimizedLSTMCell)` step
  cnn_step           the Fashion-MNIST CNN step (batch 128) against the same model with Flax's max_pool
  optim_overhead     gradient accumulation, dynamic loss scaling, bf16: ms per update against the plain step
  input_pipeline     training fed by the TFDS + Grain pipeline against the same steps fed from memory
  compression_costs  QAT and pruning step time, PTQ eval time, int8/int4 bytes against float
  scaling            steps/s on 2, 4, 8 fake CPU devices (or the accelerators) against 1 device

`models` names the first two. Where PyTorch is installed (`pip install -e '.[bench]'`), the same models
written in PyTorch (`benchmarks/peers/`) are timed too, in their own process, and each model row gets a
row against its PyTorch peer (target: 1.2x). The first row is this machine's float32 matmul speed
through XLA (GFLOP/s), the scale a model's FLOP rate (its `gflops` field) is read against.

Every timed figure is the median over >= 5 timed windows after warm-up (`--quick`: a seconds-long smoke
run of each, whose numbers mean nothing), with the min and max of those windows. The table is printed
as Markdown; `--json` also writes every row (`benchmarks.common.row`). A benchmark that fails (e.g. its
data is not prepared) is reported in one line and the others still run; the exit status is then 1.

`--explain`: each model benchmark also records a `jax.profiler` trace of 5 of its updates (the trace
`--config.profile_steps` writes for TensorBoard) and the suite prints the 10 operations that took the
most time in it (`benchmarks.common.top_operations`), to say where a step's time goes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BENCHMARKS = ("lstm_step", "cnn_step", "optim_overhead", "input_pipeline", "compression_costs", "scaling")
GROUPS = {"models": ("lstm_step", "cnn_step")}
PEER_TARGET = 1.2  # chainjax's step at least this much faster than the same model in PyTorch

_QUICK = flags.DEFINE_bool("quick", False, "A seconds-long smoke run of every benchmark (numbers meaningless).")
_JSON = flags.DEFINE_string("json", None, "Also write every row (a JSON list) to this file.")
_ONLY = flags.DEFINE_list("only", [], f"Benchmarks to run (default: all): {', '.join(BENCHMARKS)}, or "
                          f"{', '.join(GROUPS)} for {', '.join(GROUPS['models'])}.")
_EXPLAIN = flags.DEFINE_bool("explain", False, "Profile each model step (a jax.profiler trace of 5 updates) "
                              "and print its top operations.")
_PEERS = flags.DEFINE_bool("peers", True, "Time the PyTorch peers of the models when PyTorch is installed.")


def selected(only: list[str]) -> list[str]:
  """The benchmarks `--only` names, in suite order (all when empty); ValueError naming an unknown one."""
  names = set()
  for name in only:
    if name in GROUPS:
      names.update(GROUPS[name])
    elif name in BENCHMARKS:
      names.add(name)
    else:
      raise ValueError(f"--only: unknown benchmark {name!r}; known: {', '.join(BENCHMARKS + tuple(GROUPS))}")
  return [b for b in BENCHMARKS if not names or b in names]


def run_benchmark(name: str, quick: bool, explain: bool = False) -> tuple[list[dict], str | None]:
  """`benchmarks/<name>.py [--quick] [--explain] --json=...` in a fresh process: (its rows, None) or ([], one
  line). `--explain` goes to the model benchmarks only."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "rows.json")
    args = [sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), f"--json={out}"]
    args += (["--quick"] if quick else []) + (["--explain"] if explain and name in GROUPS["models"] else [])
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode or not os.path.exists(out):
      lines = [line for line in (proc.stderr + proc.stdout).strip().splitlines() if line.strip()]
      return [], f"{name}: exit {proc.returncode}: {lines[-1] if lines else 'no output'}"
    with open(out) as f:
      rows = json.load(f)
  return [{"benchmark": name, **r} for r in rows], None


def peer_rows(quick: bool) -> tuple[list[dict], str | None]:
  """The PyTorch peers' rows (`benchmarks.peers.rows`) from a fresh process; ([], None) without PyTorch."""
  code = ("import json, sys; from benchmarks import peers; "
          "print(json.dumps(peers.rows(quick=sys.argv[1] == '1') if peers.available() else None))")
  proc = subprocess.run([sys.executable, "-c", code, "1" if quick else "0"], cwd=ROOT, capture_output=True,
                        text=True, check=False)
  if proc.returncode:
    lines = proc.stderr.strip().splitlines()
    return [], f"peers: exit {proc.returncode}: {lines[-1] if lines else 'no output'}"
  rows = json.loads(proc.stdout.strip().splitlines()[-1])
  return rows or [], None


def against_peers(rows: list[dict], peers: list[dict]) -> list[dict]:
  """A row per model row with a PyTorch peer of the same `model`: our examples/s against the peer's."""
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  by_name = {p["name"]: p for p in peers}
  out = []
  for r in rows:
    peer = by_name.get(r.get("model"))
    if peer:
      out.append({"benchmark": "peers", **common.row(
          f"{r['model']} step vs PyTorch", r["ours"], peer["examples_per_sec"],
          f"PyTorch {peer['torch']} ({peer['threads']} threads): {peer['examples_per_sec']:.0f} "
          f"({peer['min']:.0f}-{peer['max']:.0f})", target=PEER_TARGET)})
  return out


def _number(value) -> str:
  if value is None:
    return ""
  return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table(rows: list[dict]) -> str:
  """The rows as a Markdown table."""
  lines = ["| benchmark | row | ours | min-max | unit | baseline | baseline is | ratio | target |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    spread = f"{_number(r['min'])}-{_number(r['max'])}" if r.get("min") is not None else ""
    ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else ""
    target = ""
    if r.get("target") is not None:
      target = f"{'>=' if r['better'] == 'higher' else '<='} {r['target']:.2f}x: {'met' if r['met'] else 'MISSED'}"
    lines.append(f"| {r['benchmark']} | {r['name']} | {_number(r['ours'])} | {spread} | {r['unit']} | "
                 f"{_number(r['baseline'])} | {r['baseline_name']} | {ratio} | {target} |")
  return "\n".join(lines)


def main(argv):
  del argv
  import jax

  from benchmarks import common

  try:
    names = selected(_ONLY.value)
  except ValueError as e:
    sys.exit(f"benchmarks.run: {e}")
  quick = _QUICK.value
  peak = common.matmul_gflops(256 if quick else 1024)
  rows = [{"benchmark": "machine", **common.row(f"float32 matmul {256 if quick else 1024}^2 (XLA)", peak, None,
                                                "", unit="GFLOP/s")}]
  failures = []
  print(f"JAX {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; "
        f"{'--quick' if quick else 'full run'}: {', '.join(names)}", flush=True)
  for name in names:
    got, failure = run_benchmark(name, quick, _EXPLAIN.value)
    rows += got
    if failure:
      failures.append(failure)
    print(f"  {name}: {failure or f'{len(got)} row(s)'}", flush=True)
  if _PEERS.value and any(r.get("model") for r in rows):
    peers, failure = peer_rows(quick)
    rows += against_peers(rows, peers)
    if failure:
      failures.append(failure)
    print(f"  peers: {failure or (f'{len(peers)} row(s)' if peers else 'PyTorch not installed')}", flush=True)
  print()
  print(table(rows))
  common.print_top_operations(rows)
  common.write_json(_JSON.value, rows)
  if failures:
    print("\nFailed:\n" + "\n".join(f"  {f}" for f in failures))
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
