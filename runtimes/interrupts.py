"""An interrupt (Ctrl-C, SIGTERM) that is never lost before a commit.

Python raises KeyboardInterrupt in whatever Python code the main thread runs when the signal
arrives. When that code runs under a caller that discards exceptions (a finalizer such as a
``__del__`` or a weakref callback, which torch's tracer runs by the thousand as its fake
tensors die; C code that clears the error of an attribute probe) the KeyboardInterrupt vanishes
and the work goes on: an export interrupted while tracing ran to its end and committed its
bundle. While `interrupts_raise` is active every such signal is also recorded, and each commit
(an atomic file's rename, a directory swap: `runtimes.fileio`, `runtimes.staging`) calls
`raise_if_interrupted` first. Whatever became of the first KeyboardInterrupt, nothing becomes
visible after the user asked to stop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["interrupts_deferred", "interrupts_handled", "interrupts_raise",
           "raise_if_interrupted"]

_received: list[int] = []  # the signals received inside `interrupts_raise`, in order
_deferring = [0]  # how many `interrupts_deferred` blocks are running


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt when an interrupt arrived inside `interrupts_raise` (even one
    whose first KeyboardInterrupt was swallowed); otherwise nothing."""
    if _received:
        raise KeyboardInterrupt(f"signal {_received[0]}")


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """While the block runs (in the main thread), SIGINT and SIGTERM raise KeyboardInterrupt
    and are recorded for `raise_if_interrupted`. SIGTERM (``kill``, a job scheduler's stop)
    then ends a run as Ctrl-C does, so the cleanup that runs on errors runs on it too: an
    export's staging directory is removed, a training run's lock released. A signal someone
    else already handles (or ignores) is left to them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        _received.append(signum)
        if not _deferring[0]:
            raise KeyboardInterrupt(f"signal {signum}")

    ours = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    previous = {sig: signal.getsignal(sig) for sig in ours}
    taken = [sig for sig, default in ours.items() if previous[sig] in (default, None)]
    for sig in taken:
        signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig in taken:
            signal.signal(sig, previous[sig])
        _received.clear()


@contextlib.contextmanager
def interrupts_handled() -> Iterator[None]:
    """A block that answers an interrupt itself and then returns normally (a server that
    finishes the requests in flight and stops): the interrupts it received are forgotten when
    it returns, so `raise_if_interrupted` does not raise them again."""
    before = len(_received)
    yield
    del _received[before:]


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """A block that must not stop half-way (making a staging directory and handing it to
    the owner that removes it): inside `interrupts_raise`, an interrupt that arrives in the
    block is raised when it ends (elsewhere Python's own handler raises it at once)."""
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1
    raise_if_interrupted()
