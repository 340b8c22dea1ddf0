"""The public separation API: a model (or bag) from the zoo, applied to tensors or files.

from htsep import Separator
separator = Separator("htdemucs", shifts=1)
stems = separator.separate_file("song.wav")       # {"drums": (C, T), ...} at the file's rate
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torchaudio.functional as AF

from htsep import zoo
from htsep.apply import (
    ChunkOptions,
    DeviceSlot,
    ProgressCallback,
    SeparationStream,
    apply_shifts,
    keep_freed_memory,
    plan_bag,
    standardize_mix,
)
from htsep.audio import AudioReader, AudioWriter, read_audio
from htsep.checkpoint import load_model
from htsep.errors import AudioError, HtsepError, UsageError
from htsep.model.htdemucs import HTDemucs
from htsep.resample import ResampledSignal

logger = logging.getLogger(__name__)

BLOCK_FRAMES = 1 << 18  # samples per block when streaming (about 6 s at 44.1 kHz)


PRECISIONS = ("fp32", "bf16", "fp16")
# Rough device memory one released-size chunk needs in flight at fp32 (activations of a
# 7.8 s segment); halved for 16-bit precisions. Used only to pick a default batch size.
CHUNK_BYTES_FP32 = 3 << 30


def auto_batch_size(device: torch.device, precision: str = "fp32") -> int:
    """Chunks per network call: 1 on the CPU (no gain there), else what free memory holds."""
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    per_chunk = CHUNK_BYTES_FP32 // (1 if precision == "fp32" else 2)
    return int(min(max(free * 0.8 // per_chunk, 1), 16))


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def parse_device(name: str | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'mps'; None picks cuda, then mps, then cpu."""
    try:
        device = torch.device(name or default_device())
    except RuntimeError as exc:
        raise UsageError(f"unknown device {name!r} (cpu, cuda, cuda:N or mps)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r}: only {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name!r}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {name!r} (cpu, cuda, cuda:N or mps)")
    return device


@dataclass
class _Member:
    spec: zoo.MemberSpec
    model: HTDemucs | None = field(default=None, repr=False)


class Separator:
    """A named model, a checkpoint file or a bag, with the separation settings.

    stems: the sources wanted (None: all). With a bag whose members serve single sources,
    only the members needed for them are downloaded and run. keep_memory: trade a higher
    resident size for speed (``apply.keep_freed_memory``; it tunes this process's malloc).
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
        if shifts < 0:
            raise UsageError(f"--shifts must be >= 0, got {shifts}")
        if not 0 <= overlap < 1:
            raise UsageError(f"--overlap must be in [0, 1), got {overlap}")
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {batch_size}")
        if precision not in PRECISIONS:
            raise UsageError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.device = parse_device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise UsageError("--precision fp16 needs a CUDA device (use bf16 or fp32 here)")
        self.shifts = shifts
        self.seed = seed
        self.spec = zoo.find_model(model, repo=None if repo is None else os.fspath(repo))
        self.name = self.spec.name
        self._download_progress = progress
        self._members = [_Member(spec) for spec in self.spec.members]
        self.sources = list(self.spec.sources) if self.spec.sources else self._discover_sources()
        if self.spec.weights is not None and any(
            len(row) != len(self.sources) for row in self.spec.weights
        ):
            raise UsageError(f"model {self.name}: bag weights do not match its sources")
        wanted = list(self.sources) if stems is None else list(stems)
        unknown = [stem for stem in wanted if stem not in self.sources]
        if unknown:
            raise UsageError(
                f"model {self.name} has no source {', '.join(map(repr, unknown))} "
                f"(it has {', '.join(self.sources)})"
            )
        if not wanted:
            raise UsageError("no stems requested")
        self.stems = wanted
        weights = self.spec.weights or tuple((1.0,) * len(self.sources) for _ in self._members)
        self._running, self._weights = plan_bag(
            weights, [self.sources.index(stem) for stem in wanted]
        )
        # Off the CPU the members stay on the host and take turns on the device.
        self._slot = None if self.device.type == "cpu" else DeviceSlot(self.device)
        first = self._load(self._running[0])
        self.sample_rate = first.sample_rate
        self.audio_channels = first.audio_channels
        limit = min(self._segment_limit(m) for m in self._running)
        if segment is None and self.spec.segment is not None and self.spec.segment <= limit:
            segment = self.spec.segment  # a bag's own segment, as demucs applies it
        segment = None if segment is None else Fraction(str(segment))
        if segment is not None and segment > limit:
            raise UsageError(
                f"--segment {float(segment):g} is longer than the model's "
                f"segment ({float(limit):g} s)"
            )
        if segment is not None and segment <= 0:
            raise UsageError(f"--segment must be positive, got {float(segment):g}")
        self.options = ChunkOptions(
            segment=segment,
            overlap=overlap,
            split=split,
            precision=precision,
            batch_size=batch_size or auto_batch_size(self.device, precision),
            release_memory=not (keep_memory and keep_freed_memory()),
        )

    # --- models ----------------------------------------------------------------------------

    def _load(self, index: int, check: bool = True) -> HTDemucs:
        member = self._members[index]
        if member.model is None:
            path = zoo.fetch(member.spec, progress=self._download_progress)
            member.model = load_model(path)
            logger.info("loaded %s from %s", member.spec.signature, path)
        if check and member.model.sources != self.sources:
            raise UsageError(
                f"model {self.name}: member {member.spec.signature} has sources "
                f"{', '.join(member.model.sources)}, the bag {', '.join(self.sources)}"
            )
        return member.model

    def _discover_sources(self) -> list[str]:
        """Sources of a bag whose description does not list them: those of the first member
        that loads (a member that is never needed may be missing or broken)."""
        first_error: HtsepError | None = None
        for index in range(len(self._members)):
            try:
                return self._load(index, check=False).sources
            except HtsepError as exc:
                first_error = first_error or exc
        assert first_error is not None
        raise first_error

    def _segment_limit(self, index: int) -> Fraction:
        return self._load(index).segment

    @property
    def members_running(self) -> int:
        """How many networks run per track (after skipping unneeded bag members)."""
        return len(self._running)

    # --- separation ------------------------------------------------------------------------

    def _to_model_layout(self, audio: torch.Tensor, downmix: bool) -> torch.Tensor:
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
            "pass --downmix to mix them down to mono first"
        )

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
        if audio.dim() != 2:
            raise AudioError(f"expected (channels, time) audio, got shape {tuple(audio.shape)}")
        if audio.shape[-1] == 0:
            raise AudioError("contains no audio")
        if not torch.isfinite(audio).all():
            raise AudioError("contains NaN or infinite samples")
        rate = sample_rate or self.sample_rate
        length = audio.shape[-1]
        mix = self._to_model_layout(audio.float(), downmix)
        out_channels = 1 if mix.shape[0] != audio.shape[0] or audio.shape[0] == 1 else None
        if rate != self.sample_rate:
            mix = AF.resample(mix, rate, self.sample_rate)
        normalized, mean, std = standardize_mix(mix)
        stems = self._apply_bag(normalized[None], progress)[0] * std + mean  # (S, C, T)
        if rate != self.sample_rate:
            stems = AF.resample(stems, self.sample_rate, rate)
            stems = _fit_length(stems, length)
        if out_channels == 1:
            stems = stems.mean(1, keepdim=True)
        names = self.sources if all_sources else self.stems
        return {stem: stems[self.sources.index(stem)].contiguous() for stem in names}

    def _apply_bag(self, mix: torch.Tensor, progress: ProgressCallback | None) -> torch.Tensor:
        """mix: (1, C, T) normalized -> weighted bag estimate (1, S, C, T)."""
        generator = torch.Generator().manual_seed(self.seed)
        share = None if progress is None else (lambda done: progress(done / len(self._running)))
        total = torch.zeros(len(self.sources))
        estimate: torch.Tensor | None = None
        for index, weights in zip(self._running, self._weights, strict=True):
            model = self._load(index)
            out = apply_shifts(
                model if self._slot is None else self._slot.get(model),
                mix,
                shifts=self.shifts,
                generator=generator,
                options=self.options,
                device=self.device,
                progress=share,
            )
            weight = torch.tensor(weights)
            out = out * weight.view(1, -1, 1, 1)
            estimate = out if estimate is None else estimate + out
            total += weight
        assert estimate is not None
        return estimate / total.view(1, -1, 1, 1)

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
        audio, rate = read_audio(path)
        try:
            stems = self.separate_tensor(
                audio, rate, downmix=downmix, progress=progress, all_sources=all_sources
            )
        except AudioError as exc:
            raise AudioError(f"{os.fspath(path)}: {exc}") from None
        return audio, rate, stems

    def scan_file(self, path: str | os.PathLike[str], *, downmix: bool = False) -> ScannedFile:
        """The first pass over ``path``: decode (ffmpeg formats to a temporary file), count the
        frames, check every sample and compute the mixture statistics. Touches no network, so
        it may run in another thread while a track is separated."""
        reader = AudioReader(path)
        try:
            return ScannedFile(self, reader, downmix=downmix)
        except BaseException:
            reader.close()
            raise

    def stream_file(
        self,
        path: str | os.PathLike[str] | ScannedFile,
        *,
        downmix: bool = False,
        progress: ProgressCallback | None = None,
        all_sources: bool = False,
        block: int = BLOCK_FRAMES,
    ) -> StreamedTrack:
        """Separate ``path`` (or a file ``scan_file`` has read) in bounded memory: the returned
        track yields (mix, stems) blocks in order, equal to ``separate_file``'s output sliced
        (up to float rounding)."""
        scanned = path if isinstance(path, ScannedFile) else self.scan_file(path, downmix=downmix)
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
        outputs: dict[str, Path],
        **options: Any,
    ) -> tuple[int, int]:
        """Separate ``path`` and write the stems named in ``outputs`` (stem -> file), streaming;
        the options are ``separate_file_staged``'s. -> (sample rate, frames)"""
        pending = self.separate_file_staged(path, outputs, **options)
        pending.finish()
        return pending.sample_rate, pending.frames

    def separate_file_staged(
        self,
        path: str | os.PathLike[str] | ScannedFile,
        outputs: dict[str, Path],
        *,
        two_stems: str | None = None,
        other_method: str = "add",
        clip_mode: str = "rescale",
        bits: int = 16,
        mp3_bitrate: int = 320,
        mp3_preset: int = 2,
        downmix: bool = False,
        progress: ProgressCallback | None = None,
    ) -> PendingOutputs:
        """Separate ``path`` and stream the stems named in ``outputs`` (stem -> file) to disk,
        up to the networks' end: the files are complete after ``finish()``.

        With ``two_stems``, ``outputs`` may also name ``no_<stem>`` (sum of the other stems) or
        ``minus_<stem>`` (mix minus the stem). Every file is written atomically. With
        ``clip_mode`` rescale the stems first go to float files in a temporary folder beside the
        outputs, since the gain depends on the whole track; ``finish()`` then applies the gain
        and encodes the final files. It needs no network, so it may run in another thread.
        """
        track = self.stream_file(
            path,
            downmix=downmix,
            progress=progress,
            all_sources=two_stems is not None and other_method == "add",
        )
        with track:
            settings = dict(bits=bits, mp3_bitrate=mp3_bitrate, mp3_preset=mp3_preset)
            if clip_mode != "rescale":
                _write_blocks(track, outputs, track.sample_rate, two_stems, clip_mode, settings)
                return PendingOutputs(track.sample_rate, track.frames)
            first = next(iter(outputs.values()))
            try:
                first.parent.mkdir(parents=True, exist_ok=True)
                staging = tempfile.TemporaryDirectory(prefix=".htsep-", dir=first.parent)
            except OSError as exc:
                raise AudioError(
                    f"{first}: cannot create folder {first.parent}: {exc.strerror or exc}"
                ) from None
            try:
                staged = {name: Path(staging.name) / f"{name}.wav" for name in outputs}
                peak = _write_blocks(
                    track, staged, track.sample_rate, two_stems, "none", {"bits": 32}
                )
            except BaseException:
                staging.cleanup()
                raise
            pending = PendingOutputs(track.sample_rate, track.frames)
            pending.stage(staging, staged, outputs, 1 / max(1.01 * peak, 1.0), settings)
            return pending


class EncodingStopped(HtsepError):
    """``PendingOutputs.finish`` was told to stop; no final file was written."""


class PendingOutputs:
    """A separated track whose final files may still have to be written: with clip mode
    rescale, float stems wait in a staging folder for the track's gain."""

    def __init__(self, sample_rate: int, frames: int) -> None:
        self.sample_rate, self.frames = sample_rate, frames
        self._staging: tempfile.TemporaryDirectory[str] | None = None
        self._work: tuple[dict[str, Path], dict[str, Path], float, dict[str, int]] | None = None

    def stage(
        self,
        staging: tempfile.TemporaryDirectory[str],
        staged: dict[str, Path],
        outputs: dict[str, Path],
        gain: float,
        settings: dict[str, int],
    ) -> None:
        self._staging, self._work = staging, (staged, outputs, gain, settings)

    def finish(self, stop: threading.Event | None = None) -> None:
        """Write the final files (scaled by the track's gain), atomically, then drop the
        staging folder. ``stop`` set: stop between blocks, leave no final file of this call
        half-written, and raise EncodingStopped."""
        try:
            if self._work is None:
                return
            staged, outputs, gain, settings = self._work
            for name, target in outputs.items():
                with (
                    AudioReader(staged[name]) as reader,
                    AudioWriter(target, self.sample_rate, reader.channels, **settings) as writer,
                ):
                    for start in range(0, reader.frames, BLOCK_FRAMES):
                        if stop is not None and stop.is_set():
                            raise EncodingStopped(f"{target}: stopped before it was complete")
                        writer.write(
                            reader.read(start, min(BLOCK_FRAMES, reader.frames - start)) * gain
                        )
        finally:
            self.discard()

    def discard(self) -> None:
        """Drop the staging folder (the final files not yet written stay unwritten)."""
        self._work = None
        if self._staging is not None:
            self._staging.cleanup()
            self._staging = None


def _write_blocks(
    track: StreamedTrack,
    outputs: dict[str, Path],
    rate: int,
    two_stems: str | None,
    clip_mode: str,
    settings: dict[str, int],
) -> float:
    """Write every block of ``track`` to ``outputs``; -> the largest absolute sample written."""
    peak = 0.0
    with contextlib.ExitStack() as stack:
        writers = {
            name: stack.enter_context(AudioWriter(path, rate, track.out_channels, **settings))
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
    """The stems named in ``names``: model stems, ``no_<stem>`` or ``minus_<stem>``."""
    out = {}
    for name in names:
        if name in stems:
            out[name] = stems[name]
        elif two_stems is not None and name == f"no_{two_stems}":
            out[name] = sum(v for k, v in stems.items() if k != two_stems)  # type: ignore[assignment]
        elif two_stems is not None and name == f"minus_{two_stems}":
            target = stems[two_stems]
            layout = mix if mix.shape[0] == target.shape[0] else mix.mean(0, keepdim=True)
            out[name] = layout - target
        else:
            raise KeyError(name)
    return out


class _StemBuffer:
    """Random reads over a stream of model-rate stems, for reads whose starts never go back."""

    def __init__(self, take: Callable[[int], torch.Tensor], length: int, shape: tuple[int, ...]):
        self.take, self.length = take, length
        self.start = 0  # position of buffer[..., 0]
        self.buffer = torch.zeros(*shape, 0)

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


class ScannedFile:
    """An open input after the first pass (``Separator.scan_file``): its length, layout and
    the mixture statistics, with the model-rate signal they were computed from."""

    def __init__(self, separator: Separator, reader: AudioReader, *, downmix: bool) -> None:
        self.reader = reader
        self.name = reader.name
        self.frames = reader.count_frames()
        self.sample_rate = rate = reader.sample_rate
        channels = reader.channels
        try:
            layout = separator._to_model_layout(torch.zeros(channels, 1), downmix)
        except AudioError as exc:
            raise AudioError(f"{self.name}: {exc}") from None
        self.downmix = layout.shape[0] != channels and channels != 1
        self.out_channels = 1 if (self.downmix or channels == 1) else channels

        def model_layout(start: int, length: int) -> torch.Tensor:
            return separator._to_model_layout(reader.read(start, length), downmix)

        self.source = ResampledSignal(model_layout, self.frames, rate, separator.sample_rate)
        self.mean, self.std = _mono_statistics(self.source, BLOCK_FRAMES)

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
        self.separator, self.block, self.scanned = separator, block, scanned
        self.reader = scanned.reader
        self.name, self.frames = scanned.name, scanned.frames
        self.sample_rate = rate = scanned.sample_rate
        self.downmix, self.out_channels = scanned.downmix, scanned.out_channels
        sep, source, mean, std = separator, scanned.source, scanned.mean, scanned.std
        model_length = source.length

        def normalized(start: int, length: int) -> torch.Tensor:
            # Inside the track (x - mean) / std; outside it zeros, as the in-memory path pads.
            out = torch.zeros(sep.audio_channels, length)
            lo, hi = max(start, 0), min(start + length, model_length)
            if lo < hi:
                out[:, lo - start : hi - start] = (source.read(lo, hi - lo) - mean) / std
            return out[None]

        members = [
            (sep._load(index), weights)
            for index, weights in zip(sep._running, sep._weights, strict=True)
        ]
        stream = SeparationStream(
            members,
            normalized,
            model_length,
            shifts=sep.shifts,
            generator=torch.Generator().manual_seed(sep.seed),
            options=sep.options,
            device=sep.device,
            progress=progress,
            slot=sep._slot,
        )
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
            stems = self.stems.read(start, count)  # (S, C, count)
            if self.out_channels == 1:
                stems = stems.mean(1, keepdim=True)
            mix = self.reader.read(start, count)
            if self.downmix:
                mix = mix.mean(0, keepdim=True)
            yield mix, {name: stems[sources.index(name)] for name in self.names}

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> StreamedTrack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mono_statistics(source: ResampledSignal, block: int) -> tuple[float, float]:
    """Mean and unbiased std of the mono mix, one block at a time (Chan et al.'s pairwise
    update in float64, so long tracks lose no precision)."""
    count, mean, squares = 0, 0.0, 0.0
    for start in range(0, source.length, block):
        mono = source.read(start, min(block, source.length - start)).double().mean(0)
        n = mono.numel()
        block_mean = float(mono.mean())
        block_squares = float(((mono - block_mean) ** 2).sum())
        delta = block_mean - mean
        total = count + n
        mean += delta * n / total
        squares += block_squares + delta * delta * count * n / total
        count = total
    std = (squares / (count - 1)) ** 0.5 if count > 1 else 0.0
    return mean, std + 1e-8


def _fit_length(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[-1] >= length:
        return x[..., :length]
    return torch.nn.functional.pad(x, (0, length - x.shape[-1]))
