"""Separation quality on a dataset: the MDX challenge's nSDR, and optionally museval's SDR.

Dimensions: S sources, C audio channels, T samples per channel.

nSDR (Music Demixing Challenge 2021) is one number per track and source, over the whole track:
``10 log10((sum s^2 + eps) / (sum (s - s_hat)^2 + eps))``. museval's SDR (BSSEval v4, SiSEC 2018)
is the median over one-second frames; it needs the optional ``museval`` package
(``pip install 'htsep[eval]'``) and is much slower.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from htsep.data import Track, load_track
from htsep.errors import AudioError, DatasetError, UsageError
from htsep.separator import Separator

EPS = 1e-8  # the MDX definition's: keeps silent references and perfect estimates finite

Scores = dict[str, dict[str, float]]  # track -> source -> dB
TrackCallback = Callable[[int, Track, dict[str, float]], None]  # (index, track, nSDR by source)


def nsdr(reference: torch.Tensor, estimate: torch.Tensor, eps: float = EPS) -> float:
    """nSDR in dB of one source over a whole track. reference, estimate: (C, T), same shape.

    Summed over every channel and sample in float64.
    """
    if reference.shape != estimate.shape:
        raise ValueError(
            f"reference {tuple(reference.shape)} and estimate {tuple(estimate.shape)} differ"
        )
    reference, estimate = reference.double(), estimate.double()
    signal = float(reference.square().sum()) + eps
    error = float((reference - estimate).square().sum()) + eps
    return 10 * math.log10(signal / error)


def baseline_nsdr(mixture: torch.Tensor, stems: torch.Tensor) -> list[float]:
    """nSDR of the trivial separation that estimates every source as mixture / S.

    mixture: (C, T), stems: (S, C, T) -> S values in dB.
    """
    estimate = mixture / stems.shape[0]
    return [nsdr(stem, estimate) for stem in stems]


def museval_sdr(references: torch.Tensor, estimates: torch.Tensor, sample_rate: int) -> list[float]:
    """museval's SDR (BSSEval v4) per source: the median over one-second frames, frames where
    it is undefined (silent reference) left out; NaN if every frame is.

    references, estimates: (S, C, T) -> S values in dB. Needs the optional ``museval`` package.
    """
    museval = import_museval()
    sdr, _isr, _sir, _sar = museval.evaluate(
        references.double().transpose(1, 2).numpy(),  # museval wants (S, T, C)
        estimates.double().transpose(1, 2).numpy(),
        win=sample_rate,
        hop=sample_rate,
    )
    return [_nan_median(row) for row in sdr]


def import_museval() -> ModuleType:
    """The ``museval`` module, or a UsageError that says how to install it."""
    try:
        import museval
    except ImportError:
        raise UsageError(
            "museval's SDR needs the museval package: pip install 'htsep[eval]'"
        ) from None
    return museval


@dataclass(frozen=True)
class EvalReport:
    """Scores of one model on some tracks: ``nsdr[track][source]`` in dB, and with museval
    ``sdr[track][source]`` (median over frames). ``mean`` and ``median`` are per source over the
    tracks; ``sdr_median`` is SiSEC's summary (median over tracks of the per-track medians)."""

    model: str
    sources: list[str]
    nsdr: Scores
    sdr: Scores | None = None

    @property
    def tracks(self) -> list[str]:
        return list(self.nsdr)

    @property
    def mean(self) -> dict[str, float]:
        return _aggregate(self.nsdr, self.sources, statistics.fmean)

    @property
    def median(self) -> dict[str, float]:
        return _aggregate(self.nsdr, self.sources, statistics.median)

    @property
    def sdr_mean(self) -> dict[str, float] | None:
        return None if self.sdr is None else _aggregate(self.sdr, self.sources, statistics.fmean)

    @property
    def sdr_median(self) -> dict[str, float] | None:
        return None if self.sdr is None else _aggregate(self.sdr, self.sources, statistics.median)

    def as_dict(self) -> dict[str, Any]:
        """The sources and scores as JSON values (an undefined museval score, NaN, as None):
        ``{sources, tracks, mean, median}``, and with museval ``museval: {tracks, mean,
        median}``."""
        record: dict[str, Any] = {
            "sources": self.sources,
            "tracks": _finite(self.nsdr),
            "mean": _finite(self.mean),
            "median": _finite(self.median),
        }
        if self.sdr is not None:
            record["museval"] = {
                "tracks": _finite(self.sdr),
                "mean": _finite(self.sdr_mean),
                "median": _finite(self.sdr_median),
            }
        return record

    def table(self, museval: bool = False, escape: Callable[[str], str] = str) -> str:
        """The nSDR (``museval``: the SDR) as text: a row per track and a column per source
        (dB, 2 decimals), then the mean and median rows. ``escape`` turns each track and source
        name into what is printed (names come from files: a newline in one would split a row)."""
        scores, mean, median = self.nsdr, self.mean, self.median
        if museval:
            if self.sdr is None:
                raise ValueError("no museval scores in this report")
            scores, mean, median = self.sdr, self.sdr_mean or {}, self.sdr_median or {}
        rows = [
            *((escape(track), values) for track, values in scores.items()),
            ("mean", mean),
            ("median", median),
        ]
        first = max(len(label) for label, _ in [("track", {}), *rows])
        shown = {source: escape(source) for source in self.sources}
        widths = {source: max(len(shown[source]), 7) for source in self.sources}
        header = "  ".join(
            [f"{'track':<{first}}", *(f"{shown[s]:>{widths[s]}}" for s in self.sources)]
        )
        lines = [header]
        for position, (label, values) in enumerate(rows):
            if position == len(scores):
                lines.append("-" * len(header))
            cells = (f"{values[s]:>{widths[s]}.2f}" for s in self.sources)
            lines.append("  ".join([f"{label:<{first}}", *cells]))
        return "\n".join(lines)


def choose_tracks(found: Sequence[Track], names: Sequence[str] | None, folder: Path) -> list[Track]:
    """The tracks of ``found`` named in ``names``, in the dataset's order; all if None.
    UsageError names those not in ``folder``."""
    if names is None:
        return list(found)
    known = {track.name for track in found}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(f"--tracks: no track {', '.join(map(repr, unknown))} in {folder}")
    return [track for track in found if track.name in names]


def evaluation_sources(separator: Separator, sources: Sequence[str]) -> list[str]:
    """The dataset's ``sources`` that get scored: all of them, which the model must have (a
    model with more sources is fine: its extra stems are not scored)."""
    missing = [source for source in sources if source not in separator.sources]
    if missing:
        raise UsageError(
            f"model {separator.name} has no source {', '.join(map(repr, missing))} "
            f"(it has {', '.join(separator.sources)}; the dataset {', '.join(sources)})"
        )
    return list(sources)


def evaluate(
    separator: Separator,
    tracks: Sequence[Track],
    sources: Sequence[str],
    *,
    framewise: bool = False,
    on_track: TrackCallback | None = None,
) -> EvalReport:
    """Separate each track's mixture and score every source against its stem.

    framewise: also compute museval's SDR (needs museval; checked before anything runs).
    on_track: called after each track with its index, the track and its nSDR by source.
    """
    names = evaluation_sources(separator, sources)
    if framewise:
        import_museval()
    if not tracks:
        raise DatasetError("no tracks to evaluate")
    for track in tracks:  # from the headers, before any track is separated
        _check_channels(separator, track, track.channels)
    scores: Scores = {}
    framewise_scores: Scores = {}
    for index, track in enumerate(tracks):
        mixture, stems = load_track(track, names)  # (C, T), (S, C, T)
        estimates = separate_track(separator, mixture, track, names)  # (S, C, T)
        scores[track.name] = {
            source: nsdr(stems[i], estimates[i]) for i, source in enumerate(names)
        }
        if framewise:
            values = museval_sdr(stems, estimates, track.sample_rate)
            framewise_scores[track.name] = dict(zip(names, values, strict=True))
        if on_track is not None:
            on_track(index, track, scores[track.name])
    return EvalReport(
        model=separator.name,
        sources=names,
        nsdr=scores,
        sdr=framewise_scores if framewise else None,
    )


def separate_track(
    separator: Separator, mixture: torch.Tensor, track: Track, sources: Sequence[str]
) -> torch.Tensor:
    """mixture (C, T) at the track's rate -> estimates (S, C, T) of ``sources``."""
    _check_channels(separator, track, mixture.shape[0])
    try:
        stems = separator.separate_tensor(mixture, track.sample_rate, all_sources=True)
    except AudioError as exc:  # e.g. more channels than the model takes
        raise DatasetError(f"{track.mixture}: {exc}") from None
    return torch.stack([stems[source] for source in sources])


def _check_channels(separator: Separator, track: Track, channels: int) -> None:
    """DatasetError unless the model takes ``channels`` (its own count, or mono, which it
    repeats). Said here rather than by the Separator, whose advice (--downmix) eval lacks."""
    if channels not in (1, separator.audio_channels):
        raise DatasetError(
            f"{track.mixture}: {channels} audio channels, the model takes "
            f"{separator.audio_channels}"
        )


def _aggregate(
    scores: Mapping[str, Mapping[str, float]],
    sources: Sequence[str],
    how: Callable[[list[float]], float],
) -> dict[str, float]:
    """Per source, ``how`` over the tracks' finite values (NaN when there are none)."""
    out = {}
    for source in sources:
        values = [v[source] for v in scores.values() if math.isfinite(v[source])]
        out[source] = how(values) if values else math.nan
    return out


def _finite(value: Any) -> Any:
    """NaN (an undefined museval score) as None, through nested dicts."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, float) and value != value:
        return None
    return value


def _nan_median(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else math.nan
