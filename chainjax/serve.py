"""`python -m chainjax.serve --export_dir=W/export`: an HTTP JSON endpoint in TF Serving's REST format.

    POST /v1/models/<model_name>:predict   {"instances": [...]}  -> {"predictions": [{output: value}, ...]}
                                           {"inputs": [...]}     -> {"outputs": {output: [...]}}
    GET  /v1/models/<model_name>           the model's status (TF Serving's model_version_status)
    GET  /v1/models/<model_name>/metadata  the signature: input and output names, shapes, dtypes
    GET  /healthz                          200 once the model is loaded and compiled

It runs the export's StableHLO (`chainjax.export.load`: no TensorFlow, no workdir). An instance is one
model input as nested lists (a raw uint8 image for image models, a string for text models, tokenized
with the export's vocabulary). Concurrent requests are batched: one worker thread takes the queued
requests, up to `--max_batch` instances or `--batch_timeout_ms` after the first, runs them as one batch
and answers each its rows. Every error is a JSON `{"error": "<one line>"}` with its status (400 bad JSON,
shapes or types; 404 unknown path or model; 405 wrong method; 411 no Content-Length; 413 a body over
`--max_request_bytes` or more than `--max_instances` instances; 500 the model failed, logged with its
traceback), and the server keeps serving. TF Serving itself serves the export's `saved_model/`.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import logging
import queue
import signal
import sys
import threading
import time
from typing import Any

import numpy as np

MAX_REQUEST_BYTES = 16 * 1024 * 1024
MAX_INSTANCES = 4096


@dataclasses.dataclass
class _Job:
  inputs: np.ndarray
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  outputs: dict | None = None
  error: str | None = None


class Batcher:
  """One worker thread that runs queued requests together: up to `max_batch` instances, waiting at most
  `timeout_s` after the first. `calls` and `batch_sizes` count the model calls (how much was merged)."""

  def __init__(self, model, max_batch: int, timeout_s: float):
    self.model, self.max_batch, self.timeout_s = model, max_batch, timeout_s
    self.calls, self.batch_sizes = 0, []
    self._queue: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._work, name="chainjax-serve-batcher", daemon=True)
    self._thread.start()

  def run(self, inputs: np.ndarray) -> dict:
    job = _Job(inputs)
    self._queue.put(job)
    job.done.wait()
    if job.error is not None:
      raise RuntimeError(job.error)
    return job.outputs

  def stop(self) -> None:
    self._queue.put(None)
    self._thread.join(timeout=30)

  def _work(self) -> None:
    while True:
      job = self._queue.get()
      if job is None:
        return
      jobs, size = [job], len(job.inputs)
      deadline = time.monotonic() + self.timeout_s
      while size < self.max_batch:
        try:
          more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
          break
        if more is None:
          self._queue.put(None)  # stop after this batch
          break
        if size + len(more.inputs) > self.max_batch:
          self._run([more])  # too big to join: it runs on its own, after this batch
          continue
        jobs.append(more)
        size += len(more.inputs)
      self._run(jobs)

  def _run(self, jobs: list[_Job]) -> None:
    try:
      outputs = self.model(np.concatenate([j.inputs for j in jobs]))
      self.calls += 1
      self.batch_sizes.append(sum(len(j.inputs) for j in jobs))
      start = 0
      for j in jobs:
        j.outputs = {k: v[start:start + len(j.inputs)] for k, v in outputs.items()}
        start += len(j.inputs)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("the model failed on a batch of %d", sum(len(j.inputs) for j in jobs))
      for j in jobs:
        j.error = f"the model failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for j in jobs:
      j.done.set()


class _HTTPServer(http.server.ThreadingHTTPServer):
  request_queue_size = 256  # the listen backlog: a burst of concurrent clients is not reset (default 5)
  daemon_threads = True


class _HTTPError(Exception):
  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


class Server:
  """The HTTP server of one export; `start()` binds (port 0: a free one) and serves in a thread."""

  def __init__(self, model, *, host: str = "127.0.0.1", port: int = 8080, model_name: str = "chainjax",
               max_batch: int = 64, batch_timeout_ms: float = 5.0, max_request_bytes: int = MAX_REQUEST_BYTES,
               max_instances: int = MAX_INSTANCES):
    self.model, self.host, self.port, self.model_name = model, host, port, model_name
    self.max_request_bytes, self.max_instances = max_request_bytes, max_instances
    self.batcher = Batcher(model, max_batch, batch_timeout_ms / 1e3)
    self.ready = False
    self._httpd: _HTTPServer | None = None
    self._thread: threading.Thread | None = None

  def warm_up(self) -> None:
    """Compiles the model for every batch size the batcher can send (powers of two up to max_batch)."""
    size = 1
    while True:
      self.model(np.zeros((size,) + tuple(self.model.input_shape), self.model.input_dtype))
      if size >= self.batcher.max_batch:
        break
      size = min(2 * size, self.batcher.max_batch)
    self.ready = True

  def start(self) -> tuple[str, int]:
    self.warm_up()
    server = self

    class Handler(_Handler):
      owner = server

    self._httpd = _HTTPServer((self.host, self.port), Handler)
    self.port = self._httpd.server_address[1]
    self._thread = threading.Thread(target=self._httpd.serve_forever, name="chainjax-serve-http", daemon=True)
    self._thread.start()
    return self.host, self.port

  def stop(self) -> None:
    """Stops accepting requests, lets the ones in flight finish, then stops the batcher."""
    if self._httpd is not None:
      self._httpd.shutdown()
      self._httpd.server_close()
    self.batcher.stop()

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}/v1/models/{self.model_name}:predict"

  # What the handler asks.

  def status(self) -> dict:
    return {"model_version_status": [{"version": str(self.model.manifest["step"]), "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}

  def metadata(self) -> dict:
    manifest = self.model.manifest
    return {"model_spec": {"name": self.model_name, "version": str(manifest["step"])},
            "metadata": {"signature_def": {"signature_def": {"serving_default": {
                "inputs": {"inputs": manifest["input"]},
                "outputs": {o["name"]: o for o in manifest["outputs"]}}}}}}

  def predict(self, body: Any) -> dict:
    if not isinstance(body, dict):
      raise _HTTPError(400, f"the body must be a JSON object with \"instances\" (or \"inputs\"), got "
                            f"{type(body).__name__}")
    signature = body.get("signature_name", "serving_default")
    if signature != "serving_default":
      raise _HTTPError(400, f"signature_name {signature!r}: this model serves only 'serving_default'")
    row = "instances" in body
    if row == ("inputs" in body):
      raise _HTTPError(400, "the body needs exactly one of \"instances\" (row format) or \"inputs\" (columnar)")
    instances = body["instances" if row else "inputs"]
    if isinstance(instances, dict):  # columnar with named inputs: {"inputs": {"inputs": [...]}}
      instances = instances.get("inputs")
    if not isinstance(instances, list):
      raise _HTTPError(400, f"\"{'instances' if row else 'inputs'}\" must be a list of examples")
    if len(instances) > self.max_instances:
      raise _HTTPError(413, f"{len(instances)} instances: at most {self.max_instances} per request")
    try:
      inputs = self.model.preprocess(instances)
    except ValueError as e:
      raise _HTTPError(400, str(e)) from None
    try:
      outputs = self.batcher.run(inputs)
    except RuntimeError as e:
      raise _HTTPError(500, str(e)) from None
    if row:
      names = list(outputs)
      return {"predictions": [{k: outputs[k][i].tolist() for k in names} for i in range(len(inputs))]}
    return {"outputs": {k: v.tolist() for k, v in outputs.items()}}


class _Handler(http.server.BaseHTTPRequestHandler):
  owner: Server
  protocol_version = "HTTP/1.1"

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.debug("%s - %s", self.address_string(), format % args)

  def _send(self, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def _error(self, status: int, message: str) -> None:
    self._send(status, {"error": message.replace("\n", " ")})

  def _route(self) -> str:
    """"predict", "status", "metadata", "health", or raises 404."""
    path = self.path.split("?", 1)[0].rstrip("/")
    if path == "/healthz":
      return "health"
    prefix = "/v1/models/"
    if not path.startswith(prefix):
      raise _HTTPError(404, f"no such path {path!r}; POST {prefix}{self.owner.model_name}:predict")
    base, _, verb = path[len(prefix):].partition(":")
    name, *tail = base.split("/")
    if name != self.owner.model_name:
      raise _HTTPError(404, f"no model named {name!r}; this server serves {self.owner.model_name!r}")
    if tail[:1] == ["versions"] and len(tail) >= 2:  # /versions/<n>: the one version there is
      tail = tail[2:]
    if verb == "predict" and not tail:
      return "predict"
    if not verb and tail in ([], ["metadata"]):
      return "metadata" if tail else "status"
    raise _HTTPError(404, f"no such path {path!r}")

  def do_GET(self):  # pylint: disable=invalid-name
    try:
      route = self._route()
      if route == "predict":
        raise _HTTPError(405, "predict takes POST")
      if route == "health":
        self._send(200 if self.owner.ready else 503, {"status": "ok" if self.owner.ready else "loading"})
      else:
        self._send(200, self.owner.status() if route == "status" else self.owner.metadata())
    except _HTTPError as e:
      self._error(e.status, str(e))

  def do_POST(self):  # pylint: disable=invalid-name
    try:
      route = self._route()
      if route != "predict":
        self._drain()
        raise _HTTPError(405, f"{self.path} takes GET")
      length = self.headers.get("Content-Length")
      if length is None:
        self.close_connection = True
        raise _HTTPError(411, "a predict request needs a Content-Length header")
      try:
        length = int(length)
      except ValueError:
        self.close_connection = True
        raise _HTTPError(400, f"Content-Length {length!r} is not a number") from None
      if length > self.owner.max_request_bytes:
        self.close_connection = True  # the body is not read
        raise _HTTPError(413, f"the body has {length} bytes: at most {self.owner.max_request_bytes}")
      raw = self.rfile.read(length)
      try:
        body = json.loads(raw)
      except (ValueError, UnicodeDecodeError) as e:
        raise _HTTPError(400, f"the body is not valid JSON: {str(e).splitlines()[0]}") from None
      self._send(200, self.owner.predict(body))
    except _HTTPError as e:
      self._error(e.status, str(e))
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("predict failed")
      self._error(500, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

  def _drain(self) -> None:
    length = int(self.headers.get("Content-Length") or 0)
    if 0 < length <= self.owner.max_request_bytes:
      self.rfile.read(length)
    elif length:
      self.close_connection = True

  do_PUT = do_DELETE = do_PATCH = lambda self: self._method_not_allowed()  # noqa: E731

  def _method_not_allowed(self):
    self._drain()
    self._error(405, f"{self.command} is not served; use GET or POST")


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("export_dir", None, "The export folder of --mode=export (W/export).", required=True)
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
  flags.DEFINE_integer("port", 8080, "Port (0: a free one, printed at start).", lower_bound=0)
  flags.DEFINE_string("model_name", "chainjax", "The model name in /v1/models/<model_name>:predict.")
  flags.DEFINE_integer("max_batch", 64, "Most instances run together.", lower_bound=1)
  flags.DEFINE_float("batch_timeout_ms", 5.0, "How long the first queued request waits for others.", lower_bound=0)
  flags.DEFINE_integer("max_request_bytes", MAX_REQUEST_BYTES, "Larger bodies get 413.", lower_bound=1)
  flags.DEFINE_integer("max_instances", MAX_INSTANCES, "More instances in one request get 413.", lower_bound=1)
  return flags.FLAGS


def serve_main(flag_values) -> int:
  """Loads the export, serves until SIGINT or SIGTERM; 0, or 2 with one line for a bad export."""
  from chainjax import export  # pylint: disable=import-outside-toplevel
  try:
    model = export.load(flag_values.export_dir, max_batch=max(flag_values.max_batch, 1))
  except ValueError as e:
    print(f"chainjax.serve: error: {e}", file=sys.stderr)
    return 2
  server = Server(model, host=flag_values.host, port=flag_values.port, model_name=flag_values.model_name,
                  max_batch=flag_values.max_batch, batch_timeout_ms=flag_values.batch_timeout_ms,
                  max_request_bytes=flag_values.max_request_bytes, max_instances=flag_values.max_instances)
  stop = threading.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.set())
  try:
    server.start()
  except OSError as e:
    print(f"chainjax.serve: error: cannot listen on {flag_values.host}:{flag_values.port}: {e.strerror}",
          file=sys.stderr)
    return 2
  print(f"serving {server.model_name} (step {model.step}) at {server.url}", flush=True)
  stop.wait()
  server.stop()
  print("chainjax.serve: stopped", flush=True)
  return 0


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  sys.exit(serve_main(flags.FLAGS))


__all__ = ["Batcher", "Server", "serve_main"]

if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(_main)
