"""Writing files so that readers only ever see a complete file, and nothing a user has is lost.

- A file is written under a hidden temporary name beside its target, flushed to disk (fsync),
  then renamed onto the target; the folder is synced too, so that after a power loss the target
  holds either its old content or the complete new one, never an empty or partial file.
- ``replace=False`` renames without replacing (``renameat2(RENAME_NOREPLACE)``, else a hard link
  then unlink): a file that appeared at the target meanwhile, from another process, is kept and
  the write fails with ``FileExistsError``.
- Temporaries and staging folders are named after their owner (host, boot, process id and the
  process's start time). A process killed with SIGKILL cannot remove them; a later run over the
  same folder removes those whose owner provably no longer runs (``remove_stale``), and never
  touches another live process's files or those of another machine sharing the folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import IO

# .<target name>.<owner>.<8 hex>.tmp (files) and .htsep-<owner>.<8 hex> (staging folders).
_OWNER = r"h[0-9a-f]{8}b[0-9a-f]{8}(?:n[0-9a-f]{8})?p\d+s\d+"
_TEMPORARY = re.compile(rf"^\..*\.({_OWNER})\.[0-9a-f]{{8}}\.(tmp|part)$", re.DOTALL)
_STAGING = re.compile(rf"^\.htsep-({_OWNER})\.[0-9a-f]{{8}}$")
_OWNER_PARTS = re.compile(r"^h([0-9a-f]{8})b([0-9a-f]{8})(?:n([0-9a-f]{8}))?p(\d+)s(\d+)$")
_COPY_BYTES = 1 << 20


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip().replace("-", "")[:8].ljust(8, "0")
    except OSError:
        return "00000000"


def _start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks after boot); None if it does not run.
    Where /proc is missing (macOS), 0 for any process that exists."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return 0
        return 0
    except OSError:
        return 0
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


@cache
def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


@cache
def _pid_namespace() -> str:
    """Which process ids this process sees: containers and sandboxes that share the host name
    (host networking) and the kernel have their own, in which pid 1 is not ours."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return "00000000"
    return hashlib.sha256(link.encode()).hexdigest()[:8]


def owner_tag() -> str:
    """This process, as its temporaries name it: host, boot, pid namespace, pid and start
    time."""
    pid = os.getpid()
    return f"h{_host()}b{_boot_id()}n{_pid_namespace()}p{pid}s{_start_time(pid) or 0}"


def _owner_alive(tag: str) -> bool:
    """False only when the owner provably no longer runs: same host, and either another boot
    or, in the same pid namespace, no process with its pid and start time. (Tags written
    before the namespace was part of them are taken to be of this namespace.)"""
    match = _OWNER_PARTS.match(tag)
    if match is None:
        return True
    host, boot, namespace, pid, start = match.groups()
    if host != _host():
        return True  # another machine sharing the folder: nothing can be proved from here
    if boot != _boot_id():
        return False
    if namespace is not None and namespace != _pid_namespace():
        return True  # its pid means another process here, or none
    now = _start_time(int(pid))
    if now is None:
        return False
    return now == 0 or now == int(start)


# Temporaries and staging folders this process made and has not yet put in place or removed,
# entered before they are created: an interruption may land at any instruction, between a
# file's creation and the ``try`` meant to remove it, and ``remove_unfinished`` still finds it.
_unfinished: set[Path] = set()
_unfinished_lock = threading.Lock()


def _claim(path: Path) -> None:
    with _unfinished_lock:
        _unfinished.add(path)


def _settled(path: Path) -> None:
    """``path`` was put in place or removed (or was never ours)."""
    with _unfinished_lock:
        _unfinished.discard(path)


def remove_unfinished() -> list[Path]:
    """Remove every temporary file and staging folder this process made and has not put in
    place or removed: what an interrupted command leaves, wherever the interruption came.
    Call it once no thread writes any more. -> what was removed."""
    with _unfinished_lock:
        paths = sorted(_unfinished)
        _unfinished.clear()
    removed = []
    for path in paths:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:  # gone already (put in place, removed), or not removable
            continue
        removed.append(path)
    return removed


def _name_prefix(name: str, limit: int) -> str:
    """The start of ``name`` in at most ``limit`` bytes as the file system stores it, cut
    between characters: file systems count bytes (255 on ext4), and 150 characters of CJK
    are 450 of them."""
    raw = os.fsencode(name)
    if len(raw) <= limit:
        return name
    cut = raw[:limit]
    try:
        cut.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.end == len(cut):  # a character split by the cut (not bytes that never decoded)
            cut = cut[: exc.start]
    return os.fsdecode(cut)


def create_temporary(target: str | os.PathLike[str], suffix: str = ".tmp") -> Path:
    """A new empty hidden file beside ``target`` (``suffix`` .tmp or .part), with the umask's
    usual permissions (unlike ``mkstemp``'s 0600), named so that ``remove_stale`` can tell
    when its owner is gone."""
    target = Path(target)
    owner = owner_tag()
    for _ in range(100):
        prefix = _name_prefix(target.name, 150)
        candidate = target.parent / f".{prefix}.{owner}.{secrets.token_hex(4)}{suffix}"
        _claim(candidate)
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            _settled(candidate)  # someone else's
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {target.parent}")


def spool(stream: IO[bytes], target: str | os.PathLike[str]) -> Path:
    """``stream`` read to its end into a new temporary file beside ``target`` (named as by
    ``create_temporary``), for readers that need all of it; the caller removes the file.
    OSError, with nothing left behind, when the folder cannot hold it."""
    path = create_temporary(target)
    try:
        with open(path, "wb") as handle:
            shutil.copyfileobj(stream, handle, _COPY_BYTES)
    except BaseException:
        path.unlink(missing_ok=True)
        _settled(path)
        raise
    return path


def copy_into(path: str | os.PathLike[str], stream: IO[bytes]) -> None:
    """The bytes of the file at ``path`` written to ``stream``, then flushed. A raw stream
    (``sys.stdout.buffer`` under ``python -u`` or PYTHONUNBUFFERED) may take fewer bytes than
    given, as a pipe whose reader left does: the rest is offered again, so that the loss shows
    as the OSError of the next write instead of passing unseen."""
    with open(path, "rb") as handle:
        while chunk := handle.read(_COPY_BYTES):
            view = memoryview(chunk)
            while view:
                written = stream.write(view)
                if written is None:  # a non-blocking stream that could take nothing now
                    raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
                view = view[written:]
    stream.flush()


def sync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename in it) to the disk, where the platform can."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename is then as durable as it gets
    finally:
        os.close(fd)


@cache
def _renameat2() -> object | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def rename_no_replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename ``source`` to ``target`` unless ``target`` exists: FileExistsError then, and
    ``source`` stays. Atomic with renameat2 (Linux) or a hard link; on file systems that have
    neither, an existence check just before the rename (a small window remains)."""
    function = _renameat2()
    if function is not None:
        result = function(  # type: ignore[operator]
            _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE
        )
        if result == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), os.fspath(target))
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), os.fspath(target))
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (
            errno.EPERM,
            errno.ENOTSUP,
            errno.EOPNOTSUPP,
            errno.EXDEV,
            errno.EMLINK,
        ):
            raise
        if os.path.lexists(target):
            raise FileExistsError(
                errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(target)
            ) from None
        os.rename(source, target)
        return
    os.unlink(source)


def place(
    temporary: str | os.PathLike[str], target: str | os.PathLike[str], *, replace: bool
) -> None:
    """Sync ``temporary`` to disk and rename it onto ``target`` (without ``replace``: only if
    ``target`` does not exist, else FileExistsError), then sync the folder."""
    sync_file(temporary)
    if replace:
        os.replace(temporary, target)
    else:
        rename_no_replace(temporary, target)
    _settled(Path(temporary))
    sync_folder(Path(target).parent)


@contextmanager
def atomic_output(target: str | os.PathLike[str], *, replace: bool = True) -> Iterator[Path]:
    """Yield a new empty temporary path beside ``target``; on success it is synced and renamed
    onto ``target`` (see ``place``), on any exception removed."""
    target = Path(target)
    temporary = create_temporary(target)
    mode = temporary.stat().st_mode
    try:
        yield temporary
        # Some writers (safetensors) replace the file with one of their own, mode 0600.
        os.chmod(temporary, mode)
        place(temporary, target, replace=replace)
    except BaseException:
        temporary.unlink(missing_ok=True)
        _settled(temporary)
        raise


class StagingFolder:
    """A hidden working folder beside the outputs (``.htsep-<owner>.<hex>``), removed by
    ``cleanup`` or, if this process is killed, by a later ``remove_stale``."""

    def __init__(self, parent: str | os.PathLike[str]) -> None:
        parent = Path(parent)
        owner = owner_tag()
        for _ in range(100):
            candidate = parent / f".htsep-{owner}.{secrets.token_hex(4)}"
            _claim(candidate)
            try:
                candidate.mkdir()
            except FileExistsError:
                _settled(candidate)  # someone else's
                continue
            self.path = candidate
            self.name = str(candidate)
            self._removed = False
            self.made: list[Path] = []  # folders made for it, removed with it if left empty
            return
        raise FileExistsError(errno.EEXIST, f"no free staging name in {parent}")

    def cleanup(self) -> None:
        if not self._removed:
            shutil.rmtree(self.path, ignore_errors=True)
            self._removed = True
            if not self.path.exists():
                _settled(self.path)
            remove_empty(self.made)


def remove_stale(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries and staging folders in ``folder`` (not below it) whose owner
    provably no longer runs. -> what was removed. A folder that cannot be listed removes
    nothing."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name) or _STAGING.match(entry.name)
        if match is None or _owner_alive(match.group(1)):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


_BLOCKED = (errno.EEXIST, errno.ENOTDIR, errno.ELOOP)


def make_folder(folder: str | os.PathLike[str]) -> list[Path]:
    """``mkdir -p folder`` -> the folders it made, outermost first. Where a part of the path
    is in the way (a file, a symbolic link to nothing, a link loop), the OSError says which
    part and why, not "File exists"."""
    path = Path(folder)
    missing = [part for part in [*reversed(path.parents), path] if not os.path.lexists(part)]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = in_the_way(path) if exc.errno in _BLOCKED else None
        if blocker is None:
            raise
        raise OSError(exc.errno, blocker) from None
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` (as ``make_folder`` returns them) that are empty, innermost
    first: what a failed write made and left with nothing in it."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone): its parents are not empty either


def real_path(path: str | os.PathLike[str]) -> Path:
    """The absolute path with every link resolved as far as they lead; unlike Path.resolve on
    Python 3.11, a link loop does not raise (the looping part is kept as it is)."""
    return Path(os.path.realpath(path))


def in_the_way(path: str | os.PathLike[str]) -> str | None:
    """Why the first existing part of ``path`` that is not a folder blocks making it ("x is a
    file, not a folder", "x is a named pipe (FIFO), not a folder", ...), or None when nothing
    does: a command can say so before its long work, not when it first writes."""
    path = Path(path)
    for part in [*reversed(path.parents), path]:
        if os.path.isdir(part):
            continue
        try:
            mode = os.lstat(part).st_mode
        except OSError:  # missing (or not to be seen): making it tells the rest
            return None
        if not stat.S_ISLNK(mode):
            return f"{part} is {_entry(mode)}, not a folder"
        broken = broken_link(part)
        if broken is not None:
            return f"{part} is {broken}"
        try:
            target = _entry(os.stat(part).st_mode)
        except OSError:
            target = "something else"
        return f"{part} is a symbolic link to {target}, not to a folder"
    return None


def _entry(mode: int) -> str:
    """What the entry of ``mode`` is, for messages: a regular file is "a file"."""
    return "a file" if stat.S_ISREG(mode) else kind_of(mode)


def broken_link(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with the symbolic link ``path`` ("a symbolic link loop", ...), or None
    when it leads to something (or is no link)."""
    try:
        os.stat(path)
    except OSError as exc:
        if not os.path.islink(path):
            return None
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        try:
            return f"a symbolic link to {os.readlink(path)}, which does not exist"
        except OSError:
            return "a symbolic link to nothing"
    return None


class FolderBusy(OSError):
    """Another process holds the folder's lock."""


@contextmanager
def folder_lock(folder: str | os.PathLike[str], *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` itself (flock on the folder, so that no lock file
    is left behind; the kernel drops it when the process ends, kill -9 included). FolderBusy
    if another process holds it (``wait``: wait for it instead); where the file system has no
    locks, nothing is locked."""
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise FolderBusy(errno.EWOULDBLOCK, "in use by another process", str(folder)) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        yield
    finally:
        os.close(handle)  # closing the last descriptor releases the lock


def kind_of(mode: int) -> str:
    """What a file system entry that is not a regular file is (from its ``st_mode``), for
    messages: "a folder", "a named pipe (FIFO)", ..."""
    kinds = [
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def not_a_stem_file(path: Path) -> str | None:
    """Why ``path`` can never hold a stem, found before the networks run: a name longer than
    its file system allows, or something other than a regular file there (a folder, a named
    pipe, a link to nothing), which neither --skip-existing nor --overwrite can take as a
    stem. None when it is a regular file, a link to one, or nothing yet."""
    folder = next(parent for parent in path.parents if os.path.isdir(parent))
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in path.parts[len(folder.parts) :]:  # those to be made (existing ones fit)
        size = len(os.fsencode(part))
        if 0 < limit < size:
            return (
                f"{path}: a name of {size} bytes in this path is longer than the file "
                f"system allows ({limit} bytes)"
            )
    try:
        mode = os.stat(path).st_mode
    except OSError:
        broken = broken_link(path)  # None when it is no link
        return f"{path} is {broken}, where a stem file goes" if broken else None
    if stat.S_ISREG(mode):
        return None
    kind = kind_of(mode)
    if os.path.islink(path):
        kind = f"a symbolic link to {kind}"
    return f"{path} is {kind}, where a stem file goes (move it away)"
