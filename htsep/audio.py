"""Reading and writing audio files: the only module of htsep that touches them.

Dimensions: C audio channels, T samples per channel (frames).

Audio is always ``(C, T)`` float32 in memory, never ``(T, C)``; this module neither downmixes
nor resamples. libsndfile (through soundfile) reads WAV, FLAC, Ogg, MP3 and AIFF and writes WAV,
FLAC and MP3. Other formats (AAC/M4A, Opus, WMA, video containers, ...) are decoded by the
``ffmpeg`` executable when it is installed. Every failure is an ``AudioError`` whose message is
one line that starts with the file's path, ready for the CLI to print as is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from htsep.errors import AudioError
from htsep.files import create_temporary

logger = logging.getLogger(__name__)

SOUNDFILE_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".aifc"}
)
FFMPEG_EXTENSIONS = frozenset(
    {
        ".m4a", ".m4b", ".mp4", ".aac", ".alac", ".caf", ".opus", ".webm", ".mka", ".mkv",
        ".wma", ".ac3", ".eac3", ".dts", ".wv", ".ape", ".mp2", ".amr", ".mov",
    }
)  # fmt: skip
AUDIO_EXTENSIONS = SOUNDFILE_EXTENSIONS | FFMPEG_EXTENSIONS
WRITE_FORMATS = ("wav", "flac", "mp3")

_WAV_SUBTYPES = {16: "PCM_16", 24: "PCM_24", 32: "FLOAT"}
_FLAC_SUBTYPES = {16: "PCM_16", 24: "PCM_24"}

# The sample rates of MPEG-1, MPEG-2 and MPEG-2.5 layer III, with the bitrate range (kbps) of
# each version: libsndfile maps its compression level linearly onto that range.
_MP3_BITRATE_RANGES = {
    **dict.fromkeys((32000, 44100, 48000), (32, 320)),
    **dict.fromkeys((16000, 22050, 24000), (8, 160)),
    **dict.fromkeys((8000, 11025, 12000), (8, 64)),
}
_MP3_PRESETS = range(2, 8)

# libsndfile reports the length of these from a header that may be an estimate (MP3 without a
# Xing/LAME tag) or from the last page (Ogg), so reading fewer frames is not proof of damage.
_ESTIMATED_LENGTH_FORMATS = frozenset({"MP3", "OGG"})

# Writers that cannot seek back (pipes) leave a placeholder in the 32-bit size of the sample
# chunk: 0 or a value near 4 GiB. Those sizes say nothing about the file.
_PLACEHOLDER_SIZE = 0x7FFF_F000
# Some writers get the size of the sample chunk slightly wrong (off by a header or a pad byte);
# only a shortfall beyond this many bytes counts as truncation.
_SIZE_SLACK = 4096
# The "[mov,mp4,m4a @ 0x55ab47113c0] " that ffmpeg puts before a demuxer's or decoder's message.
_FFMPEG_CONTEXT = re.compile(r"^\[[^\]]* @ 0x[0-9a-fA-F]+\] ")

# How the files libsndfile reads begin (MP3 may also begin with a bare frame sync).
_AUDIO_SIGNATURES = (b"RIFF", b"RIFX", b"RF64", b"FORM", b"fLaC", b"OggS", b"ID3", b"caff")
_NOT_AUDIO = "not a recognised audio file (unknown format or corrupt header)"
# More channels than this is a (T, C) tensor passed as (C, T), not music.
_MAX_CHANNELS = 64


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says. ``frames`` is exact for WAV/FLAC/AIFF and may be an estimate
    for compressed formats."""

    sample_rate: int
    channels: int
    frames: int


def audio_info(path: str | os.PathLike[str]) -> AudioInfo:
    """Sample rate, channel count and length of an audio file, without decoding it."""
    name = os.fspath(path)
    _check_regular_file(name)
    # libsndfile goes first for every extension: it also reads CAF and Ogg Opus without ffmpeg.
    info = _soundfile_info(name)
    if info is None:
        info = _ffmpeg_info(name, _ffmpeg_tools(name))
    if info.frames <= 0:
        raise AudioError(f"{name}: contains no audio")
    return info


def read_audio(path: str | os.PathLike[str]) -> tuple[torch.Tensor, int]:
    """Decode a whole file. -> (audio (C, T) float32, contiguous; sample rate)

    Mono files give (1, T). Integer samples are scaled to [-1, 1); float files keep their values.
    """
    name = os.fspath(path)
    _check_regular_file(name)
    decoded = _soundfile_read(name)
    if decoded is None:
        decoded = _ffmpeg_read(name, _ffmpeg_tools(name))
    frames, sample_rate = decoded  # frames: (T, C)
    if frames.shape[0] == 0:
        raise AudioError(f"{name}: contains no audio")
    if not np.isfinite(frames).all():
        raise AudioError(f"{name}: contains NaN or infinite samples")
    return torch.from_numpy(np.ascontiguousarray(frames.T)), sample_rate


def write_audio(
    path: str | os.PathLike[str],
    audio: torch.Tensor,
    sample_rate: int,
    *,
    bits: int = 16,
    mp3_bitrate: int = 320,
    mp3_preset: int = 2,
) -> None:
    """Write audio (C, T) float atomically; the format comes from the extension.

    - ``.wav``: ``bits`` 16 or 24 give integer PCM, 32 gives 32-bit float.
    - ``.flac``: ``bits`` 16 or 24 (FLAC has no float samples).
    - ``.mp3``: constant bitrate ``mp3_bitrate`` kbps (``bits`` is ignored). libsndfile takes a
      compression level in [0, 1] that it maps linearly onto the bitrate range of the MPEG
      version of the sample rate (32..320 kbps at 32-48 kHz, 8..160 at 16-24 kHz, 8..64 below);
      we invert that map, clamping to the range, and LAME rounds to the nearest legal bitrate.
      ``mp3_preset`` (2 = best ... 7 = fastest, LAME's ``-q``) is checked but has no effect:
      libsndfile does not expose LAME's algorithm quality, so LAME's default is used.

    Integer formats and MP3 are clamped to [-1, 1] first (libsndfile before 1.0.29 wraps
    around, and LAME encodes any level, to decode as peaks far beyond full scale); float WAV
    keeps values beyond it. Missing parent folders are created. The file is written under a hidden
    temporary name in the same folder and renamed onto ``path`` only when complete, so ``path``
    never holds half a file and a failed write leaves an existing file untouched.
    """
    with AudioWriter(
        path,
        sample_rate,
        _channels_of(path, audio),
        bits=bits,
        mp3_bitrate=mp3_bitrate,
        mp3_preset=mp3_preset,
    ) as writer:
        writer.write(audio)


def _channels_of(path: str | os.PathLike[str], audio: torch.Tensor) -> int:
    if not isinstance(audio, torch.Tensor) or audio.dim() != 2 or audio.shape[0] == 0:
        shape = tuple(audio.shape) if hasattr(audio, "shape") else type(audio).__name__
        raise AudioError(
            f"{os.fspath(path)}: expected (channels, time) audio to write, got {shape}"
        )
    return int(audio.shape[0])


class AudioWriter:
    """Write a file block by block, atomically: the blocks go to a hidden temporary file in the
    destination folder, renamed onto ``path`` when the ``with`` block ends without an error and
    deleted otherwise. Formats and clamping as in ``write_audio``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        sample_rate: int,
        channels: int,
        *,
        bits: int = 16,
        mp3_bitrate: int = 320,
        mp3_preset: int = 2,
    ) -> None:
        self.name = os.fspath(path)
        self.target = Path(self.name)
        self.channels = channels
        self.settings = _encoder_settings(
            self.name, self.target.suffix.lower(), sample_rate, bits, mp3_bitrate, mp3_preset
        )
        self.sample_rate = sample_rate
        self._temporary: str | None = None
        self._handle: sf.SoundFile | None = None

    def __enter__(self) -> AudioWriter:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AudioError(
                f"{self.name}: cannot create folder {self.target.parent}: {_reason(exc)}"
            ) from None
        self._temporary = _create_temporary(self.name, self.target)
        try:
            self._handle = sf.SoundFile(
                self._temporary, "w", self.sample_rate, self.channels, **self.settings
            )
        except BaseException as exc:
            self._discard()
            if isinstance(exc, (OSError, sf.SoundFileError, RuntimeError)):
                raise AudioError(f"{self.name}: cannot write: {_reason(exc)}") from exc
            raise
        return self

    def write(self, audio: torch.Tensor) -> None:
        """Append ``audio`` (C, T)."""
        assert self._handle is not None, "use AudioWriter in a with block"
        frames = _frames_to_write(self.name, audio, clamp=self.settings["subtype"] != "FLOAT")
        if frames.shape[1] != self.channels:
            raise AudioError(
                f"{self.name}: expected {self.channels} channels to write, got {frames.shape[1]}"
            )
        try:
            self._handle.write(frames)
        except (OSError, sf.SoundFileError, RuntimeError) as exc:
            raise AudioError(f"{self.name}: cannot write: {_reason(exc)}") from exc

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is not None:
            self._discard()
            return
        assert self._handle is not None and self._temporary is not None
        try:
            self._handle.close()
            os.replace(self._temporary, self.target)
        except BaseException as exc:  # KeyboardInterrupt included: never leave it behind
            self._discard()
            if isinstance(exc, (OSError, sf.SoundFileError, RuntimeError)):
                raise AudioError(f"{self.name}: cannot write: {_reason(exc)}") from exc
            raise

    def _discard(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(Exception):
                self._handle.close()
            self._handle = None
        if self._temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._temporary)
            self._temporary = None


class AudioReader:
    """Random access to a file's samples without holding them: ``read(start, length)``.

    Formats libsndfile reads are read in place; others are decoded by ffmpeg into a temporary
    float WAV (on disk, deleted on ``close``). Reads outside the file return zeros. ``frames``
    is the header's length, which for MP3 and Ogg may be an estimate: ``count_frames`` reads
    the file through and returns the exact number.
    """

    def __init__(self, path: str | os.PathLike[str], block_frames: int = 1 << 18) -> None:
        self.name = os.fspath(path)
        self.block_frames = block_frames
        _check_regular_file(self.name)
        self._decoded: str | None = None
        handle = _open_soundfile(self.name)
        if handle is None:
            handle = self._decode_with_ffmpeg()
        self._handle = handle
        self.sample_rate = handle.samplerate
        self.channels = handle.channels
        self.frames = handle.frames
        if self.frames <= 0:
            self.close()
            raise AudioError(f"{self.name}: contains no audio")

    def _decode_with_ffmpeg(self) -> sf.SoundFile:
        ffmpeg, ffprobe = _ffmpeg_tools(self.name)
        stream = _probe(self.name, ffprobe)
        handle_fd, decoded = _named_temporary(".wav")
        os.close(handle_fd)
        self._decoded = decoded
        _run_tool(self.name, [
            ffmpeg, "-nostdin", "-y", "-v", "error", "-i", f"file:{self.name}", "-map", "0:a:0",
            "-acodec", "pcm_f32le", "-ac", str(stream["channels"]),
            "-ar", str(stream["sample_rate"]), "-f", "wav", decoded,
        ])  # fmt: skip
        try:
            return sf.SoundFile(decoded)
        except (sf.LibsndfileError, RuntimeError) as exc:
            self.close()
            raise AudioError(
                f"{self.name}: ffmpeg's output is unreadable ({_reason(exc)})"
            ) from None

    def read(self, start: int, length: int) -> torch.Tensor:
        """Samples [start, start + length) as (C, length) float32; zeros outside the file."""
        out = torch.zeros(self.channels, length)
        lo, hi = max(start, 0), min(start + length, self.frames)
        if lo < hi:
            try:
                self._handle.seek(lo)
                frames = self._handle.read(hi - lo, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise AudioError(
                    f"{self.name}: truncated or corrupt audio ({_reason(exc)})"
                ) from None
            if not np.isfinite(frames).all():
                raise AudioError(f"{self.name}: contains NaN or infinite samples")
            got = frames.shape[0]
            out[:, lo - start : lo - start + got] = torch.from_numpy(frames.T)
        return out

    def count_frames(self) -> int:
        """Read the file through once (checking every sample) and fix ``frames`` to the count."""
        self._handle.seek(0)
        total = 0
        while True:
            try:
                frames = self._handle.read(self.block_frames, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise AudioError(
                    f"{self.name}: truncated or corrupt audio ({_reason(exc)})"
                ) from None
            if frames.shape[0] == 0:
                break
            if not np.isfinite(frames).all():
                raise AudioError(f"{self.name}: contains NaN or infinite samples")
            total += frames.shape[0]
        if total == 0:
            raise AudioError(f"{self.name}: contains no audio")
        if total < self.frames and self._handle.format not in _ESTIMATED_LENGTH_FORMATS:
            raise AudioError(
                f"{self.name}: truncated or corrupt audio "
                f"({total} of {self.frames} frames could be read)"
            )
        self.frames = total
        return total

    def close(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.close()
        if self._decoded is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._decoded)
            self._decoded = None

    def __enter__(self) -> AudioReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _named_temporary(suffix: str) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix="htsep-", suffix=suffix)


# Reading -----------------------------------------------------------------------------------------


def _check_regular_file(name: str) -> None:
    try:
        mode = os.stat(name).st_mode
    except FileNotFoundError:
        raise AudioError(f"{name}: no such file") from None
    except OSError as exc:
        raise AudioError(f"{name}: cannot read: {_reason(exc)}") from None
    if stat.S_ISDIR(mode):
        raise AudioError(f"{name}: is a folder, not an audio file")
    if not stat.S_ISREG(mode):
        raise AudioError(f"{name}: is not a regular file")
    try:
        with open(name, "rb") as handle:
            empty = not handle.read(1)
    except OSError as exc:
        raise AudioError(f"{name}: cannot read: {_reason(exc)}") from None
    if empty:
        raise AudioError(f"{name}: is empty (0 bytes)")


def _open_soundfile(name: str) -> sf.SoundFile | None:
    """An open SoundFile, or None when libsndfile does not recognise the file and ffmpeg may
    still be worth a try."""
    try:
        handle = sf.SoundFile(name)
    except (sf.LibsndfileError, RuntimeError) as exc:
        if _starts_like_audio(name):
            raise AudioError(f"{name}: truncated or corrupt audio ({_reason(exc)})") from None
        if _suffix(name) in SOUNDFILE_EXTENSIONS:
            raise AudioError(f"{name}: {_NOT_AUDIO}") from None
        return None
    if _sample_chunk_truncated(name):
        handle.close()
        raise AudioError(f"{name}: truncated or corrupt audio (the file ends before its samples)")
    return handle


def _soundfile_info(name: str) -> AudioInfo | None:
    handle = _open_soundfile(name)
    if handle is None:
        return None
    with handle:
        return AudioInfo(handle.samplerate, handle.channels, handle.frames)


def _soundfile_read(name: str) -> tuple[np.ndarray, int] | None:
    """-> (frames (T, C) float32, sample rate), or None when libsndfile does not recognise it."""
    handle = _open_soundfile(name)
    if handle is None:
        return None
    with handle:
        declared = handle.frames
        try:
            frames = handle.read(dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioError(f"{name}: truncated or corrupt audio ({_reason(exc)})") from None
        if frames.shape[0] < declared:
            if handle.format not in _ESTIMATED_LENGTH_FORMATS:
                raise AudioError(
                    f"{name}: truncated or corrupt audio "
                    f"({frames.shape[0]} of {declared} frames could be read)"
                )
            logger.warning("%s: read %d of about %d frames", name, frames.shape[0], declared)
        return frames, handle.samplerate


def _sample_chunk_truncated(name: str) -> bool:
    """True when a WAV or AIFF header promises more sample bytes than the file holds.

    libsndfile quietly reads what is there, which would separate a fraction of a song without a
    word; FLAC and MP3 cuts surface as decoder errors or missing frames instead.
    """
    with open(name, "rb") as handle:
        head = handle.read(12)
        kinds = {
            (b"RIFF", b"WAVE"): ("<I", b"data"),
            (b"RIFX", b"WAVE"): (">I", b"data"),
            (b"FORM", b"AIFF"): (">I", b"SSND"),
            (b"FORM", b"AIFC"): (">I", b"SSND"),
        }
        if len(head) < 12 or (head[:4], head[8:]) not in kinds:
            return False  # RF64, W64 and others carry 64-bit sizes libsndfile checks itself
        size_format, sample_chunk = kinds[head[:4], head[8:]]
        file_size = os.fstat(handle.fileno()).st_size
        offset = 12
        while offset + 8 <= file_size:
            handle.seek(offset)
            chunk = handle.read(8)
            (size,) = struct.unpack(size_format, chunk[4:])
            if chunk[:4] == sample_chunk:
                if size == 0 or size >= _PLACEHOLDER_SIZE:
                    return False
                return offset + 8 + size > file_size + _SIZE_SLACK
            offset += 8 + size + (size & 1)  # chunks are padded to an even size
        return False  # libsndfile found samples where we did not: a writer's quirk, trust it


def _starts_like_audio(name: str) -> bool:
    """Whether the file begins with the signature of a format libsndfile reads, so that its
    failure to open it means damage rather than some other kind of file."""
    with open(name, "rb") as handle:
        head = handle.read(4)
    mpeg_sync = len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0
    return head.startswith(_AUDIO_SIGNATURES) or mpeg_sync


# Decoding through ffmpeg -------------------------------------------------------------------------


def _ffmpeg_tools(name: str) -> tuple[str, str]:
    """Paths of ffmpeg and ffprobe, or the error that explains why the file cannot be read."""
    suffix = _suffix(name)
    ffmpeg, ffprobe = shutil.which("ffmpeg"), shutil.which("ffprobe")
    if ffmpeg is not None and ffprobe is not None:
        return ffmpeg, ffprobe
    if suffix not in FFMPEG_EXTENSIONS:
        raise AudioError(f"{name}: {_NOT_AUDIO}")
    missing = "ffmpeg" if ffmpeg is None else "ffprobe (part of ffmpeg)"
    raise AudioError(
        f"{name}: reading {suffix} files needs {missing}, which is not installed (install it, "
        "e.g. 'apt install ffmpeg' or 'brew install ffmpeg', or convert the file to WAV or FLAC)"
    )


def _run_tool(name: str, command: list[str]) -> bytes:
    """Run ffmpeg or ffprobe; -> stdout. A failure becomes the first line of its stderr."""
    try:
        done = subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL, check=False)
    except OSError as exc:
        raise AudioError(f"{name}: cannot run {command[0]}: {_reason(exc)}") from None
    stderr = done.stderr.decode("utf-8", "replace").strip()
    if done.returncode != 0:
        tool = Path(command[0]).name
        first = stderr.splitlines()[0] if stderr else f"exit status {done.returncode}"
        # ffmpeg starts its messages with the input's URL or its demuxer's address; the path
        # already leads ours.
        first = _FFMPEG_CONTEXT.sub("", first.removeprefix(f"file:{name}: "))
        raise AudioError(f"{name}: {tool} cannot read it: {first}")
    if stderr:
        logger.warning("%s: %s: %s", name, Path(command[0]).name, stderr.splitlines()[0])
    return done.stdout


def _probe(name: str, ffprobe: str) -> dict[str, Any]:
    """ffprobe's description of the first audio stream, with the container's duration."""
    out = _run_tool(
        name,
        [
            ffprobe, "-v", "error", "-select_streams", "a:0",
            "-show_entries", "stream=sample_rate,channels,duration:format=duration",
            "-of", "json", f"file:{name}",
        ],
    )  # fmt: skip
    try:
        probed = json.loads(out)
        streams = probed.get("streams") or []
        if not streams:
            raise AudioError(f"{name}: has no audio stream")
        stream = dict(streams[0])
        stream["sample_rate"] = int(stream["sample_rate"])
        stream["channels"] = int(stream["channels"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise AudioError(f"{name}: ffprobe gave no sample rate and channel count") from None
    if stream["sample_rate"] <= 0 or stream["channels"] <= 0:
        raise AudioError(f"{name}: ffprobe gave no sample rate and channel count")
    stream["format_duration"] = (probed.get("format") or {}).get("duration")
    return stream


def _ffmpeg_info(name: str, tools: tuple[str, str]) -> AudioInfo:
    stream = _probe(name, tools[1])
    rate, channels = stream["sample_rate"], stream["channels"]
    for duration in (stream.get("duration"), stream.get("format_duration")):
        with contextlib.suppress(ValueError, OverflowError):  # absent, "N/A" or nonsense
            return AudioInfo(rate, channels, round(float(str(duration)) * rate))
    frames, _ = _ffmpeg_read(name, tools)  # no duration in the header: count by decoding
    return AudioInfo(rate, channels, frames.shape[0])


def _ffmpeg_read(name: str, tools: tuple[str, str]) -> tuple[np.ndarray, int]:
    """-> (frames (T, C) float32, sample rate), decoded by ffmpeg to raw little-endian floats."""
    ffmpeg, ffprobe = tools
    stream = _probe(name, ffprobe)
    rate, channels = stream["sample_rate"], stream["channels"]
    # -ac/-ar restate the probed layout: raw output has no header, so if the stream changed
    # layout midway ffmpeg must convert rather than change the meaning of the bytes.
    raw = _run_tool(
        name,
        [
            ffmpeg, "-nostdin", "-v", "error", "-i", f"file:{name}", "-map", "0:a:0",
            "-f", "f32le", "-acodec", "pcm_f32le", "-ac", str(channels), "-ar", str(rate), "-",
        ],
    )  # fmt: skip
    samples = np.frombuffer(raw, dtype="<f4")
    usable = samples.size - samples.size % channels
    frames = samples[:usable].reshape(-1, channels)  # (T, C), interleaved as decoded
    return frames.astype(np.float32), rate


# Writing -----------------------------------------------------------------------------------------


def _encoder_settings(
    name: str, suffix: str, sample_rate: int, bits: int, mp3_bitrate: int, mp3_preset: int
) -> dict[str, Any]:
    """soundfile's keywords for a format, or the AudioError that explains why it cannot be."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise AudioError(f"{name}: the sample rate must be a positive integer, not {sample_rate}")
    if suffix == ".wav":
        if bits not in _WAV_SUBTYPES:
            raise AudioError(f"{name}: WAV takes 16, 24 or 32 bits, not {bits}")
        return {"format": "WAV", "subtype": _WAV_SUBTYPES[bits]}
    if suffix == ".flac":
        if bits == 32:
            raise AudioError(
                f"{name}: FLAC has no 32-bit float samples (use 16 or 24 bits, or WAV)"
            )
        if bits not in _FLAC_SUBTYPES:
            raise AudioError(f"{name}: FLAC takes 16 or 24 bits, not {bits}")
        return {"format": "FLAC", "subtype": _FLAC_SUBTYPES[bits]}
    if suffix == ".mp3":
        return _mp3_settings(name, sample_rate, mp3_bitrate, mp3_preset)
    what = f"{suffix} files" if suffix else "a file without an extension"
    known = ", ".join(f".{extension}" for extension in WRITE_FORMATS)
    raise AudioError(f"{name}: cannot write {what} (use one of: {known})")


def _mp3_settings(name: str, sample_rate: int, bitrate: int, preset: int) -> dict[str, Any]:
    if "MP3" not in sf.available_formats():
        raise AudioError(
            f"{name}: this libsndfile cannot write MP3 (it needs version 1.1 or later)"
        )
    if sample_rate not in _MP3_BITRATE_RANGES:
        raise AudioError(f"{name}: mp3 does not support {sample_rate} Hz")
    if not 8 <= bitrate <= 320:
        raise AudioError(f"{name}: the mp3 bitrate must be 8 to 320 kbps, not {bitrate}")
    if preset not in _MP3_PRESETS:
        raise AudioError(f"{name}: the mp3 preset must be 2 (best) to 7 (fastest), not {preset}")
    low, high = _MP3_BITRATE_RANGES[sample_rate]
    kbps = min(max(bitrate, low), high)
    # libsndfile: kbps = high - level * (high - low); it truncates, hence the half step.
    level = min(max((high - kbps - 0.5) / (high - low), 0.0), 1.0)
    return {
        "format": "MP3",
        "subtype": "MPEG_LAYER_III",
        "bitrate_mode": "CONSTANT",
        "compression_level": level,
    }


def _frames_to_write(name: str, audio: torch.Tensor, *, clamp: bool) -> np.ndarray:
    """audio (C, T) -> contiguous (T, C) float32 array, as libsndfile interleaves; ``audio``
    itself is left as it is."""
    if not isinstance(audio, torch.Tensor) or audio.dim() != 2 or audio.shape[0] == 0:
        shape = tuple(audio.shape) if hasattr(audio, "shape") else type(audio).__name__
        raise AudioError(f"{name}: expected (channels, time) audio to write, got {shape}")
    if audio.shape[0] > _MAX_CHANNELS:
        raise AudioError(
            f"{name}: expected (channels, time) audio to write, got {tuple(audio.shape)} "
            f"(more than {_MAX_CHANNELS} channels: is it (time, channels)?)"
        )
    samples = audio.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(samples).all()):
        raise AudioError(f"{name}: the audio to write contains NaN or infinite samples")
    if clamp:
        samples = samples.clamp(-1.0, 1.0)
    return np.ascontiguousarray(samples.numpy().T)


def _create_temporary(name: str, target: Path) -> str:
    """Create an empty hidden file next to ``target``. Unlike ``tempfile.mkstemp`` (mode 0600)
    it gets the permissions the umask gives any new file, which the renamed result keeps."""
    try:
        return os.fspath(create_temporary(target))
    except FileExistsError:
        raise AudioError(
            f"{name}: cannot write: no free temporary name in {target.parent}"
        ) from None
    except OSError as exc:
        raise AudioError(f"{name}: cannot write: {_reason(exc)}") from None


# Helpers -----------------------------------------------------------------------------------------


def _suffix(name: str) -> str:
    return Path(name).suffix.lower()


def _reason(exc: BaseException) -> str:
    """The cause of an OS or libsndfile error, on one line and without the temporary's name."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    elif isinstance(exc, sf.LibsndfileError):
        reason = exc.error_string
    else:
        reason = str(exc) or type(exc).__name__
    return " ".join(reason.split()).removeprefix("Error : ").rstrip(".")
