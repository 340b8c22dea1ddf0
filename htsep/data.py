"""Datasets in the MUSDB18-HQ layout: ``<root>/<split>/<track>/mixture.wav`` beside one file per
source (``drums.wav``, ``bass.wav``, ...; WAV or FLAC).

Dimensions: S sources, C audio channels, T samples per channel.

``find_tracks`` reads only the files' headers and refuses a dataset whose tracks disagree, with a
one-line ``DatasetError`` that names the tracks at fault; ``load_track`` decodes one track.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from htsep.audio import AudioInfo, audio_info, read_audio
from htsep.errors import AudioError, DatasetError, UsageError
from htsep.files import broken_link, kind_of

MIXTURE = "mixture"
MUSDB_SOURCES = ("drums", "bass", "other", "vocals")
DATASET_EXTENSIONS = frozenset({".wav", ".flac"})
_SHOWN = 3  # tracks or problems named in one message before "and N more"


@dataclass(frozen=True)
class Track:
    """One track folder, as its headers describe it. ``stems`` maps each of the dataset's
    sources, in the dataset's order, to its file; every file has the mixture's rate, channel
    count and length."""

    name: str
    folder: Path
    mixture: Path
    stems: dict[str, Path]
    sample_rate: int
    frames: int
    channels: int


def find_tracks(
    root: Path, split: str, sources: Sequence[str] | None = None
) -> tuple[list[str], list[Track]]:
    """The tracks of ``<root>/<split>`` sorted by name, and the source names. -> (sources, tracks)

    sources: the sources every track must have (other files are ignored); None: those the
    tracks have, which must then be the same in every track, in MUSDB order (drums, bass,
    other, vocals) and then alphabetically. A bad ``sources`` is a UsageError
    (``requested_sources``), checked before the dataset is read.
    """
    names = None if sources is None else requested_sources(sources)
    root = Path(root)
    if not _is_folder(root, root):
        problem = broken_link(root)
        if problem is None and os.path.lexists(root):  # a file, a named pipe: not a folder
            try:
                mode = os.stat(root).st_mode
                problem = "a file" if stat.S_ISREG(mode) else kind_of(mode)
            except OSError as exc:
                problem = f"unreadable ({exc.strerror or exc})"
            problem += ", not a dataset folder"
        raise DatasetError(
            f"{root}: is {problem}" if problem else f"{root}: no such dataset folder"
        )
    folder = root / split
    if not _is_folder(folder, root):
        raise DatasetError(
            f"{root}: no {split}/ folder (expected {root}/{split}/<track>/mixture.wav)"
        )
    files = {track.name: _audio_files(track) for track in _track_folders(folder)}
    if not files:
        raise DatasetError(_no_tracks_message(folder))
    _check_mixtures(folder, files)
    if names is None:
        names = _common_sources(files)
    else:
        _check_has_sources(files, names)
    tracks = [_describe(folder / name, files[name], names) for name in sorted(files)]
    _check_sample_rates(tracks)
    return names, tracks


def load_track(track: Track, sources: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a track. -> (mixture (C, T) float32, stems (S, C, T) float32 in ``sources`` order)"""
    missing = [source for source in sources if source not in track.stems]
    if missing:
        raise DatasetError(f"{track.folder}: no stem {', '.join(map(repr, missing))}")
    mixture = _read(track.mixture)
    stems = []
    for source in sources:
        stem = _read(track.stems[source])
        if stem.shape != mixture.shape:
            raise DatasetError(
                f"{track.folder}: {track.stems[source].name} has shape {tuple(stem.shape)}, "
                f"{track.mixture.name} {tuple(mixture.shape)}"
            )
        stems.append(stem)
    return mixture, torch.stack(stems)


def order_sources(names: set[str] | Sequence[str]) -> list[str]:
    """MUSDB's sources first in MUSDB's order, then the others alphabetically."""
    known = [name for name in MUSDB_SOURCES if name in names]
    return known + sorted(set(names) - set(MUSDB_SOURCES))


def _is_folder(path: Path, blame: Path) -> bool:
    """Whether ``path`` is a folder (False for nothing there, a link to nothing or a link
    loop); DatasetError naming ``blame``, the folder whose permissions hide it, when that
    cannot be known."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return False
        raise DatasetError(f"{blame}: cannot read: {_reason(exc)}") from None


def _track_folders(split: Path) -> list[Path]:
    items = _listing(split)
    return [item for item in items if not item.name.startswith(".") and _is_folder(item, split)]


def _listing(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise DatasetError(f"{folder}: cannot read: {_reason(exc)}") from None


def _audio_files(track: Path) -> dict[str, Path]:
    """The track's audio files by name without extension; a name given twice is an error.
    Entries that are not regular files are kept: they are refused by name if used."""
    found: dict[str, Path] = {}
    for item in _listing(track):
        if item.name.startswith(".") or item.suffix.lower() not in DATASET_EXTENSIONS:
            continue
        if item.stem in found:
            raise DatasetError(
                f"{track}: both {found[item.stem].name} and {item.name}; keep one of them"
            )
        found[item.stem] = item
    return found


def _no_tracks_message(split: Path) -> str:
    packed = sorted(split.glob("*.stem.mp4"))
    if packed:
        return (
            f"{split}: {len(packed)} .stem.mp4 files but no track folders; htsep reads the "
            "MUSDB18-HQ layout (<track>/mixture.wav, <track>/<source>.wav)"
        )
    return f"{split}: no track folders"


def _check_mixtures(split: Path, files: dict[str, dict[str, Path]]) -> None:
    lacking = [name for name, found in files.items() if MIXTURE not in found]
    if lacking:
        raise DatasetError(
            f"{split}: no {MIXTURE}.wav or {MIXTURE}.flac in track {_names(lacking)}"
        )


def _common_sources(files: dict[str, dict[str, Path]]) -> list[str]:
    """The sources of the tracks, which must all have the same ones."""
    present: dict[str, list[str]] = defaultdict(list)
    for name, found in files.items():
        for stem in found:
            if stem != MIXTURE:
                present[stem].append(name)
    if not present:
        raise DatasetError(f"track {_names(list(files))}: no source files beside the mixture")
    problems = []
    for source in order_sources(set(present)):
        missing = [name for name in files if name not in present[source]]
        if missing:
            problems.append(
                f"{source} is in {len(present[source])} of {len(files)} tracks, "
                f"missing in {_names(missing)}"
            )
    if problems:
        raise DatasetError(f"sources differ across tracks: {_join(problems)}")
    return order_sources(set(present))


def requested_sources(sources: Sequence[str]) -> list[str]:
    """``sources`` as a list; UsageError (a bad request, whatever the dataset holds) when it is
    empty, names a source twice or names the mixture."""
    names = list(sources)
    if not names:
        raise UsageError("no sources requested")
    twice = [name for name in dict.fromkeys(names) if names.count(name) > 1]
    if twice:
        raise UsageError(f"{', '.join(twice)} given twice")
    if MIXTURE in names:
        raise UsageError(f"{MIXTURE!r} is the mixture, not a source")
    return names


def _check_has_sources(files: dict[str, dict[str, Path]], sources: list[str]) -> None:
    problems = []
    for source in sources:
        missing = [name for name, found in files.items() if source not in found]
        if missing:
            problems.append(f"no {source} in track {_names(missing)}")
    if problems:
        raise DatasetError(_join(problems))


def _describe(folder: Path, files: dict[str, Path], sources: list[str]) -> Track:
    mixture = files[MIXTURE]
    info = _info(mixture)
    problems = []
    for source in sources:
        stem = _info(files[source])
        for what, ours, theirs in (
            ("frames", stem.frames, info.frames),
            ("Hz", stem.sample_rate, info.sample_rate),
            ("channels", stem.channels, info.channels),
        ):
            if ours != theirs:
                problems.append(f"{files[source].name} has {ours} {what}, {mixture.name} {theirs}")
    if problems:
        raise DatasetError(f"{folder}: {_join(problems)}")
    return Track(
        name=folder.name,
        folder=folder,
        mixture=mixture,
        stems={source: files[source] for source in sources},
        sample_rate=info.sample_rate,
        frames=info.frames,
        channels=info.channels,
    )


def _check_sample_rates(tracks: list[Track]) -> None:
    by_rate: dict[int, list[str]] = defaultdict(list)
    for track in tracks:
        by_rate[track.sample_rate].append(track.name)
    if len(by_rate) > 1:
        groups = sorted(by_rate.items(), key=lambda item: -len(item[1]))
        shown = [f"{rate} Hz in {_names(names)}" for rate, names in groups]
        raise DatasetError(f"tracks have different sample rates: {'; '.join(shown)}")


def _info(path: Path) -> AudioInfo:
    _check_regular(path)
    try:
        return audio_info(path)
    except AudioError as exc:  # its message starts with the path, which names the track
        raise DatasetError(str(exc)) from None


def _read(path: Path) -> torch.Tensor:
    try:
        audio, _ = read_audio(path)
    except AudioError as exc:
        raise DatasetError(str(exc)) from None
    return audio


def _check_regular(path: Path) -> None:
    """DatasetError naming what ``path`` is when it is no regular file (or a link to one): a link
    to nothing, a named pipe, a device, a folder; never opened, so a FIFO cannot block."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        problem = broken_link(path)
        raise DatasetError(
            f"{path}: is {problem}" if problem else f"{path}: cannot read: {_reason(exc)}"
        ) from None
    if not stat.S_ISREG(mode):
        raise DatasetError(f"{path}: is {kind_of(mode)}, not an audio file")


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown if len(names) <= _SHOWN else f"{shown} and {len(names) - _SHOWN} more"


def _join(problems: list[str]) -> str:
    shown = "; ".join(problems[:_SHOWN])
    more = len(problems) - _SHOWN
    return shown if more <= 0 else f"{shown}; and {more} more"
