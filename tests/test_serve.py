"""`chainjax.serve`: TF Serving's REST predict API over real HTTP, batching, and one-line errors."""

import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import helpers
import processes
from chainjax import export
from chainjax import predict
from chainjax import serve
from chainjax import train
from chainjax.data import base


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """default:runlocal trained and exported: (workdir, export dir, eval inputs)."""
  workdir = str(tmp_path_factory.mktemp("serve") / "run")
  config = helpers.load_config("default", "runlocal")
  train.train_and_evaluate(config, workdir)
  export.export_workdir(config, workdir)
  exp = predict.Predictor.from_workdir(workdir).experiment
  x = np.concatenate([b["inputs"] for b in exp.task.eval_iterator(exp.config.eval_batch_size, base.Shard())])
  return workdir, os.path.join(workdir, export.EXPORT_DIR), x[:128]


@pytest.fixture(scope="module")
def server(exported):
  model = export.load(exported[1])
  server = serve.Server(model, port=0, max_batch=32, batch_timeout_ms=20, max_request_bytes=200_000,
                        max_instances=100)
  server.start()
  yield server
  server.stop()


def _request(server, method, path, body=None, headers=None, raw=None):
  connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
  try:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    connection.request(method, path, body=data, headers=headers or {})
    response = connection.getresponse()
    return response.status, json.loads(response.read())
  finally:
    connection.close()


def _predict(server, body, **kwargs):
  return _request(server, "POST", "/v1/models/chainjax:predict", body, **kwargs)


def test_predictions_are_the_models_in_row_and_columnar_form(exported, server):
  workdir, directory, x = exported
  reference = export.load(directory)(x[:10])
  status, answer = _predict(server, {"instances": x[:10].tolist()})
  assert status == 200 and len(answer["predictions"]) == 10
  for i, row in enumerate(answer["predictions"]):
    assert set(row) == set(reference)
    for name, value in row.items():
      np.testing.assert_allclose(value, reference[name][i], rtol=1e-6, atol=1e-7)
  assert [row["classes"] for row in answer["predictions"]] == \
      predict.Predictor.from_workdir(workdir)(x[:10]).classes.tolist()
  status, columnar = _predict(server, {"signature_name": "serving_default", "inputs": x[:3].tolist()})
  assert status == 200 and columnar["outputs"]["classes"] == reference["classes"][:3].tolist()
  assert _request(server, "GET", "/healthz") == (200, {"status": "ok"})
  status, model_status = _request(server, "GET", "/v1/models/chainjax")
  assert status == 200 and model_status["model_version_status"][0]["state"] == "AVAILABLE"
  status, metadata = _request(server, "GET", "/v1/models/chainjax/metadata")
  signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
  assert status == 200 and signature["inputs"]["inputs"]["shape"] == [None, 64]
  assert set(signature["outputs"]) == set(reference)


def test_fifty_concurrent_requests_are_batched_and_each_gets_its_rows(exported, server):
  _, directory, x = exported
  reference = export.load(directory)(x)
  sizes = [1 + (i * 7) % 5 for i in range(50)]
  starts = [sum(sizes[:i]) % (len(x) - 5) for i in range(50)]
  calls_before = server.batcher.calls

  def one(i):
    return _predict(server, {"instances": x[starts[i]:starts[i] + sizes[i]].tolist()})

  with concurrent.futures.ThreadPoolExecutor(50) as pool:
    answers = list(pool.map(one, range(50)))
  for i, (status, answer) in enumerate(answers):
    assert status == 200
    expected = reference["classes"][starts[i]:starts[i] + sizes[i]].tolist()
    assert [row["classes"] for row in answer["predictions"]] == expected
  calls = server.batcher.calls - calls_before
  assert calls < 50 and max(server.batcher.batch_sizes[-calls:]) > 5  # requests were merged
  assert max(server.batcher.batch_sizes) <= 32


def test_bad_requests_get_one_line_errors_and_the_server_keeps_serving(exported, server):
  x = exported[2]
  cases = [
      (lambda: _predict(server, None, raw=b"{not json"), 400, "the body is not valid JSON"),
      (lambda: _predict(server, [1, 2]), 400, "must be a JSON object"),
      (lambda: _predict(server, {"examples": []}), 400, "exactly one of \"instances\""),
      (lambda: _predict(server, {"instances": 3}), 400, "must be a list"),
      (lambda: _predict(server, {"instances": [[0.0] * 63]}), 400, "instances: shape (1, 63); the model takes [N, 64]"),
      (lambda: _predict(server, {"instances": ["a", "b"]}), 400, "instances: strings, but the model takes"),
      (lambda: _predict(server, {"instances": [[0.0] * 64, [0.0] * 3]}), 400, "instances"),
      (lambda: _predict(server, {"instances": []}), 400, "empty batch"),
      (lambda: _predict(server, {"instances": [[0.0] * 64], "signature_name": "other"}), 400, "signature_name"),
      (lambda: _predict(server, {"instances": x[:101].tolist()}), 413, "at most 100 per request"),
      (lambda: _predict(server, None, raw=b" " * 200_001), 413, "at most 200000"),
      (lambda: _request(server, "POST", "/v1/models/other:predict", {"instances": []}), 404, "no model named 'other'"),
      (lambda: _request(server, "GET", "/v2/nothing"), 404, "no such path"),
      (lambda: _request(server, "GET", "/v1/models/chainjax:predict"), 405, "predict takes POST"),
      (lambda: _request(server, "PUT", "/v1/models/chainjax:predict", {}), 405, "PUT is not served"),
  ]
  for call, status, message in cases:
    got, answer = call()
    assert got == status and message in answer["error"] and "\n" not in answer["error"], (status, answer)
  status, answer = _predict(server, {"instances": x[:2].tolist()})
  assert status == 200 and len(answer["predictions"]) == 2


def test_no_content_length_is_411(server):
  connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
  try:
    connection.putrequest("POST", "/v1/models/chainjax:predict")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
  finally:
    connection.close()


def test_the_command_serves_and_stops_on_sigterm(exported):
  _, directory, x = exported
  bad = subprocess.run([sys.executable, "-m", "chainjax.serve", "--export_dir=/nonexistent/export"],
                       env=processes.env(1), capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("chainjax.serve: error: ")
  port = processes.free_port()
  proc = subprocess.Popen([sys.executable, "-m", "chainjax.serve", f"--export_dir={directory}", f"--port={port}",
                           "--model_name=parity", "--max_batch=8"], env=processes.env(1), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline, answer = time.monotonic() + 120, None
    while time.monotonic() < deadline and proc.poll() is None:
      try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("POST", "/v1/models/parity:predict", json.dumps({"instances": x[:3].tolist()}))
        answer = json.loads(connection.getresponse().read())
        connection.close()
        break
      except OSError:
        time.sleep(0.5)
    assert answer is not None and len(answer["predictions"]) == 3, proc.stderr.read() if proc.poll() else answer
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert f"serving parity (step 60) at http://127.0.0.1:{port}/v1/models/parity:predict" in out
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
