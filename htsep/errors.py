"""Exceptions a user can act on. The CLI maps each to a one-line message and an exit code."""


class HtsepError(Exception):
    """Base class of every error htsep reports to a user."""


class CheckpointError(HtsepError):
    """A checkpoint file is missing, unreadable, unsafe or does not fit the model it describes."""


class UnsupportedOptionError(CheckpointError):
    """A checkpoint asks for a model option htsep does not implement."""


class InputLengthError(HtsepError, ValueError):
    """A tensor given to the network is longer than the model's segment."""


class AudioError(HtsepError):
    """An audio file cannot be read or written (missing, empty, corrupt, unsupported, ...)."""


class ModelNotFoundError(HtsepError):
    """A model name, signature or path that resolves to nothing."""


class DownloadError(HtsepError):
    """A checkpoint could not be downloaded or failed its hash check."""


class UsageError(HtsepError):
    """Options that contradict each other or the model (e.g. a segment longer than the model's)."""


class DatasetError(HtsepError):
    """A dataset folder does not have the MUSDB18-HQ layout or its tracks do not agree."""
