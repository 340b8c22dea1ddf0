"""htsep: music stem separation with Hybrid Transformer Demucs.

The public names below are imported on first use, so that tools which need no network (the
synthetic dataset writer, ``htsep --version``) do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    __version__: str
    from htsep.checkpoint import load_model, save_model
    from htsep.errors import CheckpointError, HtsepError, UnsupportedOptionError
    from htsep.model.config import HTDemucsConfig
    from htsep.model.htdemucs import HTDemucs
    from htsep.separator import Separator

_HOMES = {
    "CheckpointError": "htsep.errors",
    "HTDemucs": "htsep.model.htdemucs",
    "HTDemucsConfig": "htsep.model.config",
    "HtsepError": "htsep.errors",
    "Separator": "htsep.separator",
    "UnsupportedOptionError": "htsep.errors",
    "load_model": "htsep.checkpoint",
    "save_model": "htsep.checkpoint",
}

__all__ = [
    "CheckpointError",
    "HTDemucs",
    "HTDemucsConfig",
    "HtsepError",
    "Separator",
    "UnsupportedOptionError",
    "__version__",
    "load_model",
    "save_model",
]


def _version() -> str:
    """The installed version. Looked up on first use: importlib.metadata takes 40 ms, and
    the command catches signals only once ``import htsep`` is done (``htsep.__main__``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("htsep")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
        globals()[name] = value
        return value
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'htsep' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
