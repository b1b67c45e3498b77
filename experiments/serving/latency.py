"""Latency and accuracy of a trained workdir through every serving artifact of `--mode=export`.

    python experiments/serving/latency.py --workdir=W [--output=W/export/latency.json]

For JAX (`chainjax.predict.Predictor`, the run's own program), the StableHLO artifact
(`chainjax.export.load`), the SavedModel (`serving_default`) and the three TFLite models: the time of
one request of 1 example and of 256 examples (the fastest of `--repeats` passes of `--requests_1`
single-example requests, and of 8 requests of 256), and the accuracy on the whole held-out set (the
test split where the task has one) with the class each artifact answers. All on this machine's CPU,
one process; printed as a Markdown table.
"""

import json
import os
import time

from absl import app
from absl import flags
import numpy as np

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained, exported workdir.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Where the JSON goes (default: W/export/latency.json).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes; the fastest counts.")
_REQUESTS_1 = flags.DEFINE_integer("requests_1", 200, "Single-example requests per timed pass.")


def _tflite(tf, path):
  """batch size -> a callable, each with its own interpreter sized for that batch."""
  interpreters = {}

  def run(x):
    if len(x) not in interpreters:
      interpreter = tf.lite.Interpreter(model_path=path, num_threads=os.cpu_count())
      interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], x.shape)
      interpreter.allocate_tensors()
      interpreters[len(x)] = interpreter.get_signature_runner("serving_default")
    return interpreters[len(x)](inputs=x)

  return run


def _timed(fn, requests, repeats):
  for r in requests[:2]:
    fn(r)  # compile / allocate
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for r in requests:
      fn(r)
    best = min(best, time.perf_counter() - start)
  return 1e3 * best / len(requests)


def main(argv):
  del argv
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from chainjax import early_exit  # pylint: disable=import-outside-toplevel
  from chainjax import export  # pylint: disable=import-outside-toplevel
  from chainjax import predict  # pylint: disable=import-outside-toplevel

  workdir = _WORKDIR.value
  directory = os.path.join(workdir, export.EXPORT_DIR)
  predictor = predict.Predictor.from_workdir(workdir, max_batch=256, exit_impl="full")
  split, inputs, labels = early_exit.held_out_set(predictor)
  saved = tf.saved_model.load(os.path.join(directory, export.SAVED_MODEL)).signatures["serving_default"]
  artifacts = {
      "JAX (Predictor)": lambda x: {"classes": predictor(x).classes},
      "StableHLO (export.load)": export.load(directory, max_batch=256),
      "SavedModel (serving_default)": lambda x: {k: v.numpy() for k, v in saved(inputs=tf.constant(x)).items()},
  }
  for kind, name in export.TFLITE.items():
    if os.path.exists(os.path.join(directory, name)):
      artifacts[f"TFLite {kind}"] = _tflite(tf, os.path.join(directory, name))
  rows = []
  for name, fn in artifacts.items():
    classes = np.concatenate([np.asarray(fn(inputs[i:i + 256])["classes"]) for i in range(0, len(inputs), 256)])
    ones = [inputs[i:i + 1] for i in range(_REQUESTS_1.value)]
    batches = [inputs[i * 256:(i + 1) * 256] for i in range(8)]
    rows.append({"artifact": name, "accuracy": float(np.mean(classes == labels)),
                 "ms_batch1": _timed(fn, ones, _REPEATS.value), "ms_batch256": _timed(fn, batches, _REPEATS.value)})
  manifest = json.load(open(os.path.join(directory, export.MANIFEST)))
  result = {"workdir": workdir, "step": predictor.step, "split": split, "examples": int(len(inputs)),
            "cpus": os.cpu_count(), "files": manifest["files"], "rows": rows}
  output = _OUTPUT.value or os.path.join(directory, "latency.json")
  with open(output, "w") as f:
    json.dump(result, f, indent=2)
  print(f"{workdir} at step {predictor.step}, {split} set ({len(inputs)} examples), {os.cpu_count()} CPU cores:")
  print("| artifact | accuracy | ms, batch 1 | ms, batch 256 | examples/s at 256 |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['artifact']} | {r['accuracy']:.4f} | {r['ms_batch1']:.3f} | {r['ms_batch256']:.2f} | "
          f"{256e3 / r['ms_batch256']:,.0f} |")


if __name__ == "__main__":
  app.run(main)
