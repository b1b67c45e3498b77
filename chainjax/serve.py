"""`python -m chainjax.serve --export_dir=W/export`: an HTTP JSON endpoint in TF Serving's REST format.

    POST /v1/models/<model_name>:predict   {"instances": [...]}  -> {"predictions": [{output: value}, ...]}
                                           {"inputs": [...]}     -> {"outputs": {output: [...]}}
    GET  /v1/models/<model_name>           the model's status (TF Serving's model_version_status)
    GET  /v1/models/<model_name>/metadata  the signature: input and output names, shapes, dtypes
    GET  /healthz                          200 once the model is loaded and compiled, 503 before and while stopping

`/v1/models/<model_name>/versions/<step>/...` is the same model. It runs the export's StableHLO
(`chainjax.exported.load`: no TensorFlow, no workdir). An instance is one model input as nested lists (a
raw uint8 image for image models, a string for text models, tokenized with the export's vocabulary), or
TF Serving's named form `{"inputs": <one input>}`; `"signature_name"` may only be `serving_default`.

Concurrent requests are batched: one worker thread takes the queued requests, up to `--max_batch`
instances or `--batch_timeout_ms` after the first, runs them as one model call and answers each its
rows; a request larger than `--max_batch` runs alone (the model chunks it). Every bucket size is compiled
at start-up, so no request waits for a compile.

Every error is a JSON `{"error": "<one line>"}` with its status, and the server keeps serving: 400 bad
JSON, body, shapes or types; 404 unknown path, model or version; 405 wrong method; 408 a body that stalls;
411 no Content-Length; 413 a body over `--max_request_bytes` (checked before reading it) or more than
`--max_instances` instances; 500 the model failed (logged with its traceback); 503 the server is stopping.
SIGINT or SIGTERM stops it: no new connection is accepted, the requests in flight are answered, exit 0.
A bad export or flag is one line on stderr and exit code 2. TF Serving itself serves the export's
`saved_model/`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http
import http.server
import json
import logging
import queue
import signal
import socket
import sys
import threading
import time
import urllib.parse
from typing import Any

import numpy as np

MAX_REQUEST_BYTES = 16 * 1024 * 1024
MAX_INSTANCES = 4096
CONNECTION_TIMEOUT_S = 60  # a client silent this long mid-request (or an idle keep-alive connection) is dropped
STOP_TIMEOUT_S = 30  # how long stop() waits for the requests in flight
LINGER_S = 2  # after refusing an unread body: how long its rest is read and dropped, so the client sees the answer
SIGNATURE = "serving_default"
_TF_DTYPES = {"float32": "DT_FLOAT", "float64": "DT_DOUBLE", "float16": "DT_HALF", "bfloat16": "DT_BFLOAT16",
              "int8": "DT_INT8", "int16": "DT_INT16", "int32": "DT_INT32", "int64": "DT_INT64", "uint8": "DT_UINT8",
              "bool": "DT_BOOL", "string": "DT_STRING"}
_STOP = object()  # the batcher queue's last item


class ModelFailed(RuntimeError):
  """The model raised on a batch (one line; the traceback is logged): a 500."""


class Stopping(RuntimeError):
  """The batcher no longer takes requests: a 503."""


def one_line(error: BaseException | str) -> str:
  """The first line of a message (an error without one: its type's name), for a JSON error or stderr."""
  lines = str(error).strip().splitlines()
  return lines[0] if lines else ("" if isinstance(error, str) else type(error).__name__)


@dataclasses.dataclass
class _Job:
  inputs: np.ndarray
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  outputs: dict | None = None
  error: str | None = None


class Batcher:
  """One worker thread that runs queued requests together: up to `max_batch` instances, waiting at most
  `timeout_s` after the first of a batch. A request that does not fit starts the next batch (requests are
  answered in order); one larger than `max_batch` runs alone.

  `calls`, `requests` and `batch_sizes` (a Counter: instances per model call -> calls) say how much was
  merged; they only grow, and only the worker writes them.
  """

  def __init__(self, model, max_batch: int, timeout_s: float):
    self.model, self.max_batch, self.timeout_s = model, max_batch, timeout_s
    self.calls, self.requests, self.batch_sizes = 0, 0, collections.Counter()
    self._queue: queue.Queue = queue.Queue()
    self._lock = threading.Lock()
    self._closed = False
    self._thread = threading.Thread(target=self._work, name="chainjax-serve-batcher", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """The model's outputs for `inputs` (a preprocessed batch); ModelFailed or Stopping."""
    job = _Job(inputs)
    with self._lock:
      if self._closed:
        raise Stopping("the server is stopping")
      self._queue.put(job)
    job.done.wait()
    if job.error is not None:
      raise ModelFailed(job.error)
    return job.outputs

  def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Takes no more requests, answers the queued ones, then ends the worker."""
    with self._lock:
      if self._closed:
        return
      self._closed = True
      self._queue.put(_STOP)
    if self._thread.is_alive():
      self._thread.join(timeout_s)

  def _work(self) -> None:
    pending = None
    while True:
      job = pending if pending is not None else self._queue.get()
      pending = None
      if job is _STOP:
        return
      jobs, size = [job], len(job.inputs)
      deadline = time.monotonic() + self.timeout_s
      while size < self.max_batch:
        try:
          more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
          break
        if more is _STOP or size + len(more.inputs) > self.max_batch:
          pending = more
          break
        jobs.append(more)
        size += len(more.inputs)
      self._run(jobs, size)

  def _run(self, jobs: list[_Job], size: int) -> None:
    try:
      inputs = jobs[0].inputs if len(jobs) == 1 else np.concatenate([j.inputs for j in jobs])
      outputs = {k: np.asarray(v) for k, v in self.model(inputs).items()}
      wrong = {k: v.shape for k, v in outputs.items() if v.shape[:1] != (size,)}
      if wrong:
        raise ValueError(f"outputs of shapes {wrong} for a batch of {size}")
      start = 0
      for j in jobs:
        j.outputs = {k: v[start:start + len(j.inputs)] for k, v in outputs.items()}
        start += len(j.inputs)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("the model failed on a batch of %d instances (%d requests)", size, len(jobs))
      for j in jobs:
        j.error = f"the model failed: {type(e).__name__}: {one_line(e)}"
    self.calls += 1
    self.requests += len(jobs)
    self.batch_sizes[size] += 1
    for j in jobs:
      j.done.set()


class _HTTPError(Exception):

  def __init__(self, status: int, message: str, headers: dict | None = None):
    super().__init__(message)
    self.status, self.headers = status, headers or {}


def _tensor_info(spec: dict) -> dict:
  """A manifest's {"name", "shape", "dtype"} as TF Serving's TensorInfo JSON (-1: any size)."""
  return {"name": spec["name"], "dtype": _TF_DTYPES.get(spec["dtype"], spec["dtype"]),
          "tensor_shape": {"dim": [{"size": str(-1 if d is None else d), "name": ""} for d in spec["shape"]],
                           "unknown_rank": False}}


class Server:
  """The HTTP server of one loaded export (`chainjax.exported.Exported`, or anything with its interface).

  `start()` binds (port 0: a free one), serves in a thread, compiles every batch size and returns the
  bound (host, port); `stop()` stops accepting, answers the requests in flight, then stops the batcher.
  """

  def __init__(self, model, *, host: str = "127.0.0.1", port: int = 8080, model_name: str = "chainjax",
               max_batch: int = 64, batch_timeout_ms: float = 5.0, max_request_bytes: int = MAX_REQUEST_BYTES,
               max_instances: int = MAX_INSTANCES):
    for name, value, low in (("port", port, 0), ("max_batch", max_batch, 1), ("batch_timeout_ms", batch_timeout_ms, 0),
                             ("max_request_bytes", max_request_bytes, 1), ("max_instances", max_instances, 1)):
      if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if not model_name or any(c in model_name for c in "/:?#% "):
      raise ValueError(f"model_name {model_name!r}: must be non-empty, without '/', ':', '?', '#', '%' or spaces")
    self.model, self.host, self.port, self.model_name = model, host, port, model_name
    self.version = str(model.manifest["step"])
    self.max_request_bytes, self.max_instances = max_request_bytes, max_instances
    self.batcher = Batcher(model, max_batch, batch_timeout_ms / 1e3)
    self.state = "loading"  # -> "ok" once warmed up -> "stopping"
    self._httpd: http.server.ThreadingHTTPServer | None = None
    self._thread: threading.Thread | None = None
    self._in_flight = 0
    self._idle = threading.Condition()

  @property
  def url(self) -> str:
    host = f"[{self.host}]" if ":" in self.host else self.host
    return f"http://{host}:{self.port}/v1/models/{self.model_name}:predict"

  def start(self) -> tuple[str, int]:
    """Binds and serves (`/healthz` says 503 until the model is compiled), warms up; the bound address."""
    owner = self

    class Handler(_Handler):
      server_owner = owner

    class HTTPServer(http.server.ThreadingHTTPServer):
      address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
      request_queue_size = 256  # the listen backlog: a burst of concurrent clients is not refused (default 5)
      daemon_threads = True  # an idle keep-alive connection does not hold up the exit (stop() waits for requests)

    self._httpd = HTTPServer((self.host, self.port), Handler)
    self.port = self._httpd.server_address[1]
    self._thread = threading.Thread(target=self._httpd.serve_forever, name="chainjax-serve-http", daemon=True)
    self._thread.start()
    self.batcher.start()
    try:
      self.warm_up()
    except BaseException:
      self.stop()
      raise
    self.state = "ok"
    return self.host, self.port

  def warm_up(self) -> None:
    """Runs the model once at every bucket size a request can reach (powers of two up to the model's
    `max_batch`, no larger than a batch or a request can be), so that each is compiled before serving."""
    largest = max(self.batcher.max_batch, self.max_instances)
    cap = min(getattr(self.model, "max_batch", largest), largest)
    size = 1
    while True:
      self.model(np.zeros((size,) + tuple(self.model.input_shape), self.model.input_dtype))
      if size >= cap:
        break
      size = min(2 * size, cap)

  def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stops accepting connections, waits (up to `timeout_s`) for the requests in flight, stops the batcher."""
    self.state = "stopping"
    if self._httpd is not None:
      self._httpd.shutdown()
    with self._idle:
      self._idle.wait_for(lambda: self._in_flight == 0, timeout_s)
    self.batcher.stop(timeout_s)
    if self._httpd is not None:
      self._httpd.server_close()
      self._httpd = None

  @contextlib.contextmanager
  def _request(self):
    with self._idle:
      self._in_flight += 1
    try:
      yield
    finally:
      with self._idle:
        self._in_flight -= 1
        self._idle.notify_all()

  # The answers, as JSON-able dicts.

  def status(self) -> dict:
    return {"model_version_status": [{"version": self.version, "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}

  def metadata(self) -> dict:
    manifest = self.model.manifest
    signature = {"inputs": {manifest["input"]["name"]: _tensor_info(manifest["input"])},
                 "outputs": {o["name"]: _tensor_info(o) for o in manifest["outputs"]},
                 "method_name": "tensorflow/serving/predict"}
    return {"model_spec": {"name": self.model_name, "signature_name": "", "version": self.version},
            "metadata": {"signature_def": {"signature_def": {SIGNATURE: signature}}}}

  def predict(self, body: Any) -> dict:
    """The answer to a predict request's parsed JSON body; _HTTPError for what is wrong with it."""
    if not isinstance(body, dict):
      raise _HTTPError(400, f"the body must be a JSON object with \"instances\" (or \"inputs\"), got "
                            f"{_json_type(body)}")
    signature = body.get("signature_name", SIGNATURE)
    if signature != SIGNATURE:
      raise _HTTPError(400, f"signature_name {signature!r}: this model serves only {SIGNATURE!r}")
    row = "instances" in body
    if row == ("inputs" in body):
      raise _HTTPError(400, "the body needs exactly one of \"instances\" (row format) or \"inputs\" (columnar)")
    key, input_name = ("instances" if row else "inputs"), self.model.manifest["input"]["name"]
    instances = body[key]
    if isinstance(instances, dict):  # columnar with named inputs: {"inputs": {"<input name>": [...]}}
      if row or set(instances) != {input_name}:
        expected = "a list of examples" + ("" if row else f" or {{\"{input_name}\": [...]}} (the model's one input)")
        raise _HTTPError(400, f"\"{key}\" must be {expected}, got an object with keys {sorted(instances)}")
      instances = instances[input_name]
    if not isinstance(instances, list):
      raise _HTTPError(400, f"\"{key}\" must be a list of examples, got {_json_type(instances)}")
    if row and instances and all(isinstance(v, dict) for v in instances):  # [{"<input name>": example}, ...]
      bad = next((i for i, v in enumerate(instances) if set(v) != {input_name}), None)
      if bad is not None:
        raise _HTTPError(400, f"instances[{bad}]: keys {sorted(instances[bad])}; the model's one input is "
                              f"{input_name!r}")
      instances = [v[input_name] for v in instances]
    if self.state == "loading":
      raise _HTTPError(503, "the model is loading; /healthz says when it is ready")
    if len(instances) > self.max_instances:
      raise _HTTPError(413, f"{len(instances)} instances: at most {self.max_instances} per request")
    try:
      inputs = self.model.preprocess(instances)
    except ValueError as e:
      raise _HTTPError(400, one_line(e)) from None
    try:
      outputs = self.batcher.run(inputs)
    except ModelFailed as e:
      raise _HTTPError(500, str(e)) from None
    except Stopping as e:
      raise _HTTPError(503, str(e)) from None
    columns = {k: outputs[k].tolist() for k in self.model.output_names}
    if not row:
      return {"outputs": columns}
    return {"predictions": [{k: v[i] for k, v in columns.items()} for i in range(len(inputs))]}

  def route(self, raw_path: str) -> str:
    """"predict", "status", "metadata" or "health" for a request path; a 404 _HTTPError otherwise."""
    path = urllib.parse.unquote(raw_path.partition("?")[0]).rstrip("/")
    if path == "/healthz":
      return "health"
    prefix, predict_path = "/v1/models/", f"/v1/models/{self.model_name}:predict"
    if not path.startswith(prefix):
      raise _HTTPError(404, f"no such path {path!r}; POST {predict_path}")
    base, colon, verb = path[len(prefix):].partition(":")
    name, *tail = base.split("/")
    if name != self.model_name:
      raise _HTTPError(404, f"no model named {name!r}; this server serves {self.model_name!r}")
    if tail[:1] == ["versions"] and len(tail) >= 2:
      if tail[1] != self.version:
        raise _HTTPError(404, f"model {name!r} has no version {tail[1]!r}; its version is {self.version}")
      tail = tail[2:]
    if colon and not tail:
      if verb != "predict":
        raise _HTTPError(404, f"no method {verb!r}; this server answers :predict ({predict_path})")
      return "predict"
    if not colon and tail in ([], ["metadata"]):
      return "metadata" if tail else "status"
    raise _HTTPError(404, f"no such path {path!r}; POST {predict_path}")


def _json_type(value: Any) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
      type(value), "a number")


def _too_large(length: int, limit: int) -> str:
  return f"the body has {length} bytes: at most {limit} (--max_request_bytes)"


class _Handler(http.server.BaseHTTPRequestHandler):
  """HTTP/1.1 with keep-alive; every answer, errors of http.server's own parsing included, is JSON."""

  server_owner: Server
  protocol_version = "HTTP/1.1"
  server_version = "chainjax.serve"
  timeout = CONNECTION_TIMEOUT_S

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.debug("%s - %s", self.address_string(), format % args)

  def send_error(self, code, message=None, explain=None):
    """http.server's own errors (a malformed request line, headers too long, an unknown method) as JSON."""
    del explain
    self.close_connection = True
    self._send(code, {"error": one_line(message or http.HTTPStatus(code).phrase)})

  def do_GET(self):  # pylint: disable=invalid-name
    self._handle()

  def do_POST(self):  # pylint: disable=invalid-name
    self._handle()

  do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

  def _handle(self) -> None:
    owner = self.server_owner
    self._body_read = False  # the body was read, or there is nothing left to drain (the client stopped sending)
    headers = {}
    with owner._request():  # pylint: disable=protected-access
      try:
        status, payload = 200, self._answer(owner)
      except _HTTPError as e:
        status, payload, headers = e.status, {"error": one_line(str(e))}, e.headers
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("%s %s failed", self.command, self.path)
        status, payload = 500, {"error": f"{type(e).__name__}: {one_line(e)}"}
      unread = False
      if not self._body_read:  # an error before the body was read: drain a small one, else close
        value = self.headers.get("Content-Length")
        if value is None:
          unread = "Transfer-Encoding" in self.headers
        elif not value.strip().isdigit() or int(value) > owner.max_request_bytes:
          unread = True
        elif int(value):
          unread = self._read_body(int(value), quiet=True) is None
      if unread or owner.state == "stopping":
        self.close_connection = True
      self._send(status, payload, headers)
      if unread:
        self._linger()

  def handle_expect_100(self):
    """`Expect: 100-continue` (curl's large uploads): a body over the limit is refused before it is sent."""
    value = self.headers.get("Content-Length", "")
    if value.strip().isdigit() and int(value) > self.server_owner.max_request_bytes:
      self.close_connection = True
      self._send(413, {"error": _too_large(int(value), self.server_owner.max_request_bytes)})
      self._linger()
      return False
    return super().handle_expect_100()

  def _answer(self, owner: Server) -> dict:
    route = owner.route(self.path)
    method = "POST" if route == "predict" else "GET"
    if self.command != method:
      raise _HTTPError(405, f"{self.command} {self.path}: use {method}", {"Allow": method})
    if route == "health":
      if owner.state != "ok":
        raise _HTTPError(503, f"the model is {owner.state}")
      return {"status": "ok"}
    if route != "predict":
      return owner.status() if route == "status" else owner.metadata()
    length = self._content_length()
    if length is None:
      raise _HTTPError(411, "a predict request needs a Content-Length header")
    if length > owner.max_request_bytes:
      raise _HTTPError(413, _too_large(length, owner.max_request_bytes))
    raw = self._read_body(length)
    try:
      body = json.loads(raw)
    except RecursionError:
      raise _HTTPError(400, "the body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      raise _HTTPError(400, f"the body is not valid JSON: {one_line(e)}") from None
    return owner.predict(body)

  def _content_length(self) -> int | None:
    """The Content-Length header as a number, None when absent; a 400 for one that is not a count."""
    value = self.headers.get("Content-Length")
    if value is None:
      return None
    if not value.strip().isdigit():
      raise _HTTPError(400, f"Content-Length {value!r} is not a number of bytes")
    return int(value)

  def _read_body(self, length: int, quiet: bool = False) -> bytes | None:
    """The body's `length` bytes. When it stalls or ends early the connection is closed, and this is None
    (`quiet`) or a 408 / 400."""
    try:
      data = self.rfile.read(length)
    except TimeoutError:
      data, problem = None, (408, f"the body stalled for {CONNECTION_TIMEOUT_S} s")
    except OSError as e:
      data, problem = None, (400, f"the body could not be read: {one_line(e)}")
    else:
      problem = None if len(data) == length else (
          400, f"the body ended after {len(data)} of its {length} bytes (Content-Length)")
    if problem is None:
      self._body_read = True
      return data
    self.close_connection = True
    if quiet:
      return None
    self._body_read = True  # nothing left to drain
    raise _HTTPError(*problem)

  def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
    data = json.dumps(payload).encode()
    try:
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      for name, value in (headers or {}).items():
        self.send_header(name, value)
      if self.close_connection:
        self.send_header("Connection", "close")
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(data)
      self.wfile.flush()
    except OSError as e:  # the client went away: nothing to answer
      logging.debug("%s: could not send the answer: %s", self.address_string(), e)
      self.close_connection = True

  def _linger(self) -> None:
    """After answering without reading the body: drops what the client still sends (for at most LINGER_S), so
    that closing does not reset the connection before the client has read the answer."""
    try:
      self.connection.shutdown(socket.SHUT_WR)
      deadline = time.monotonic() + LINGER_S
      while (left := deadline - time.monotonic()) > 0:
        self.connection.settimeout(left)
        if not self.connection.recv(1 << 16):
          break
    except OSError:
      pass


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("export_dir", None, "The export folder written by --mode=export (W/export).")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
  flags.DEFINE_integer("port", 8080, "Port (0: a free one, printed at start).", lower_bound=0, upper_bound=65535)
  flags.DEFINE_string("model_name", "chainjax", "The model name in /v1/models/<model_name>:predict.")
  flags.DEFINE_integer("max_batch", 64, "Most instances run together in one model call.", lower_bound=1)
  flags.DEFINE_float("batch_timeout_ms", 5.0, "How long the first queued request of a batch waits for others.",
                     lower_bound=0)
  flags.DEFINE_integer("max_request_bytes", MAX_REQUEST_BYTES, "A larger body gets 413, unread.", lower_bound=1)
  flags.DEFINE_integer("max_instances", MAX_INSTANCES, "More instances in one request get 413.", lower_bound=1)
  return flags.FLAGS


def _error(message: str) -> int:
  print(f"chainjax.serve: error: {message}", file=sys.stderr, flush=True)
  return 2


def serve_main(flag_values) -> int:
  """Loads the export, serves until SIGINT or SIGTERM; 0, or 2 with one line for a bad export or flag."""
  stop = threading.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.set())
  if not flag_values.export_dir:
    return _error("--export_dir is required: the export folder of --mode=export (W/export)")
  from chainjax import exported  # pylint: disable=import-outside-toplevel
  try:
    model = exported.load(flag_values.export_dir, max_batch=flag_values.max_batch)
    server = Server(model, host=flag_values.host, port=flag_values.port, model_name=flag_values.model_name,
                    max_batch=flag_values.max_batch, batch_timeout_ms=flag_values.batch_timeout_ms,
                    max_request_bytes=flag_values.max_request_bytes, max_instances=flag_values.max_instances)
  except ValueError as e:
    return _error(one_line(e))
  except Exception as e:  # pylint: disable=broad-except
    return _error(f"--export_dir={flag_values.export_dir}: cannot load the export: {type(e).__name__}: {one_line(e)}")
  try:
    server.start()
  except OSError as e:
    return _error(f"cannot listen on {flag_values.host}:{flag_values.port}: {e.strerror or one_line(e)}")
  except Exception as e:  # pylint: disable=broad-except
    return _error(f"the model failed at warm-up: {type(e).__name__}: {one_line(e)}")
  print(f"serving {server.model_name} (step {server.version}) at {server.url}", flush=True)
  while not stop.wait(1.0):
    pass
  server.stop()
  batcher = server.batcher
  print(f"chainjax.serve: stopped after {batcher.requests} requests in {batcher.calls} model calls", flush=True)
  return 0


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, but a bad or unknown flag is one line and exit code 2 (as in chainjax.main)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(_error(one_line(e)))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(_error(f"unexpected arguments: {' '.join(argv[1:])}"))
  from absl import flags  # pylint: disable=import-outside-toplevel
  sys.exit(serve_main(flags.FLAGS))


__all__ = ["Batcher", "ModelFailed", "Server", "Stopping", "main", "parse_flags", "serve_main"]

if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main, flags_parser=parse_flags)
