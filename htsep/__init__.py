"""htsep: music stem separation with Hybrid Transformer Demucs."""

from importlib.metadata import PackageNotFoundError, version

from htsep.checkpoint import load_model, save_model
from htsep.errors import CheckpointError, HtsepError, UnsupportedOptionError
from htsep.model.config import HTDemucsConfig
from htsep.model.htdemucs import HTDemucs
from htsep.separator import Separator

try:
    __version__ = version("htsep")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

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
