"""Deterministic synthetic multitrack songs in the MUSDB18-HQ layout, to train and test on.

Dimensions: T frames (samples per channel), C = 2 audio channels, K harmonics.

Every track is a short piece of music built from nothing with numpy: a random tempo (80 to 160
BPM), key (major or natural minor) and chord progression (one chord per bar or half bar), shared
by four sources that differ in spectrum and in time structure as real stems do:

- ``drums``: percussion on a sixteenth-note grid, random patterns with fills and crashes. The
  kick is a sine whose pitch falls exponentially (about 150 Hz to 50 Hz) under an exponential
  decay, the snare a short decaying tone plus a burst of high-passed noise, the hi-hats (closed
  and open) and crashes high-passed noise bursts. Transient, broadband, and the only source with
  much energy above a few kHz.
- ``bass``: one note at a time between 40 and 200 Hz (chord roots, fifths, octaves and passing
  notes on a per-track rhythm), a sawtooth or square wave behind a steep low-pass near its
  fundamental, with plucked envelopes. Nearly all of its energy lies below 250 Hz.
- ``other``: the chords, three or four notes in close voicing at 200 to 400 Hz, as a detuned
  pad, plucked arpeggios or electric-piano stabs. Several steady pitches at once, changing with
  the harmony, without vibrato.
- ``vocals``: a sung melody, one note at a time at 200 to 800 Hz: a harmonic-rich source shaped
  by three formant resonances that move from vowel to vowel, vibrato at 5 to 6 Hz that sets in
  during each note, glides between notes, and phrases separated by rests with soft breath noise.

Each source is rendered in float64, scaled to unit RMS, given a random gain, and placed in the
stereo field with a small random pan per note or hit. The track is scaled so that neither the
mixture nor any stem peaks above -1 dBFS, each stem is rounded to 16-bit integers, and the
mixture is the integer sum of the rounded stems: ``mixture == drums + bass + other + vocals``
holds exactly in the written files.

Determinism: all randomness comes from ``numpy.random.Generator`` (PCG64) seeded with
``[seed, split, index, stream]`` (split 0 for train and 1 for test, one stream for the song's
plan and one per source), and all arithmetic is single-threaded numpy float64, so the same
arguments give the same bytes on every run. Test tracks never share a generator with train
tracks, whatever the seed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import soundfile as sf

from htsep.errors import HtsepError
from htsep.files import (
    StagingFolder,
    folder_lock,
    make_folder,
    remove_empty,
    remove_stale,
    rename_no_replace,
    sync_folder,
)

logger = logging.getLogger(__name__)

SOURCES = ("drums", "bass", "other", "vocals")
SPLITS = {"train": 0, "test": 1}
# Below 8 kHz the cymbals and the voice's formants would not fit; above 384 kHz htsep reads no
# audio.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 384_000
# A track is rendered whole in memory, about 120 bytes a frame (the four float64 stereo stems
# and their 16-bit copies): at most five minutes (longer than most songs) at up to 48 kHz, or
# as many frames at higher rates, about 1.7 GB.
MAX_SECONDS = 300.0
MAX_FRAMES = 300 * 48_000
# Track folders are named with four digits (synth-0000 .. synth-9999), which sort in order.
MAX_TRACKS = 10_000

_STREAMS = {"song": 0, "drums": 1, "bass": 2, "other": 3, "vocals": 4}
# Range of each source's gain in dB, relative to unit RMS.
_GAIN_DB = {"drums": (-2.0, 2.0), "bass": (-3.0, 1.0), "other": (-5.0, 0.0), "vocals": (-2.0, 2.0)}
_PEAK = 10.0 ** (-1.0 / 20.0)  # -1 dBFS
_FULL_SCALE = 32767

_MAJOR = (0, 2, 4, 5, 7, 9, 11)
_MINOR = (0, 2, 3, 5, 7, 8, 10)
# Chord roots as scale degrees (0 = tonic): common four-chord loops.
_PROGRESSIONS = (
    (0, 4, 5, 3),
    (0, 5, 3, 4),
    (0, 3, 4, 3),
    (5, 3, 0, 4),
    (0, 3, 5, 4),
    (0, 1, 4, 0),
    (0, 5, 1, 4),
)
# Formant frequencies (Hz) of five vowels (a, e, i, o, u) for an adult voice, and the
# bandwidths and relative levels of the three formants.
_VOWELS = np.array(
    [[800.0, 1200.0, 2500.0], [500.0, 1800.0, 2500.0], [300.0, 2200.0, 3000.0],
     [500.0, 900.0, 2500.0], [350.0, 800.0, 2300.0]]
)  # fmt: skip
_FORMANT_BANDWIDTHS = np.array([90.0, 120.0, 180.0])
_FORMANT_LEVELS = np.array([1.0, 0.8, 0.5])
# Vocal notes last 2, 3, 4, 6 or 8 sixteenths, and move by these scale steps, with these odds.
_NOTE_ODDS = (0.35, 0.1, 0.3, 0.1, 0.15)
_MELODY_STEPS = (-2, -1, 0, 1, 2, -3, 3, -4, 4)
_MELODY_ODDS = (0.15, 0.25, 0.1, 0.25, 0.12, 0.04, 0.04, 0.025, 0.025)
# Chance of a kick on each sixteenth of a bar (the downbeat always has one).
_KICK_ODDS = np.array(
    [1.0, 0.0, 0.05, 0.1, 0.1, 0.0, 0.15, 0.05, 0.75, 0.0, 0.2, 0.1, 0.05, 0.0, 0.2, 0.05]
)


_Pitch = TypeVar("_Pitch", float, np.ndarray)


class OutputExistsError(HtsepError, FileExistsError):
    """The dataset folder already holds a ``train`` or ``test`` folder."""


@dataclass(frozen=True)
class _Chord:
    start: float  # seconds
    duration: float  # seconds
    root: int  # scale degree of the root, 0 = tonic
    notes: int  # 3 (triad) or 4 (seventh chord)


@dataclass(frozen=True)
class _Song:
    """What the four sources share: timing, key and harmony."""

    sample_rate: int
    frames: int
    beat: float  # seconds per quarter note
    tonic: int  # pitch class of the key, 0 = C
    scale: tuple[int, ...]
    chords: tuple[_Chord, ...]

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate

    @property
    def step(self) -> float:
        """Seconds per sixteenth note, the grid every event sits on."""
        return self.beat / 4

    def pitch(self, degree: int, low: int) -> int:
        """MIDI pitch of a scale degree (any integer), counted from the lowest tonic >= ``low``."""
        tonic = low + (self.tonic - low) % 12
        return tonic + 12 * (degree // 7) + self.scale[degree % 7]

    def chord_at(self, time: float) -> _Chord:
        index = min(int(time / self.chords[0].duration), len(self.chords) - 1)
        return self.chords[index]


@dataclass(frozen=True)
class _Timbre:
    """A harmonic tone: weights (K,) of its harmonics and an envelope in seconds."""

    weights: np.ndarray
    attack: float
    decay: float
    sustain: float  # level the decay tends to, 0 for a plucked tone
    release: float
    damping: float = 0.0  # extra decay rate (1/s) per harmonic above the first: dulls with time


# Public API --------------------------------------------------------------------------------------


def render_track(
    seed: int, split: str, index: int, seconds: float, sample_rate: int
) -> dict[str, np.ndarray]:
    """The stems and the mixture of one synthetic track, as 16-bit integers.

    Returns ``{"drums", "bass", "other", "vocals", "mixture"}``, each int16 of shape
    (T, C) = (round(seconds * sample_rate), 2), the layout soundfile writes; the mixture is the
    exact sum of the four stems. The same arguments always give the same arrays.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    frames = _check_arguments(seed, index, seconds, sample_rate)

    def generator(stream: str) -> np.random.Generator:
        return np.random.default_rng([seed, SPLITS[split], index, _STREAMS[stream]])

    song_rng = generator("song")
    song = _plan_song(song_rng, frames, sample_rate)
    gains = {name: 10.0 ** (song_rng.uniform(*_GAIN_DB[name]) / 20.0) for name in SOURCES}
    renderers = {
        "drums": _render_drums,
        "bass": _render_bass,
        "other": _render_other,
        "vocals": _render_vocals,
    }
    stems = {}
    for name in SOURCES:
        stem = _unit_rms(renderers[name](song, generator(name)))
        stem *= gains[name]  # in place: a track's memory is mostly its stems
        stems[name] = stem
    return _quantize(stems)


def write_dataset(
    out: Path,
    tracks: int,
    seconds: float,
    seed: int,
    sample_rate: int = 44100,
    test_tracks: int | None = None,
) -> bool:
    """Write ``out/{train,test}/synth-NNNN/{mixture,drums,bass,other,vocals}.wav`` and
    ``out/synthetic.json`` (the recipe). -> False when ``out`` already holds the complete set of
    this recipe (nothing is written: the same command gives the same bytes).

    ``tracks`` train tracks and ``test_tracks`` test tracks (default ``max(1, tracks // 4)``),
    each ``seconds`` long, stereo 16-bit PCM at ``sample_rate``, rendered one track at a time.
    Refuses (``OutputExistsError``, before writing anything) when ``out/train`` or ``out/test``
    exists. The whole set is written in a hidden staging folder in ``out`` and renamed into
    place once complete, the recipe last: a failure or an interruption (KeyboardInterrupt)
    leaves ``out`` as it was, so the same call can simply be made again; what a killed process
    left (``kill -9``) is removed by the next call (``files.remove_stale``).
    """
    test_tracks = default_test_tracks(tracks) if test_tracks is None else test_tracks
    if not (1 <= tracks <= MAX_TRACKS and 1 <= test_tracks <= MAX_TRACKS):
        raise ValueError(
            f"need 1 to {MAX_TRACKS} train and test tracks, got {tracks} and {test_tracks}"
        )
    _check_arguments(seed, 0, seconds, sample_rate)
    recipe = {
        "tracks": tracks,
        "test_tracks": test_tracks,
        "seconds": seconds,
        "seed": seed,
        "sample_rate": sample_rate,
    }
    if _written_before(out, recipe):
        return False
    for split in SPLITS:
        if os.path.lexists(out / split):
            raise OutputExistsError(f"{out / split} already exists")
    made = make_folder(out)
    try:
        if not _place_unless_written(out, recipe, None):  # written meanwhile by another
            return False
        remove_stale(out)
        staging = StagingFolder(out)
        try:
            for split, count in (("train", tracks), ("test", test_tracks)):
                for index in range(count):
                    folder = staging.path / split / track_name(index)
                    folder.mkdir(parents=True)
                    track = render_track(seed, split, index, seconds, sample_rate)
                    for name, audio in track.items():
                        _write_wav(folder / f"{name}.wav", audio, sample_rate)
                    logger.info("wrote %s", out / split / folder.name)
            (staging.path / RECIPE_FILE).write_text(json.dumps(recipe, sort_keys=True) + "\n")
            # The same command run twice at once: the second to finish finds the first's set.
            return _place_unless_written(out, recipe, staging.path)
        finally:
            staging.cleanup()
    except BaseException:
        remove_empty(made)
        raise


def _write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """16-bit WAV; a failure is an OSError naming the file and, where it can be told, why
    (libsndfile says only "System error." for a full disk or a file size limit)."""
    try:
        sf.write(path, audio, sample_rate, "PCM_16", format="WAV")
    except sf.LibsndfileError as exc:
        reason = str(exc).strip().rstrip(".") or "write failed"
        size = audio.size * 2 + (1 << 16)  # the samples and room for a header
        with contextlib.suppress(OSError, ImportError, ValueError):
            import resource

            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if limit != resource.RLIM_INFINITY and limit < size:
                reason = f"{os.strerror(errno.EFBIG)} (ulimit -f)"
            room = os.statvfs(path.parent)
            if room.f_bavail * room.f_frsize < size:
                reason = os.strerror(errno.ENOSPC)
        raise OSError(errno.EIO, f"{path}: cannot write ({reason})") from None


def _place_unless_written(out: Path, recipe: dict[str, float], staging: Path | None) -> bool:
    """Under a lock on ``out`` (other writers of it wait): False when it holds this recipe's
    complete set now; else ``staging`` put in place (when given) and True. OutputExistsError
    when another set is there."""
    with folder_lock(out, wait=True):
        if _written_before(out, recipe):
            return False
        if staging is None:
            for split in SPLITS:
                if os.path.lexists(out / split):
                    raise OutputExistsError(f"{out / split} already exists")
        else:
            _put_in_place(staging, out)
    return True


def _put_in_place(staging: Path, out: Path) -> None:
    """Move ``train``, ``test`` and the recipe from ``staging`` into ``out``, the recipe last (its
    presence says the set is complete). On any failure, what was moved goes back to
    ``staging``."""
    moved: list[str] = []
    try:
        for split in SPLITS:
            try:
                rename_no_replace(staging / split, out / split)
            except FileExistsError:  # made by another process since the check
                raise OutputExistsError(f"{out / split} already exists") from None
            moved.append(split)
        # A recipe left without its set (train and test removed by hand) is replaced.
        os.replace(staging / RECIPE_FILE, out / RECIPE_FILE)
    except BaseException:
        for name in moved:
            os.rename(out / name, staging / name)
        raise
    sync_folder(out)


RECIPE_FILE = "synthetic.json"


def _written_before(out: Path, recipe: dict[str, float]) -> bool:
    """Whether ``out`` holds a complete set written with this very recipe (the same bytes)."""
    try:
        saved = json.loads((out / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return False
    if saved != json.loads(json.dumps(recipe)):
        return False
    for split, count in (("train", recipe["tracks"]), ("test", recipe["test_tracks"])):
        for index in range(int(count)):
            folder = out / split / track_name(index)
            if not all((folder / f"{name}.wav").is_file() for name in ("mixture", *SOURCES)):
                return False
    return True


def default_test_tracks(tracks: int) -> int:
    """How many test tracks go with ``tracks`` train tracks unless told: a quarter, at least 1."""
    return max(1, tracks // 4)


def track_name(index: int) -> str:
    """The folder name of the track at ``index`` in its split: ``synth-0000``, ..."""
    return f"synth-{index:04d}"


# The song -----------------------------------------------------------------------------------------


def _check_arguments(seed: int, index: int, seconds: float, sample_rate: int) -> int:
    """Frames of a track, after checking what ``render_track`` is given."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed} and {index}")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise ValueError(
            f"sample rate must be {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz, got {sample_rate}"
        )
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
        raise ValueError(f"seconds must be a number in (0, {MAX_SECONDS:g}], got {seconds}")
    frames = round(seconds * sample_rate)
    if frames < 1:
        raise ValueError(f"{seconds} seconds is less than one sample at {sample_rate} Hz")
    if frames > MAX_FRAMES:
        raise ValueError(
            f"{seconds} seconds at {sample_rate} Hz is {frames} frames, more than a track may "
            f"hold ({MAX_FRAMES})"
        )
    return frames


def _plan_song(rng: np.random.Generator, frames: int, sample_rate: int) -> _Song:
    beat = 60.0 / rng.uniform(80.0, 160.0)
    tonic = int(rng.integers(12))
    scale = _MAJOR if rng.random() < 0.5 else _MINOR
    chord_seconds = beat * (2 if rng.random() < 0.3 else 4)
    if rng.random() < 0.6:
        loop: tuple[int, ...] = _PROGRESSIONS[rng.integers(len(_PROGRESSIONS))]
    else:
        loop = (0, *(int(root) for root in rng.choice([0, 1, 3, 4, 5], size=3)))
    count = math.ceil(frames / sample_rate / chord_seconds)
    sevenths = rng.random(count) < 0.3
    chords = tuple(
        _Chord(i * chord_seconds, chord_seconds, loop[i % len(loop)], 4 if sevenths[i] else 3)
        for i in range(count)
    )
    return _Song(sample_rate, frames, beat, tonic, scale, chords)


def _unit_rms(stem: np.ndarray) -> np.ndarray:
    """``stem`` divided by its RMS, in place (a silent stem is left as it is)."""
    rms = float(np.sqrt(np.mean(stem**2)))
    if rms > 0:
        stem /= rms
    return stem


def _quantize(stems: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float stems (T, C) -> int16 stems and their int16 sum, the peak of all at -1 dBFS."""
    scale = _PEAK * _FULL_SCALE / _peak(stems)
    result = {}
    for name in SOURCES:
        scaled = stems[name] * scale
        # Every stem peaks at -1 dBFS or below: its rounded values fit 16 bits.
        result[name] = np.rint(scaled, out=scaled).astype(np.int16)
    total = np.zeros(result[SOURCES[0]].shape, np.int32)
    for name in SOURCES:
        total += result[name]
    # Rounding moves each stem by at most half a step: four steps of headroom cannot be used up.
    assert int(np.max(np.abs(total))) <= _FULL_SCALE, "the mixture overflows 16 bits"
    result["mixture"] = total.astype(np.int16)
    return result


def _peak(stems: dict[str, np.ndarray], block: int = 1 << 16) -> float:
    """The largest magnitude in the float stems (T, C) and in their sum, a block of frames at a
    time: the sum of a whole track would be one more stem's worth of memory."""
    frames = len(stems[SOURCES[0]])
    peak = 0.0
    for start in range(0, frames, block):
        parts = [stems[name][start : start + block] for name in SOURCES]
        mixture = sum(parts, np.zeros_like(parts[0]))
        # A stem can peak higher than the mixture where the others cancel it.
        peak = max(peak, *(float(np.max(np.abs(part))) for part in (mixture, *parts)))
    return peak


# Drums --------------------------------------------------------------------------------------------


def _render_drums(song: _Song, rng: np.random.Generator) -> np.ndarray:
    """Percussion (T, C): kick, snare, closed and open hi-hats and crashes on a random pattern."""
    rate = song.sample_rate
    hats = [_hat(rng, rate, decay=rng.uniform(0.02, 0.05), seconds=0.15) for _ in range(4)]
    sounds = {
        "kick": [_kick(rng, rate)],
        "snare": [_snare(rng, rate)],
        "hat": hats,
        "open_hat": [_hat(rng, rate, decay=rng.uniform(0.15, 0.3), seconds=0.6)],
        "crash": [_crash(rng, rate)],
    }
    side = 1.0 if rng.random() < 0.5 else -1.0
    pans = {
        "kick": 0.0,
        "snare": rng.uniform(-0.15, 0.15),
        "hat": side * rng.uniform(0.2, 0.5),
        "crash": -side * rng.uniform(0.2, 0.6),
    }
    pans["open_hat"] = pans["hat"]
    out = np.zeros((song.frames, 2))
    for instrument, time, velocity in _drum_hits(song, rng):
        variants = sounds[instrument]
        sound = variants[rng.integers(len(variants))]
        pan = pans[instrument] + rng.uniform(-0.05, 0.05)
        _add(out, round(time * rate), velocity * sound, pan)
    return out


def _drum_hits(song: _Song, rng: np.random.Generator) -> list[tuple[str, float, float]]:
    """(instrument, onset in seconds, velocity) of every hit: a two-bar pattern with variations."""
    half_time = rng.random() < 0.2
    hat_every = int(rng.choice([1, 2, 2, 4]))
    patterns = [_bar_pattern(rng, half_time, hat_every) for _ in range(2)]
    bars = math.ceil(song.seconds / (16 * song.step))
    hits = []
    for bar in range(bars):
        pattern = {name: velocities.copy() for name, velocities in patterns[bar % 2].items()}
        if bar % 4 == 3 and rng.random() < 0.4:
            fill = rng.random(4) < 0.7
            pattern["snare"][12:][fill] = rng.uniform(0.5, 1.0, 4)[fill]
        pattern["crash"] = np.zeros(16)
        if bar % 4 == 0 and rng.random() < (0.6 if bar else 0.3):
            pattern["crash"][0] = 1.0
        for instrument, velocities in pattern.items():
            for step in np.flatnonzero(velocities):
                time = (bar * 16 + step) * song.step
                if time > 0:
                    time = max(0.0, time + rng.normal(0.0, 0.004))
                hits.append((instrument, float(time), float(velocities[step])))
    return hits


def _bar_pattern(
    rng: np.random.Generator, half_time: bool, hat_every: int
) -> dict[str, np.ndarray]:
    """Velocities (16,) per instrument for one bar of sixteenths."""
    steps = np.arange(16)
    kick = np.where(rng.random(16) < _KICK_ODDS, rng.uniform(0.75, 1.0, 16), 0.0)
    kick[0] = 1.0
    snare = np.zeros(16)
    snare[[8] if half_time else [4, 12]] = 1.0
    ghosts = (rng.random(16) < 0.06) & (snare == 0)
    snare[ghosts] = rng.uniform(0.15, 0.3, 16)[ghosts]
    accents = np.where(steps % 4 == 0, 1.0, 0.65) * rng.uniform(0.8, 1.0, 16)
    hat = np.where(steps % hat_every == 0, accents, 0.0)
    open_hat = np.zeros(16)
    if rng.random() < 0.35:
        step = int(rng.choice([6, 14]))
        open_hat[step], hat[step] = 0.8, 0.0
    return {"kick": kick, "snare": snare, "hat": hat, "open_hat": open_hat}


def _kick(rng: np.random.Generator, rate: int) -> np.ndarray:
    """A sine swept down exponentially from ~150 Hz to ~50 Hz, decaying, with a short click."""
    t = _time(0.45, rate)
    start, end = rng.uniform(110.0, 170.0), rng.uniform(42.0, 58.0)
    frequency = end + (start - end) * np.exp(-t / rng.uniform(0.025, 0.05))
    body = np.sin(2 * np.pi * np.cumsum(frequency) / rate) * np.exp(-t / rng.uniform(0.15, 0.3))
    click = _filtered_noise(rng, len(t), rate, low=1000.0, high=5000.0) * np.exp(-t / 0.003)
    return (body + 0.15 * click) * np.minimum(t / 0.001, 1.0)


def _snare(rng: np.random.Generator, rate: int) -> np.ndarray:
    """A decaying tone (~200 Hz and its first drum mode) under a burst of high-passed noise."""
    t = _time(0.3, rate)
    pitch = rng.uniform(170.0, 240.0)
    decay = np.exp(-t / rng.uniform(0.03, 0.06))
    tone = (np.sin(2 * np.pi * pitch * t) + 0.5 * np.sin(2 * np.pi * 1.59 * pitch * t)) * decay
    noise = _filtered_noise(rng, len(t), rate, low=1500.0, high=min(9000.0, 0.45 * rate))
    noise *= np.exp(-t / rng.uniform(0.08, 0.16))
    mix = rng.uniform(0.3, 0.5)
    return (mix * tone + (1 - mix) * noise) * np.minimum(t / 0.0005, 1.0)


def _hat(rng: np.random.Generator, rate: int, decay: float, seconds: float) -> np.ndarray:
    t = _time(seconds, rate)
    noise = _filtered_noise(rng, len(t), rate, low=min(7000.0, 0.3 * rate))
    return 0.5 * noise * np.exp(-t / decay)


def _crash(rng: np.random.Generator, rate: int) -> np.ndarray:
    t = _time(2.0, rate)
    noise = _filtered_noise(rng, len(t), rate, low=min(4500.0, 0.25 * rate))
    return 0.5 * noise * np.exp(-t / rng.uniform(0.6, 1.2))


# Bass ---------------------------------------------------------------------------------------------


def _render_bass(song: _Song, rng: np.random.Generator) -> np.ndarray:
    """A bass line (T, C): low-passed saw or square notes following the chord roots."""
    rate = song.sample_rate
    odd_only = rng.random() < 0.4
    cutoff = rng.uniform(110.0, 220.0)
    gate = rng.uniform(0.55, 0.95)
    decay, sustain = rng.uniform(0.1, 0.4), rng.uniform(0.4, 0.9)
    damping = rng.uniform(0.0, 8.0)
    every = int(rng.choice([2, 2, 4]))
    onsets = (np.arange(16) % every == 0) | (rng.random(16) < 0.12)
    onsets[0] = True
    base_pan = rng.uniform(-0.1, 0.1)
    bars = math.ceil(song.seconds / (16 * song.step))
    times = (16 * np.arange(bars)[:, None] + np.flatnonzero(onsets)).ravel() * song.step
    times = times[times < song.seconds]
    # Each note is held for a fraction of the time to the next one.
    lengths = gate * np.diff(times, append=times[-1] + every * song.step)
    out = np.zeros((song.frames, 2))
    for time, length in zip(times.tolist(), lengths.tolist(), strict=True):
        chord = song.chord_at(time)
        offset = int(rng.choice([0, 7, 4, 1, -1], p=[0.65, 0.12, 0.13, 0.05, 0.05]))
        pitch = song.pitch(chord.root + offset, low=28)
        pitch += 12 if pitch < 28 else -12 if pitch > 52 else 0  # keep to 41-185 Hz
        frequency = _hertz(float(pitch))
        harmonics = np.arange(1, 13)
        weights = 1.0 / harmonics
        if odd_only:
            weights[1::2] = 0.0
        # A steep (about 24 dB per octave) low-pass keeps the bass below 250 Hz.
        weights /= np.sqrt(1.0 + (harmonics * frequency / cutoff) ** 8)
        timbre = _Timbre(weights, 0.004, decay, sustain, 0.03, damping)
        start = round(time * rate)
        tone = _tone(frequency, length, timbre, rate, song.frames - start)
        _add(out, start, tone, base_pan + rng.uniform(-0.05, 0.05))
    return out


# Other (chords) -----------------------------------------------------------------------------------


def _render_other(song: _Song, rng: np.random.Generator) -> np.ndarray:
    """The chords (T, C), as a detuned pad, plucked arpeggios or electric-piano stabs."""
    kind = ("pad", "pluck", "keys")[int(rng.integers(3))]
    harmonics = np.arange(1, 13)
    brightness = rng.uniform(1000.0, 4000.0)
    rolloff = (
        1.0 / harmonics ** rng.uniform(1.0, 1.6) / np.sqrt(1 + (harmonics * 300 / brightness) ** 4)
    )
    if kind == "pad":
        timbre = _Timbre(rolloff[:10], rng.uniform(0.08, 0.25), 1.0, 1.0, rng.uniform(0.15, 0.35))
    elif kind == "pluck":
        timbre = _Timbre(rolloff, 0.002, rng.uniform(0.15, 0.4), 0.0, 0.05, rng.uniform(2.0, 8.0))
    else:
        weights = np.array([1.0, 0.45, 0.2, 0.3, 0.08, 0.05, 0.1, 0.03])
        timbre = _Timbre(weights, 0.003, rng.uniform(0.6, 1.2), 0.1, 0.08, rng.uniform(1.0, 4.0))
    spread, base_pan = rng.uniform(0.2, 0.6), rng.uniform(-0.2, 0.2)
    notes = _chord_notes(song, rng, kind)
    rate = song.sample_rate
    detune = 2.0 ** (rng.uniform(4.0, 9.0) / 1200.0)
    out = np.zeros((song.frames, 2))
    for time, length, pitch in notes:
        start = round(time * rate)
        pan = base_pan + rng.uniform(-spread, spread)
        if kind == "pad":
            # Two oscillators a few cents apart, one on each side: a slow chorus.
            for ratio, side in ((detune, 1.0), (1.0 / detune, -1.0)):
                tone = _tone(_hertz(pitch) * ratio, length, timbre, rate, song.frames - start)
                _add(out, start, 0.5 * tone, pan + 0.2 * side)
        else:
            _add(out, start, _tone(_hertz(pitch), length, timbre, rate, song.frames - start), pan)
    return out


def _chord_notes(
    song: _Song, rng: np.random.Generator, kind: str
) -> list[tuple[float, float, int]]:
    """(onset in seconds, held seconds, MIDI pitch) of every chord note."""
    arpeggio_steps = int(rng.choice([1, 2]))
    stab_every = int(rng.choice([4, 4, 2, 16]))
    strum = rng.uniform(0.0, 0.015)
    notes = []
    for chord in song.chords:
        # Close voicing: every chord tone folded into the octave above G3.
        pitches = sorted(
            55 + (song.pitch(chord.root + 2 * i, 0) - 55) % 12 for i in range(chord.notes)
        )
        if kind == "pad":
            notes += [(chord.start, chord.duration, pitch) for pitch in pitches]
        elif kind == "pluck":
            steps = round(chord.duration / song.step)
            order = pitches + pitches[-2:0:-1] if rng.random() < 0.5 else pitches
            for number, step in enumerate(range(0, steps, arpeggio_steps)):
                time = chord.start + step * song.step
                notes.append((time, 1.5 * arpeggio_steps * song.step, order[number % len(order)]))
        else:
            steps = round(chord.duration / song.step)
            for step in range(0, steps, stab_every):
                time = chord.start + step * song.step
                length = 0.8 * min(stab_every, steps - step) * song.step
                notes += [(time + i * strum, length, pitch) for i, pitch in enumerate(pitches)]
    return [note for note in notes if note[0] < song.seconds]


# Vocals -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Singer:
    """What stays the same across a track's phrases."""

    vibrato_rate: float  # Hz
    vibrato_depth: float  # semitones
    formant_scale: float  # vocal tract length: a smaller (> 1) or larger (< 1) singer


def _render_vocals(song: _Song, rng: np.random.Generator) -> np.ndarray:
    """A sung melody (T, C): formant-shaped harmonic phrases with vibrato, glides and breaths."""
    rate = song.sample_rate
    singer = _Singer(rng.uniform(5.0, 6.0), rng.uniform(0.25, 0.6), rng.uniform(0.9, 1.15))
    base_pan = rng.uniform(-0.1, 0.1)
    out = np.zeros((song.frames, 2))
    # The first phrase starts early, so that even a short track has a voice.
    time = rng.uniform(0.0, min(0.5 * song.beat, 0.25 * song.seconds))
    degree = song.chord_at(time).root + int(rng.choice([0, 2, 4]))
    first = True
    while (start := round(time * rate)) < song.frames:
        count = int(rng.integers(3, 9))
        durations = song.step * rng.choice([2, 3, 4, 6, 8], size=count, p=_NOTE_ODDS)
        degrees = degree + np.cumsum(rng.choice(_MELODY_STEPS, size=count, p=_MELODY_ODDS))
        # Reflect the random walk into degrees -1 to 7: an octave and a step, a comfortable range.
        degrees = np.abs((degrees + 9) % 16 - 8) - 1
        degree = int(degrees[-1])
        pitches = np.array([song.pitch(int(d), low=57) for d in degrees], dtype=np.float64)
        pan = base_pan + rng.uniform(-0.08, 0.08)
        phrase = _phrase(rng, singer, pitches, durations, rate, song.frames - start)
        _add(out, start, phrase, pan)
        if not first:
            seconds = rng.uniform(0.15, 0.3)
            _add(out, round((time - 0.03 - seconds) * rate), _breath(rng, seconds, rate), pan)
        first = False
        time += float(np.sum(durations)) + song.step * int(rng.choice([4, 6, 8, 12]))
    return out


def _phrase(
    rng: np.random.Generator,
    singer: _Singer,
    pitches: np.ndarray,
    durations: np.ndarray,
    rate: int,
    max_frames: int,
) -> np.ndarray:
    """One sung phrase (n,), at most ``max_frames`` long, scaled so that its sung part has unit
    RMS: notes (N,) of ``pitches`` (MIDI) lasting ``durations`` (seconds) each."""
    starts = np.concatenate([[0.0], np.cumsum(durations)[:-1]])
    sung = float(np.sum(durations))
    t = _time(sung + 0.1, rate)[:max_frames]
    frequency = _hertz(_sung_pitch(rng, singer, pitches, starts, durations, t))
    phase = 2 * np.pi * np.cumsum(frequency) / rate
    # Formants move to each note's vowel within 50 ms of its start.
    vowels = _VOWELS[rng.integers(len(_VOWELS), size=len(pitches))] * singer.formant_scale
    knot_times = np.concatenate([[0.0], np.stack([starts[1:], starts[1:] + 0.05], 1).ravel()])
    knot_vowels = np.concatenate([vowels[:1], np.repeat(vowels[:-1], 2, 0)])
    knot_vowels[2::2] = vowels[1:]
    # The harmonics' amplitudes change slowly: computed every millisecond, interpolated between.
    control = np.arange(0, len(t), max(1, rate // 1000))
    formants = np.stack([np.interp(t[control], knot_times, knot_vowels[:, j]) for j in range(3)])
    amplitudes = _voice_harmonics(frequency[control], formants, rate)  # (K, control)
    samples = np.arange(len(t))
    voiced = np.zeros(len(t))
    twice_cos = 2.0 * np.cos(phase)
    previous, sine = np.zeros(len(t)), np.sin(phase)
    for row in amplitudes:
        voiced += np.interp(samples, control, row) * sine
        previous, sine = sine, twice_cos * sine - previous
    voiced *= _sung_loudness(rng, starts, sung, t)
    sung_frames = max(1, min(len(voiced), round(sung * rate)))
    return voiced / max(float(np.sqrt(np.mean(voiced[:sung_frames] ** 2))), 1e-12)


def _sung_pitch(
    rng: np.random.Generator,
    singer: _Singer,
    pitches: np.ndarray,
    starts: np.ndarray,
    durations: np.ndarray,
    t: np.ndarray,
) -> np.ndarray:
    """Pitch (n,) in MIDI semitones at times ``t`` of notes (N,): a scoop into the first note,
    linear glides centred on each change, vibrato within each note and a slow random drift."""
    glide = rng.uniform(0.04, 0.1)
    knot_times = np.concatenate(
        [[0.0, 0.06], np.stack([starts[1:] - glide / 2, starts[1:] + glide / 2], 1).ravel()]
    )
    knot_pitches = np.concatenate(
        [[pitches[0] - rng.uniform(0.3, 1.0)], np.repeat(pitches, 2)[:-1]]
    )
    melody = np.interp(t, knot_times, knot_pitches)
    # Vibrato sets in from 0.15 s into a note, is full by 0.4 s, and fades in its last 50 ms.
    note = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, len(starts) - 1)
    since, left = t - starts[note], starts[note] + durations[note] - t
    depth = singer.vibrato_depth * np.clip((since - 0.15) / 0.25, 0, 1) * np.clip(left / 0.05, 0, 1)
    vibrato = depth * np.sin(2 * np.pi * singer.vibrato_rate * t + rng.uniform(0, 2 * np.pi))
    drift_times = np.arange(0.0, t[-1] + 0.3, 0.15) if len(t) else np.zeros(1)
    drift = np.interp(t, drift_times, rng.uniform(-0.1, 0.1, len(drift_times)))
    return melody + vibrato + drift


def _sung_loudness(
    rng: np.random.Generator, starts: np.ndarray, sung: float, t: np.ndarray
) -> np.ndarray:
    """Loudness (n,) at times ``t``: a soft attack, a level per note with a small dip at each
    change, and a 0.1 s release after the last note (notes last 0.18 s or more)."""
    levels = rng.uniform(0.7, 1.0, len(starts))
    changes = starts[1:, None] + np.array([-0.03, 0.0, 0.04])  # (N - 1, 3)
    dips = 0.7 * np.minimum(levels[:-1], levels[1:])
    times = np.concatenate(
        [[0.0, rng.uniform(0.04, 0.08)], changes.ravel(), [sung - 0.02, sung + 0.1]]
    )
    values = np.concatenate(
        [[0.0, levels[0]], np.stack([levels[:-1], dips, levels[1:]], 1).ravel(), [levels[-1], 0.0]]
    )
    return np.interp(t, times, values)


def _voice_harmonics(frequency: np.ndarray, formants: np.ndarray, rate: int) -> np.ndarray:
    """Amplitudes (K, n) of a voice's harmonics at ``frequency`` (n,) with ``formants`` (3, n).

    A source falling at about 5 dB per octave, through three resonances of fixed bandwidth and
    level over a small floor; harmonics fade out between 0.4 and 0.45 of the sample rate.
    """
    count = int(min(40, 0.45 * rate // np.min(frequency)))
    harmonic = np.arange(1, count + 1)[:, None] * frequency  # (K, n)
    offsets = (harmonic[:, None, :] - formants[None]) / (_FORMANT_BANDWIDTHS[None, :, None] / 2)
    envelope = 0.03 + np.sum(_FORMANT_LEVELS[None, :, None] / np.sqrt(1 + offsets**2), axis=1)
    source = np.arange(1, count + 1)[:, None] ** -0.8
    return source * envelope * _band_limit(harmonic, rate)


def _breath(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    """An inhalation (n,): band-passed noise under a raised-sine swell, quiet beside the voice."""
    t = _time(seconds, rate)
    noise = _filtered_noise(rng, len(t), rate, low=500.0, high=min(3500.0, 0.4 * rate))
    return rng.uniform(0.06, 0.12) * noise * np.sin(np.pi * t / seconds) ** 2


# Shared DSP ---------------------------------------------------------------------------------------


def _time(seconds: float, rate: int) -> np.ndarray:
    return np.arange(round(seconds * rate)) / rate


def _hertz(pitch: _Pitch) -> _Pitch:
    """MIDI pitch -> frequency in Hz (69 = A4 = 440 Hz)."""
    return 440.0 * 2.0 ** ((pitch - 69.0) / 12.0)


def _band_limit(frequency: np.ndarray | float, rate: int) -> np.ndarray:
    """Gain that fades partials out between 0.4 and 0.45 of the sample rate (no aliasing)."""
    return np.clip((0.45 * rate - np.asarray(frequency)) / (0.05 * rate), 0.0, 1.0)


def _tone(
    frequency: float, length: float, timbre: _Timbre, rate: int, max_frames: int
) -> np.ndarray:
    """A note (n,) of ``frequency`` Hz held ``length`` seconds, then released; at most
    ``max_frames`` long."""
    t = _time(length + timbre.release, rate)[:max_frames]
    weights = timbre.weights * _band_limit(frequency * np.arange(1, len(timbre.weights) + 1), rate)
    phase = 2 * np.pi * frequency * t
    twice_cos = 2.0 * np.cos(phase)
    damping = np.exp(-timbre.damping * t)
    factor = np.ones(len(t))
    # sin(k x) = 2 cos(x) sin((k - 1) x) - sin((k - 2) x): one multiply-add per harmonic.
    previous, sine = np.zeros(len(t)), np.sin(phase)
    wave = np.zeros(len(t))
    for weight in weights:
        if weight:
            wave += weight * factor * sine
        previous, sine = sine, twice_cos * sine - previous
        factor *= damping
    return wave * _envelope(t, timbre, length)


def _envelope(t: np.ndarray, timbre: _Timbre, length: float) -> np.ndarray:
    """Linear attack, exponential decay towards the sustain level, linear release after
    ``length`` seconds."""
    attack = np.minimum(t / timbre.attack, 1.0)
    decay = timbre.sustain + (1.0 - timbre.sustain) * np.exp(-t / timbre.decay)
    release = np.clip(1.0 - (t - length) / timbre.release, 0.0, 1.0)
    return attack * decay * release


def _filtered_noise(
    rng: np.random.Generator, frames: int, rate: int, low: float, high: float | None = None
) -> np.ndarray:
    """White noise (n,) through a second-order high-pass at ``low`` Hz (and low-pass at
    ``high``), filtered in the frequency domain, of unit RMS."""
    frequency = np.fft.rfftfreq(frames, 1.0 / rate)
    gain = 1.0 / np.sqrt(1.0 + (low / np.maximum(frequency, 1e-3)) ** 4)
    if high is not None:
        gain /= np.sqrt(1.0 + (frequency / high) ** 4)
    noise = np.fft.irfft(np.fft.rfft(rng.standard_normal(frames)) * gain, frames)
    return noise / max(float(np.sqrt(np.mean(noise**2))), 1e-12)


def _add(out: np.ndarray, start: int, mono: np.ndarray, pan: float) -> None:
    """Add ``mono`` (n,) into ``out`` (T, C) from frame ``start`` with a constant-power pan
    (-1 left .. 1 right), cut to fit ``out`` (``start`` may be negative)."""
    if start < 0:
        mono, start = mono[-start:], 0
    piece = mono[: max(0, len(out) - start)]
    angle = (min(max(pan, -1.0), 1.0) + 1.0) * np.pi / 4
    out[start : start + len(piece)] += piece[:, None] * np.array([np.cos(angle), np.sin(angle)])
