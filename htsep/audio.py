"""Reading and writing audio files: the only module of htsep that touches them.

Dimensions: C audio channels, T samples per channel (frames).

Audio is always ``(C, T)`` float32 in memory, never ``(T, C)``; this module neither downmixes
nor resamples. libsndfile (through soundfile) reads WAV, FLAC, Ogg, MP3 and AIFF and writes WAV,
FLAC and MP3. Other formats (AAC/M4A, Opus, WMA, video containers, ...) are decoded by the
``ffmpeg`` executable when it is installed. Every failure is an ``AudioError`` whose message is
one line that starts with the file's path, ready for the CLI to print as is.

Hostile or damaged input, by class:

- Truncation: libsndfile quietly shortens the length of most containers to what the file holds.
  A file whose header announces more samples than it holds is refused (``_check_complete``:
  libsndfile's own header log, then a parse of the headers it does not check). Formats whose
  header states no length (IRCAM, PAF, PVF) can only show a cut that splits a frame.
- Encodings libsndfile decodes but cannot seek in (GSM 6.10, G.72x and NMS ADPCM, XI DPCM) are
  read front to back: ``AudioReader`` decodes them once into a float temporary.
- An input that changes while it is read (truncated, rewritten in place) fails: ``AudioReader``
  checks the open file's size and times on every read and in ``check_unchanged``. A file
  replaced by a rename is not a change: the reader keeps reading the file it opened.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from soundfile import _ffi, _snd

from htsep.errors import AudioError, UsageError
from htsep.files import create_temporary, make_folder, place
from htsep.quiet import native_stderr_muted

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
# The integer subtypes htsep writes, by bits per sample. libsndfile 1.2.2 converts float samples
# to these by flooring in WAV and AIFF (rounding only in FLAC), a bias of half a step: htsep
# rounds them itself and hands libsndfile integers, which it stores as they are.
_PCM_BITS = {"PCM_16": 16, "PCM_24": 24}
# libsndfile's SFC_SET_ADD_PEAK_CHUNK: float WAVs get a PEAK chunk stamped with the time of
# writing, so that two runs would never give the same bytes.
_SET_ADD_PEAK_CHUNK = 0x1050

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

# Encodings libsndfile seeks in exactly, so that AudioReader reads them in place. It seeks in
# MP3 and Vorbis only roughly (off by hundreds of samples), in the blocks of SDS and 24-bit PAF
# not at all near the end, in GSM 6.10, G.72x, NMS ADPCM and DPCM never: those are decoded front
# to back into a temporary file instead.
_RANDOM_ACCESS_SUBTYPES = frozenset(
    {"PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW",
     "IMA_ADPCM", "MS_ADPCM", "ALAC_16", "ALAC_20", "ALAC_24", "ALAC_32"}
)  # fmt: skip
_PACKED_FORMATS = frozenset({"SDS", "PAF"})

# Writers that cannot seek back (pipes) leave a placeholder in a 32-bit chunk size, which says
# nothing about the file: 0, 0xFFFFFFFF (ffmpeg) or sox's MS_UNSPEC, 0x7FFFF000 rounded down to
# whole blocks of the data chunk (and, in the RIFF size, that plus the header). Every other size
# is a length, however large (a WAV of 2 to 4 GiB).
_UNKNOWN_SIZES = frozenset({0, 0xFFFF_FFFF})
_SOX_UNKNOWN_SIZE = 0x7FFF_F000
# The "[mov,mp4,m4a @ 0x55ab47113c0] " that ffmpeg puts before a demuxer's or decoder's message.
_FFMPEG_CONTEXT = re.compile(r"^\[[^\]]* @ 0x[0-9a-fA-F]+\] ")

# How the files libsndfile reads begin (MP3 may also begin with a bare frame sync).
# How the files of every container libsndfile reads begin (those that have a signature): when
# libsndfile cannot open such a file it is damaged, and ffmpeg, which reads some of them too,
# would decode what is left of it without a word.
_AUDIO_SIGNATURES = (
    b"RIFF", b"RIFX", b"RF64", b"FORM", b"fLaC", b"OggS", b"ID3", b"caff",  # WAV AIFF SVX ...
    b"riff\x2e\x91\xcf\x11", b".snd", b"dns.", b"NIST_1A", b"Creative Voice File", b"2BIT",
    b"Extended Instrument:", b"MATLAB 5.0 MAT-file", b" paf", b"fap ", b"PVF1", b"ALawSoundFile",
    b"\x64\xa3\x01\x00", b"\x64\xa3\x02\x00", b"\x64\xa3\x03\x00", b"\x64\xa3\x04\x00",
    b"\x00\x01\xa3\x64", b"\x00\x02\xa3\x64", b"\x00\x03\xa3\x64", b"\x00\x04\xa3\x64",
)  # fmt: skip
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


def file_name(path: Any, what: str = "audio file") -> str:
    """``path`` (a str or os.PathLike) as a str, or the UsageError that says why it is no
    file name: another type (bytes included), an empty string, a NUL character."""
    try:
        name = os.fspath(path)
    except TypeError:
        name = None
    article = "an" if what[0] in "aeiou" else "a"
    if not isinstance(name, str):
        kind = type(path).__name__
        raise UsageError(f"expected {article} {what} path (str or os.PathLike), not {kind}")
    if not name:
        raise UsageError(f"expected {article} {what} path, got an empty string")
    if "\0" in name:
        raise UsageError(f"{what} path {name!r} contains a NUL character, which no file name can")
    return name


def audio_info(path: str | os.PathLike[str]) -> AudioInfo:
    """Sample rate, channel count and length of an audio file, without decoding it."""
    name = file_name(path)
    with _open_input(name):
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
    name = file_name(path)
    with _open_input(name):
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
    replace: bool = True,
    label: str | None = None,
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
    keeps values beyond it. Integer samples are rounded to the nearest step (half to even), the
    same in every container: x is stored as rint(x * 2^(bits-1)), at most 2^(bits-1) - 1.
    Float WAVs carry no PEAK chunk, whose time stamp would make each write's bytes differ.

    Missing parent folders are created. The file is written under a hidden temporary name in
    the same folder, synced to disk and renamed onto ``path`` only when complete, so ``path``
    never holds half a file and a failed write leaves an existing file untouched.
    ``replace=False``: a file that appears at ``path`` meanwhile is kept and the write fails.
    ``label``: the name errors give instead of ``path``.
    """
    with AudioWriter(
        path,
        sample_rate,
        _channels_of(label or file_name(path, "output file"), audio),
        bits=bits,
        mp3_bitrate=mp3_bitrate,
        mp3_preset=mp3_preset,
        replace=replace,
        label=label,
    ) as writer:
        writer.write(audio)


def _channels_of(name: str, audio: torch.Tensor) -> int:
    if not isinstance(audio, torch.Tensor) or audio.dim() != 2 or audio.shape[0] == 0:
        shape = tuple(audio.shape) if hasattr(audio, "shape") else type(audio).__name__
        raise AudioError(f"{name}: expected (channels, time) audio to write, got {shape}")
    return int(audio.shape[0])


class AudioWriter:
    """Write a file block by block, atomically: the blocks go to a hidden temporary file in the
    destination folder, synced and renamed onto ``path`` when the ``with`` block ends without an
    error, deleted otherwise. Formats, clamping, ``replace`` and ``label`` as in
    ``write_audio``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        sample_rate: int,
        channels: int,
        *,
        bits: int = 16,
        mp3_bitrate: int = 320,
        mp3_preset: int = 2,
        replace: bool = True,
        label: str | None = None,
    ) -> None:
        target = file_name(path, "output file")
        self.target = Path(target)
        self.name = label if label is not None else target
        if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)):
            raise UsageError(f"{self.name}: the channel count must be an integer, not {channels!r}")
        if not 1 <= channels <= _MAX_CHANNELS:
            raise AudioError(
                f"{self.name}: cannot write {channels} channels (1 to {_MAX_CHANNELS}; "
                "is it (time, channels)?)"
            )
        if not isinstance(replace, bool):
            raise UsageError(f"replace must be True or False, not {replace!r}")
        self.channels = int(channels)
        self.replace = replace
        self.settings = _encoder_settings(
            self.name, self.target.suffix.lower(), sample_rate, bits, mp3_bitrate, mp3_preset
        )
        if self.settings["format"] == "MP3":
            _check_mp3_tag(self.name, sample_rate, self.channels, mp3_bitrate, self.settings)
        self.sample_rate = sample_rate
        self._temporary: str | None = None
        self._handle: sf.SoundFile | None = None

    def __enter__(self) -> AudioWriter:
        try:
            make_folder(self.target.parent)
        except OSError as exc:
            raise AudioError(
                f"{self.name}: cannot create folder {self.target.parent}: {_reason(exc)}"
            ) from None
        self._temporary = _create_temporary(self.name, self.target)
        try:
            self._handle = sf.SoundFile(
                os.fsencode(self._temporary), "w", self.sample_rate, self.channels, **self.settings
            )
            if self.settings["subtype"] == "FLOAT":  # before any sample is written
                _snd.sf_command(self._handle._file, _SET_ADD_PEAK_CHUNK, _ffi.NULL, 0)
        except BaseException as exc:
            self._fail(exc)
            raise
        return self

    def write(self, audio: torch.Tensor) -> None:
        """Append ``audio`` (C, T)."""
        if self._handle is None:
            raise UsageError(f"{self.name}: write inside the writer's with block")
        frames = _frames_to_write(self.name, audio, self.settings["subtype"])
        if frames.shape[1] != self.channels:
            raise AudioError(
                f"{self.name}: expected {self.channels} channels to write, got {frames.shape[1]}"
            )
        try:
            self._handle.write(frames)
        except BaseException as exc:
            self._fail(exc)
            raise

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is not None:
            self._discard()
            return
        assert self._handle is not None and self._temporary is not None
        try:
            self._handle.close()
            self._handle = None
            place(self._temporary, self.target, replace=self.replace)
        except FileExistsError:
            self._discard()
            raise AudioError(
                f"{self.name}: exists already (created by another program while htsep wrote "
                "it); not replaced"
            ) from None
        except BaseException as exc:  # KeyboardInterrupt included: never leave it behind
            self._fail(exc)
            raise
        self._temporary = None

    def _fail(self, exc: BaseException) -> None:
        """Remove the temporary; for a write error, raise the AudioError that explains it."""
        # libsndfile reports a full disk (or a file size limit) as "System error": repeat the
        # failed write with the OS to learn its reason before the temporary goes.
        reason = None
        if _is_write_error(exc) and self._temporary is not None:
            reason = _write_failure(self._temporary)
        self._discard()
        if _is_write_error(exc):
            raise AudioError(f"{self.name}: cannot write: {reason or _reason(exc)}") from None

    def _discard(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(Exception):
                self._handle.close()
            self._handle = None
        if self._temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._temporary)
            self._temporary = None


def _write_failure(path: str) -> str | None:
    """The OS's reason why ``path`` cannot grow (a full disk, a file size limit), if appending
    to it fails now: libsndfile reports either as "System error"."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError as exc:
        return _reason(exc)
    try:
        os.write(fd, bytes(1 << 16))
    except OSError as exc:
        return _reason(exc)
    finally:
        os.close(fd)
    return None


def _is_write_error(exc: BaseException) -> bool:
    # soundfile asserts that libsndfile wrote every frame: a short write is an AssertionError.
    return isinstance(exc, (OSError, sf.SoundFileError, RuntimeError, AssertionError))


class AudioReader:
    """Random access to a file's samples without holding them: ``read(start, length)``.

    PCM-like encodings and FLAC are read in place; encodings libsndfile cannot seek in exactly
    (MP3, Ogg, GSM 6.10, G.72x, ...) are decoded by libsndfile front to back, and formats it
    does not read are decoded by ffmpeg, into a temporary float file (on disk, deleted on
    ``close``). Reads outside [0, frames) return zeros. ``frames`` is
    the header's length, which for MP3 and Ogg may be an estimate: ``count_frames`` reads the
    file through and returns the exact number.

    The input must not change while it is read: ``read`` and ``check_unchanged`` raise
    AudioError when the open file's size or times differ from those at opening, or when it
    yields fewer samples than counted. A file replaced by a rename (the usual way editors save)
    is not a change: the reader goes on reading the file it opened, which stays whole.
    """

    def __init__(self, path: str | os.PathLike[str], block_frames: int = 1 << 18) -> None:
        self.name = file_name(path)
        if isinstance(block_frames, bool) or not isinstance(block_frames, int) or block_frames < 1:
            raise UsageError(f"block_frames must be a positive integer, not {block_frames!r}")
        self.block_frames = block_frames
        self._decoded: str | None = None
        self._handle: sf.SoundFile | None = None
        self._input: _Input | None = _open_input(self.name)
        try:
            handle = _open_soundfile(self.name)
            if handle is None:
                handle = self._decode_with_ffmpeg()
            elif not _random_access(handle):
                handle = self._decode_front_to_back(handle)
            else:
                self._input.check_same_path()
        except BaseException:
            self.close()
            raise
        self._handle = handle
        self.sample_rate = handle.samplerate
        self.channels = handle.channels
        self.frames = handle.frames
        # Whether ``frames`` is exact, so that a short read means the file changed.
        self._exact = self._decoded is not None or handle.format not in _ESTIMATED_LENGTH_FORMATS
        if self.frames <= 0:
            self.close()
            raise AudioError(f"{self.name}: contains no audio")

    def _decode_with_ffmpeg(self) -> sf.SoundFile:
        ffmpeg, ffprobe = _ffmpeg_tools(self.name)
        stream = _probe(self.name, ffprobe)
        self._decoded = decoded = _decoding_temporary(self.name)
        _run_tool(self.name, [
            ffmpeg, "-nostdin", "-y", "-v", "error", "-i", f"file:{self.name}", "-map", "0:a:0",
            "-acodec", "pcm_f32le", "-ac", str(stream["channels"]),
            "-ar", str(stream["sample_rate"]), "-rf64", "auto", "-f", "wav", decoded,
        ])  # fmt: skip
        return self._open_decoded()

    def _decode_front_to_back(self, handle: sf.SoundFile) -> sf.SoundFile:
        """Decode an encoding libsndfile cannot seek in exactly into a float temporary, block by
        block."""
        self._decoded = _decoding_temporary(self.name)
        with handle:
            try:
                out = sf.SoundFile(
                    os.fsencode(self._decoded),
                    "w",
                    handle.samplerate,
                    handle.channels,
                    "FLOAT",
                    format="RF64",
                )
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise AudioError(f"{self.name}: cannot decode it: {_reason(exc)}") from None
            with out:
                for block in _blocks(self.name, handle, self.block_frames):
                    try:
                        out.write(block)
                    except (sf.LibsndfileError, RuntimeError, AssertionError) as exc:
                        where = os.path.dirname(self._decoded)
                        reason = _write_failure(self._decoded) or _reason(exc)
                        raise AudioError(
                            f"{self.name}: cannot decode it into {where}: {reason}"
                        ) from None
        return self._open_decoded()

    def _open_decoded(self) -> sf.SoundFile:
        """The decoded temporary, once the input is known not to have changed meanwhile: the
        reader is done with the input itself."""
        assert self._input is not None and self._decoded is not None
        self._input.check_unchanged()
        self._input.close()
        self._input = None
        try:
            return sf.SoundFile(os.fsencode(self._decoded))
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioError(
                f"{self.name}: the decoded audio is unreadable ({_reason(exc)})"
            ) from None

    def read(self, start: int, length: int) -> torch.Tensor:
        """Samples [start, start + length) as (C, length) float32; zeros outside the file."""
        if self._handle is None:
            raise UsageError(f"{self.name}: the reader is closed")
        for what, value in (("start", start), ("length", length)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise UsageError(f"{what} must be an integer, not {value!r}")
        if length < 0:
            raise UsageError(f"length must be >= 0, not {length}")
        out = torch.zeros(self.channels, length)
        lo, hi = max(start, 0), min(start + length, self.frames)
        if lo < hi:
            self.check_unchanged()
            try:
                self._handle.seek(lo)
                read = self._handle.read(hi - lo, dtype=_read_dtype(self._handle), always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                self.check_unchanged()
                raise AudioError(
                    f"{self.name}: truncated or corrupt audio ({_reason(exc)})"
                ) from None
            frames = _float32_samples(self.name, read)
            got = frames.shape[0]
            if got < hi - lo and self._exact:
                raise AudioError(
                    f"{self.name}: changed while it was read ({got} of the {hi - lo} frames "
                    f"from frame {lo} could be read again)"
                )
            out[:, lo - start : lo - start + got] = torch.from_numpy(frames.T)
        return out

    def check_unchanged(self) -> None:
        """Raise AudioError if the input was modified (written, truncated) since it was opened.
        A file replaced by a rename is not modified: the reader still reads the one it opened."""
        if self._input is not None:
            self._input.check_unchanged()

    def count_frames(self) -> int:
        """Read the file through once (checking every sample) and fix ``frames`` to the count."""
        if self._handle is None:
            raise UsageError(f"{self.name}: the reader is closed")
        self.check_unchanged()
        try:
            self._handle.seek(0)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioError(f"{self.name}: truncated or corrupt audio ({_reason(exc)})") from None
        total = sum(block.shape[0] for block in _blocks(self.name, self._handle, self.block_frames))
        self.check_unchanged()
        if total == 0:
            raise AudioError(f"{self.name}: contains no audio")
        if total < self.frames and self._exact:
            raise AudioError(
                f"{self.name}: truncated or corrupt audio "
                f"({total} of {self.frames} frames could be read)"
            )
        self.frames = total
        self._exact = True
        return total

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._input is not None:
            self._input.close()
            self._input = None
        if self._decoded is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._decoded)
            self._decoded = None

    def __enter__(self) -> AudioReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _decoding_temporary(name: str) -> str:
    """A new empty file in the temporary folder for a decoded input, named (as ``files``
    names temporaries) after this process so that a later run can remove it if it is killed."""
    try:
        return os.fspath(create_temporary(Path(tempfile.gettempdir()) / "htsep-decoded.wav"))
    except OSError as exc:
        raise AudioError(
            f"{name}: cannot create a temporary file in {tempfile.gettempdir()}: {_reason(exc)}"
        ) from None


# Reading -----------------------------------------------------------------------------------------


class _Input:
    """An input file held open (without blocking on a FIFO) from its checks to its last read,
    with the size and times it had when opened."""

    def __init__(self, name: str) -> None:
        self.name = name
        try:
            # O_NONBLOCK: opening a FIFO for reading would wait for a writer.
            self.fd: int | None = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise AudioError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise AudioError(f"{name}: is a folder, not an audio file") from None
        except OSError as exc:
            raise AudioError(f"{name}: cannot read: {_reason(exc)}") from None
        try:
            self.stat = os.fstat(self.fd)
            if stat.S_ISDIR(self.stat.st_mode):
                raise AudioError(f"{name}: is a folder, not an audio file")
            if not stat.S_ISREG(self.stat.st_mode):
                raise AudioError(f"{name}: is not a regular file")
            try:
                empty = not os.pread(self.fd, 1, 0)
            except OSError as exc:
                raise AudioError(f"{name}: cannot read: {_reason(exc)}") from None
            if empty:
                raise AudioError(f"{name}: is empty (0 bytes)")
        except BaseException:
            self.close()
            raise

    def check_unchanged(self) -> None:
        if self.fd is None:
            return
        now = os.fstat(self.fd)
        if _changed(self.stat, now):
            detail = (
                f"now {now.st_size} bytes, was {self.stat.st_size}"
                if now.st_size != self.stat.st_size
                else "rewritten in place"
            )
            raise AudioError(
                f"{self.name}: changed while it was being read ({detail}); not used "
                "(separate it again once it is complete)"
            )

    def check_same_path(self) -> None:
        """The file libsndfile opened by name is the one held open (not swapped meanwhile)."""
        try:
            now = os.stat(self.name)
        except OSError as exc:
            raise AudioError(f"{self.name}: cannot read: {_reason(exc)}") from None
        if (now.st_ino, now.st_dev) != (self.stat.st_ino, self.stat.st_dev):
            raise AudioError(f"{self.name}: replaced while it was being opened; not used")
        self.check_unchanged()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> _Input:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _changed(then: os.stat_result, now: os.stat_result) -> bool:
    if (now.st_size, now.st_mtime_ns) != (then.st_size, then.st_mtime_ns):
        return True
    # The change time catches a rewrite whose modification time was set back, but it also moves
    # when a link to the file comes or goes (a rename over it): only compared if none did.
    return now.st_nlink == then.st_nlink and now.st_ctime_ns != then.st_ctime_ns


def _open_input(name: str) -> _Input:
    """Check that ``name`` is a non-empty regular file that can be read, without blocking."""
    return _Input(name)


def _open_soundfile(name: str) -> sf.SoundFile | None:
    """An open SoundFile whose header promises no more than the file holds, or None when
    libsndfile does not recognise the file and ffmpeg may still be worth a try."""
    try:
        with native_stderr_muted():  # libmpg123's notes on a damaged MP3
            handle = _soundfile_for_reading(name)
    except (sf.LibsndfileError, RuntimeError) as exc:
        if _starts_like_audio(name):
            reason = _reason(exc)
            if "not a regular file" in reason:  # libsndfile's words for an MP3 with no frame
                reason = "no audio frames found"
            raise AudioError(f"{name}: truncated or corrupt audio ({reason})") from None
        if _suffix(name) in SOUNDFILE_EXTENSIONS:
            raise AudioError(f"{name}: {_NOT_AUDIO}") from None
        if _suffix(name) == ".raw":  # ffmpeg would take it for raw video
            raise AudioError(
                f"{name}: headerless audio: its sample rate, channels and encoding are "
                "unknown (give it a header, e.g. as WAV)"
            ) from None
        return None
    try:
        if handle.channels <= 0 or handle.samplerate <= 0:
            raise AudioError(f"{name}: truncated or corrupt audio (no channels or sample rate)")
        _check_complete(name, handle)
        with native_stderr_muted():
            _check_decodable(name, handle)
    except BaseException:
        handle.close()
        raise
    return handle


def _soundfile_for_reading(name: str) -> sf.SoundFile:
    """libsndfile's reader of ``name``, from what the file holds. soundfile takes a ".raw" name
    for headerless audio, whose rate, channels and encoding it would need to be told: such a
    file is opened through a descriptor instead, which leaves the format to libsndfile's look
    at the content (a WAV named .raw is read; headerless samples are not recognised)."""
    if _suffix(name) != ".raw":
        # bytes: names need not be UTF-8. libsndfile reads standard input for the name "-":
        # a file of that name (given as ./-, which pathlib shortens) is read as ./-.
        return sf.SoundFile(os.fsencode("./-" if name == "-" else name))
    # libsndfile closes the descriptor with the file, and also when it cannot open it.
    return sf.SoundFile(os.open(name, os.O_RDONLY), closefd=True)


def _check_complete(name: str, handle: sf.SoundFile) -> None:
    """Refuse a file whose header announces more samples than the file holds (libsndfile reads
    what is there without a word, which would separate a fraction of a song)."""
    if handle.format == "OGG":  # first: the pages say more precisely what is wrong
        damage = _ogg_damage(name)
        if damage is not None:
            what = "cannot read all of it" if "chained" in damage else "truncated or corrupt audio"
            raise AudioError(f"{name}: {what} ({damage})")
    detail = _truncation_in_log(handle.extra_info) or _truncation_in_header(name, handle)
    if detail is not None:
        raise AudioError(
            f"{name}: truncated or corrupt audio (the file ends before its samples: {detail})"
        )


def _check_decodable(name: str, handle: sf.SoundFile) -> None:
    """Decode the first frames of a seekable file: some encodings open but never decode in
    this libsndfile (AIFF DWVW), which should not wait for the second pass to show."""
    if not handle.seekable():
        return
    try:
        handle.read(1, dtype="float32")
        handle.seek(0)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError(
            f"{name}: truncated or corrupt audio, or an encoding this libsndfile cannot decode "
            f"({handle.format} {handle.subtype}: {_reason(exc)})"
        ) from None


def _random_access(handle: sf.SoundFile) -> bool:
    return (
        handle.seekable()
        and handle.subtype in _RANDOM_ACCESS_SUBTYPES
        and handle.format not in _PACKED_FORMATS
    )


def _blocks(name: str, handle: sf.SoundFile, block_frames: int) -> Iterator[np.ndarray]:
    """Read ``handle`` from its position to its end: blocks (T, C) float32 of finite samples.
    Never seeks; never reads past an exact length (a crafted stream that decodes without end
    stops there)."""
    exact = handle.format not in _ESTIMATED_LENGTH_FORMATS
    start = handle.tell() if handle.seekable() else 0
    left = handle.frames - start
    # An MP3 whose tag counts its frames has an exact length too, though mpg123 may be asked
    # for more: a damaged frame in the middle is skipped without a word, and shows as fewer.
    counted = handle.format == "MP3" and _mp3_exact_length(name)
    # soundfile seeks back to its own count of the position after each read of a seekable
    # file, which libsndfile does only roughly in MP3 (a block read then repeats or skips
    # samples), and stops at the header's length, an estimate in MP3: read as from a stream.
    seekable, handle._info.seekable = handle._info.seekable, 0
    try:
        while not exact or left > 0:
            count = min(block_frames, left) if exact else block_frames
            try:
                with native_stderr_muted():
                    read = handle.read(count, dtype=_read_dtype(handle), always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise AudioError(f"{name}: truncated or corrupt audio ({_reason(exc)})") from None
            if read.shape[0] == 0:
                break
            frames = _float32_samples(name, read)
            left -= frames.shape[0]
            yield frames
        if counted and left != 0:
            raise AudioError(
                f"{name}: truncated or corrupt audio (its Xing/Info tag counts "
                f"{handle.frames - start} frames, {handle.frames - start - left} decoded)"
            )
    finally:
        handle._info.seekable = seekable


def _read_dtype(handle: sf.SoundFile) -> str:
    """The dtype to read ``handle`` in: its own for 64-bit floats, which libsndfile would turn
    into infinities where they exceed float32's range, else float32."""
    return "float64" if handle.subtype == "DOUBLE" else "float32"


def _float32_samples(name: str, frames: np.ndarray) -> np.ndarray:
    """frames (T, C) as read -> float32, or the AudioError that says why they cannot be."""
    if not np.isfinite(frames).all():
        raise AudioError(f"{name}: contains NaN or infinite samples")
    with np.errstate(over="ignore"):  # checked below
        narrow = frames.astype(np.float32, copy=False)
    if not np.isfinite(narrow).all():
        peak = float(np.abs(frames).max())
        raise AudioError(
            f"{name}: contains samples beyond float32's range (as large as {peak:.3g})"
        )
    return narrow


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
        blocks = list(_blocks(name, handle, 1 << 20))
        frames = np.concatenate(blocks) if blocks else np.zeros((0, handle.channels), np.float32)
        if frames.shape[0] < declared:
            if handle.format not in _ESTIMATED_LENGTH_FORMATS:
                raise AudioError(
                    f"{name}: truncated or corrupt audio "
                    f"({frames.shape[0]} of {declared} frames could be read)"
                )
            logger.warning("%s: read %d of about %d frames", name, frames.shape[0], declared)
        return frames, handle.samplerate


# What libsndfile's header log says when a header promises more than the file holds:
# "data : 80000 (should be 39979)" (WAV, AU, AIFF, SVX, W64's riff size), the RF64 frame count
# against its ds64 chunk, a cut Ogg page, and the words of MAT4, VOC, PAF and WVE. A WAV's RIFF
# size counts too: a file that lacks only the pad byte after an odd-sized data chunk has all
# its sample bytes, but libsndfile then decodes GSM 6.10's last block wrong.
_LOG_SIZE = re.compile(
    r"^\s*(data|SSND|BODY|Data Size|riff|RIFF)\s*:\s*(\d+)\s*\(should be (\d+)\)",
    re.MULTILINE,
)
_LOG_COUNT = re.compile(
    r"Calculated frame count (\d+) does not match value from 'ds64' chunk of (\d+)"
    r"|Data length (\d+) should be (\d+)"
)
_LOG_WORDS = re.compile(
    r"File seems to be truncated|Seems to be a truncated file|file seems to be truncated"
    r"|Junk after the last page|Last page lacks an end-of-stream bit",
    re.IGNORECASE,
)


_LOG_DATA_SIZE = re.compile(r"^\s*data\s*:\s*(\d+)", re.MULTILINE)
_LOG_BLOCK_ALIGN = re.compile(r"^\s*Block Align\s*:\s*(\d+)", re.MULTILINE)


def _placeholder_size(label: str, declared: int, log: str) -> bool:
    """Whether a chunk size in libsndfile's log is the "unknown length" of a writer that
    cannot seek back (``_UNKNOWN_SIZES``, sox's), not a length the file must hold."""
    if label == "riff":  # W64's size has 64 bits: never a placeholder
        return False
    if declared in _UNKNOWN_SIZES:
        return True
    if label == "RIFF":  # derived from the data chunk's size: a placeholder with it
        data = _LOG_DATA_SIZE.search(log)
        return data is not None and _placeholder_size("data", int(data.group(1)), log)
    align = _LOG_BLOCK_ALIGN.search(log)
    block = int(align.group(1)) if align is not None and int(align.group(1)) > 0 else 1
    return declared == _SOX_UNKNOWN_SIZE - _SOX_UNKNOWN_SIZE % block


def _truncation_in_log(log: str) -> str | None:
    for match in _LOG_SIZE.finditer(log):
        label, declared, present = match.group(1), int(match.group(2)), int(match.group(3))
        if declared > present and not _placeholder_size(label, declared, log):
            return f"{label.lower()} size {declared} bytes, {present} present"
    for match in _LOG_COUNT.finditer(log):
        groups = [int(g) for g in match.groups() if g is not None]
        if match.group(1) is not None and groups[0] < groups[1]:
            return f"{groups[1]} frames announced, {groups[0]} present"
        if match.group(3) is not None and groups[0] > groups[1]:
            return f"data size {groups[0]} bytes, {groups[1]} present"
    words = _LOG_WORDS.search(log)
    if words is not None:
        return words.group(0)[0].lower() + words.group(0)[1:]
    return None


def _truncation_in_header(name: str, handle: sf.SoundFile) -> str | None:
    """The headers whose lengths libsndfile does not check (its log says nothing of them):
    -> what they announce beyond the end of the file, or None."""
    parse = _HEADER_CHECKS.get(handle.format)
    if parse is None:
        return None
    with open(name, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        head = file.read(1 << 16)
        try:
            end = parse(file, head, handle)
        except (struct.error, ValueError, IndexError, OSError):
            return None  # a header we cannot follow: libsndfile, which opened it, is trusted
    if end is not None and end > size:
        return f"{end - size} bytes announced beyond its {size} bytes"
    return None


_SAMPLE_BYTES = {"PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4,
                 "DOUBLE": 8, "ULAW": 1, "ALAW": 1}  # fmt: skip


def _frame_bytes(handle: sf.SoundFile) -> int:
    return handle.channels * _SAMPLE_BYTES[handle.subtype]


def _caf_end(file: Any, head: bytes, handle: sf.SoundFile) -> int | None:
    """CAF: chunks of (type, signed 64-bit size) after an 8-byte header; the data chunk's size
    is -1 when it runs to the end of the file."""
    offset, size = 8, os.fstat(file.fileno()).st_size
    while offset + 12 <= size:
        file.seek(offset)
        kind, length = struct.unpack(">4sq", file.read(12))
        if kind == b"data":
            return None if length == -1 else offset + 12 + length
        if length < 0:
            return None
        offset += 12 + length
    return None


def _nist_end(file: Any, head: bytes, handle: sf.SoundFile) -> int | None:
    """NIST SPHERE: a text header ("sample_count -i 20000" ...) whose size is on line 2."""
    lines = head.split(b"end_head")[0].decode("ascii", "replace").split("\n")
    fields = {}
    for line in lines[2:]:
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit():  # "-i 2", and "-s1 1" from some writers
            fields[parts[0]] = int(parts[2])
    count, width = fields.get("sample_count"), fields.get("sample_n_bytes")
    channels = fields.get("channel_count", handle.channels)
    if count is None or width is None:
        return None
    return int(lines[1]) + count * channels * width


def _avr_end(file: Any, head: bytes, handle: sf.SoundFile) -> int:
    """AVR: a 128-byte header with the frame count at byte 26."""
    (frames,) = struct.unpack(">I", head[26:30])
    return 128 + frames * _frame_bytes(handle)


def _mpc2k_end(file: Any, head: bytes, handle: sf.SoundFile) -> int:
    """Akai MPC 2000: a 42-byte header with the frame count at byte 30."""
    (frames,) = struct.unpack("<I", head[30:34])
    return 42 + frames * _frame_bytes(handle)


def _mat5_end(file: Any, head: bytes, handle: sf.SoundFile) -> int | None:
    """MAT5: a 128-byte header then elements of (type, size); the last must fit."""
    order = "<" if head[126:128] == b"IM" else ">"
    offset, size, end = 128, os.fstat(file.fileno()).st_size, None
    while offset + 8 <= size:
        file.seek(offset)
        kind, length = struct.unpack(f"{order}II", file.read(8))
        if kind >> 16:  # a small element: type, size and data in 8 bytes
            offset += 8
            continue
        end = offset + 8 + length
        offset = end + (-end % 8)
    # libsndfile (1.2) writes the size of its sample matrix 8 bytes too large.
    return None if end is None else end - 8


def _whole_frames_end(header: int) -> Any:
    """Formats whose samples run to the end of the file after a fixed header (IRCAM, PAF): no
    length to compare, but a cut that splits a frame shows."""

    def end(file: Any, head: bytes, handle: sf.SoundFile) -> int | None:
        if handle.subtype not in _SAMPLE_BYTES or (handle.format, handle.subtype) == (
            "PAF",
            "PCM_24",
        ):
            return None  # PAF packs 24-bit samples in blocks, and libsndfile checks those
        data = os.fstat(file.fileno()).st_size - header
        unit = _frame_bytes(handle)
        return header + data + (-data % unit)

    return end


# Bits of an MPEG audio frame header -> (version, sample-rate index, mono); side-info size of
# layer III by (MPEG-1?, mono?), where a Xing/Info tag follows.
_MP3_SIDE_INFO = {(True, False): 32, (True, True): 17, (False, False): 17, (False, True): 9}


def _mp3_tag(file: Any, head: bytes) -> tuple[int, int | None, int | None] | None:
    """The Xing/Info tag of an MP3 (LAME and libsndfile write one) -> (where the first frame
    begins, the tag's frame count, its byte count of the stream from that frame on; each None
    where the tag leaves it out), or None without a tag."""
    offset = 0
    if head[:3] == b"ID3" and len(head) >= 10:
        syncsafe = head[6:10]
        offset = 10 + (syncsafe[0] << 21 | syncsafe[1] << 14 | syncsafe[2] << 7 | syncsafe[3])
        offset += 10 if head[5] & 0x10 else 0
    file.seek(offset)
    frame = file.read(64)
    if len(frame) < 4 or frame[0] != 0xFF or frame[1] & 0xE0 != 0xE0:
        return None
    mpeg1 = frame[1] & 0x18 == 0x18
    mono = frame[3] >> 6 == 3
    at = 4 + _MP3_SIDE_INFO[mpeg1, mono]
    if frame[at : at + 4] not in (b"Xing", b"Info"):
        return None
    (flags,) = struct.unpack(">I", frame[at + 4 : at + 8])
    field = at + 8
    frames = stream_bytes = None
    if flags & 1:
        (frames,) = struct.unpack(">I", frame[field : field + 4])
        field += 4
    if flags & 2:
        (stream_bytes,) = struct.unpack(">I", frame[field : field + 4])
    return offset, frames or None, stream_bytes or None


def _mp3_end(file: Any, head: bytes, handle: sf.SoundFile) -> int | None:
    """MP3 with a Xing/Info tag that gives the stream's bytes: where the stream ends. Without
    one the length is an estimate from the size."""
    tag = _mp3_tag(file, head)
    if tag is None or tag[2] is None:
        return None
    return tag[0] + tag[2]


def _mp3_exact_length(name: str) -> bool:
    """Whether libsndfile's length of this MP3 is exact: a Xing/Info tag counts its frames (and
    mpg123 decodes exactly that many samples, the encoder's delay and padding taken off)."""
    try:
        with open(name, "rb") as file:
            tag = _mp3_tag(file, file.read(1 << 16))
    except (struct.error, ValueError, IndexError, OSError):
        return False
    return tag is not None and tag[1] is not None


# Ogg pages: "OggS", version, flags, granule position, serial number, page number, checksum,
# segment count; then the segment sizes and the segments.
_OGG_PAGE = struct.Struct("<4sBBqIIIB")
_BIT_REVERSED = bytes(int(f"{value:08b}"[::-1], 2) for value in range(256))


def _ogg_crc(page: bytes) -> int:
    """Ogg's CRC-32 (polynomial 0x04C11DB7, most significant bit first, no inversions): zlib's
    bit-reflected CRC-32 of the same polynomial over the bytes with their bits reversed, then
    the result's 32 bits reversed (zlib's own inversions undone by the start value and xor)."""
    reflected = zlib.crc32(page.translate(_BIT_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


def _ogg_damage(name: str) -> str | None:
    """Where an Ogg file is damaged, or None: every page must follow the last, pass its
    checksum and carry the next page number of its stream. libogg drops a page that fails
    silently, and the decoders skip the gap, so a file damaged inside reads as a shorter one.
    Chained streams are refused too: libsndfile reads only the first."""
    numbers: dict[int, int] = {}
    beginning = True  # still among the first pages, where every stream begins
    with open(name, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        offset = 0
        while offset < size:
            header = file.read(_OGG_PAGE.size)
            if len(header) < _OGG_PAGE.size:
                return f"a page cut short at byte {offset}"
            capture, version, flags, _, serial, number, checksum, count = _OGG_PAGE.unpack(header)
            if capture != b"OggS" or version != 0:
                return f"no Ogg page where one should begin, at byte {offset}"
            table = file.read(count)
            body = file.read(sum(table))
            if len(table) < count or len(body) < sum(table):
                return f"a page cut short at byte {offset}"
            page = header[:22] + bytes(4) + header[26:] + table + body
            if _ogg_crc(page) != checksum:
                return f"the page at byte {offset} fails its checksum"
            if flags & 2 and numbers and offset > 0 and not beginning:
                # A stream that begins after another's pages: chained files (Ogg's way of
                # joining tracks), of which libsndfile reads the first alone, without a word.
                return (
                    f"a second, chained stream begins at byte {offset}; libsndfile reads the "
                    "first alone"
                )
            beginning = bool(flags & 2)
            expected = numbers.get(serial)
            if expected is not None and number != expected:
                return f"{(number - expected) % 2**32} page(s) missing before byte {offset}"
            numbers[serial] = (number + 1) % 2**32
            offset += len(page)
    return None


def _sds_end(file: Any, head: bytes, handle: sf.SoundFile) -> int:
    """MIDI Sample Dump: a 21-byte dump header with the frame count in three 7-bit bytes, then
    127-byte packets of 120 data bytes, each sample in ceil(bits / 7) of them."""
    bits = head[6]
    frames = head[10] | head[11] << 7 | head[12] << 14
    per_packet = 120 // -(-bits // 7)
    return 21 + -(-frames // per_packet) * 127


_HEADER_CHECKS = {
    "SDS": _sds_end,
    "CAF": _caf_end,
    "NIST": _nist_end,
    "AVR": _avr_end,
    "MPC2K": _mpc2k_end,
    "MAT5": _mat5_end,
    "IRCAM": _whole_frames_end(1024),
    "PAF": _whole_frames_end(2048),
    "MP3": _mp3_end,
}


def _starts_like_audio(name: str) -> bool:
    """Whether the file begins with the signature of a format libsndfile reads, so that its
    failure to open it means damage rather than some other kind of file."""
    with open(name, "rb") as handle:
        head = handle.read(32)
    mpeg_sync = len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0
    sds_dump = len(head) >= 4 and head[:2] == b"\xf0\x7e" and head[3] == 0x01  # MIDI sample dump
    return head.startswith(_AUDIO_SIGNATURES) or mpeg_sync or sds_dump


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
    if sample_rate > 384000:  # the rates htsep reads; libsndfile's field is a 32-bit int
        raise AudioError(f"{name}: cannot write {sample_rate} Hz (at most 384000)")
    if not _whole(bits):
        raise AudioError(f"{name}: bits must be 16, 24 or 32, not {bits!r}")
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


def _whole(value: Any) -> bool:
    """Whether ``value`` is an integer (a bool, float or string is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _mp3_settings(name: str, sample_rate: int, bitrate: int, preset: int) -> dict[str, Any]:
    if "MP3" not in sf.available_formats():
        raise AudioError(
            f"{name}: this libsndfile cannot write MP3 (it needs version 1.1 or later)"
        )
    if sample_rate not in _MP3_BITRATE_RANGES:
        raise AudioError(f"{name}: mp3 does not support {sample_rate} Hz")
    if not _whole(bitrate) or not 8 <= bitrate <= 320:
        raise AudioError(f"{name}: the mp3 bitrate must be 8 to 320 kbps, not {bitrate!r}")
    if not _whole(preset) or preset not in _MP3_PRESETS:
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


def _check_mp3_tag(
    name: str, sample_rate: int, channels: int, bitrate: int, settings: dict[str, Any]
) -> None:
    """Refuse MP3 settings at which the encoder writes no Xing/Info tag: the tag is what lets
    a decoder drop the encoder's delay and padding, so without it a stem would start about
    1100 samples late and run that much longer. The tag fits only in frames large enough
    (at 44.1 kHz in stereo, from 64 kbps on)."""
    if _mp3_tagged(sample_rate, channels, settings["compression_level"]):
        return
    low, high = _MP3_BITRATE_RANGES[sample_rate]
    enough = next(
        (
            kbps
            for kbps in range(low, high + 1, 8)
            if _mp3_tagged(
                sample_rate,
                channels,
                _mp3_settings(name, sample_rate, kbps, 2)["compression_level"],
            )
        ),
        None,
    )
    advice = f"use --mp3-bitrate {enough} or more" if enough is not None else "use WAV or FLAC"
    raise AudioError(
        f"{name}: at {bitrate} kbps and {sample_rate} Hz an MP3 frame has no room for the "
        f"length tag, so the stem would start late and run long; {advice}"
    )


@functools.cache
def _mp3_tagged(sample_rate: int, channels: int, level: float) -> bool:
    """Whether libsndfile's MP3 encoder writes a Xing/Info tag at these settings (a few
    milliseconds of encoding silence in memory, once per process and settings)."""
    buffer = io.BytesIO()
    try:
        with sf.SoundFile(
            buffer,
            "w",
            sample_rate,
            channels,
            format="MP3",
            subtype="MPEG_LAYER_III",
            bitrate_mode="CONSTANT",
            compression_level=level,
        ) as probe:
            probe.write(np.zeros((4 * 1152, channels), dtype=np.float32))
    except (sf.LibsndfileError, RuntimeError, AssertionError):
        return True  # the encoder fails here: the real write will say how
    buffer.seek(0)
    return _mp3_tag(buffer, buffer.read(1 << 16)) is not None


def _frames_to_write(name: str, audio: torch.Tensor, subtype: str) -> np.ndarray:
    """audio (C, T) -> contiguous (T, C) array for libsndfile's ``subtype`` (as it interleaves):
    integers for the PCM subtypes (``_quantise``), float32 otherwise, clamped to [-1, 1] unless
    float. ``audio`` itself is left as it is."""
    if not isinstance(audio, torch.Tensor) or audio.dim() != 2 or audio.shape[0] == 0:
        shape = tuple(audio.shape) if hasattr(audio, "shape") else type(audio).__name__
        raise AudioError(f"{name}: expected (channels, time) audio to write, got {shape}")
    if audio.shape[0] > _MAX_CHANNELS:
        raise AudioError(
            f"{name}: expected (channels, time) audio to write, got {tuple(audio.shape)} "
            f"(more than {_MAX_CHANNELS} channels: is it (time, channels)?)"
        )
    if audio.layout != torch.strided or audio.device.type == "meta":
        raise AudioError(f"{name}: expected a dense tensor of samples to write")
    if audio.dtype == torch.bool or audio.is_complex():
        raise AudioError(f"{name}: cannot write {audio.dtype} samples (real numbers expected)")
    # float64 stays float64 until quantised: through float32 a sample could round twice.
    if not audio.is_floating_point():  # as audio files store them: int16 k -> k / 2^15, ...
        limits = torch.iinfo(audio.dtype)
        half = float(2 ** (limits.bits - 1))
        wide = audio.detach().to(device="cpu", dtype=torch.float64)
        samples = (wide if limits.min < 0 else wide - half) / half
    else:
        wide_dtype = torch.float64 if audio.dtype == torch.float64 else torch.float32
        samples = audio.detach().to(device="cpu", dtype=wide_dtype)
    if not bool(torch.isfinite(samples).all()):
        raise AudioError(f"{name}: the audio to write contains NaN or infinite samples")
    frames = samples.numpy().T  # (T, C), a view
    if subtype in _PCM_BITS:
        return _quantise(frames, _PCM_BITS[subtype])
    if subtype != "FLOAT":
        frames = np.clip(frames, -1.0, 1.0)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused
        narrow = np.ascontiguousarray(frames, dtype=np.float32)
    if not np.isfinite(narrow).all():
        raise AudioError(f"{name}: the audio to write has samples beyond float32's range")
    return narrow


def _quantise(frames: np.ndarray, bits: int) -> np.ndarray:
    """frames (T, C) float -> contiguous (T, C) integers that libsndfile stores unchanged:
    int16 for 16 bits, otherwise int32 with the sample in its top ``bits`` bits (as libsndfile
    scales them). Each sample becomes rint(x * 2^(bits-1)) (half to even), clipped to the
    integer range; ``frames`` itself is left as it is."""
    full_scale = 2.0 ** (bits - 1)
    # Clipped before scaling, so that no product overflows; the scaling itself is exact.
    steps = np.clip(frames, -1.0, 1.0)
    steps *= full_scale
    np.rint(steps, out=steps)
    np.clip(steps, -full_scale, full_scale - 1, out=steps)
    if bits == 16:
        return steps.astype(np.int16, order="C")
    integers = steps.astype(np.int32, order="C")
    integers <<= 32 - bits
    return integers


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
