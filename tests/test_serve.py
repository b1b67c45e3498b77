"""`chainjax.serve` over real HTTP: TF Serving's REST predict API on a real export, batching of concurrent
requests, one-line JSON errors after which the server keeps serving, a clean stop, and the command line."""

import concurrent.futures
import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

import helpers
import processes
from chainjax import export
from chainjax import exported as exported_lib
from chainjax import predict
from chainjax import serve
from chainjax import train
from chainjax.data import base

TIMEOUT_S = 30  # of every client call: a broken server fails a test, it never hangs it


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """default:runlocal trained and exported: (workdir, export dir, 128 eval inputs)."""
  workdir = str(tmp_path_factory.mktemp("serve") / "run")
  config = helpers.load_config("default", "runlocal")
  train.train_and_evaluate(config, workdir)
  manifest = export.export_workdir(config, workdir)
  assert manifest["input"]["shape"] == [None, 64]
  exp = predict.Predictor.from_workdir(workdir).experiment
  x = np.concatenate([b["inputs"] for b in exp.task.eval_iterator(exp.config.eval_batch_size, base.Shard())])
  return workdir, os.path.join(workdir, export.EXPORT_DIR), x[:128]


@pytest.fixture(scope="module")
def server(run):
  server = serve.Server(exported_lib.load(run[1]), port=0, max_batch=32, batch_timeout_ms=20,
                        max_request_bytes=200_000, max_instances=100)
  host, port = server.start()
  assert (host, port) == ("127.0.0.1", server.port) and port > 0
  yield server
  server.stop()


def _request(server, method, path, body=None, headers=None, raw=None, connection=None):
  """(status, parsed JSON answer) of one request; on `connection` when given (kept open)."""
  conn = connection or http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT_S)
  try:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    text = response.read()
    assert response.getheader("Content-Type") == "application/json", (response.status, text)
    return response.status, json.loads(text) if method != "HEAD" else None
  finally:
    if connection is None:
      conn.close()


def _predict(server, body, **kwargs):
  return _request(server, "POST", f"/v1/models/{server.model_name}:predict", body, **kwargs)


def _raw(server, data: bytes, shut_write: bool = False) -> tuple[int, dict]:
  """Sends raw bytes on a socket; (status, JSON error) of the answer, read until the server closes."""
  with socket.create_connection((server.host, server.port), timeout=TIMEOUT_S) as s:
    s.sendall(data)
    if shut_write:
      s.shutdown(socket.SHUT_WR)
    answer = b""
    while chunk := s.recv(65536):
      answer += chunk
  head, _, body = answer.partition(b"\r\n\r\n")
  return int(head.split()[1]), json.loads(body)


def test_predictions_are_the_exports_in_row_and_columnar_form(run, server):
  workdir, directory, x = run
  reference = exported_lib.load(directory)(x[:10])
  status, answer = _predict(server, {"instances": x[:10].tolist()})
  assert status == 200 and len(answer["predictions"]) == 10
  for i, row in enumerate(answer["predictions"]):
    assert list(row) == list(reference)  # every output, in the manifest's order
    for name, value in row.items():
      np.testing.assert_allclose(value, reference[name][i], rtol=1e-6, atol=1e-7)
  classes = [row["classes"] for row in answer["predictions"]]
  assert classes == predict.Predictor.from_workdir(workdir)(x[:10]).classes.tolist()

  # The same 10 rows in TF Serving's named form: the same padded batch, so the same program and bits (another
  # batch size pads to another bucket, whose program may round differently on some CPUs).
  named = _predict(server, {"signature_name": "serving_default", "instances": [{"inputs": v} for v in x[:10].tolist()]})
  assert named == (200, {"predictions": answer["predictions"]})
  status, columnar = _predict(server, {"inputs": x[:3].tolist()})
  assert status == 200 and columnar["outputs"]["classes"] == classes[:3]
  np.testing.assert_allclose(columnar["outputs"]["probabilities_level3"], reference["probabilities_level3"][:3],
                             rtol=1e-6, atol=1e-7)
  assert _predict(server, {"inputs": {"inputs": x[:3].tolist()}}) == (200, columnar)
  status, versioned = _request(server, "POST", "/v1/models/chainjax/versions/60:predict", {"instances": x[:1].tolist()})
  assert status == 200
  _assert_rows_close(versioned["predictions"], answer["predictions"][:1])  # batch 1 and 10 may round differently


def _assert_rows_close(rows, expected):
  assert len(rows) == len(expected) and all(list(row) == list(e) for row, e in zip(rows, expected))
  for name in expected[0]:
    np.testing.assert_allclose([row[name] for row in rows], [e[name] for e in expected], rtol=1e-6, atol=1e-7)


def test_health_status_and_metadata(run, server):
  assert _request(server, "GET", "/healthz") == (200, {"status": "ok"})
  ok = {"version": "60", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
  assert _request(server, "GET", "/v1/models/chainjax") == (200, {"model_version_status": [ok]})
  assert _request(server, "GET", "/v1/models/chainjax/versions/60") == (200, {"model_version_status": [ok]})
  status, metadata = _request(server, "GET", "/v1/models/chainjax/metadata")
  assert status == 200 and metadata["model_spec"] == {"name": "chainjax", "signature_name": "", "version": "60"}
  signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
  assert signature["inputs"] == {"inputs": {"name": "inputs", "dtype": "DT_FLOAT", "tensor_shape": {
      "dim": [{"size": "-1", "name": ""}, {"size": "64", "name": ""}], "unknown_rank": False}}}
  manifest = exported_lib.load(run[1]).manifest
  assert list(signature["outputs"]) == [o["name"] for o in manifest["outputs"]]
  assert signature["outputs"]["classes"]["dtype"] == "DT_INT32"
  assert signature["outputs"]["probabilities_level1"]["tensor_shape"]["dim"][0]["size"] == "-1"


def test_fifty_concurrent_requests_are_batched_and_each_gets_its_rows(run, server):
  _, directory, x = run
  reference = exported_lib.load(directory)(x)
  sizes = [1 + (i * 7) % 5 for i in range(49)] + [80]  # and one larger than max_batch: it runs alone
  starts = [sum(sizes[:i]) % (len(x) - 80) for i in range(50)]
  calls, requests = server.batcher.calls, server.batcher.requests

  def one(i):
    return _predict(server, {"instances": x[starts[i]:starts[i] + sizes[i]].tolist()})

  with concurrent.futures.ThreadPoolExecutor(50) as pool:
    answers = list(pool.map(one, range(50)))
  for i, (status, answer) in enumerate(answers):
    assert status == 200, answer
    rows = slice(starts[i], starts[i] + sizes[i])
    assert [row["classes"] for row in answer["predictions"]] == reference["classes"][rows].tolist()
    np.testing.assert_allclose([row["probabilities_level2"] for row in answer["predictions"]],
                               reference["probabilities_level2"][rows], rtol=1e-6, atol=1e-7)
  calls = server.batcher.calls - calls
  assert server.batcher.requests - requests == 50
  assert calls < 25, server.batcher.batch_sizes  # requests were merged
  assert max(size for size in server.batcher.batch_sizes if size != 80) <= 32
  assert max(server.batcher.batch_sizes) == 80 and any(1 < size <= 32 for size in server.batcher.batch_sizes)


def test_bad_requests_get_one_line_errors_and_the_server_keeps_serving(run, server):
  x = run[2]
  row = [0.0] * 64
  cases = [
      (lambda: _predict(server, None, raw=b"{not json"), 400, "the body is not valid JSON: Expecting property name"),
      (lambda: _predict(server, None, raw=b"[" * 100_000), 400, "the body is not valid JSON"),
      (lambda: _predict(server, None, raw=b"\xff\xfe\xfa"), 400, "the body is not valid JSON"),
      (lambda: _predict(server, [1, 2]), 400, "the body must be a JSON object with \"instances\" (or \"inputs\"), got "
       "a list"),
      (lambda: _predict(server, {"examples": []}), 400, "exactly one of \"instances\" (row format) or \"inputs\""),
      (lambda: _predict(server, {"instances": [row], "inputs": [row]}), 400, "exactly one of"),
      (lambda: _predict(server, {"instances": 3}), 400, "\"instances\" must be a list of examples, got a number"),
      (lambda: _predict(server, {"inputs": {"x": [row]}}), 400, "or {\"inputs\": [...]} (the model's one input)"),
      (lambda: _predict(server, {"instances": [{"x": row}]}), 400, "instances[0]: keys ['x']; the model's one input"),
      (lambda: _predict(server, {"instances": [row[:63]]}), 400, "instances: shape (1, 63); the model takes [N, 64] "
       "float32"),
      (lambda: _predict(server, {"instances": row}), 400, "instances: shape (64,)"),
      (lambda: _predict(server, {"instances": ["a", "b"]}), 400, "instances: strings, but the model takes [N, 64]"),
      (lambda: _predict(server, {"instances": [row, row[:3]]}), 400, "instances: not an array"),
      (lambda: _predict(server, {"instances": [[None] * 64]}), 400, "instances: dtype object"),
      (lambda: _predict(server, {"instances": []}), 400, "instances: empty batch"),
      (lambda: _predict(server, {"instances": [row], "signature_name": "other"}), 400, "signature_name 'other': this "
       "model serves only 'serving_default'"),
      (lambda: _predict(server, {"instances": x[:101].tolist()}), 413, "101 instances: at most 100 per request"),
      (lambda: _predict(server, None, raw=b" " * 200_001), 413, "the body has 200001 bytes: at most 200000"),
      (lambda: _predict(server, None, raw=b"{}", headers={"Content-Length": "-2"}), 400, "Content-Length '-2' is not"),
      (lambda: _request(server, "POST", "/v1/models/other:predict", {"instances": [row]}), 404, "no model named "
       "'other'; this server serves 'chainjax'"),
      (lambda: _request(server, "POST", "/v1/models/chainjax/versions/7:predict", {"instances": [row]}), 404,
       "model 'chainjax' has no version '7'; its version is 60"),
      (lambda: _request(server, "POST", "/v1/models/chainjax:classify", {}), 404, "no method 'classify'"),
      (lambda: _request(server, "GET", "/v2/nothing"), 404, "no such path '/v2/nothing'"),
      (lambda: _request(server, "GET", "/v1/models/chainjax:predict"), 405, "GET /v1/models/chainjax:predict: use "
       "POST"),
      (lambda: _request(server, "PUT", "/v1/models/chainjax:predict", {}), 405, "PUT"),
      (lambda: _request(server, "POST", "/healthz", {}), 405, "use GET"),
      (lambda: _raw(server, b"BREW /pot HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), 501, "Unsupported method ('BREW')"),
      (lambda: _raw(server, b"GET /a b HTTP/1.1\r\n\r\n"), 400, "Bad request syntax"),
      (lambda: _raw(server, b"POST /v1/models/chainjax:predict HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"in", True),
       400, "the body ended after 4 of its 10 bytes"),
      (lambda: _raw(server, b"POST /v1/models/chainjax:predict HTTP/1.1\r\nContent-Length: 900000\r\n"
                    b"Expect: 100-continue\r\n\r\n"), 413, "the body has 900000 bytes"),
  ]
  for call, status, message in cases:
    got, answer = call()
    assert (got, list(answer)) == (status, ["error"]) and message in answer["error"], (status, message, answer)
    assert "\n" not in answer["error"] and len(answer["error"]) < 300, answer
  # A refused request with a body leaves its keep-alive connection usable: the body was drained.
  connection = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT_S)
  try:
    for path, status in (("/v1/models/other:predict", 404), ("/v1/models/chainjax:predict", 200),
                         ("/healthz", 405), ("/v1/models/chainjax:predict", 200)):
      got, answer = _request(server, "POST", path, {"instances": x[:2].tolist()}, connection=connection)
      assert got == status, answer
    assert len(answer["predictions"]) == 2
  finally:
    connection.close()


def test_no_content_length_is_411(server):
  connection = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT_S)
  try:
    connection.putrequest("POST", "/v1/models/chainjax:predict")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411
    assert json.loads(response.read()) == {"error": "a predict request needs a Content-Length header"}
  finally:
    connection.close()


class _StubModel:
  """`chainjax.exported.Exported`'s interface in numpy: the sum of each example, and a model failure for an
  example whose first value is -1 (-2: the model takes 1 s, and sets `slow` when it starts). Every call
  waits for `gate` and sets `called`."""

  manifest = {"step": 7, "input": {"name": "inputs", "shape": [None, 2], "dtype": "float32"},
              "outputs": [{"name": "sum", "shape": [None], "dtype": "float32"}]}
  input_shape, input_dtype, output_names, max_batch = (2,), np.dtype(np.float32), ("sum",), 8

  def __init__(self):
    self.slow, self.gate, self.called = threading.Event(), threading.Event(), threading.Event()
    self.gate.set()

  def preprocess(self, instances):
    x = np.asarray(instances, np.float32)
    if x.ndim != 2 or x.shape[1:] != self.input_shape:
      raise ValueError(f"instances: shape {x.shape}; the model takes [N, 2] float32")
    return x

  def __call__(self, instances):
    self.called.set()
    assert self.gate.wait(TIMEOUT_S)
    x = self.preprocess(instances)
    if (x[:, 0] == -1).any():
      raise FloatingPointError("overflow in the stub model\nsecond line")
    if (x[:, 0] == -2).any():
      self.slow.set()
      time.sleep(1)
    return {"sum": x.sum(-1)}


def test_loading_a_failing_model_and_stop_with_requests_in_flight():
  model = _StubModel()
  server = serve.Server(model, port=0, model_name="stub", max_batch=4, batch_timeout_ms=0)
  model.gate.clear()
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    started = pool.submit(server.start)
    try:
      assert model.called.wait(TIMEOUT_S)  # bound and warming up
      assert _request(server, "GET", "/healthz") == (503, {"error": "the model is loading"})
      assert _predict(server, {"instances": [[1, 2]]}) == (503, {"error": "the model is loading; /healthz says when "
                                                                          "it is ready"})
      model.gate.set()
      assert started.result(TIMEOUT_S) == ("127.0.0.1", server.port)
      assert _request(server, "GET", "/healthz") == (200, {"status": "ok"})
      assert _predict(server, {"instances": [[1, 2], [3, 4]]}) == (200, {"predictions": [{"sum": 3.0}, {"sum": 7.0}]})
      assert _predict(server, {"instances": [[-1, 2]]}) == (500, {"error": "the model failed: FloatingPointError: "
                                                                           "overflow in the stub model"})
      assert _predict(server, {"inputs": [[1, 1]]}) == (200, {"outputs": {"sum": [2.0]}})
      slow = pool.submit(_predict, server, {"instances": [[-2, 5]]})
      assert model.slow.wait(TIMEOUT_S)
    finally:
      model.gate.set()
      server.stop()
    assert slow.result(TIMEOUT_S) == (200, {"predictions": [{"sum": 3.0}]})  # answered, though stop() came first
  with pytest.raises(OSError):
    _predict(server, {"instances": [[1, 2]]})
  assert (server.batcher.calls, server.batcher.requests) == (4, 4)


def test_the_command_line(run):
  _, directory, x = run
  for args, message in [(["--export_dir=/nonexistent"], "/nonexistent/manifest.json does not exist: run "),
                        ([], "--export_dir is required"),
                        ([f"--export_dir={directory}", "--port=-1"], "flag --port=-1: "),
                        ([f"--export_dir={directory}", "--max_batch=many"], "flag --max_batch=many: ")]:
    bad = subprocess.run([sys.executable, "-m", "chainjax.serve", *args], cwd=helpers.REPO, env=processes.env(1),
                         capture_output=True, text=True, timeout=120)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("chainjax.serve: error: "), bad.stderr
    assert message in lines[0], lines

  proc = subprocess.Popen([sys.executable, "-m", "chainjax.serve", f"--export_dir={directory}", "--port=0",
                           "--model_name=parity", "--max_batch=8"], cwd=helpers.REPO, env=processes.env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = queue.Queue()
  reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
  reader.start()
  seen, port, deadline = [], None, time.monotonic() + 120
  try:
    while port is None and time.monotonic() < deadline:  # the line comes once every bucket is compiled
      try:
        seen.append(lines.get(timeout=max(deadline - time.monotonic(), 0.1)))
      except queue.Empty:
        break
      match = re.fullmatch(r"serving parity \(step 60\) at http://127\.0\.0\.1:(\d+)/v1/models/parity:predict\n",
                           seen[-1])
      port = match and int(match[1])
    assert port, (proc.poll(), seen)
    server = types.SimpleNamespace(host="127.0.0.1", port=port, model_name="parity")
    assert _request(server, "GET", "/healthz") == (200, {"status": "ok"})
    status, answer = _predict(server, {"instances": x[:3].tolist()})
    assert status == 200 and [row["classes"] for row in answer["predictions"]] == \
        exported_lib.load(directory)(x[:3])["classes"].tolist()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    reader.join(timeout=10)
    seen += list(lines.queue)
    assert seen[-1] == "chainjax.serve: stopped after 1 requests in 1 model calls\n", seen
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
