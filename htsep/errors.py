"""Exceptions a user can act on. The CLI maps each to a one-line message and an exit code."""


class HtsepError(Exception):
    """Base class of every error htsep reports to a user."""


class CheckpointError(HtsepError):
    """A checkpoint file is missing, unreadable, unsafe or does not fit the model it describes."""


class UnsupportedOptionError(CheckpointError):
    """A checkpoint asks for a model option htsep does not implement."""


class InputError(HtsepError, ValueError):
    """A tensor given to the network that it cannot take: its shape, dtype or device."""


class InputLengthError(InputError):
    """A tensor given to the network is longer than the model's segment."""


class AudioError(HtsepError):
    """An audio file cannot be read or written (missing, empty, corrupt, unsupported, ...)."""


class ModelNotFoundError(HtsepError):
    """A model name, signature or path that resolves to nothing."""


class DownloadError(HtsepError):
    """A checkpoint could not be downloaded or failed its hash check.

    ``problem`` says what went wrong. When the file can be had another way, ``file_name`` is
    its name in the download cache and the message ends with ``advice`` for Python callers; a
    command line says ``problem`` with its own advice instead.
    """

    def __init__(
        self, problem: str, *, file_name: str | None = None, advice: str | None = None
    ) -> None:
        super().__init__(f"{problem}; {advice}" if advice else problem)
        self.problem, self.file_name = problem, file_name


class UsageError(HtsepError):
    """Options that contradict each other or the model (e.g. a segment longer than the model's)."""


class DatasetError(HtsepError):
    """A dataset folder does not have the MUSDB18-HQ layout or its tracks do not agree."""
