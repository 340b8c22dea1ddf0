"""SIGTERM handled as Ctrl-C, so that a long batch stops the way an interrupted one does.

A batch interrupted with KeyboardInterrupt removes what it had not finished (see
``htsep.files``). SIGTERM, what job schedulers and ``kill`` send, would end the process at
once instead; inside ``signals_as_interrupts`` it raises ``Terminated``, a KeyboardInterrupt.
The command line runs ``separate`` in it; a Python script can run a ``Batch`` in it too::

    with signals_as_interrupts():
        batch.run(tracks)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C: the work stops and nothing half-written is left."""


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM stop the work with KeyboardInterrupt (Terminated for SIGTERM);
    once one came, later ones are ignored, so that a second Ctrl-C cannot cut the cleanup
    short and leave temporary files behind (kill -9 still stops at once; a later run removes
    what it left). Outside the main thread, where handlers cannot be set, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopped = []

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stopped.append(signum)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        if not stopped:  # once stopping, the process stays deaf to them until it exits
            for sig, handler in previous.items():
                signal.signal(sig, handler)
