"""Separating a batch of files: inputs -> planned outputs -> pipeline -> one report per track.

The command line's ``separate`` is a thin layer over this module; Python users get the same
guarantees (the whole batch planned before any work, nothing replaced without ``overwrite``,
resumable with ``skip_existing``, a bad file failing only its own track):

    from htsep import Separator
    from htsep.batch import Batch, OutputSettings, find_inputs

    separator = Separator("htdemucs")
    batch = Batch(separator, "separated", OutputSettings(format="flac", skip_existing=True))
    for track in batch.run(find_inputs(["album/"], exclude=batch.folder)):
        print(track.source, track.status, track.error or track.outputs)
"""

from __future__ import annotations

import base64
import errno
import glob
import itertools
import os
import re
import string
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from htsep import files
from htsep.errors import HtsepError, UsageError

if TYPE_CHECKING:  # the command line imports this module before it knows it needs torch
    from htsep.separator import PendingOutputs, ScannedFile, Separator


class OtherMethod(str, Enum):
    """The complement written beside ``two_stems``: the sum of the other stems (add), the mix
    minus the stem (minus), or none."""

    add = "add"
    minus = "minus"
    none = "none"


class ClipMode(str, Enum):
    """How stems are kept inside full scale: one gain for all stems of a track when any
    would clip (rescale), a hard clip at +-0.99 (clamp), or not at all (none)."""

    rescale = "rescale"
    clamp = "clamp"
    none = "none"


FORMATS = ("wav", "flac", "mp3")
TEMPLATE_FIELDS = ("track", "trackext", "stem", "ext", "folder")
DEFAULT_TEMPLATE = "{track}/{stem}.{ext}"


@dataclass(frozen=True)
class OutputSettings:
    """What a batch writes, and what it does with files that exist.

    format: wav, flac or mp3; bits: 16 or 24 (wav, flac) or 32 (float wav); two_stems: write
    this stem and its complement (``other_method``) only; template: the path of each stem
    below ``<out>/<model>``, from the fields {track}, {trackext}, {stem}, {ext} and {folder};
    overwrite: replace existing stem files; skip_existing: skip tracks whose stems all exist
    and finish those with some (their existing stems are kept); downmix: mix inputs with more
    channels than the model down to mono. Every field is checked when the settings are made.
    """

    format: str = "wav"
    bits: int = 16
    clip_mode: ClipMode | str = ClipMode.rescale
    two_stems: str | None = None
    other_method: OtherMethod | str = OtherMethod.add
    template: str = DEFAULT_TEMPLATE
    overwrite: bool = False
    skip_existing: bool = False
    mp3_bitrate: int = 320
    mp3_preset: int = 2
    downmix: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"format {self.format!r}: use {', '.join(FORMATS)}")
        allowed = {"wav": (16, 24, 32), "flac": (16, 24), "mp3": (16,)}[self.format]
        if type(self.bits) is not int or self.bits not in allowed:
            raise UsageError(
                f"{self.bits!r} bits cannot be written to {self.format} "
                f"({', '.join(map(str, allowed))})"
            )
        object.__setattr__(self, "clip_mode", _member(ClipMode, self.clip_mode, "clip mode"))
        method = _member(OtherMethod, self.other_method, "other method")
        object.__setattr__(self, "other_method", method)
        if self.two_stems is not None and (
            not isinstance(self.two_stems, str) or not self.two_stems.strip()
        ):
            raise UsageError(f"two stems {self.two_stems!r}: a stem name is expected")
        for name in ("overwrite", "skip_existing", "downmix"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if type(self.mp3_bitrate) is not int or not 8 <= self.mp3_bitrate <= 320:
            raise UsageError(f"mp3 bitrate must be 8 to 320 kbps, not {self.mp3_bitrate!r}")
        if type(self.mp3_preset) is not int or not 2 <= self.mp3_preset <= 7:
            raise UsageError(f"mp3 preset must be 2 (best) to 7 (fastest), not {self.mp3_preset!r}")
        check_template(self.template, self.format, 1)  # {stem} is checked once stems are known

    @property
    def ext(self) -> str:
        return self.format


def _member(kind: type[Enum], value: Any, what: str) -> Any:
    try:
        return kind(value.value if isinstance(value, Enum) else value)
    except ValueError:
        choices = ", ".join(item.value for item in kind)  # type: ignore[attr-defined]
        raise UsageError(f"{what} {value!r}: use {choices}") from None


@dataclass
class Track:
    """One input of a batch, with what became of it: status pending, ok, skipped or failed."""

    source: str  # as the user named it (or the file found under a folder or glob)
    path: Path | None
    error: str | None = None
    status: str = "pending"
    outputs: list[str] = field(default_factory=list)
    sample_rate: int | None = None
    duration: float | None = None
    seconds: float | None = None
    name: str | None = None  # the track's name when not its file's (stdin)
    folder: str = ""  # its folder below the folder argument it was found under ("" if named)
    # Later inputs that reached the same file (a.wav and ./a.wav, a link to it, its folder):
    # it is separated once, where it was first reached.
    aliases: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """How progress lines name the track."""
        name = self.name or (self.path.name if self.path is not None else self.source)
        return f"{self.folder}/{name}" if self.folder else name

    @property
    def speed(self) -> float | None:
        """Seconds of audio separated per second of work ("4.11x real time")."""
        return (self.duration / self.seconds) if self.seconds and self.duration else None

    def record(self, model: str) -> dict[str, Any]:
        """The track as one JSON object (``--json``). A path that is not UTF-8 (its undecodable
        bytes are lone surrogates in JSON, which most readers turn into U+FFFD) comes with its
        exact bytes in base64 too: ``input_bytes``, ``outputs_bytes``."""
        speed = self.speed
        record: dict[str, Any] = {
            "input": self.source,
            "outputs": self.outputs,
            "model": model,
            "sample_rate": self.sample_rate,
            "duration": self.duration,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "times_real_time": None if speed is None else round(speed, 2),
            "status": self.status,
            "error": self.error,
        }
        if not _utf8(self.source):
            record["input_bytes"] = _base64_path(self.source)
        if not all(map(_utf8, self.outputs)):
            record["outputs_bytes"] = [_base64_path(output) for output in self.outputs]
        return record

    def records(self, model: str) -> list[dict[str, Any]]:
        """``record``, then one for each alias (the same but for ``input`` and ``same_as``,
        the input that named the file first, with ``same_as_bytes`` when that is not UTF-8),
        so that every input has its record."""
        first = self.record(model)
        out = [first]
        for alias in self.aliases:
            record = {key: value for key, value in first.items() if key != "input_bytes"}
            record["input"], record["same_as"] = alias, self.source
            if not _utf8(alias):
                record["input_bytes"] = _base64_path(alias)
            if not _utf8(self.source):
                record["same_as_bytes"] = _base64_path(self.source)
            out.append(record)
        return out


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes of a file name
        return False
    return True


def _base64_path(text: str) -> str:
    return base64.b64encode(os.fsencode(text)).decode("ascii")


# --- inputs ----------------------------------------------------------------------------------


def find_inputs(patterns: Sequence[str | os.PathLike[str]], exclude: Path) -> list[Track]:
    """Files as given, folders searched recursively for audio, glob patterns expanded; in a
    stable order, each file once (another input that reaches it is one of its track's
    ``aliases``). Files found under a folder or pattern are never taken
    from ``exclude`` (the tree htsep writes, ``<out>/<model>``); files named directly are.
    An input that names nothing is a track with an error, so that the batch reports it."""
    from htsep.audio import AUDIO_EXTENSIONS, file_name

    if isinstance(patterns, (str, os.PathLike)):  # one input, not its letters
        patterns = [patterns]
    patterns = [file_name(pattern, "input") for pattern in patterns]
    exclude = files.real_path(exclude)
    tracks: list[Track] = []
    seen: dict[Path, Track] = {}

    def add(path: Path, source: str, root: Path | None = None) -> None:
        if source == "-":  # a file of that name, not standard input (whose name this is)
            source = "./-"
        key = files.real_path(path)
        if key in seen:
            seen[key].aliases.append(source)
            return
        relative = "" if root is None else path.parent.relative_to(root).as_posix()
        seen[key] = Track(source, path, folder="" if relative == "." else relative)
        tracks.append(seen[key])

    def audio_under(folder: Path) -> list[Path]:
        found = []
        for item in sorted(folder.rglob("*")):
            if item.suffix.lower() not in AUDIO_EXTENSIONS:
                continue
            # Hidden files and folders are not searched: htsep's own staging folders (whose
            # stems vanish as they are placed), .Trash, .git and the like.
            if any(part.startswith(".") for part in item.relative_to(folder).parts):
                continue
            if item.is_file() and not files.real_path(item).is_relative_to(exclude):
                found.append(item)
        return found

    def take(pattern: str) -> None:
        path = Path(pattern)
        if path.is_dir():
            found = audio_under(path)
            if not found:
                tracks.append(
                    Track(pattern, None, error=f"{pattern}: no audio files in this folder")
                )
            for file in found:
                add(file, str(file), root=path)
        elif path.exists():
            add(path, pattern)
        elif glob.has_magic(pattern):
            matches = [Path(m) for m in sorted(expand_pattern(pattern))]
            files_matched = [
                m for m in matches if m.is_file() and not files.real_path(m).is_relative_to(exclude)
            ]
            # A name part with "*" takes audio files only, as a folder's search ("music/*"
            # leaves cover.jpg), unless it spells the extension itself ("*.xyz": those files
            # were asked for); "?" and "[...]" pick names one character at a time ("[-]").
            asked = Path(path.name).suffix.lower()
            spelled = bool(asked) and not glob.has_magic(asked)
            named = [
                m
                for m in files_matched
                if "*" not in path.name
                or m.suffix.lower() in AUDIO_EXTENSIONS
                or (spelled and m.suffix.lower() == asked)
            ]
            below = [(f, m) for m in matches if m.is_dir() for f in audio_under(m)]
            if not named and not below:
                others = len(files_matched)
                problem = (
                    f"no audio files match this pattern ({others} other file"
                    f"{'s' if others > 1 else ''})"
                    if others
                    else "no files match this pattern"
                )
                tracks.append(Track(pattern, None, error=f"{pattern}: {problem}"))
            # Like a folder argument, a pattern keeps the layout below its part before the
            # first wildcard: "music/**/*.m4a" writes music/A/01.m4a as A/01, as "music" does
            # (two 01.m4a of different folders would otherwise share one track folder).
            fixed = Path(*itertools.takewhile(lambda part: not glob.has_magic(part), path.parts))
            taken = set()  # "music/**" gives music/A/01.wav, and again in music/ and music/A/
            for file, root in [(file, fixed) for file in named] + below:
                if file not in taken:
                    taken.add(file)
                    add(file, str(file), root=root)
        else:
            problem = files.broken_link(path) or "no such file or folder"
            tracks.append(Track(pattern, None, error=f"{pattern}: {problem}"))

    for item in patterns:
        pattern = os.fspath(item)
        if not pattern.strip():
            raise UsageError("an input is an empty string (an unset variable in a script?)")
        try:
            take(pattern)
        except (OSError, RuntimeError) as exc:
            # A name too long for the file system, a folder that cannot be listed, a symlink
            # loop (RuntimeError before Python 3.13): that input fails, the others go on.
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            tracks.append(Track(pattern, None, error=f"{pattern}: {reason}"))
    return tracks


def expand_pattern(pattern: str) -> set[str]:
    """``glob.glob(pattern, recursive=True)``, except that ``**`` does not descend into links
    to folders, as a folder argument is not searched through them: glob's ``**`` followed
    them, so a link to a folder above it gave every file again 40 levels deep (until the
    path was too long), and two such links ran for hours. A pattern's other parts, and its
    part before ``**``, follow links as glob does; hidden names match only a part that
    starts with a dot, as in glob."""
    parts = pattern.split("/")
    if "**" not in parts:
        return set(glob.glob(pattern))
    at = parts.index("**")
    head, rest = "/".join(parts[:at]), "/".join(parts[at + 1 :])
    if at and not head:  # "/**/...": the root folder
        head = "/"
    found: set[str] = set()
    for base in glob.glob(head) if head else [""]:
        if base and not os.path.isdir(base):
            continue
        for folder in _folders_below(base):
            if rest:
                found |= expand_pattern(os.path.join(glob.escape(folder), rest))
            else:  # a final "**": the folders and the files in them, as glob gives them
                if folder:
                    found.add(os.path.join(folder, ""))
                with os.scandir(folder or ".") as entries:
                    found |= {os.path.join(folder, e.name) for e in entries if _plain_file(e)}
    return found


def _folders_below(base: str) -> list[str]:
    """``base`` and every folder below it, not hidden and not through a link to a folder
    (``os.walk`` does not follow them); named relative to ``base`` as given ("" is the current
    folder, whose subfolders are then named without "./")."""
    found = []
    for root, subfolders, _ in os.walk(base or ".", followlinks=False):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found.append(root if base else os.path.relpath(root))
    return ["" if folder == "." and not base else folder for folder in found]


def _plain_file(entry: os.DirEntry[str]) -> bool:
    """A file that is not hidden (or a link to one), as a final ``**`` matches it."""
    try:
        return not entry.name.startswith(".") and entry.is_file()
    except OSError:
        return False


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N), 1 <= K <= N, in plain ASCII digits (int() would also take "1_0",
    " 2" and other scripts' digits)."""
    match = re.fullmatch(r"([0-9]+)/([0-9]+)", text)
    if match is None:
        raise UsageError(f"--shard {text!r}: expected K/N (e.g. 1/4) or auto")
    if any(len(number.lstrip("0")) > 9 for number in match.groups()):
        raise UsageError(f"--shard {text!r}: too large (at most 999999999 slices)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 1 <= index <= count:
        raise UsageError(f"--shard {text!r}: need 1 <= K <= N")
    return index, count


def take_shard(tracks: list[Track], index: int, count: int) -> list[Track]:
    """Every count-th input starting at the index-th: slices that cover the list exactly once."""
    return tracks[index - 1 :: count]


# --- shards of a job: SLURM arrays, torchrun, srun ------------------------------------------


@dataclass(frozen=True)
class Shard:
    """The slice of the inputs one process takes (``take_shard``): the index-th of count,
    1-based, and where that came from ("torchrun rank 2 of 8"; "" when given as K/N)."""

    index: int
    count: int
    origin: str = ""


@dataclass(frozen=True)
class _Ranks:
    """This process among the processes of one launch (torchrun or srun)."""

    rank: int
    world: int
    local_rank: int | None  # on its machine: the GPU it takes
    launcher: str  # "torchrun" or "srun"

    @property
    def origin(self) -> str:
        noun = "rank" if self.launcher == "torchrun" else "task"
        return f"{self.launcher} {noun} {self.rank} of {self.world}"


_AUTO = "--shard auto"
_NOTHING_FOUND = (
    f"{_AUTO}: found no SLURM array task (SLURM_ARRAY_TASK_ID), torchrun rank (RANK, "
    "WORLD_SIZE) or srun task (SLURM_PROCID, SLURM_STEP_NUM_TASKS) in the environment; "
    "give --shard K/N"
)


def shard_from_environment(environ: Mapping[str, str]) -> Shard:
    """This process's shard in a job, read from its environment (pass ``os.environ``).

    A SLURM job array gives each array task its place among the tasks: from
    SLURM_ARRAY_TASK_ID, _MIN, _MAX and _STEP (``--array=0-15:2`` is 8 tasks), checked
    against _COUNT when it is set (the ids of a list such as ``--array=1,3,7`` are not evenly
    spaced, so a task cannot know its place: refused); with _COUNT alone the ids are 0 to
    count - 1. Several processes of one launch take their rank: torchrun's RANK of
    WORLD_SIZE, else srun's SLURM_PROCID of SLURM_STEP_NUM_TASKS (only inside an srun step:
    a batch script has SLURM_PROCID=0 whatever its task count). Both together (torchrun in
    every task of an array) make array tasks x ranks slices, rank fastest, so that together
    the processes cover every input exactly once. Nothing found, a value that is not a
    whole number, or values that contradict each other: UsageError."""
    array = _array_task(environ)
    ranks = _ranks(environ)
    if array is None and ranks is None:
        raise UsageError(_NOTHING_FOUND)
    position, tasks, origin = array if array is not None else (0, 1, "")
    if ranks is None:
        return Shard(position + 1, tasks, origin)
    return Shard(
        position * ranks.world + ranks.rank + 1,
        tasks * ranks.world,
        f"{origin}, {ranks.origin}" if origin else ranks.origin,
    )


def shard_device(device: str | None, environ: Mapping[str, str]) -> str | None:
    """The device of one of several processes on a machine (``--shard auto`` under torchrun
    or srun): cuda:<local rank> (LOCAL_RANK, or srun's SLURM_LOCALID) when ``device`` is None
    or plain "cuda" and CUDA is available; otherwise ``device`` unchanged (an explicit cuda:N,
    cpu or mps wins; without CUDA the default device stays). An srun task that sees a single
    GPU takes it (``srun --gpus-per-task=1`` leaves each task its own as cuda:0). A local
    rank without a GPU of its own is a UsageError."""
    ranks = _ranks(environ)
    if ranks is None or ranks.local_rank is None or device not in (None, "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    visible = torch.cuda.device_count()
    if ranks.launcher == "srun" and visible == 1:
        return "cuda:0"
    if ranks.local_rank >= visible:
        variable = "LOCAL_RANK" if ranks.launcher == "torchrun" else "SLURM_LOCALID"
        raise UsageError(
            f"{_AUTO}: {variable}={ranks.local_rank} has no GPU of its own ({visible} CUDA "
            f"device{'s' if visible != 1 else ''} visible); start at most {visible} "
            "processes per machine, or give --device"
        )
    return f"cuda:{ranks.local_rank}"


def _array_task(environ: Mapping[str, str]) -> tuple[int, int, str] | None:
    """(position among the array's tasks from 0, number of tasks, description), or None
    outside a job array."""
    task = whole_variable(environ, "SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    first = whole_variable(environ, "SLURM_ARRAY_TASK_MIN")
    last = whole_variable(environ, "SLURM_ARRAY_TASK_MAX")
    step = whole_variable(environ, "SLURM_ARRAY_TASK_STEP")
    count = whole_variable(environ, "SLURM_ARRAY_TASK_COUNT")
    if (first is None) != (last is None):
        given, missing = ("MIN", "MAX") if last is None else ("MAX", "MIN")
        raise UsageError(
            f"{_AUTO}: SLURM_ARRAY_TASK_{given} is set without SLURM_ARRAY_TASK_{missing}"
        )
    if count == 0:
        raise UsageError(f"{_AUTO}: SLURM_ARRAY_TASK_COUNT=0 with SLURM_ARRAY_TASK_ID={task}")
    if first is None or last is None:
        if count is None:
            raise UsageError(
                f"{_AUTO}: SLURM_ARRAY_TASK_ID={task} without SLURM_ARRAY_TASK_MIN and _MAX "
                "or SLURM_ARRAY_TASK_COUNT: the array's size is unknown"
            )
        first, last, step = 0, count - 1, 1  # ids 0 .. count - 1
    step = 1 if step is None else step
    spread = f"{first}-{last}" + (f":{step}" if step != 1 else "")
    if step < 1:
        raise UsageError(f"{_AUTO}: SLURM_ARRAY_TASK_STEP=0: the step is at least 1")
    if not first <= task <= last:
        raise UsageError(f"{_AUTO}: SLURM_ARRAY_TASK_ID={task} is outside the array {spread}")
    if (last - first) % step or (task - first) % step:
        bad = "the array's span" if (last - first) % step else f"task {task}"
        raise UsageError(f"{_AUTO}: step {step} does not divide {bad} (array {spread})")
    tasks = (last - first) // step + 1
    if count is not None and count != tasks:
        raise UsageError(
            f"{_AUTO}: SLURM array of {count} tasks with ids from {first} to {last} that are "
            "not evenly spaced (a list such as --array=1,3,7): this task cannot tell its "
            f"place; submit a range (--array=0-{count - 1}) or give --shard K/N"
        )
    return (task - first) // step, tasks, f"SLURM array task {task} in {spread}"


def _ranks(environ: Mapping[str, str]) -> _Ranks | None:
    """torchrun's RANK of WORLD_SIZE (its LOCAL_RANK), else srun's SLURM_PROCID of
    SLURM_STEP_NUM_TASKS (its SLURM_LOCALID); None for a process launched alone. torchrun
    comes first: started by srun on several machines, it numbers all their processes."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        names = ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_STEP_NUM_TASKS" in environ:
        names = ("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
    else:
        return None
    launcher, rank_name, world_name, local_name = names
    rank = whole_variable(environ, rank_name)
    world = whole_variable(environ, world_name)
    if rank is None or world is None:
        given, missing = (rank_name, world_name) if world is None else (world_name, rank_name)
        raise UsageError(f"{_AUTO}: {given} is set without {missing}")
    if world < 1 or rank >= world:
        raise UsageError(f"{_AUTO}: {rank_name}={rank} is not a rank of {world_name}={world}")
    local_rank = whole_variable(environ, local_name)
    if local_rank is not None and local_rank >= world:
        raise UsageError(f"{_AUTO}: {local_name}={local_rank} with {world_name}={world}")
    return _Ranks(rank, world, local_rank, launcher)


def whole_variable(environ: Mapping[str, str], name: str, context: str = _AUTO) -> int | None:
    """The variable as a whole number >= 0, None when it is not set. Strict: launchers write
    plain digits, so anything else (empty, signed, spaced) was written by hand, wrongly.
    ``context``: what the error lines start with (the option or command reading it)."""
    value = environ.get(name)
    if value is None:
        return None
    if not value.strip():
        raise UsageError(f"{context}: {name} is empty (an unset variable in a script?)")
    if not re.fullmatch(r"[0-9]+", value):
        raise UsageError(f"{context}: {name}={value!r}: expected a whole number")
    if len(value.lstrip("0")) > 9:
        raise UsageError(f"{context}: {name}={value}: too large")
    return int(value)


# --- outputs ---------------------------------------------------------------------------------


def output_folder(out: str | os.PathLike[str], model: str) -> Path:
    """``<out>/<model>``, the tree a batch writes (a model name never leaves it)."""
    if model in ("", ".", "..") or any(sep in model for sep in "/\\\0"):
        raise UsageError(f"model name {model!r} cannot name an output folder")
    return Path(out) / model


def check_template(template: str, ext: str, stems: int) -> None:
    """A --filename template: plain {track}, {trackext}, {stem}, {ext} and {folder} fields
    only, a relative path that stays inside <out>/<model> with no "." or ".." part, ending
    in the format's extension, and naming {stem} when more than one stem is written."""
    what = f"--filename {template!r}"
    if not isinstance(template, str) or not template.strip():
        raise UsageError("--filename is empty")
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template)]
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None
    for field_name, spec, conversion in parsed:
        if field_name is None:
            continue
        if field_name not in TEMPLATE_FIELDS or spec or conversion:
            raise UsageError(
                f"{what}: only the plain fields {{track}}, {{trackext}}, {{stem}}, {{ext}} and "
                "{folder} are "
                f"available, not {{{field_name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}}"
            )
    sample = template.format(track="t", trackext="wav", stem="s", ext=ext, folder="f")
    relative = Path(sample)
    if relative.is_absolute() or os.path.normpath(sample).split(os.sep)[0] == "..":
        raise UsageError(f"{what}: must be a relative path inside <out>/<model>")
    if any(part in (".", "..") for part in _components(sample)):
        # Resolved by the file system, not by text: "x/../" after a symlinked folder x leads
        # wherever x points, out of <out>/<model>.
        raise UsageError(f"{what}: '.' and '..' cannot be parts of the path")
    if relative.suffix.lower() != f".{ext}":
        raise UsageError(
            f"{what}: must end with .{{ext}} (here .{ext}), e.g. {{track}}/{{stem}}.{{ext}}"
        )
    if stems > 1 and "stem" not in _template_fields(template):
        raise UsageError(f"{what}: {stems} stems would go to one file; add {{stem}}")


def _components(path: str) -> list[str]:
    """The parts of ``path`` as written ("a/./b" -> a, ., b; pathlib would drop the ".")."""
    for sep in {os.sep, os.altsep} - {None, "/"}:
        path = path.replace(sep, "/")  # type: ignore[arg-type]
    return path.split("/")


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def track_name(path: Path) -> tuple[str, str]:
    """(track, trackext) of an input file: its name without and with only the extension.
    A name that is only dots before its extension (``..wav``) keeps its whole name, so that
    no track is called ``.`` or ``..``."""
    base, dot, suffix = path.name.rpartition(".")
    if not dot:
        return path.name, ""
    if not base.strip("."):
        return path.name, suffix
    return base, suffix


@dataclass(frozen=True)
class OutputPlan:
    """Where a track's stems go, and which existing ones a resumed track keeps."""

    paths: dict[str, Path]
    keep: frozenset[str] = frozenset()


def output_paths(
    tracks: list[Track], settings: OutputSettings, names: list[str], folder: Path
) -> dict[int, dict[str, Path]]:
    """The stem files of every track that names a file (failed ones too), from the template.
    A template that leads out of ``folder``, or two tracks (or two stems) that would write one
    file, are a UsageError. -> {track index: {stem: path}}"""
    template = settings.template
    check_template(template, settings.ext, len(names))
    owners: dict[Path, str] = {}
    paths_of: dict[int, dict[str, Path]] = {}
    for index, track in enumerate(tracks):
        if track.path is None:  # an input that named nothing
            continue
        base, suffix = track_name(track.path) if track.name is None else (track.name, "")
        # Files found under a folder argument keep their place below it: before the template's
        # path, or where it says {folder}.
        below = folder if "folder" in _template_fields(template) else folder / track.folder
        fields = dict(track=base, trackext=suffix, ext=settings.ext, folder=track.folder or ".")
        paths = {stem: below / template.format(stem=stem, **fields) for stem in names}
        for stem in names:
            # A whole part "{folder}" is "." for a file named directly (harmless); any other
            # "." or ".." a track's values make (".{folder}", "{trackext}." with no
            # extension) is refused as check_template refuses one in the template's text.
            parts = [
                part
                for piece in _components(template)
                if piece != "{folder}"
                for part in _components(piece.format(stem=stem, **fields))
            ]
            if any(part in (".", "..") for part in parts):
                raise UsageError(
                    f"--filename {template!r}: for {track.source} it gives "
                    f"{_shown(paths[stem])!r}, "
                    "with '.' or '..' as a part of the path"
                )
        for stem, path in paths.items():
            try:
                os.fsencode(path)
            except UnicodeEncodeError:  # a stem or model name this file system cannot spell
                encoding = sys.getfilesystemencoding()
                raise UsageError(
                    f"{_shown(path)!r} cannot be a file name here (the file system encoding is "
                    f"{encoding}): run with a UTF-8 locale, e.g. LC_ALL=C.UTF-8"
                ) from None
            # The sample values check_template tried are not every track's: {folder} is "."
            # for a file named directly and {trackext} empty for a name without one, so
            # ".{folder}" or "{trackext}/..." can still lead out of <out>/<model>.
            inside = Path(os.path.normpath(path))
            if os.path.normpath(folder) not in map(str, inside.parents):
                raise UsageError(
                    f"--filename {template!r}: for {track.source} it gives {_shown(path)!r}, "
                    "outside <out>/<model>"
                )
            key = Path(os.path.abspath(path))
            if key in owners:
                other = owners[key]
                raise UsageError(
                    f"--filename {template!r}: {_shown(path)} would be written for both "
                    f"{other} and {track.source}"
                    + (_clash_hint(other, track) if other != track.source else f" (stem {stem})")
                )
            owners[key] = track.source
        paths_of[index] = paths
    return paths_of


# A stem name no file name holds: paths made with it are equal for two tracks exactly when
# they are equal for every stem name put in its place.
_ANY_STEM = "\0"


def _shown(path: Path) -> str:
    """A path of ``output_paths`` as messages show it: {stem} where the stem is any."""
    return str(path).replace(_ANY_STEM, "{stem}")


def check_track_clashes(tracks: list[Track], settings: OutputSettings, folder: Path) -> None:
    """Two tracks that would write one file, or a template that leads out of ``folder``, as a
    UsageError, before the model is known (nor loaded or downloaded). Every input counts, also
    those another --shard takes: a clash is one whatever slice a process runs."""
    output_paths(tracks, settings, [_ANY_STEM], folder)


def _clash_hint(other: str, track: Track) -> str:
    """Why two inputs can share their stems' paths, when it is that they share a name."""
    if track.folder or track.path is None or Path(other).name != track.path.name:
        return ""
    return (
        " (files of one name from different folders: name the folder that holds them "
        "instead, and its subfolders are kept below <out>/<model>)"
    )


def plan_outputs(
    tracks: list[Track], settings: OutputSettings, names: list[str], folder: Path
) -> dict[int, OutputPlan]:
    """The stem files of every track, before any work (``output_paths``). A track whose
    outputs would replace an input fails, and so does one with a stem name too long for its
    file system or something other than a file (a folder, a FIFO) at a stem path; with
    skip_existing a finished track is skipped and an unfinished one keeps its finished stems;
    without overwrite an existing stem fails its track. -> {track index: plan}"""
    paths_of = output_paths(tracks, settings, names, folder)
    inputs = {files.real_path(t.path) for t in tracks if t.path is not None}
    plans: dict[int, OutputPlan] = {}
    for index, paths in paths_of.items():
        track = tracks[index]
        if track.error is not None:  # failed already (an earlier plan of the same tracks)
            continue
        clash = next((p for p in paths.values() if files.real_path(p) in inputs), None)
        if clash is not None:
            track.error = f"{track.source}: output {clash} would overwrite an input file"
            continue
        problem = next(filter(None, map(files.not_a_stem_file, paths.values())), None)
        if problem is not None:
            track.error = f"{track.source}: {problem}"
            continue
        # A symbolic link to a stem file counts as that file (kept, or replaced by a file).
        existing = [stem for stem, path in paths.items() if os.path.isfile(path)]
        if settings.skip_existing and len(existing) == len(paths):
            track.status = "skipped"
            track.outputs = [str(p) for p in paths.values()]
            continue
        if existing and not (settings.overwrite or settings.skip_existing):
            track.error = (
                f"{track.source}: {paths[existing[0]]} exists (use --overwrite to replace it "
                "or --skip-existing to skip finished tracks)"
            )
            continue
        keep = frozenset() if settings.overwrite else frozenset(existing)
        plans[index] = OutputPlan(paths, keep)
    return plans


# --- running ---------------------------------------------------------------------------------


class BatchEvents:
    """What a running batch tells its caller; override what you need (these do nothing).

    Calls come from the thread that called ``Batch.run``. ``finished`` comes once per track, in
    input order, when its files are complete (or it failed or was skipped); with the pipeline
    the last encoding of a track may end while the next one is being separated.
    """

    def started(self, index: int, track: Track, seconds: float) -> None:
        """The networks start on track ``index``, ``seconds`` long."""

    def progress(self, index: int, seconds: float) -> None:
        """``seconds`` more of track ``index`` went through the networks."""

    def separated(self, index: int) -> None:
        """The networks are done with track ``index`` (its files may still be encoding)."""

    def finished(self, index: int, track: Track) -> None:
        """Track ``index`` is done: ``track.status`` is ok, skipped or failed."""


# What a track can fail on besides an HtsepError: the machine's limits, not a bug.
_EXHAUSTED = {
    errno.EMFILE: "too many open files (raise `ulimit -n`)",
    errno.ENFILE: "too many open files on this system",
    errno.ENOMEM: "out of memory",
}


def _track_failure(exc: Exception) -> HtsepError | None:
    """``exc`` as the failure of one track (the batch goes on), or None for a bug, which
    stops the batch: running out of memory or of file descriptors is the former."""
    from htsep.devices import out_of_memory

    if isinstance(exc, HtsepError):
        return exc
    if out_of_memory(exc):
        return HtsepError("out of memory (use a shorter --segment, or free memory)")
    if isinstance(exc, OSError) and exc.errno in _EXHAUSTED:
        return HtsepError(_EXHAUSTED[exc.errno])
    if isinstance(exc, FileNotFoundError) and _no_current_folder():
        return HtsepError("the current folder was removed: relative paths lead nowhere now")
    return None


def _no_current_folder() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


class Batch:
    """Separates tracks with one Separator into ``<out>/<model>``, in input order.

    ``run`` plans the whole batch's outputs first (a clash is a UsageError before any work),
    removes what killed runs left in the output folders, then separates. With ``pipeline``,
    the next track's first pass (decoding, checks, statistics) and the previous track's final
    encoding (the rescale pass) run in two background threads while the networks separate
    the current track, and where the runner makes full calls (CUDA) the room in a track's
    last network calls goes to the next track's first chunks, with the same stems. A track
    that fails is reported and the batch goes on; an interruption stops the background work
    and leaves no half-written file.
    """

    def __init__(
        self,
        separator: Separator,
        out: str | os.PathLike[str],
        settings: OutputSettings | None = None,
        *,
        pipeline: bool = True,
        events: BatchEvents | None = None,
    ) -> None:
        from htsep.audio import file_name
        from htsep.separator import Separator

        if not isinstance(separator, Separator):
            raise UsageError(f"separator must be an htsep.Separator, not {separator!r}")
        if settings is not None and not isinstance(settings, OutputSettings):
            raise UsageError(f"settings must be OutputSettings or None, not {settings!r}")
        if not isinstance(pipeline, bool):
            raise UsageError(f"pipeline must be True or False, not {pipeline!r}")
        if events is not None and not isinstance(events, BatchEvents):
            raise UsageError(f"events must be BatchEvents or None, not {events!r}")
        self.separator = separator
        self.settings = settings if settings is not None else OutputSettings()
        self.folder = output_folder(file_name(out, "output folder"), separator.name)
        self.names = separator.output_names(
            self.settings.two_stems, OtherMethod(self.settings.other_method).value
        )
        check_template(self.settings.template, self.settings.ext, len(self.names))
        self.pipeline = pipeline
        self.events = events if events is not None else BatchEvents()

    def plan(self, tracks: list[Track]) -> dict[int, OutputPlan]:
        """The outputs of every track (see ``plan_outputs``)."""
        return plan_outputs(tracks, self.settings, self.names, self.folder)

    def run(self, tracks: Sequence[Track | str | os.PathLike[str]]) -> list[Track]:
        """Separate ``tracks`` (Track objects, or paths, folders and patterns to find them);
        -> the tracks with their status, outputs and errors."""
        if isinstance(tracks, bytes):
            raise UsageError("expected an input path (str or os.PathLike), not bytes")
        if isinstance(tracks, (str, os.PathLike, Track)):  # one input, not its letters
            tracks = [tracks]
        if not isinstance(tracks, Iterable):
            raise UsageError(f"expected input paths or Tracks, not {tracks!r}")
        found: list[Track] = []
        for item in tracks:
            if not isinstance(item, (str, os.PathLike, Track)):
                raise UsageError(f"expected an input path (str or os.PathLike), not {item!r}")
            found.extend([item] if isinstance(item, Track) else find_inputs([item], self.folder))
        every = output_paths(found, self.settings, self.names, self.folder)
        plans = self.plan(found)
        # What killed runs left: staging folders and temporaries beside the stems (of every
        # track, skipped and failed ones too: a run killed after a track's last stem left its
        # staging folder there), decoded inputs in the temporary folder (never a live
        # process's files).
        folders = {path.parent for paths in every.values() for path in paths.values()}
        for parent in sorted(folders) + [Path(tempfile.gettempdir())]:
            files.remove_stale(parent)
        try:
            with _Run(self, found, plans) as running:
                running.run()
        except _EventFailed as failed:
            raise failed.error.with_traceback(failed.error.__traceback__) from None
        return found


class _EventFailed(BaseException):
    """An exception of a BatchEvents method, carried through the batch untouched."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Run:
    """One ``Batch.run``: the tracks in order, with the background decoder and encoder."""

    def __init__(self, batch: Batch, tracks: list[Track], plans: dict[int, OutputPlan]) -> None:
        self.batch, self.tracks, self.plans = batch, tracks, plans
        self.separator, self.settings, self.events = batch.separator, batch.settings, batch.events
        self.scans: dict[int, Future[ScannedFile | None]] = {}
        # The track being encoded: index, future (None without the pipeline), pending, start.
        self.encoding: tuple[int, Future[float] | None, PendingOutputs, float] | None = None
        self.stop = threading.Event()
        from htsep.devices import serial_torch_thread  # torch is loaded by now

        # torch's CPU operators run serially on the helper threads (``serial_torch_thread``).
        # Each track's encoding gets a thread of its own, which ends with it (``_encode``).
        self.decoder: ThreadPoolExecutor | None = None
        self.encoder: ThreadPoolExecutor | None = None
        if batch.pipeline:
            self.decoder = ThreadPoolExecutor(1, "htsep-decode", serial_torch_thread)

    def run(self) -> None:
        self._plan(0)
        for index in range(len(self.tracks)):
            self._plan(index + 1)  # before this one runs, so that its decoding can start
            if index in self.plans:
                self._separate(index)
            else:
                self._collect()
                self._report(index)
        self._collect()

    def _plan(self, index: int) -> None:
        """Start the first pass of track ``index`` in the background, if it is to run."""
        if index in self.plans and self.decoder is not None:
            self.scans[index] = self.decoder.submit(self._scan, index)

    def _scan(self, index: int) -> ScannedFile | None:
        """The track's first pass; None once the batch is stopping, when no one will use it."""
        if self.stop.is_set():
            return None
        path = self.tracks[index].path
        assert path is not None
        from htsep.separator import ScannedFile

        return ScannedFile.open(self.separator, path, self.settings.downmix)

    def _separate(self, index: int) -> None:
        track = self.tracks[index]
        started = time.perf_counter()
        scanned = None
        try:
            future = self.scans.pop(index, None)
            scanned = future.result() if future is not None else self._scan(index)
            assert scanned is not None
            pending = self._run_networks(index, scanned)
        except BaseException as exc:
            # Ours now (popped from self.scans): its descriptor and decoded temporary go,
            # whatever stopped the track (a stem that appeared meanwhile, a callback).
            if scanned is not None:
                scanned.close()
            failure = _track_failure(exc) if isinstance(exc, Exception) else None
            if failure is None:
                raise
            self._collect()
            self._fail(index, failure)
            self._report(index)
            return
        try:
            track.sample_rate = pending.sample_rate
            track.duration = pending.frames / pending.sample_rate
            # The track before is reported first. Its finished() may raise (or Ctrl-C come)
            # while this track's staging folder is held here alone, so drop it then.
            self._collect()
        except BaseException:
            pending.discard()
            raise
        # From here __exit__ drops the staging folder (after the encoder has stopped).
        self.encoding = (index, None, pending, started)
        if not self.batch.pipeline:
            self._collect()
            return
        from htsep.devices import serial_torch_thread

        self.encoder = ThreadPoolExecutor(1, "htsep-encode", serial_torch_thread)
        try:
            encoded = self.encoder.submit(self._encode, pending, True)
        finally:
            self.encoder.shutdown(wait=False)  # the thread ends once the job is done
        self.encoding = (index, encoded, pending, started)

    def _run_networks(self, index: int, scanned: ScannedFile) -> PendingOutputs:
        from htsep.separator import write_stems

        settings, plan = self.settings, self.plans[index]
        duration = scanned.frames / scanned.sample_rate
        scanned.fill_from(lambda: self._next_file(index))
        self._tell(self.events.started, index, self.tracks[index], duration)
        pending = None
        try:
            pending = write_stems(
                self.separator,
                scanned,
                plan.paths,
                overwrite=settings.overwrite,
                keep=plan.keep,
                two_stems=settings.two_stems,
                other_method=OtherMethod(settings.other_method).value,
                clip_mode=ClipMode(settings.clip_mode).value,
                bits=settings.bits,
                mp3_bitrate=settings.mp3_bitrate,
                mp3_preset=settings.mp3_preset,
                progress=lambda done: self._progress(index, done * duration),
            )
            return pending
        finally:
            try:
                self._tell(self.events.separated, index)
            except BaseException:
                if pending is not None:  # its staging folder would stay behind
                    pending.discard()
                raise

    def _next_file(self, index: int) -> ScannedFile | None:
        """The first pass of the track after ``index``, once done, if that track runs next
        and its pass succeeded: its first chunks may fill this track's last network calls.
        A failure stays in the future, for that track to report in its turn. Without the
        pipeline, tracks run one at a time: None."""
        future = self.scans.get(index + 1)
        if future is None:
            return None
        try:
            return future.result()
        except Exception:
            return None

    def _encode(self, pending: PendingOutputs, beside: bool = False) -> float:
        """``beside``: on a helper thread, beside the network calls (``yield_to_helper``)."""
        if beside:
            from htsep.devices import yield_to_helper

            yield_to_helper()
        pending.finish(self.stop)
        return time.perf_counter()

    def _progress(self, index: int, seconds: float) -> None:
        """Pass progress on; report the track encoded in the background once it is done."""
        self._tell(self.events.progress, index, seconds)
        if self.encoding is not None and self.encoding[1] is not None and self.encoding[1].done():
            self._collect()

    def _collect(self) -> None:
        """Wait for the track being encoded, and report it."""
        if self.encoding is None:
            return
        index, future, pending, started = self.encoding
        self.encoding = None
        track = self.tracks[index]
        if self.encoder is not None:
            self.encoder.shutdown(wait=True)  # the job done, its thread (and team) gone
            self.encoder = None
        try:
            finished = self._encode(pending) if future is None else future.result()
        except Exception as exc:
            failure = _track_failure(exc)
            if failure is None:
                raise
            self._fail(index, failure)
            # The stems that are complete all the same (kept from a run cut short, or put in
            # place before the failure): --skip-existing keeps them.
            plan = self.plans[index]
            done = {*pending.placed, *(plan.paths[stem] for stem in plan.keep)}
            track.outputs = [str(path) for path in plan.paths.values() if path in done]
        else:
            track.seconds = finished - started
            track.status = "ok"
            track.outputs = [str(path) for path in self.plans[index].paths.values()]
        self._report(index)

    def _fail(self, index: int, exc: HtsepError) -> None:
        track, message = self.tracks[index], str(exc)
        assert track.path is not None
        # Messages name the file read; the track is named as given (``-`` for stdin, whose
        # file is a spooled temporary).
        name = str(track.path)
        track.error = (
            track.source + message[len(name) :]
            if message.startswith(name + ":")
            else f"{track.source}: {message}"
        )

    def _report(self, index: int) -> None:
        track = self.tracks[index]
        if track.error is not None:
            track.status = "failed"
        self._tell(self.events.finished, index, track)

    @staticmethod
    def _tell(event: Any, *args: Any) -> None:
        """Call the caller's ``event``; what it raises stops the batch as it is (wrapped, so
        that no track takes it for its own failure: an HtsepError raised in finished() for one
        track failed the track being separated)."""
        try:
            event(*args)
        except Exception as exc:
            raise _EventFailed(exc) from exc

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc: object) -> None:
        """On an interruption or error: stop the background work, drop what it left."""
        self.stop.set()
        if isinstance(exc[1], BaseException) and not isinstance(exc[1], Exception):
            # Ctrl-C or a signal: a decode in the background (an ffmpeg that reads a slow or
            # endless input) is stopped rather than waited for. Not on an error: that would
            # stop the decodes of other batches of this process too.
            from htsep.audio import stop_decoders

            stop_decoders()
        for executor in (self.decoder, self.encoder):
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
        for future in self.scans.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                scanned = future.result()
                if scanned is not None:
                    scanned.close()
        if self.encoding is not None:
            self._settle_encoding()

    def _settle_encoding(self) -> None:
        """What the track being encoded when the batch stopped did, as its record will say
        (its finished() is not called: the batch is stopping): ok if every file was put in
        place meanwhile (a record of "interrupted" with no outputs said otherwise while all
        its stems were there), else the stems it completed; then its staging goes."""
        assert self.encoding is not None
        index, future, pending, started = self.encoding
        self.encoding = None
        track, plan = self.tracks[index], self.plans[index]
        try:
            ended = future is not None and future.done() and not future.cancelled()
            if ended and future is not None and future.exception() is None:
                track.status, track.seconds = "ok", future.result() - started
                track.outputs = [str(path) for path in plan.paths.values()]
                return
            done = {*pending.placed, *(plan.paths[stem] for stem in plan.keep)}
            track.outputs = [str(path) for path in plan.paths.values() if path in done]
        finally:
            pending.discard()
