"""What native libraries print on standard error, kept off the command line's one-line errors.

libmpg123, inside libsndfile, writes its own notes on descriptor 2 while it reads a damaged MP3
("Note: Illegal Audio-MPEG-Header ...", "Trying to resync ...", "Warning: Xing stream size
off ..."), so a bad file gave several lines where htsep promises one. The command line gives
Python's ``sys.stderr`` a duplicate of descriptor 2 at start (``own_stderr``); descriptor 2
itself is then pointed at /dev/null while libsndfile opens or decodes a file
(``native_stderr_muted``), which silences the libraries and leaves htsep's own lines, from every
thread, where they were. Without ``own_stderr`` (htsep used as a library) nothing is muted: a
caller's descriptors are not ours to move.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_enabled = False
_depth = 0  # muted sections open now, over all threads
_saved: int | None = None  # descriptor 2 as it was, while muted


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
    stream.flush()
    sys.stderr = open(  # noqa: SIM115 - lives as long as the process
        fd,
        "w",
        encoding=stream.encoding,
        errors=stream.errors,
        buffering=1,
        closefd=True,
    )
    _enabled = True


@contextmanager
def native_stderr_muted() -> Iterator[None]:
    """Descriptor 2 on /dev/null for the duration (nested and concurrent sections share one
    redirection, undone when the last ends); nothing unless ``own_stderr`` ran."""
    global _depth, _saved
    if not _enabled:
        yield
        return
    with _lock:
        if _depth == 0:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                _saved = os.dup(2)
                os.dup2(null, 2)
            finally:
                os.close(null)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                os.dup2(_saved, 2)
                os.close(_saved)
                _saved = None
