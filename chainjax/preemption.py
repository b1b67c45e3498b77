"""Preemption: on SIGTERM every process agrees on one step, checkpoints it and stops.

The train loop calls `should_stop(step)` once per completed step, on every process, and
stops (after checkpointing `step`) when it returns True. How processes agree:

  * Under `jax.distributed` (any number of processes): JAX's preemption sync manager.
    Its SIGTERM handler (installed by `jax.distributed.initialize`, in C++) tells the
    coordination service, which tells every process; they exchange the step they have
    reached and all stop at the same one, `max + 1`
    (`jax.experimental.multihost_utils.reached_preemption_sync_point`). A SIGTERM sent to
    one process stops all of them. We install no Python handler here: it would replace
    JAX's.
  * A single process without `jax.distributed`: a Python SIGTERM handler sets a flag and
    the next `should_stop` returns True (the agreement of one).

JAX's sync point is `max(last step each process passed to reached_preemption_sync_point)
+ 1`, and a process that has not called it yet counts as step 0. A notice that arrives
before the loop of a resumed run (during start-up or restore) would therefore set the
sync point to 1, a step the run never reaches; `__enter__` detects that case and the run
stops after its first step instead. Orbax also calls `reached_preemption_sync_point` (with
the step being saved), which keeps the counters consistent as long as we pass train steps.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class PreemptedError(Exception):
  """Training stopped at `step` on a preemption notice; the checkpoint of `step` is saved."""

  def __init__(self, step: int):
    self.step = step
    super().__init__(f"preempted (SIGTERM) at step {step}; its checkpoint is saved. "
                     "Run the same command again to resume from it.")


def _uses_jax_sync_manager() -> bool:
  """`jax.distributed.initialize` starts the sync manager unless `jax_enable_preemption_service` is off."""
  return jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service


class Preemption:
  """`should_stop(step)` is True at the one step where every process stops; a context manager."""

  def __init__(self, start_step: int = 0):
    """`start_step`: the step the loop starts from (the restored one), the same on every process."""
    self.start_step = start_step
    self._requested = threading.Event()
    self._previous_handler = None
    self.stopped_at: int | None = None

  def __enter__(self) -> "Preemption":
    if _uses_jax_sync_manager():
      logging.info("Preemption: SIGTERM is handled by JAX's preemption sync manager.")
      if self.start_step >= 1 and multihost_utils.reached_preemption_sync_point(1):
        self._requested.set()  # a notice during start-up: every process sees it here and stops after one step
      multihost_utils.reached_preemption_sync_point(self.start_step)
    elif threading.current_thread() is threading.main_thread():
      if jax.process_count() > 1:
        logging.warning("Preemption: jax_enable_preemption_service is off, so a SIGTERM stops only the "
                        "process that receives it, at a step the others do not know.")
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    else:
      logging.warning("Preemption: not in the main thread, so SIGTERM is not caught.")
    return self

  def __exit__(self, *exc) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._requested.set()

  def should_stop(self, step: int) -> bool:
    """True when every process is to checkpoint `step` (just completed) and stop; call at every step."""
    stop = self._requested.is_set()
    if _uses_jax_sync_manager():
      stop = multihost_utils.reached_preemption_sync_point(step) or stop
    if stop and self.stopped_at is None:
      self.stopped_at = step
      logging.warning("Preemption notice: checkpointing step %d and stopping.", step)
    return stop
