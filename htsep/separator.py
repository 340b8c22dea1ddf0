"""The public separation API: a model (or bag) from the zoo, applied to tensors or files.

from htsep import Separator
separator = Separator("htdemucs", shifts=1)
stems = separator.separate_file("song.wav")       # {"drums": (C, T), ...} at the file's rate
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torchaudio.functional as AF

from htsep import zoo
from htsep.apply import ChunkOptions, ProgressCallback, apply_shifts, plan_bag, standardize_mix
from htsep.audio import read_audio
from htsep.checkpoint import load_model
from htsep.errors import AudioError, HtsepError, UsageError
from htsep.model.htdemucs import HTDemucs

logger = logging.getLogger(__name__)


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
    only the members needed for them are downloaded and run.
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
        batch_size: int = 1,
        stems: Sequence[str] | None = None,
        progress: bool = True,
    ) -> None:
        if shifts < 0:
            raise UsageError(f"--shifts must be >= 0, got {shifts}")
        if not 0 <= overlap < 1:
            raise UsageError(f"--overlap must be in [0, 1), got {overlap}")
        if batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {batch_size}")
        self.device = parse_device(device)
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
            segment=segment, overlap=overlap, batch_size=batch_size, split=split
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
            model = self._load(index).to(self.device)
            try:
                out = apply_shifts(
                    model,
                    mix,
                    shifts=self.shifts,
                    generator=generator,
                    options=self.options,
                    device=self.device,
                    progress=share,
                )
            finally:
                if self.device.type != "cpu":
                    model.to("cpu")
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
        """Read ``path`` and separate it. -> (mix (C, T), sample rate, {stem: (C', T)})"""
        audio, rate = read_audio(path)
        try:
            stems = self.separate_tensor(
                audio, rate, downmix=downmix, progress=progress, all_sources=all_sources
            )
        except AudioError as exc:
            raise AudioError(f"{os.fspath(path)}: {exc}") from None
        return audio, rate, stems


def _fit_length(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[-1] >= length:
        return x[..., :length]
    return torch.nn.functional.pad(x, (0, length - x.shape[-1]))
