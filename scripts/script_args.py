"""Argument types shared by the benchmark scripts: each refuses a bad value in argparse's one
error line (exit 2) before any work, instead of a traceback minutes later.

An empty value (an unset variable in a script) is refused by every type here.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def _text(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("empty value (an unset variable in a script?)")
    return value


def whole(low: int = 1, high: int | None = None) -> Callable[[str], int]:
    """A whole number from ``low`` to ``high`` (None: no bound)."""

    def parse(value: str) -> int:
        try:
            number = int(_text(value))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < low or (high is not None and number > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{number} is out of range ({bound})")
        return number

    return parse


def positive(high: float | None = None) -> Callable[[str], float]:
    """A finite number above 0 and at most ``high`` (None: no bound)."""

    def parse(value: str) -> float:
        try:
            number = float(_text(value))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not math.isfinite(number) or number <= 0 or (high is not None and number > high):
            bound = f"above 0 and at most {high:g}" if high is not None else "above 0"
            raise argparse.ArgumentTypeError(f"{value} is out of range ({bound})")
        return number

    return parse


def checkout(value: str) -> Path:
    """A folder holding an htsep package (a checkout or worktree of this repository): with
    any other folder, ``PYTHONPATH=<folder> python -m htsep`` would run the installed htsep
    and time it as the baseline."""
    path = Path(_text(value))
    if not (path / "htsep" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(
            f"{path} is not an htsep checkout (no htsep/__init__.py in it); make one with "
            "git worktree add <folder> <commit>"
        )
    return path


def new_file(value: str) -> Path:
    """A file to write: its folder must exist, and it must not be a folder itself."""
    path = Path(_text(value))
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder, not a file name")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.parent}: no such folder")
    return path


def folder(value: str) -> Path:
    """A folder to work in (made if missing): not an existing file."""
    path = Path(_text(value))
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    return path


def text(value: str) -> str:
    """Any text but an empty one."""
    return _text(value)
