"""What native libraries print on standard error, kept off the command line's one-line errors.

libmpg123, inside libsndfile, writes its own notes on descriptor 2 while it reads a damaged MP3
("Note: Illegal Audio-MPEG-Header ...", "Trying to resync ...", "Warning: Xing stream size
off ..."), so a bad file gave several lines where htsep promises one. The command line gives
Python's ``sys.stderr`` a duplicate of descriptor 2 at start (``own_stderr``); descriptor 2
itself is then pointed at /dev/null while libsndfile opens or decodes a file
(``native_stderr_muted``), which silences the libraries and leaves htsep's own lines, from every
thread, where they were. Without ``own_stderr`` (htsep used as a library) nothing is muted: a
caller's descriptors are not ours to move.

Standard error carries diagnostics only, so the stream ``own_stderr`` sets up never fails the
work: once a write fails (a log on a full disk, a reader of ``2>&1 |`` that left, a terminal
that hung up) the rest goes to /dev/null. ``standard_descriptors`` fills descriptors 0-2 that
were closed at start with /dev/null, so that no file htsep opens can take their numbers (a
file on descriptor 2 would receive what the libraries print, and the muting above would
replace it).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_enabled = False
_depth = 0  # muted sections open now, over all threads
_saved: int | None = None  # descriptor 2 as it was, while muted


def standard_descriptors() -> tuple[int, ...]:
    """Open /dev/null on each of descriptors 0, 1 and 2 that is closed; return those numbers.
    Python has set their ``sys`` streams to None already, which stays so."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                continue
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            closed.append(fd)
    return tuple(closed)


class _LossyText(io.TextIOWrapper):
    """A text stream whose failed writes lose the text instead of raising: once one fails,
    its descriptor is pointed at /dev/null."""

    def write(self, text: str) -> int:
        try:
            return super().write(text)
        except OSError:
            self._discard()
            return len(text)

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:
            self._discard()
            with contextlib.suppress(OSError, ValueError):
                super().flush()  # what stayed buffered goes to /dev/null

    def _discard(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self.fileno())
            finally:
                os.close(null)


def own_stderr() -> None:
    """Give ``sys.stderr`` its own descriptor, a duplicate of 2, with the same encoding, error
    handler and line buffering; from then on ``native_stderr_muted`` mutes descriptor 2."""
    global _enabled
    if _enabled or sys.stderr is None:
        return
    try:
        stream = sys.stderr
        fd = os.dup(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return  # no descriptor behind sys.stderr (replaced by a caller): leave it alone
    with contextlib.suppress(OSError, ValueError):
        stream.flush()
    sys.stderr = _LossyText(
        open(fd, "wb", closefd=True),  # noqa: SIM115 - lives as long as the process
        encoding=stream.encoding,
        errors=stream.errors,
        line_buffering=True,
    )
    _enabled = True


def _mute() -> bool:
    """Point descriptor 2 at /dev/null, keeping a copy in ``_saved``; False, with nothing
    changed, when no descriptor is left."""
    global _saved
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return False
    try:
        _saved = os.dup(2)
        os.dup2(null, 2)
    except OSError:
        if _saved is not None:
            os.close(_saved)
            _saved = None
        return False
    finally:
        os.close(null)
    return True


@contextmanager
def native_stderr_muted() -> Iterator[None]:
    """Descriptor 2 on /dev/null for the duration (nested and concurrent sections share one
    redirection, undone when the last ends); nothing unless ``own_stderr`` ran."""
    global _depth, _saved
    if not _enabled:
        yield
        return
    with _lock:
        if _depth == 0 and not _mute():
            muted = False  # no descriptor left (ulimit -n): not muted, the work goes on
        else:
            muted = True
            _depth += 1
    if not muted:
        yield
        return
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                os.dup2(_saved, 2)
                os.close(_saved)
                _saved = None
