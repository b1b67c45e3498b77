"""A watchdog: calls `on_timeout` when nothing has called `beat()` for `timeout` seconds.

Why a thread and not a signal: a hung step is most often a main thread blocked in native
code (an XLA collective waiting for a peer, a device sync, a stuck read), where Python
signal handlers (SIGALRM, SIGTERM) never run. A daemon thread still runs there, because
such calls release the GIL; its `on_timeout` can report (e.g. `dump_stacks_and_exit`) and
end the process with `os._exit`, which needs nothing from the blocked main thread.

    with Watchdog(1800, on_timeout=lambda: dump_stacks_and_exit("no progress", 6)) as dog:
      for batch in batches:
        step(batch)
        dog.beat()

The deadline counts from `start()` (entering the `with`) and from every `beat()`, so the
first interval covers whatever runs before the first beat (start-up, compiling the first
step): choose `timeout` above it. The thread wakes once per `timeout` (not per beat), so
`beat()` costs one `time.monotonic()` call and an attribute store.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable


class Watchdog:
  """Calls `on_timeout()` once, from its own thread, if `beat()` is not called for `timeout` seconds.

  `timeout <= 0` disables it (no thread; `beat()` still works). `stop()` (or leaving the `with`)
  ends the thread without calling `on_timeout`; a stopped watchdog never fires.
  """

  def __init__(self, timeout: float, on_timeout: Callable[[], None], name: str = "chainjax-watchdog"):
    self.timeout = float(timeout)
    self.on_timeout = on_timeout
    self.name = name
    self.fired = False
    self._last_beat = time.monotonic()
    self._stopped = threading.Event()
    self._lock = threading.Lock()  # stop() and firing exclude each other: no fire after stop() returns
    self._thread: threading.Thread | None = None

  def beat(self) -> None:
    """A sign of life: the deadline moves to `timeout` seconds from now. Cheap, any thread."""
    self._last_beat = time.monotonic()

  def start(self) -> "Watchdog":
    if self.timeout > 0 and self._thread is None:
      self._last_beat = time.monotonic()
      self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    """Ends the watch; after it returns, `on_timeout` is not called (unless it already was)."""
    with self._lock:
      self._stopped.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join()

  def __enter__(self) -> "Watchdog":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def _run(self) -> None:
    remaining = self.timeout
    while not self._stopped.wait(max(remaining, 0.0)):
      remaining = self._last_beat + self.timeout - time.monotonic()
      if remaining <= 0:
        with self._lock:
          if self._stopped.is_set():
            return
          self.fired = True
          self.on_timeout()
        return


def dump_stacks_and_exit(message: str, code: int) -> None:
  """Writes every thread's stack and then `chainjax: error: <message>` to stderr; `os._exit(code)`.

  `os._exit`, not `sys.exit`: it is called from a watchdog thread while the main thread may be
  blocked in native code, which would never see a `SystemExit`. Nothing is cleaned up (no
  `atexit`, no `finally`): what has been saved stays saved, what was being written is incomplete.
  """
  stream = sys.stderr if sys.stderr is not None else sys.__stderr__
  try:
    stream.flush()
    faulthandler.dump_traceback(file=stream, all_threads=True)
  except (AttributeError, ValueError, OSError):  # no usable file descriptor: still say why and exit
    pass
  exit_with_message(message, code)


def exit_with_message(message: str, code: int) -> None:
  """Writes the one line `chainjax: error: <message>` to stderr and ends the process at once (`os._exit`)."""
  try:
    print(f"chainjax: error: {message}", file=sys.stderr, flush=True)
  finally:
    os._exit(code)
