"""The public separation API: a model (or bag) from the zoo, applied to tensors or files.

from htsep import Separator
separator = Separator("htdemucs", shifts=1)
stems = separator.separate_file("song.wav")       # {"drums": (C, T), ...} at the file's rate
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from htsep import files, zoo
from htsep.apply import (
    ChunkOptions,
    NetworkRunner,
    ProgressCallback,
    SeparationStream,
    mix_statistics,
    plan_bag,
    segment_samples,
    zero_extended,
)
from htsep.audio import AudioReader, AudioWriter, file_name, read_audio
from htsep.checkpoint import load_model
from htsep.devices import (
    DeviceSlot,
    auto_batch_size,
    bf16_arithmetic,
    keep_freed_memory,
    own_arithmetic,
    parse_device,
)
from htsep.errors import AudioError, HtsepError, UsageError
from htsep.model.config import show_number
from htsep.model.htdemucs import HTDemucs
from htsep.model.kernels import cpu_products
from htsep.resample import ResampledSignal

logger = logging.getLogger(__name__)

BLOCK_FRAMES = 1 << 18  # samples per block when streaming (about 6 s at 44.1 kHz)


PRECISIONS = ("fp32", "bf16", "fp16")
# Bounds of the settings: beyond them a value is a typo or an unset variable, not a choice.
MAX_SHIFTS = 100
MAX_BATCH_SIZE = 1024
# Seconds: every chunk costs a whole network call, however short.
MIN_SEGMENT = Fraction(zoo.MIN_SEGMENT_SECONDS)
MAX_SEED = 2**63 - 1
# Chunks over one sample (1 / (1 - overlap)) beyond which --overlap is warned about: at 0.99999,
# one network call per sample step, hours for a second of audio.
_MANY_CHUNKS = 20
# Sample rates accepted for tensors and files, as for the resampler's bounds.
MIN_RATE, MAX_RATE = 1000, 384000
# separate_tensor holds the whole track (and its stems) in memory; beyond this it must stream.
MAX_TENSOR_SECONDS = 6 * 3600
MAX_CHANNELS = 64
# How errors name the downmix option for Python callers (the command line's is --downmix).
API_DOWNMIX = "downmix=True"


def _integer(value: Any, what: str, low: int, high: int) -> int:
    """``value`` as an int in [low, high]; integral floats are accepted, bools and text not."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UsageError(f"{what} must be an integer, not {value!r}")
    if isinstance(value, (float, np.floating)) and not (
        math.isfinite(value) and float(value).is_integer()
    ):
        raise UsageError(f"{what} must be an integer, not {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise UsageError(f"{what} must be in {low}..{high}, not {number}")
    return number


def _real(value: Any, what: str) -> float:
    """``value`` as a finite float; bools and text are refused."""
    if isinstance(value, bool) or not isinstance(
        value, (int, float, Fraction, np.integer, np.floating)
    ):
        raise UsageError(f"{what} must be a number, not {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int or Fraction beyond float's range
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise UsageError(f"{what} must be a finite number, not {shown}") from None
    if not math.isfinite(number):
        raise UsageError(f"{what} must be a finite number, not {value!r}")
    return number


def check_sample_rate(rate: Any, what: str = "sample rate") -> int:
    """A sample rate in Hz: an integer in MIN_RATE..MAX_RATE."""
    return _integer(rate, what, MIN_RATE, MAX_RATE)


@dataclass(frozen=True)
class Settings:
    """The separation settings, checked: what ``Separator`` accepts beyond the model."""

    shifts: int = 1
    overlap: float = 0.25
    split: bool = True
    segment: Fraction | None = None
    seed: int = 0
    batch_size: int | None = None
    precision: str = "fp32"
    stems: tuple[str, ...] | None = None

    @classmethod
    def check(
        cls,
        *,
        shifts: Any = 1,
        overlap: Any = 0.25,
        split: Any = True,
        segment: Any = None,
        seed: Any = 0,
        batch_size: Any = None,
        precision: Any = "fp32",
        stems: Any = None,
    ) -> Settings:
        """Check every value's type and range (UsageError naming the option) before any work."""
        shifts = _integer(shifts, "shifts", 0, MAX_SHIFTS)
        overlap = _real(overlap, "overlap")
        if not 0 <= overlap < 1:
            raise UsageError(f"overlap must be in [0, 1), got {show_number(overlap)}")
        if not isinstance(split, bool):
            raise UsageError(f"split must be True or False, not {split!r}")
        if segment is not None:
            seconds = _real(segment, "segment")
            if seconds <= 0:
                raise UsageError(f"segment must be positive, got {show_number(seconds)}")
            segment = (
                Fraction(segment)
                if isinstance(segment, (int, Fraction))
                else (Fraction(str(seconds)))
            )
            if segment < MIN_SEGMENT:
                raise UsageError(
                    f"segment {show_number(seconds)} s is too short "
                    f"(at least {float(MIN_SEGMENT):g} s)"
                )
        seed = _integer(seed, "seed", 0, MAX_SEED)
        if batch_size is not None:
            batch_size = _integer(batch_size, "batch size", 1, MAX_BATCH_SIZE)
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise UsageError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        if stems is not None:
            if isinstance(stems, str):
                stems = [stems]  # one stem, not its letters
            if not isinstance(stems, Sequence) or not all(isinstance(s, str) for s in stems):
                raise UsageError(f"stems must be a list of stem names, not {stems!r}")
            stems = tuple(dict.fromkeys(stems))
            if not stems:
                raise UsageError("no stems requested")
        return cls(shifts, overlap, split, segment, seed, batch_size, precision, stems)


class Bag:
    """The networks a separation runs: the members of a model or bag that carry weight for
    the wanted stems, loaded, each with its weights per source (see ``apply.plan_bag``).

    sources: the model's sources; stems: the wanted ones; members: (network, weights) of the
    members that run; sample_rate, audio_channels: theirs; segment: the longest chunk every
    running member takes, in seconds.
    """

    def __init__(
        self, spec: zoo.ModelSpec, stems: Sequence[str] | None = None, *, progress: bool = True
    ) -> None:
        self.spec, self.name = spec, spec.name
        self._progress = progress
        self._models: list[HTDemucs | None] = [None] * len(spec.members)
        self.sources = list(spec.sources) if spec.sources else self._discover_sources()
        if spec.weights is not None and any(len(row) != len(self.sources) for row in spec.weights):
            raise UsageError(f"model {self.name}: bag weights do not match its sources")
        wanted = list(self.sources) if stems is None else list(stems)
        unknown = [stem for stem in wanted if stem not in self.sources]
        if unknown:
            raise UsageError(
                f"model {self.name} has no source {', '.join(map(repr, unknown))} "
                f"(it has {', '.join(self.sources)})"
            )
        self.stems = wanted
        weights = spec.weights or tuple((1.0,) * len(self.sources) for _ in spec.members)
        running, plan = plan_bag(weights, [self.sources.index(stem) for stem in wanted])
        self.members = [(self.model(index), row) for index, row in zip(running, plan, strict=True)]
        # Where each running member stands in the bag: the shift trick's random delays are
        # drawn for every member, running or not, so that a member's are those of a whole run.
        self.places = list(running)
        first = self.members[0][0]
        self.sample_rate, self.audio_channels = first.sample_rate, first.audio_channels
        for index, (model, _) in zip(running, self.members, strict=True):
            # One input feeds every member: demucs refuses such bags too.
            if (model.sample_rate, model.audio_channels) != (self.sample_rate, self.audio_channels):
                raise UsageError(
                    f"model {self.name}: member {self.spec.members[index].signature} takes "
                    f"{_layout(model)} audio, member {self.spec.members[running[0]].signature} "
                    f"{_layout(first)}"
                )
        if spec.segment is not None:
            for model, _ in self.members:
                _apply_bag_segment(model, spec.segment)
        self.segment = min(model.segment for model, _ in self.members)

    def model(self, index: int) -> HTDemucs:
        """Member ``index`` of the model's description (downloaded and loaded once)."""
        model = self._models[index]
        if model is None:
            model = self._fetch(index)
        if model.sources != self.sources:
            raise UsageError(
                f"model {self.name}: member {self.spec.members[index].signature} has sources "
                f"{', '.join(model.sources)}, the bag {', '.join(self.sources)}"
            )
        return model

    def _fetch(self, index: int) -> HTDemucs:
        member = self.spec.members[index]
        for other, loaded in zip(self.spec.members, self._models, strict=True):
            if loaded is not None and other == member:  # listed twice: one network in memory
                self._models[index] = loaded
                return loaded
        path = zoo.fetch(member, progress=self._progress)
        model = self._models[index] = load_model(path)
        logger.info("loaded %s from %s", member.signature, path)
        return model

    def _discover_sources(self) -> list[str]:
        """Sources of a bag whose description does not list them: those of the first member
        that loads (a member that is never needed may be missing or broken)."""
        first_error: HtsepError | None = None
        for index in range(len(self.spec.members)):
            try:
                return list((self._models[index] or self._fetch(index)).sources)
            except HtsepError as exc:
                first_error = first_error or exc
        assert first_error is not None
        raise first_error

    def to_model_layout(
        self, audio: torch.Tensor, downmix: bool, option: str = "--downmix"
    ) -> torch.Tensor:
        """audio (C, T) -> (audio_channels, T): mono is repeated, ``downmix`` mixes more
        channels than the model takes down to mono first. ``option``: how the error names
        the downmix option (the command line's flag, or the Python keyword)."""
        channels = audio.shape[0]
        if downmix and channels > self.audio_channels:
            audio = audio.mean(0, keepdim=True)
            channels = 1
        if channels == self.audio_channels:
            return audio
        if channels == 1:
            return audio.expand(self.audio_channels, -1)
        raise AudioError(
            f"{channels} audio channels, the model takes {self.audio_channels}; "
            f"pass {option} to mix them down to mono first"
        )


class Separator:
    """A named model, a checkpoint file or a bag, with the separation settings.

    stems: the sources wanted (None: all). With a bag whose members serve single sources,
    only the members needed for them are downloaded and run. keep_memory: trade a higher
    resident size for speed (``devices.keep_freed_memory``; it tunes this process's malloc).
    """

    def __init__(
        self,
        model: str = zoo.DEFAULT_MODEL,
        *,
        repo: str | os.PathLike[str] | None = None,
        device: str | None = None,
        shifts: int = 1,
        overlap: float = 0.25,
        split: bool = True,
        segment: float | Fraction | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        precision: str = "fp32",
        stems: Sequence[str] | None = None,
        progress: bool = True,
        keep_memory: bool = False,
    ) -> None:
        settings = Settings.check(
            shifts=shifts,
            overlap=overlap,
            split=split,
            segment=segment,
            seed=seed,
            batch_size=batch_size,
            precision=precision,
            stems=stems,
        )
        if not isinstance(model, (str, os.PathLike)):
            raise UsageError(f"model must be a name or a checkpoint path, not {model!r}")
        if repo is not None and not isinstance(repo, (str, os.PathLike)):
            raise UsageError(f"repo must be a folder path, not {repo!r}")
        _flag(progress, "progress")
        _flag(keep_memory, "keep_memory")
        self.device = parse_device(device)
        if settings.precision == "fp16" and self.device.type != "cuda":
            raise UsageError("--precision fp16 needs a CUDA device (use bf16 or fp32 here)")
        if settings.precision == "bf16" and self.device.type == "cpu" and not bf16_arithmetic():
            raise UsageError(
                "--precision bf16: this CPU has no bfloat16 arithmetic (AVX512-BF16, AMX or Arm "
                "BF16), so it would run many times slower than fp32; use fp32 here"
            )
        if self.device.type == "cpu":
            cpu_products()  # a bad HTSEP_CPU_PRODUCTS is refused before any work
        self.shifts = settings.shifts
        self.seed = settings.seed
        self.spec = zoo.find_model(model, repo=None if repo is None else os.fspath(repo))
        self.bag = Bag(self.spec, settings.stems, progress=progress)
        self.name, self.sources, self.stems = self.bag.name, self.bag.sources, self.bag.stems
        self.sample_rate, self.audio_channels = self.bag.sample_rate, self.bag.audio_channels
        # Off the CPU the members stay on the host and take turns on the device.
        self.slot = None if self.device.type == "cpu" else DeviceSlot(self.device)
        limit = self.bag.segment
        segment = settings.segment
        if segment is not None and segment > limit:
            raise UsageError(
                f"--segment {show_number(float(segment))} is longer than the model's "
                f"segment ({float(limit):g} s)"
            )
        if settings.split:
            # Chunks are cut every (1 - overlap) x chunk samples, rounded down.
            chunk = min(segment_samples(model, segment) for model, _ in self.bag.members)
            step = int((1 - settings.overlap) * chunk)
            if step < 1:
                raise UsageError(
                    f"--overlap {show_number(settings.overlap)} leaves no step between chunks "
                    f"of {chunk} samples; use a smaller overlap"
                )
            if chunk / step > _MANY_CHUNKS:  # allowed, as by demucs, but rarely meant
                logger.warning(
                    "--overlap %s puts every sample through about %d chunks, %d times the "
                    "network calls of the default 0.25",
                    show_number(settings.overlap),
                    round(chunk / step),
                    round(chunk / step / 1.3333),
                )
        self.options = ChunkOptions(
            segment=segment,
            overlap=settings.overlap,
            split=settings.split,
            precision=settings.precision,
            batch_size=settings.batch_size or auto_batch_size(self.device, settings.precision),
            release_memory=not (keep_memory and keep_freed_memory()),
        )
        # Shared by every track: a batch size halved after running out of memory stays halved.
        self.runner = NetworkRunner(
            self.device, self.options.precision, self.options.batch_size, self.slot
        )

    @property
    def members_running(self) -> int:
        """How many networks run per track (after skipping unneeded bag members)."""
        return len(self.bag.members)

    # --- separation ------------------------------------------------------------------------

    def separate_tensor(
        self,
        audio: torch.Tensor,
        sample_rate: int | None = None,
        *,
        downmix: bool = False,
        progress: ProgressCallback | None = None,
        all_sources: bool = False,
    ) -> dict[str, torch.Tensor]:
        """audio: (C, T) at ``sample_rate`` (default: the model's) -> {stem: (C', T)}.

        Stems come back at the input's rate, length and channel count (mono in, mono out;
        downmix: the mono mix of all channels). Only the requested stems are returned unless
        ``all_sources``: the others then come from the members that ran (see plan_bag).
        """
        _flag(downmix, "downmix")
        _flag(all_sources, "all_sources")
        _check_progress(progress)
        rate = self.sample_rate if sample_rate is None else check_sample_rate(sample_rate)
        audio = _as_audio_tensor(audio, max_frames=MAX_TENSOR_SECONDS * rate)
        channels, length = audio.shape
        if not downmix and channels not in (1, self.audio_channels) and channels > length:
            raise AudioError(
                f"{channels} audio channels of {length} samples, the model takes "
                f"{self.audio_channels}: pass (channels, time) audio if it is (time, channels), "
                f"or {API_DOWNMIX} to mix the channels down to mono"
            )
        # The file path's engine over the tensor: one block of the whole length.
        scanned = ScannedFile(self, _TensorReader(audio, rate), downmix=downmix, option=API_DOWNMIX)
        with StreamedTrack(
            self, scanned, progress=progress, all_sources=all_sources, block=length
        ) as track:
            ((_, stems),) = list(track)
        del track, scanned  # the model-rate stems they hold, before the copies below
        return {name: _own_storage(stem) for name, stem in stems.items()}

    def separate_file(
        self,
        path: str | os.PathLike[str],
        *,
        downmix: bool = False,
        progress: ProgressCallback | None = None,
        all_sources: bool = False,
    ) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """Read ``path`` whole and separate it. -> (mix (C, T), sample rate, {stem: (C', T)})

        Holds the track in memory; ``separate_file_to`` streams it to files instead.
        """
        _check_progress(progress)
        audio, rate = read_audio(_file_path(path))
        if not MIN_RATE <= rate <= MAX_RATE:
            raise AudioError(f"{os.fspath(path)}: {_rate_problem(rate)}")
        try:
            stems = self.separate_tensor(
                audio, rate, downmix=downmix, progress=progress, all_sources=all_sources
            )
        except AudioError as exc:
            raise AudioError(f"{os.fspath(path)}: {exc}") from None
        return audio, rate, stems

    def stream_file(
        self,
        path: str | os.PathLike[str] | ScannedFile,
        *,
        downmix: bool = False,
        progress: ProgressCallback | None = None,
        all_sources: bool = False,
        block: int = BLOCK_FRAMES,
    ) -> StreamedTrack:
        """Separate ``path`` (or a file ``ScannedFile.open`` has read) in bounded memory: the
        returned track yields (mix, stems) blocks in order, equal to ``separate_file``'s output
        sliced (up to float rounding)."""
        _check_progress(progress)
        if isinstance(path, ScannedFile):
            scanned = path
        else:
            scanned = ScannedFile.open(self, path, downmix, option=API_DOWNMIX)
        try:
            return StreamedTrack(
                self, scanned, progress=progress, all_sources=all_sources, block=block
            )
        except BaseException:
            scanned.close()
            raise

    def separate_file_to(
        self,
        path: str | os.PathLike[str] | ScannedFile,
        outputs: Mapping[str, str | os.PathLike[str]],
        **options: Any,
    ) -> tuple[int, int]:
        """Separate ``path`` and write the stems named in ``outputs`` (stem -> file), streaming;
        the options are ``write_stems``'s. -> (sample rate, frames)"""
        pending = write_stems(self, path, outputs, **options)
        pending.finish()
        return pending.sample_rate, pending.frames

    def output_names(self, two_stems: str | None = None, other_method: str = "add") -> list[str]:
        """The stems a file separation can write: the requested stems, or with ``two_stems``
        that stem and its complement (``no_<stem>`` for add, ``minus_<stem>`` for minus)."""
        if two_stems is None:
            return list(self.stems)
        if not isinstance(two_stems, str):
            raise UsageError(f"two_stems must be a stem name or None, not {two_stems!r}")
        if not isinstance(other_method, str):
            raise UsageError(f"other method {other_method!r}: use add, minus or none")
        if two_stems not in self.sources:
            raise UsageError(
                f"model {self.name} has no source {two_stems!r} (it has {', '.join(self.sources)})"
            )
        complement = {"add": [f"no_{two_stems}"], "minus": [f"minus_{two_stems}"], "none": []}
        if other_method not in complement:
            raise UsageError(f"other method {other_method!r}: use add, minus or none")
        return [two_stems, *complement[other_method]]


def write_stems(
    separator: Separator,
    path: str | os.PathLike[str] | ScannedFile,
    outputs: Mapping[str, str | os.PathLike[str]],
    *,
    two_stems: str | None = None,
    other_method: str = "add",
    clip_mode: str = "rescale",
    bits: int = 16,
    mp3_bitrate: int = 320,
    mp3_preset: int = 2,
    downmix: bool = False,
    overwrite: bool = False,
    keep: Collection[str] = (),
    progress: ProgressCallback | None = None,
) -> PendingOutputs:
    """Separate ``path`` (or a file ``ScannedFile.open`` has read) with ``separator`` and
    stream the stems named in ``outputs`` (stem -> file) to disk,
    up to the networks' end: the files are complete after ``finish()``.

    With ``two_stems``, ``outputs`` may also name ``no_<stem>`` (sum of the other stems) or
    ``minus_<stem>`` (mix minus the stem). Every file is written atomically and synced to
    disk. Without ``overwrite`` a file that exists when it would be put in place is never
    replaced: the track fails instead. ``keep``: stems of ``outputs`` whose existing files
    are kept as they are (a resumed track); they still count for the rescale gain. With
    ``clip_mode`` rescale the stems first go to float files in a staging folder beside the
    outputs, since the gain depends on the whole track; ``finish()`` then applies the gain
    and encodes the final files. It needs no network, so it may run in another thread.
    """
    try:
        _flag(overwrite, "overwrite")
        _flag(downmix, "downmix")
        _check_progress(progress)
        targets = _check_outputs(separator, outputs, two_stems, other_method, keep)
        # A stem to keep whose file is not there (yet) is written like the others.
        keep = [name for name in keep if os.path.lexists(targets[name])]
        source = path.name if isinstance(path, ScannedFile) else _file_path(path)
        for name, target in targets.items():
            if source and _same_file(target, source):
                raise UsageError(f"output of {name!r}, {target}, is the input file")
            # Whatever overwrite says, as the command line: a folder, a named pipe or a link
            # to nothing where the file goes, before the networks run.
            problem = files.not_a_stem_file(target)
            if problem is not None:
                raise AudioError(problem)
        if not overwrite:
            _refuse_existing(targets, keep)
        if clip_mode not in ("rescale", "clamp", "none"):
            raise UsageError(f"clip mode {clip_mode!r}: use rescale, clamp or none")
        mp3_bitrate = _integer(mp3_bitrate, "mp3_bitrate", 8, 320)
        mp3_preset = _integer(mp3_preset, "mp3_preset", 2, 7)
    except BaseException:
        # A file scanned for this call is this call's to close, whatever happens (its reader
        # may hold a decoded temporary of the input).
        if isinstance(path, ScannedFile):
            path.close()
        raise
    settings: dict[str, Any] = dict(bits=bits, mp3_bitrate=mp3_bitrate, mp3_preset=mp3_preset)
    track = separator.stream_file(
        path,
        downmix=downmix,
        progress=progress,
        all_sources=two_stems is not None and f"no_{two_stems}" in targets,
    )
    with track:
        for target in targets.values():  # a bad format or rate fails before the networks
            AudioWriter(target, track.sample_rate, track.out_channels, **settings)
        written = {name: target for name, target in targets.items() if name not in keep}
        # A set that replaces existing files is placed all at once (``_Replacement``); new
        # files go in place one by one, and a track cut short keeps those it finished.
        replacing = overwrite and any(os.path.lexists(target) for target in written.values())
        if clip_mode != "rescale":
            done = PendingOutputs(track.sample_rate, track.frames)
            if replacing:
                replacement = _Replacement(written)
                try:
                    _write_blocks(
                        track,
                        replacement.held,
                        two_stems,
                        clip_mode,
                        settings,
                        overwrite=True,
                        labels={name: str(target) for name, target in written.items()},
                    )
                    replacement.place(done.placed)
                finally:
                    replacement.cleanup()
                return done
            made = _make_folders(written.values())
            try:
                _write_blocks(track, written, two_stems, clip_mode, settings, overwrite=overwrite)
            except BaseException:
                for chain in made:  # the folders of a track that failed, if left empty
                    files.remove_empty(chain)
                raise
            done.placed.extend(written.values())
            return done
        staging = _staging_folder(next(iter(targets.values())))
        try:
            staged = {name: staging.path / f"{name}.wav" for name in targets}
            labels = {name: str(target) for name, target in targets.items()}
            peak = _write_blocks(
                track, staged, two_stems, "none", {"bits": 32}, overwrite=True, labels=labels
            )
        except BaseException:
            staging.cleanup()
            raise
        pending = PendingOutputs(track.sample_rate, track.frames)
        pending.stage(
            staging,
            staged,
            written,
            1 / max(1.01 * peak, 1.0),
            settings,
            overwrite=overwrite,
            replacing=replacing,
        )
        return pending


def _check_outputs(
    separator: Separator,
    outputs: Mapping[str, str | os.PathLike[str]],
    two_stems: str | None,
    other_method: str,
    keep: Collection[str],
) -> dict[str, Path]:
    """outputs as {stem: Path}, or a UsageError naming what is wrong with it."""
    if not isinstance(outputs, Mapping) or not outputs:
        raise UsageError("outputs must be a non-empty mapping of stem names to files")
    separator.output_names(two_stems, other_method)  # checks two_stems and other_method
    if isinstance(keep, str) or not isinstance(keep, Collection):
        raise UsageError(f"keep must be a collection of stem names, not {keep!r}")
    if not all(isinstance(name, str) for name in keep):
        raise UsageError(f"keep must hold stem names, not {list(keep)!r}")
    if two_stems is None:
        known = list(separator.stems)
    else:  # both complements can be written at once
        known = [two_stems, f"no_{two_stems}", f"minus_{two_stems}"]
    unknown = [name for name in outputs if name not in known]
    if unknown:
        raise UsageError(
            f"no stem {', '.join(map(repr, unknown))} to write (available: {', '.join(known)})"
        )
    targets: dict[str, Path] = {}
    for name, target in outputs.items():
        targets[name] = Path(file_name(target, f"{name!r} output file"))
    paths = [os.path.abspath(target) for target in targets.values()]
    if len(set(paths)) != len(paths):
        raise UsageError("two stems are to be written to the same file")
    extra = [name for name in keep if name not in targets]
    if extra:
        raise UsageError(f"keep names stems that are not outputs: {', '.join(extra)}")
    return targets


def _refuse_existing(targets: dict[str, Path], keep: Collection[str]) -> None:
    """Fail early on an output that exists already (it is checked again, atomically, when
    each file is put in place)."""
    for name, target in targets.items():
        if name not in keep and os.path.lexists(target):
            raise AudioError(f"{target}: exists already; not replaced")


def _make_folders(targets: Collection[Path]) -> list[list[Path]]:
    """The folders of ``targets``, made -> the folders made, per target (``make_folder``)."""
    made = []
    for target in targets:
        try:
            made.append(files.make_folder(target.parent))
        except OSError as exc:
            for chain in made:
                files.remove_empty(chain)
            raise AudioError(
                f"{target}: cannot create folder {target.parent}: {exc.strerror or exc}"
            ) from None
    return made


def _staging_folder(first: Path) -> files.StagingFolder:
    """A hidden folder beside the outputs, for the float stems of a track; the folders made
    for it go with it if the track leaves them empty."""
    try:
        made = files.make_folder(first.parent)
    except OSError as exc:
        raise AudioError(
            f"{first}: cannot create folder {first.parent}: {exc.strerror or exc}"
        ) from None
    try:
        staging = files.StagingFolder(first.parent)
    except OSError as exc:
        files.remove_empty(made)
        raise AudioError(
            f"{first}: cannot write in {first.parent}: {exc.strerror or exc}"
        ) from None
    staging.made = made
    return staging


class EncodingStopped(HtsepError):
    """``PendingOutputs.finish`` was told to stop; no final file was written."""


class PendingOutputs:
    """A separated track whose final files may still have to be written: with clip mode
    rescale, float stems wait in a staging folder for the track's gain."""

    def __init__(self, sample_rate: int, frames: int) -> None:
        self.sample_rate, self.frames = sample_rate, frames
        # The final files put in place so far, in order (a track that fails part of the way
        # through has written these).
        self.placed: list[Path] = []
        self._staging: files.StagingFolder | None = None
        self._work: tuple[dict[str, Path], dict[str, Path], float, dict[str, Any]] | None = None
        self._overwrite = self._replacing = False

    def stage(
        self,
        staging: files.StagingFolder,
        staged: dict[str, Path],
        outputs: dict[str, Path],
        gain: float,
        settings: dict[str, Any],
        *,
        overwrite: bool,
        replacing: bool = False,
    ) -> None:
        """``replacing``: the outputs replace existing files, and are placed all at once."""
        self._staging, self._work = staging, (staged, outputs, gain, settings)
        self._overwrite, self._replacing = overwrite, replacing

    def finish(self, stop: threading.Event | None = None) -> None:
        """Write the final files (scaled by the track's gain), atomically, then drop the
        staging folder. New files go in place one by one; files that replace an existing set
        are all encoded first, then put in place together, so that a failure leaves the old
        set whole. ``stop`` set: stop between blocks, leave no final file of this call
        half-written, and raise EncodingStopped."""
        replacement = None
        try:
            if self._work is None:
                return
            staged, outputs, gain, settings = self._work
            if self._replacing:
                replacement = _Replacement(outputs)
            for name, target in outputs.items():
                with (
                    AudioReader(staged[name]) as reader,
                    AudioWriter(
                        target if replacement is None else replacement.held[name],
                        self.sample_rate,
                        reader.channels,
                        replace=self._overwrite,
                        label=str(target),
                        **settings,
                    ) as writer,
                ):
                    for start in range(0, reader.frames, BLOCK_FRAMES):
                        if stop is not None and stop.is_set():
                            raise EncodingStopped(f"{target}: stopped before it was complete")
                        writer.write(
                            reader.read(start, min(BLOCK_FRAMES, reader.frames - start)) * gain
                        )
                if replacement is None:
                    self.placed.append(target)
            if replacement is not None:
                replacement.place(self.placed)
        finally:
            if replacement is not None:
                replacement.cleanup()
            self.discard()

    def discard(self) -> None:
        """Drop the staging folder (the final files not yet written stay unwritten)."""
        self._work = None
        if self._staging is not None:
            self._staging.cleanup()
            self._staging = None


class _Replacement:
    """Final files that replace an existing set, held back until every one is complete: each
    is encoded into a hidden staging folder beside its target, and only then are they all
    renamed into place (a rename takes no space). A disk that fills at the second stem thus
    leaves the old set whole, not new and old stems mixed (which --skip-existing would take
    for a finished track)."""

    def __init__(self, targets: dict[str, Path]) -> None:
        self.targets = targets
        self.held: dict[str, Path] = {}
        self._folders: dict[str, files.StagingFolder] = {}
        try:
            for name, target in targets.items():
                parent = os.path.abspath(target.parent)
                if parent not in self._folders:  # one per folder: a rename stays in its file system
                    self._folders[parent] = _staging_folder(target)
                self.held[name] = self._folders[parent].path / target.name
        except BaseException:
            self.cleanup()
            raise

    def place(self, placed: list[Path]) -> None:
        """Rename every held file onto its target, appending each to ``placed``."""
        for name, target in self.targets.items():
            try:
                files.place(self.held[name], target, replace=True)
            except OSError as exc:
                raise AudioError(f"{target}: cannot put in place: {exc.strerror or exc}") from None
            placed.append(target)

    def cleanup(self) -> None:
        for folder in self._folders.values():
            folder.cleanup()


def _write_blocks(
    track: StreamedTrack,
    outputs: dict[str, Path],
    two_stems: str | None,
    clip_mode: str,
    settings: dict[str, Any],
    *,
    overwrite: bool,
    labels: dict[str, str] | None = None,
) -> float:
    """Write every block of ``track`` to ``outputs`` (errors name ``labels`` instead of the
    files, when given); -> the largest absolute sample written."""
    peak = 0.0
    with contextlib.ExitStack() as stack:
        writers = {
            name: stack.enter_context(
                AudioWriter(
                    path,
                    track.sample_rate,
                    track.out_channels,
                    replace=overwrite,
                    label=None if labels is None else labels[name],
                    **settings,
                )
            )
            for name, path in outputs.items()
        }
        for mix, stems in track:
            final = _final_stems(stems, mix, list(outputs), two_stems)
            if clip_mode == "clamp":
                final = {name: stem.clamp(-0.99, 0.99) for name, stem in final.items()}
            for name, writer in writers.items():
                writer.write(final[name])
                peak = max(peak, float(final[name].abs().max()))
    return peak


def _final_stems(
    stems: dict[str, torch.Tensor], mix: torch.Tensor, names: list[str], two_stems: str | None
) -> dict[str, torch.Tensor]:
    """The stems named in ``names``: model stems, ``no_<stem>`` or ``minus_<stem>``. With
    ``two_stems`` the complement's name means the complement, even where the model has a
    source of that name (which is then one of the stems summed), as in demucs."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if two_stems is not None and name == f"no_{two_stems}":
            out[name] = sum(v for k, v in stems.items() if k != two_stems)  # type: ignore[assignment]
        elif two_stems is not None and name == f"minus_{two_stems}":
            target = stems[two_stems]
            layout = mix if mix.shape[0] == target.shape[0] else mix.mean(0, keepdim=True)
            out[name] = layout - target
        elif name in stems:
            out[name] = stems[name]
        else:
            raise KeyError(name)
    return out


class _StemBuffer:
    """Random reads over a stream of model-rate stems, for reads whose starts never go back."""

    def __init__(self, take: Callable[[int], torch.Tensor], length: int, shape: tuple[int, ...]):
        self.take, self.length = take, length
        self.start = 0  # position of buffer[..., 0]
        self.buffer = torch.zeros(*shape, 0, dtype=torch.float32)

    def read(self, start: int, length: int) -> torch.Tensor:
        out = self.buffer.new_zeros(*self.buffer.shape[:-1], length)
        end = min(start + length, self.length)
        available = self.start + self.buffer.shape[-1]
        if end > available:
            self.buffer = torch.cat([self.buffer, self.take(end - available)], -1)
        lo = max(start, 0)
        if lo < end:
            kept = self.buffer[..., lo - self.start : end - self.start]
            out[..., lo - start : end - start] = kept
        drop = max(min(start, end) - self.start, 0)
        if drop:
            self.buffer, self.start = self.buffer[..., drop:], self.start + drop
        return out


class _TensorReader:
    """Audio in memory with the reads of an ``AudioReader`` (nothing to close or to change)."""

    name = ""

    def __init__(self, audio: torch.Tensor, sample_rate: int) -> None:
        self.audio, self.sample_rate = audio, sample_rate
        self.channels, self.frames = audio.shape

    def count_frames(self) -> int:
        return self.frames

    def read(self, start: int, length: int) -> torch.Tensor:
        return zero_extended(self.audio, start, length)

    def check_unchanged(self) -> None:
        pass

    def close(self) -> None:
        pass


class ScannedFile:
    """An open input after the first pass (``ScannedFile.open``): its length, layout and
    the mixture statistics, with the model-rate signal they were computed from, and the
    networks' stream over it (``separation``)."""

    def __init__(
        self,
        separator: Separator,
        reader: AudioReader | _TensorReader,
        *,
        downmix: bool,
        option: str = "--downmix",
    ) -> None:
        self.separator = separator
        self.reader = reader
        self.name = reader.name
        self.frames = reader.count_frames()
        self.sample_rate = rate = reader.sample_rate
        if not MIN_RATE <= rate <= MAX_RATE:
            raise AudioError(
                f"{self.name}: {_rate_problem(rate)}" if self.name else _rate_problem(rate)
            )
        channels = reader.channels
        bag = separator.bag
        try:
            layout = bag.to_model_layout(torch.zeros(channels, 1), downmix, option)
        except AudioError as exc:
            raise AudioError(f"{self.name}: {exc}" if self.name else str(exc)) from None
        self.downmix = layout.shape[0] != channels and channels != 1
        self.out_channels = 1 if (self.downmix or channels == 1) else channels

        def model_layout(start: int, length: int) -> torch.Tensor:
            return bag.to_model_layout(reader.read(start, length), downmix, option)

        self.source = ResampledSignal(model_layout, self.frames, rate, separator.sample_rate)
        with own_arithmetic(separator.device):
            self.mean, self.std = mix_statistics(self.source.read, self.source.length, BLOCK_FRAMES)
        self._separation: SeparationStream | None = None
        self.streamed = False  # a StreamedTrack took it: its separation is consumed once

    def normalized(self, start: int, length: int) -> torch.Tensor:
        """The model-rate mix normalized, as the networks take it: (x - mean) / std inside the
        track, zeros outside it (as the in-memory path pads). -> (1, C, length)"""
        out = torch.zeros(self.separator.audio_channels, length, dtype=torch.float32)
        lo, hi = max(start, 0), min(start + length, self.source.length)
        if lo < hi:
            out[:, lo - start : hi - start] = (self.source.read(lo, hi - lo) - self.mean) / self.std
        return out[None]

    def separation(self) -> SeparationStream:
        """The networks' estimate of the normalized mix, streamed; made on first use, by this
        file's ``StreamedTrack`` or already by the track before it (``fill_from``)."""
        if self._separation is None:
            sep = self.separator
            self._separation = SeparationStream(
                sep.bag.members,
                self.normalized,
                self.source.length,
                places=sep.bag.places,
                shifts=sep.shifts,
                generator=torch.Generator().manual_seed(sep.seed),
                options=sep.options,
                device=sep.device,
                runner=sep.runner,
            )
        return self._separation

    def fill_from(self, following: Callable[[], ScannedFile | None]) -> None:
        """Let this file's last network calls take the first chunks of ``following()``, the
        file separated next (None: no such file), when they leave room (see
        ``apply.ChunkStream``); ``following`` is asked then, and may wait for that file."""

        def stream() -> SeparationStream | None:
            file = following()
            return None if file is None else file.separation()

        self.separation().following = stream

    @classmethod
    def open(
        cls,
        separator: Separator,
        path: str | os.PathLike[str],
        downmix: bool = False,
        *,
        option: str = "--downmix",
    ) -> ScannedFile:
        """The first pass over ``path``: decode (ffmpeg formats to a temporary file), count the
        frames, check every sample and compute the mixture statistics. Touches no network, so
        it may run in another thread while a track is separated. ``option``: how a channel
        count error names the downmix option."""
        _flag(downmix, "downmix")
        reader = AudioReader(_file_path(path))
        try:
            return cls(separator, reader, downmix=downmix, option=option)
        except BaseException:
            reader.close()
            raise

    def close(self) -> None:
        self.reader.close()


class StreamedTrack:
    """One file being separated in bounded memory; iterate for (mix (C, n), {stem: (C', n)})
    blocks at the file's rate. A first pass (``ScannedFile``) counted the frames, checked every
    sample and computed the mixture statistics; this one runs the networks."""

    def __init__(
        self,
        separator: Separator,
        scanned: ScannedFile,
        *,
        progress: ProgressCallback | None,
        all_sources: bool,
        block: int,
    ) -> None:
        if scanned.separator is not separator:
            raise UsageError("the file was scanned for another Separator")
        if scanned.streamed:
            raise UsageError(
                f"{scanned.name}: this ScannedFile was separated already; open it again"
            )
        _check_progress(progress)
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
            raise UsageError(f"block must be a positive number of frames, not {block!r}")
        block = int(block)
        scanned.streamed = True
        self.separator, self.block, self.scanned = separator, block, scanned
        self.reader = scanned.reader
        self.name, self.frames = scanned.name, scanned.frames
        self.sample_rate = rate = scanned.sample_rate
        self.downmix, self.out_channels = scanned.downmix, scanned.out_channels
        sep, mean, std = separator, scanned.mean, scanned.std
        model_length = scanned.source.length
        stream = scanned.separation()
        stream.progress = progress
        buffer = _StemBuffer(
            lambda count: stream.take(count)[0] * std + mean,
            model_length,
            (len(sep.sources), sep.audio_channels),
        )
        self.stems = ResampledSignal(buffer.read, model_length, sep.sample_rate, rate)
        self.names = sep.sources if all_sources else sep.stems

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        sources = self.separator.sources
        for start in range(0, self.frames, self.block):
            count = min(self.block, self.frames - start)
            # Not across the yield: the caller's code between blocks keeps its own autocast.
            with own_arithmetic(self.separator.device):
                stems = self.stems.read(start, count)  # (S, C, count)
                if self.out_channels == 1:
                    stems = stems.mean(1, keepdim=True)
                mix = self.reader.read(start, count)
                if self.downmix:
                    mix = mix.mean(0, keepdim=True)
            yield mix, {name: stems[sources.index(name)] for name in self.names}
        # A file rewritten in place since the first pass gave other samples than the statistics
        # and the frame count were computed from.
        self.reader.check_unchanged()

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> StreamedTrack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _apply_bag_segment(model: HTDemucs, segment: Fraction) -> None:
    """A bag's own segment, as demucs applies it: a member whose segment is at least as long
    takes the bag's, both as its chunk length and as the length each chunk is zero-padded to
    in the network (with or without --segment); a shorter member keeps its own."""
    if segment < model.segment:
        model.config = dataclasses.replace(model.config, segment=segment)


def _layout(model: HTDemucs) -> str:
    return f"{model.sample_rate} Hz {model.audio_channels}-channel"


def _as_audio_tensor(audio: Any, max_frames: int | None = None) -> torch.Tensor:
    """(C, T) float32 audio from a tensor or a numpy array. Integer samples are scaled to
    [-1, 1) as audio files store them (int16 / 2^15, ...); unsigned ones are centred first
    (uint8 on 128, uint16 on 2^15, ...). Complex and boolean samples, other shapes, sparse or
    storage-less tensors, empty or non-finite audio, and more than ``max_frames`` samples
    per channel (checked before any copy) are refused."""
    if isinstance(audio, np.ndarray):
        if audio.dtype.kind not in "biufc" or audio.dtype.byteorder not in "=|<>":
            raise AudioError(f"cannot separate an array of {audio.dtype}")
        if audio.dtype.kind in "bc":
            raise AudioError(f"cannot separate {audio.dtype} samples (real numbers expected)")
        _check_frames(audio.shape, max_frames)
        if audio.dtype.kind == "f" and audio.dtype.itemsize > 8:  # long double: torch has none
            audio = audio.astype(np.float64)
        audio = torch.from_numpy(np.ascontiguousarray(audio.astype(audio.dtype.newbyteorder("="))))
    if not isinstance(audio, torch.Tensor):
        raise AudioError(
            f"expected a (channels, time) tensor or numpy array, not {type(audio).__name__}"
        )
    if audio.is_nested:
        raise AudioError("expected a dense tensor of samples, not a nested one")
    if audio.layout != torch.strided:
        raise AudioError(f"expected a dense tensor of samples, not a {audio.layout} one")
    if audio.is_quantized:
        raise AudioError(
            f"cannot separate quantized samples ({audio.dtype}): dequantize them first"
        )
    if audio.device.type == "meta":
        raise AudioError("expected a tensor holding samples, not one on the meta device")
    if audio.dim() != 2:
        raise AudioError(f"expected (channels, time) audio, got shape {tuple(audio.shape)}")
    if audio.dtype == torch.bool or audio.is_complex():
        raise AudioError(f"cannot separate {audio.dtype} samples (real numbers expected)")
    if audio.shape[0] == 0 or audio.shape[-1] == 0:
        raise AudioError("contains no audio")
    if audio.shape[0] > MAX_CHANNELS:
        raise AudioError(
            f"expected (channels, time) audio, got shape {tuple(audio.shape)} "
            f"(more than {MAX_CHANNELS} channels: is it (time, channels)?)"
        )
    _check_frames(audio.shape, max_frames)
    if not audio.is_floating_point():
        limits = torch.iinfo(audio.dtype)
        half = float(2 ** (limits.bits - 1))
        audio = audio.double()
        audio = (audio if limits.min < 0 else audio - half) / half
    wide = audio.detach()
    audio = wide.to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(audio).all():
        if bool(torch.isfinite(wide).all()):  # float64 samples float32 cannot hold
            peak = float(wide.abs().max())
            raise AudioError(f"contains samples beyond float32's range (as large as {peak:.3g})")
        raise AudioError("contains NaN or infinite samples")
    return audio


def _check_frames(shape: tuple[int, ...], max_frames: int | None) -> None:
    if max_frames is not None and len(shape) == 2 and shape[-1] > max_frames:
        raise UsageError(
            f"{shape[-1]} samples per channel is over {MAX_TENSOR_SECONDS // 3600} hours: "
            "use separate_file_to, which streams"
        )


def _flag(value: Any, name: str) -> bool:
    """A True/False option of the Python API (a string like "no" would read as true)."""
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be True or False, not {value!r}")
    return value


def _check_progress(progress: Any) -> None:
    if progress is not None and not callable(progress):
        raise UsageError(f"progress must be a function or None, not {progress!r}")


def _own_storage(stem: torch.Tensor) -> torch.Tensor:
    """``stem`` contiguous and alone in its memory: a stem sliced from the tensor of every
    source would keep all of them alive as long as it is kept (or saved)."""
    if stem.is_contiguous() and stem.untyped_storage().nbytes() == stem.nbytes:
        return stem
    return stem.clone(memory_format=torch.contiguous_format)


def _file_path(path: Any) -> str:
    return file_name(path, "audio file")


def _same_file(target: Path, source: str) -> bool:
    try:
        return os.path.samefile(target, source)
    except (OSError, ValueError):
        return False


def _rate_problem(rate: int) -> str:
    return f"sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE} Hz"
