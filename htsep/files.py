"""Writing files so that readers only ever see a complete file: a temporary beside the target,
renamed over it once written."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new empty temporary path beside ``target``; on success it is renamed onto
    ``target``, on any exception removed. Unlike ``tempfile.mkstemp`` (mode 0600) the file gets
    the permissions the umask gives any new file, so the result is readable as usual."""
    target = Path(target)
    temporary = create_temporary(target)
    mode = temporary.stat().st_mode
    try:
        yield temporary
        # Some writers (safetensors) replace the file with one of their own, mode 0600.
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def create_temporary(target: Path) -> Path:
    """A new empty hidden file beside ``target``, with the umask's usual permissions."""
    for _ in range(100):
        candidate = target.parent / f".{target.name[:200]}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name in {target.parent}")
