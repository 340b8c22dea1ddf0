"""SIGTERM and SIGHUP handled as Ctrl-C, so that a long batch stops the way an interrupted
one does.

A batch interrupted with KeyboardInterrupt removes what it had not finished (see
``htsep.files``). SIGTERM, what job schedulers and ``kill`` send, and SIGHUP, what a closed
terminal or ssh session sends, would end the process at once instead; inside
``signals_as_interrupts`` they raise ``Terminated``, a KeyboardInterrupt. A signal the process
was started ignoring (``nohup``, ``&`` in a script for SIGINT) stays ignored.
The command line runs ``separate`` in it; a Python script can run a ``Batch`` in it too::

    with signals_as_interrupts():
        batch.run(tracks)
"""

from __future__ import annotations

import builtins
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled as Ctrl-C: the work stops and nothing half-written is left.
    ``signum`` is the signal's number (the shell's exit status for it is 128 + signum)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.signum = int(signum)


_STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def exit_status(interruption: KeyboardInterrupt) -> int:
    """The exit status a shell gives a process its signal ended: 128 + the signal's number
    (130 for Ctrl-C)."""
    signum = interruption.signum if isinstance(interruption, Terminated) else signal.SIGINT
    return 128 + signum


def how_stopped(interruption: KeyboardInterrupt) -> str:
    """ "interrupted" (Ctrl-C), "terminated" (SIGTERM) or "hung up" (SIGHUP)."""
    if not isinstance(interruption, Terminated):
        return "interrupted"
    return "hung up" if interruption.signum == signal.SIGHUP else "terminated"


@contextlib.contextmanager
def signals_as_interrupts(*, deaf_after: bool = False) -> Iterator[list[int]]:
    """SIGINT, SIGTERM and SIGHUP stop the work with KeyboardInterrupt (Terminated for the
    latter two); once one came, later ones are ignored until the block ends, so that a second
    Ctrl-C cannot cut the cleanup short and leave temporary files behind (kill -9 still stops
    at once; a later run removes what it left). The handlers that were set before are put
    back when the block ends, so a host program's own handlers (Jupyter's Ctrl-C) work again;
    ``deaf_after``: once a signal came they are not, and the process stays deaf to these
    signals until it exits (the command line, whose exit still removes temporary folders). A
    signal that was ignored when this began stays ignored. Outside the main thread, where
    handlers cannot be set, it does nothing. -> the list of the signals its handlers caught
    (one at most), filled as they come."""
    stopped: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return
    caught = [sig for sig in _STOPPING if signal.getsignal(sig) is not signal.SIG_IGN]

    def stop(signum: int, frame: Any) -> None:
        for sig in caught:
            signal.signal(sig, signal.SIG_IGN)
        stopped.append(signum)
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)

    previous = {sig: signal.signal(sig, stop) for sig in caught}
    try:
        yield stopped
    finally:
        if not (stopped and deaf_after):
            for sig, handler in previous.items():
                # None: a handler set outside Python, which cannot be put back; the default.
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP held back (blocked) in this thread until the block ends,
    when one that came meanwhile is delivered: its handler then runs in the code after the
    block. Where signals cannot be blocked (not POSIX), it does nothing."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPPING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


# Packages whose first import runs C++ start-up code that a KeyboardInterrupt raised inside it
# (from a Python module that code imports, numpy for one) can lose, or turn into SIGABRT.
_FRAGILE_IMPORTS = frozenset({"torch", "torchaudio"})


def hold_signals_while_torch_loads() -> None:
    """From now on, in this process, the first import of torch or torchaudio, wherever it
    happens, runs with SIGINT, SIGTERM and SIGHUP held back (``signals_held``); one that came
    meanwhile raises its KeyboardInterrupt from the import statement once the package has
    loaded, so it stays importable for the cleanup that follows. Inside torch's C++ start-up
    a KeyboardInterrupt was lost (the command then ran on, deaf to later signals) or aborted
    the process. The command line calls this first; it is not for library use (it replaces
    ``builtins.__import__``, the one place that sees every import statement as a whole)."""
    if getattr(builtins.__import__, "_htsep_holds_signals", False):
        return
    plain = builtins.__import__

    def held_import(
        name: str,
        globals: Any = None,
        locals: Any = None,
        fromlist: Any = (),
        level: int = 0,
    ) -> Any:
        top = name.partition(".")[0]
        if (
            level
            or top not in _FRAGILE_IMPORTS
            or top in sys.modules
            or threading.current_thread() is not threading.main_thread()
        ):
            return plain(name, globals, locals, fromlist, level)
        with signals_held():
            return plain(name, globals, locals, fromlist, level)

    held_import._htsep_holds_signals = True  # type: ignore[attr-defined]
    builtins.__import__ = held_import
