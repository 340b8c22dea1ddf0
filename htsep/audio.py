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
  checks the open file's size and times (and, when only its change time moved, its bytes)
  on every read and in ``check_unchanged``. A file replaced by a rename is not a change: the
  reader keeps reading the file it opened; nor is a change of its metadata alone (chmod).
- ffmpeg recognises files by content: it may use only demuxers of containers that hold their
  own audio (no playlist or script that names other files) and only local files, and it reads
  the descriptor htsep holds. A decode shorter than the length its container states is refused
  (ffmpeg decodes a cut file as far as it goes). ``stop_decoders`` kills the running tools.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import re
import select
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import soundfile as sf
import torch
from soundfile import _ffi, _snd

from htsep.errors import AudioError, UsageError
from htsep.files import create_temporary, make_folder, place, remove_empty
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
# libsndfile's SFE_SYSTEM, "System error": the OS refused a read or write (sf_strerror says why).
_SFE_SYSTEM = 2

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
# Encodings that this libsndfile (1.2) opens but decodes wrongly, left to ffmpeg: 32-bit ALAC
# came out as noise (off by up to 1.5 where ffmpeg is within 2.3e-10). Its 16-, 20- and 24-bit
# ALAC read as ffmpeg reads them.
_FFMPEG_DECODES = frozenset({"ALAC_32"})

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
        if isinstance(name, bytes) and not isinstance(path, bytes):
            kind = f"{kind}, whose __fspath__ gives bytes"
        raise UsageError(f"expected {article} {what} path (str or os.PathLike), not {kind}")
    if not name:
        raise UsageError(f"expected {article} {what} path, got an empty string")
    if "\0" in name:
        raise UsageError(f"{what} path {name!r} contains a NUL character, which no file name can")
    return name


def audio_info(path: str | os.PathLike[str]) -> AudioInfo:
    """Sample rate, channel count and length of an audio file, without decoding it (ffmpeg
    decodes one whose header states no length, to count its samples without keeping them)."""
    name = file_name(path)
    begun = _decodes_begun()
    with _open_input(name) as held:
        # libsndfile goes first for every extension: it also reads CAF and Ogg Opus without ffmpeg.
        info = _soundfile_info(name)
        if info is None:
            info = _ffmpeg_info(name, held, begun)
    if info.frames <= 0:
        raise AudioError(f"{name}: contains no audio")
    return info


def read_audio(path: str | os.PathLike[str]) -> tuple[torch.Tensor, int]:
    """Decode a whole file. -> (audio (C, T) float32, contiguous; sample rate)

    Mono files give (1, T). Integer samples are scaled to [-1, 1); float files keep their values.
    """
    name = file_name(path)
    begun = _decodes_begun()
    with _open_input(name) as held:
        decoded = _soundfile_read(name)
        if decoded is None:
            decoded = _ffmpeg_read(name, held, begun)
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
    if not isinstance(audio, torch.Tensor):
        kind = type(audio).__name__
        shape = f" of shape {tuple(audio.shape)}" if hasattr(audio, "shape") else ""
        raise AudioError(
            f"{name}: expected a torch tensor of (channels, time) audio to write, got a "
            f"{kind}{shape} (torch.from_numpy makes one of a numpy array)"
        )
    if audio.dim() != 2 or audio.shape[0] == 0:
        raise AudioError(
            f"{name}: expected (channels, time) audio to write, got {tuple(audio.shape)}"
        )
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
        most = _FORMAT_CHANNELS.get(self.settings["format"])
        if most is not None and self.channels > most:  # libsndfile: "Format not recognised"
            raise AudioError(
                f"{self.name}: {self.settings['format']} holds at most {most} channels, not "
                f"{self.channels} (use WAV)"
            )
        if self.settings["format"] == "MP3":
            _check_mp3_tag(self.name, sample_rate, self.channels, mp3_bitrate, self.settings)
        self.sample_rate = sample_rate
        self._temporary: str | None = None
        self._handle: sf.SoundFile | None = None
        self._made: list[Path] = []  # folders made for the file, removed with it if empty

    def __enter__(self) -> AudioWriter:
        if not self.replace and os.path.lexists(self.target):  # before any block is written
            raise AudioError(f"{self.name}: exists already; not replaced")
        try:
            self._made = make_folder(self.target.parent)
        except OSError as exc:
            raise AudioError(
                f"{self.name}: cannot create folder {self.target.parent}: {_reason(exc)}"
            ) from None
        try:
            self._temporary = _create_temporary(self.name, self.target)
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
        # libsndfile reports a full disk (or a file size limit) as "System error" and keeps the
        # OS's reason with the handle. Where the handle is gone (its closing failed), repeat the
        # failed write with the OS before the temporary goes, though on ext4 that can succeed.
        reason = None
        if _is_write_error(exc):
            reason = _system_error(self._handle)
            if reason is None and self._temporary is not None:
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
        remove_empty(self._made)
        self._made = []


def _system_error(handle: sf.SoundFile | None) -> str | None:
    """The OS's reason for the last error of an open libsndfile handle, if that error was the
    OS's ("System error : No space left on device.")."""
    if handle is None or handle.closed or _snd.sf_error(handle._file) != _SFE_SYSTEM:
        return None
    text = _ffi.string(_snd.sf_strerror(handle._file)).decode("utf-8", "replace")
    reason = _reason(RuntimeError(text.partition(":")[2]))
    return reason or None


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
        begun = _decodes_begun()
        self._input: _Input | None = _open_input(self.name)
        try:
            handle = _open_soundfile(self.name)
            if handle is None:
                handle = self._decode_with_ffmpeg(begun)
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

    def _decode_with_ffmpeg(self, begun: int) -> sf.SoundFile:
        """Decode into a float WAV temporary. A decode that fills the temporary folder is named
        as such, whether ffmpeg fails, is killed (SIGXFSZ) or exits 0 with a header it could
        not finish."""
        assert self._input is not None
        ffmpeg, ffprobe = _ffmpeg_tools(self.name)
        source = _ffmpeg_source(self.name, self._input)
        stream = _probe(self.name, ffprobe, source, begun)
        self._decoded = decoded = self._decoding_temporary()
        command = [*_decode_command(ffmpeg, source, stream), "-rf64", "auto", "-f", "wav", decoded]
        where = os.path.dirname(decoded)
        try:
            stderr = _run_tool(self.name, command, begun, source)
        except DecodingStopped:
            raise
        except AudioError:
            reason = _write_failure(decoded)
            if reason is None:
                raise
            raise AudioError(f"{self.name}: cannot decode it into {where}: {reason}") from None
        written = _write_error(stderr)
        if written is not None or not _wav_finished(decoded):
            reason = _write_failure(decoded) or written or "ffmpeg left it unfinished"
            raise AudioError(f"{self.name}: cannot decode it into {where}: {reason}")
        _warn(self.name, "ffmpeg", stderr, source)
        _check_source(self._input, source)
        handle = self._open_decoded()
        try:
            _check_length(self.name, stream, handle.frames)
        except BaseException:
            handle.close()
            raise
        return handle

    def _decode_front_to_back(self, handle: sf.SoundFile) -> sf.SoundFile:
        """Decode an encoding libsndfile cannot seek in exactly into a float temporary, block by
        block."""
        self._decoded = self._decoding_temporary()
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
        try:
            out = torch.zeros(self.channels, length)
        except (RuntimeError, OverflowError, TypeError):  # torch's message is a C++ trace
            raise UsageError(
                f"length {length}: {self.channels} x {length} float32 samples do not fit in memory"
            ) from None
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
            self._forget_decoded()  # removes the file
            self._decoded = None

    def _decoding_temporary(self) -> str:
        """The decoded copy's temporary, removed by ``close``, or when the reader is collected
        without it (a stream dropped midway), or at exit: it held 230 MB for 10 minutes."""
        path = _decoding_temporary(self.name)
        self._forget_decoded = weakref.finalize(self, _unlink_quietly, path)
        return path

    def __enter__(self) -> AudioReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


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
            self.checksum: int | None = None  # of the bytes, taken by the first check
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
        """Fail if the file's content changed since it was opened. Its size and modification
        time tell most changes; its change time also catches a rewrite whose modification time
        was set back (``touch -r``), but it moves as well when only the file's metadata does
        (chmod, chown, an extended attribute, a link made or removed, a rename over its name).
        So the first check (``_open_input`` makes it) takes a checksum of its bytes, and a
        later change of the change time alone fails only if the bytes no longer match it."""
        if self.fd is None:
            return
        now = os.fstat(self.fd)
        if (now.st_size, now.st_mtime_ns) != (self.stat.st_size, self.stat.st_mtime_ns):
            moved = now.st_size != self.stat.st_size
            self._fail(f"now {now.st_size} bytes, was {self.stat.st_size}" if moved else "")
        if now.st_ctime_ns == self.stat.st_ctime_ns:
            if self.checksum is None:
                self.checksum = self._content_checksum()
            return
        if self.checksum is None or self._content_checksum() != self.checksum:
            self._fail("")
        self.stat = now  # the same bytes: only the metadata changed

    def _content_checksum(self) -> int:
        """CRC-32 of the whole file (a few GB/s: milliseconds for a song), read through one
        small buffer (reading info holds no more memory than that)."""
        assert self.fd is not None
        checksum, offset = 0, 0
        buffer = bytearray(1 << 16)
        view = memoryview(buffer)
        try:
            while True:
                if hasattr(os, "preadv"):
                    count = os.preadv(self.fd, [buffer], offset)
                    block: bytes | memoryview = view[:count]
                else:
                    block = os.pread(self.fd, len(buffer), offset)
                    count = len(block)
                if not count:
                    return checksum
                checksum = zlib.crc32(block, checksum)
                offset += count
        except OSError as exc:
            raise AudioError(f"{self.name}: cannot read: {_reason(exc)}") from None

    def _fail(self, detail: str) -> NoReturn:
        raise AudioError(
            f"{self.name}: changed while it was being read ({detail or 'rewritten in place'}); "
            "not used (separate it again once it is complete)"
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


def _open_input(name: str) -> _Input:
    """Check that ``name`` is a non-empty regular file that can be read, without blocking;
    its checksum is taken now, so that a later check compares the bytes it was opened with
    (another file renamed over its name moves its change time)."""
    held = _Input(name)
    try:
        held.check_unchanged()
    except BaseException:
        held.close()
        raise
    return held


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
    if _zero_data_size(handle):
        # A writer that could not seek back left 0 as the data size: libsndfile reads no
        # frame, ffmpeg reads as far as the file goes.
        handle.close()
        if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
            raise AudioError(
                f"{name}: its data chunk states 0 bytes (the size a writer that could not seek "
                "back leaves); reading it needs ffmpeg, which is not installed"
            )
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
    if handle.subtype in _FFMPEG_DECODES:  # its header checked (a cut shows), not its decoder
        handle.close()
        return None  # ffmpeg's decoder, or its absence explained
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


def _zero_data_size(handle: sf.SoundFile) -> bool:
    """A WAV whose data chunk states 0 bytes (no frames for libsndfile) but holds samples."""
    if handle.format not in ("WAV", "WAVEX", "RF64") or handle.frames != 0:
        return False
    data = _LOG_DATA_SIZE.search(handle.extra_info)
    if data is None or int(data.group(1)) != 0:
        return False
    return _bytes_after_header(handle) > 0


def _bytes_after_header(handle: sf.SoundFile) -> int:
    """How many bytes the file holds past its data chunk's header (0 if unknown)."""
    name = handle.name
    try:
        with open(name, "rb") as file:
            head = file.read(1 << 16)
            size = os.fstat(file.fileno()).st_size
    except (OSError, TypeError):
        return 0
    at = head.find(b"data")
    return max(0, size - (at + 8)) if at >= 12 else 0


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
    failure to open it means damage rather than some other kind of file. An ID3v2 tag may
    precede MP3 and also formats libsndfile does not read (ADTS AAC): what follows it decides."""
    with open(name, "rb") as handle:
        head = handle.read(32)
        offset = 0
        for _ in range(8):  # tags may be stacked; more than a few is no file a writer made
            if not (head.startswith(b"ID3") and len(head) >= 10):
                break
            syncsafe = head[6:10]
            offset += 10 + (syncsafe[0] << 21 | syncsafe[1] << 14 | syncsafe[2] << 7 | syncsafe[3])
            offset += 10 if head[5] & 0x10 else 0  # a footer
            handle.seek(offset)
            head = handle.read(32)
            if not head:  # a tag and nothing after it: a cut file
                return True
    sds_dump = len(head) >= 4 and head[:2] == b"\xf0\x7e" and head[3] == 0x01  # MIDI sample dump
    return head.startswith(_AUDIO_SIGNATURES) or _mpeg_audio_sync(head) or sds_dump


def _mpeg_audio_sync(head: bytes) -> bool:
    """Whether ``head`` begins with an MPEG audio frame header (layer I, II or III): 11 sync
    bits, a version that is not the reserved one, a layer that is not 00 (which marks ADTS, the
    AAC stream ffmpeg reads), a bitrate that is not "bad" and a sample rate that is not
    reserved."""
    if len(head) < 3 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    version, layer = head[1] >> 3 & 3, head[1] >> 1 & 3
    return version != 1 and layer != 0 and head[2] >> 4 != 0xF and head[2] >> 2 & 3 != 3


# Decoding through ffmpeg -------------------------------------------------------------------------

# The demuxers ffmpeg may read an input with (its -format_whitelist, which a demuxer passes when
# one of its names is listed: "mov" is "mov,mp4,m4a,3gp,3g2,mj2"): containers and streams that
# hold their own audio. ffmpeg recognises a file by its content, whatever its name, and some of
# its demuxers read the files a file names: an HLS playlist or an ffconcat script named song.m4a
# would have htsep separate other local files. With "file" the only protocol, nothing else is.
_FFMPEG_DEMUXERS = (
    "aac", "ac3", "aiff", "amr", "amrnb", "amrwb", "ape", "asf", "au", "avi", "caf", "dsf", "dts",
    "dtshd", "eac3", "flac", "flv", "loas", "matroska", "mlp", "mov", "mp3", "mpc", "mpc8",
    "mpeg", "mpegts", "ogg", "shn", "tak", "truehd", "tta", "w64", "wav", "wv", "xwma",
)  # fmt: skip
_FFMPEG_INPUT_OPTIONS = (
    "-protocol_whitelist", "file", "-format_whitelist", ",".join(_FFMPEG_DEMUXERS),
)  # fmt: skip
# Demuxers that read what a file refers to (playlists, manifests, scripts, session
# descriptions): named as such when the whitelist turns them away, and refused if an ffmpeg
# that ignored it probed one.
_REFERRING_DEMUXERS = frozenset(
    {"hls", "applehttp", "concat", "dash", "webm_dash_manifest", "imf", "sdp", "rtsp", "rtp",
     "sap"}
)  # fmt: skip
_REFERS = "a playlist or script that refers to other files; not read"
_NOT_ON_WHITELIST = re.compile(r"^\[([^\]@]+?) @ 0x[0-9a-fA-F]+\] Format not on whitelist")

# Containers whose header states the length of the audio (not estimated from the bitrate, as
# ffmpeg does for raw AAC, MP3 or AC-3 streams, AVI and MPEG-TS): a decode shorter than that
# length by more than the tolerance below is a truncated or damaged file, which ffmpeg decodes
# as far as it goes with at most a warning.
_STATED_LENGTH_DEMUXERS = frozenset(
    {"mov", "matroska", "caf", "asf", "wv", "tta", "flv", "flac", "wav", "w64", "aiff"}
)
# How much shorter than the stated length a whole file may decode, in frames, plus 1/1000 of
# that length. Measured with ffmpeg 5.1 on whole files of 2 and 30 s: WMA in ASF decodes up to
# 1996 frames fewer than stated (44.1 kHz), ALAC in CAF up to 1912 (a partial last packet of
# 4096), Opus in WebM 384, Vorbis or AC-3 in Matroska up to 26 (its durations are whole
# milliseconds); AAC in MP4 decodes a frame more. A couple of codec frames (4096) is above all
# of them; the 1/1000 covers durations rounded to a container's time base. A cut file misses
# far more (an M4A cut to 14%: 478208 of 1323000 frames).
_SHORTFALL_FRAMES = 4096
# Decoding errors in ffmpeg's messages that are about writing the decoded temporary (a full
# disk, a file size limit): ffmpeg 5.1 may still exit 0 after "Error writing trailer".
_WRITE_ERROR = re.compile(
    r"Error writing trailer|av_interleaved_write_frame\(\)|Error closing file"
    r"|No space left on device|File too large|Disk quota exceeded"
)
# The sample rates htsep reads (separator.MIN_RATE..MAX_RATE), refused before decoding.
_MIN_RATE, _MAX_RATE = 1000, 384000
_PIPE_BLOCK = 1 << 16
# Seconds to wait for the end of a tool's stderr once the tool and its group are gone.
_ERRORS_PATIENCE = 5.0
# How often, in ms, a read from a silent tool checks whether the tool has exited.
_EXIT_CHECK_MS = 250
# Matroska's DURATION tag: hours, minutes and seconds with a fraction.
_CLOCK = re.compile(r"(\d+):([0-5]\d):(\d\d(?:\.\d+)?)")


class DecodingStopped(AudioError):
    """An ffmpeg decode ended by ``stop_decoders``: the work it was for is stopping."""


# ffmpeg and ffprobe processes running now (-> whether stop_decoders killed it), and how many
# times stop_decoders was called: a decode that began before a call starts no tool after it.
_TOOLS_LOCK = threading.RLock()  # re-entered by a signal handler that calls stop_decoders
_RUNNING: dict[subprocess.Popen[bytes], bool] = {}
_stops = 0


def stop_decoders() -> None:
    """Kill (SIGKILL) every ffmpeg and ffprobe that htsep runs, in any thread, and stop the
    decodes they serve: each raises DecodingStopped (an AudioError) in its own thread as soon
    as its tool is gone, and one that began before this call starts no tool afterwards.
    Decodes that begin later run as usual. Safe from any thread and from a signal handler; it
    returns at once, without waiting for those threads. It stops the decodes of every batch in
    the process."""
    global _stops
    with _TOOLS_LOCK:
        _stops += 1
        for process in _RUNNING:
            _RUNNING[process] = True
            _kill(process)


def _decodes_begun() -> int:
    """The mark a decode takes when it begins, for ``_run_tool`` to compare."""
    return _stops


def _kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the tool and anything it started (it leads a process group of its own). The
    process is never reaped while registered, so its pid cannot belong to another yet."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if hasattr(os, "killpg"):
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()


def _pump(process: subprocess.Popen[bytes], consume: Callable[[bytes], Any]) -> None:
    """Pass the tool's standard output to ``consume`` until the tool is done with it. A process
    the tool left running holds the pipe open after the tool exits: once the tool has exited
    (all it wrote is in the pipe by then) its group is killed and the rest drained."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    if not hasattr(os, "waitid") or not hasattr(select, "poll"):
        while block := os.read(fd, _PIPE_BLOCK):
            consume(block)
        return
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    exited = False
    while True:
        if poller.poll(0 if exited else _EXIT_CHECK_MS):
            if not (block := os.read(fd, _PIPE_BLOCK)):
                return
            consume(block)
        elif exited:
            return  # drained; only a process outside the group still holds the pipe
        elif os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG):
            with _TOOLS_LOCK:
                _kill(process)  # not reaped yet, so the pid is still the tool's
            exited = True


def _wait_for_exit(process: subprocess.Popen[bytes]) -> None:
    """Wait until the tool exits without reaping it (so that ``_kill`` stays safe)."""
    if hasattr(os, "waitid"):
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
    else:
        process.wait()


class _Errors(threading.Thread):
    """Collects a tool's standard error while its standard output is read (either pipe could
    fill while the other waits): the first and the last 64 KiB."""

    def __init__(self, pipe: Any) -> None:
        super().__init__(name="htsep-ffmpeg-errors", daemon=True)
        self.pipe, self.head, self.tail = pipe, bytearray(), bytearray()
        self.start()

    def run(self) -> None:
        with contextlib.suppress(OSError, ValueError), self.pipe:
            while block := self.pipe.read1(_PIPE_BLOCK):
                room = _PIPE_BLOCK - len(self.head)
                if room > 0:
                    self.head += block[:room]
                    block = block[room:]
                self.tail += block
                del self.tail[:-_PIPE_BLOCK]

    def text(self) -> str:
        """What the tool wrote, once the pipe ends. A process that left the tool's group can
        hold the pipe open after the tool is gone: the text so far, after a while."""
        self.join(_ERRORS_PATIENCE)
        return (self.head + self.tail).decode("utf-8", "replace").strip()


@dataclass(frozen=True)
class _Source:
    """How ffmpeg and ffprobe are given the input: a URL, and the descriptors it needs."""

    url: str
    fds: tuple[int, ...]


def _ffmpeg_source(name: str, held: _Input) -> _Source:
    """The descriptor htsep holds, as /dev/fd/N where the system has those, so that both tools
    read the file htsep checked even if another is renamed over its name meanwhile (libsndfile's
    path checks the same with ``check_same_path``); else the name, checked after decoding."""
    if held.fd is not None and os.name == "posix" and os.path.isdir("/dev/fd"):
        return _Source(f"file:/dev/fd/{held.fd}", (held.fd,))
    return _Source(f"file:{name}", ())


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


def _run_tool(
    name: str,
    command: list[str],
    begun: int,
    source: _Source,
    consume: Callable[[bytes], Any] | None = None,
) -> str:
    """Run ffmpeg or ffprobe on the input; its standard output goes block by block to
    ``consume`` (None: nowhere). -> its standard error. A failure becomes the first line of its
    stderr; a tool killed by ``stop_decoders``, or started after it stopped the decode that
    began at ``begun``, raises DecodingStopped. Whatever stops the caller meanwhile (Ctrl-C, an
    error in ``consume``) kills the tool before it goes on."""
    tool = Path(command[0]).name
    # Everything from the start on is inside the try, so that an interruption anywhere after
    # the tool started still ends it.
    started: list[subprocess.Popen[bytes]] = []
    errors: _Errors | None = None
    try:
        with _TOOLS_LOCK:
            if begun != _stops:
                raise DecodingStopped(f"{name}: decoding stopped")
            for fd in source.fds:  # where /dev/fd/N shares the descriptor's offset (BSD, macOS)
                os.lseek(fd, 0, os.SEEK_SET)
            try:
                started.append(
                    subprocess.Popen(
                        command,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL if consume is None else subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        pass_fds=source.fds,
                        start_new_session=os.name == "posix",  # a group of its own, for _kill
                    )
                )
            except OSError as exc:
                raise AudioError(f"{name}: cannot run {command[0]}: {_reason(exc)}") from None
            _RUNNING[started[0]] = False
        process = started[0]
        errors = _Errors(process.stderr)
        if consume is not None:
            _pump(process, consume)
        _wait_for_exit(process)
    finally:
        if started:
            process = started[0]
            with _TOOLS_LOCK:
                stopped = _RUNNING.pop(process, False)
                # Before it is reaped, while its pid is still its own: the tool if the caller
                # was stopped, and whatever it left running, which would hold its stderr open.
                _kill(process)
            process.wait()
            stderr = errors.text() if errors is not None else ""
            for pipe in (process.stdout, None if errors is not None else process.stderr):
                if pipe is not None:  # the reader closes stderr when it ends
                    pipe.close()
    if stopped:
        raise DecodingStopped(f"{name}: decoding stopped")
    if process.returncode != 0:
        code = process.returncode
        first = stderr.splitlines()[0] if stderr else None
        refused = _NOT_ON_WHITELIST.match(first or "")
        if refused is not None:
            demuxer = refused.group(1)
            if demuxer in _REFERRING_DEMUXERS:
                raise AudioError(f"{name}: {_REFERS}")
            raise AudioError(
                f"{name}: not a recognised audio file (ffmpeg takes it for {demuxer}, which "
                "htsep does not read)"
            )
        if code < 0:
            first = f"killed by signal {-code}"
        elif first is None:
            first = f"exit status {code}"
        raise AudioError(f"{name}: {tool} cannot read it: {_tool_line(first, source)}")
    return stderr


def _tool_line(line: str, source: _Source) -> str:
    """A line of ffmpeg's, without the input's URL or the "[demuxer @ 0x...] " that it starts
    with: the path already leads ours."""
    return _FFMPEG_CONTEXT.sub("", line.removeprefix(f"{source.url}: "))


def _warn(name: str, tool: str, stderr: str, source: _Source) -> None:
    """ffmpeg's first message about a file it read, as a warning."""
    if stderr:
        logger.warning("%s: %s: %s", name, tool, _tool_line(stderr.splitlines()[0], source))


@dataclass(frozen=True)
class _Stream:
    """The audio stream ffmpeg decodes: ``index`` among the file's streams; ``frames`` the
    length the file states or ffmpeg estimates (None without one); ``stated`` whether that
    length is the container's own, which a whole file decodes to."""

    index: int
    sample_rate: int
    channels: int
    frames: int | None
    stated: bool


def _probe(name: str, ffprobe: str, source: _Source, begun: int) -> _Stream:
    """ffprobe's description of the audio stream to read: the one marked default, if any, else
    the first. Refused before decoding: no audio, more channels than htsep reads, a sample rate
    outside the range it reads, a playlist that an ffmpeg ignoring the whitelist probed."""
    command = [
        ffprobe, "-v", "error", *_FFMPEG_INPUT_OPTIONS, "-show_entries",
        "stream=index,codec_type,sample_rate,channels,duration:stream_tags"
        ":stream_disposition=default,attached_pic:format=format_name,duration,nb_streams",
        "-of", "json", source.url,
    ]  # fmt: skip
    out = bytearray()
    _warn(name, "ffprobe", _run_tool(name, command, begun, source, out.extend), source)
    try:
        probed = json.loads(out)
        demuxers = set(str((probed.get("format") or {}).get("format_name", "")).split(","))
        if demuxers & _REFERRING_DEMUXERS:
            raise AudioError(f"{name}: {_REFERS}")
        every = probed.get("streams") or []
        streams = [s for s in every if s.get("codec_type") == "audio"]
        if not streams:
            raise AudioError(f"{name}: has no audio stream")
        chosen = next(
            (s for s in streams if (s.get("disposition") or {}).get("default") == 1), streams[0]
        )
        index, rate = int(chosen["index"]), int(chosen["sample_rate"])
        channels = int(chosen["channels"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise AudioError(f"{name}: ffprobe gave no sample rate and channel count") from None
    if rate <= 0 or channels <= 0:
        raise AudioError(f"{name}: ffprobe gave no sample rate and channel count")
    if channels > _MAX_CHANNELS:
        raise AudioError(f"{name}: has more than {_MAX_CHANNELS} channels ({channels})")
    if not _MIN_RATE <= rate <= _MAX_RATE:
        raise AudioError(f"{name}: sample rate {rate} Hz is outside {_MIN_RATE}..{_MAX_RATE} Hz")
    # The stream's own duration; else, in Matroska, its DURATION tag (ffmpeg and mkvmerge write
    # one for each track); else the file's, which is the stream's only when no other stream
    # has a timeline (a cover picture or an attached file has none).
    container = probed.get("format") or {}
    own = _frames_of(chosen.get("duration"), rate)
    if own is None and "matroska" in demuxers:
        own = _frames_of(_matroska_duration(chosen.get("tags")), rate)
    frames = own if own is not None else _frames_of(container.get("duration"), rate)
    timed = [s for s in every if isinstance(s, dict) and not _untimed(s)]
    alone = own is not None or len(timed) == 1
    stated = frames is not None and alone and bool(demuxers & _STATED_LENGTH_DEMUXERS)
    return _Stream(index, rate, channels, frames, stated)


def _untimed(stream: dict[str, Any]) -> bool:
    """Whether a stream has no timeline of its own: an attached file or a cover picture."""
    disposition = stream.get("disposition") or {}
    return stream.get("codec_type") == "attachment" or disposition.get("attached_pic") == 1


def _matroska_duration(tags: Any) -> float | None:
    """A Matroska track's DURATION tag ("HH:MM:SS.nnnnnnnnn"; ffmpeg names it DURATION-eng
    where the tag has a language) in seconds; None without a readable one."""
    if not isinstance(tags, dict):
        return None
    for key, value in tags.items():
        if str(key).upper().split("-")[0] != "DURATION":
            continue
        found = _CLOCK.fullmatch(str(value).strip())
        if found is not None:
            hours, minutes, seconds = found.groups()
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return None


def _frames_of(duration: Any, rate: int) -> int | None:
    """ffprobe's duration in seconds as frames; None where it is absent, "N/A" or nonsense."""
    try:
        return round(float(str(duration)) * rate)
    except (ValueError, OverflowError):
        return None


def _decode_command(ffmpeg: str, source: _Source, stream: _Stream) -> list[str]:
    """ffmpeg reading the chosen stream as float32 samples, output options and file to add.
    -ac/-ar restate the probed layout: if the stream changed layout midway, ffmpeg must convert
    rather than change the meaning of the bytes (raw output has no header)."""
    return [
        ffmpeg, "-nostdin", "-y", "-v", "error", *_FFMPEG_INPUT_OPTIONS, "-i", source.url,
        "-map", f"0:{stream.index}", "-acodec", "pcm_f32le", "-ac", str(stream.channels),
        "-ar", str(stream.sample_rate),
    ]  # fmt: skip


def _check_source(held: _Input, source: _Source) -> None:
    """After a decode: the input is the file htsep opened (the tools read it by name where
    they could not be given the descriptor), and unchanged."""
    if not source.fds:
        held.check_same_path()
    held.check_unchanged()


def _check_length(name: str, stream: _Stream, frames: int) -> None:
    """A decode shorter than the length the container states is a cut or damaged file."""
    if not stream.stated or stream.frames is None:
        return
    if frames < stream.frames - (_SHORTFALL_FRAMES + stream.frames // 1000):
        raise AudioError(
            f"{name}: truncated or corrupt audio ({frames} of the {stream.frames} frames its "
            "header states could be decoded)"
        )


def _ffmpeg_info(name: str, held: _Input, begun: int) -> AudioInfo:
    ffmpeg, ffprobe = _ffmpeg_tools(name)
    source = _ffmpeg_source(name, held)
    stream = _probe(name, ffprobe, source, begun)
    if stream.frames is not None:
        return AudioInfo(stream.sample_rate, stream.channels, stream.frames)
    # No length in the header: count the decoded samples as they come, holding none.
    size = 0

    def count(block: bytes) -> None:
        nonlocal size
        size += len(block)

    command = [*_decode_command(ffmpeg, source, stream), "-f", "f32le", "-"]
    _warn(name, "ffmpeg", _run_tool(name, command, begun, source, count), source)
    _check_source(held, source)
    frames = size // (4 * stream.channels)
    _check_length(name, stream, frames)
    return AudioInfo(stream.sample_rate, stream.channels, frames)


def _ffmpeg_read(name: str, held: _Input, begun: int) -> tuple[np.ndarray, int]:
    """-> (frames (T, C) float32, sample rate), decoded by ffmpeg to raw little-endian floats."""
    ffmpeg, ffprobe = _ffmpeg_tools(name)
    source = _ffmpeg_source(name, held)
    stream = _probe(name, ffprobe, source, begun)
    raw = bytearray()  # grown in place: the samples are never held twice
    command = [*_decode_command(ffmpeg, source, stream), "-f", "f32le", "-"]
    _warn(name, "ffmpeg", _run_tool(name, command, begun, source, raw.extend), source)
    usable = len(raw) // (4 * stream.channels) * stream.channels
    samples = np.frombuffer(raw, dtype="<f4", count=usable)
    frames = samples.reshape(-1, stream.channels)  # (T, C), interleaved as decoded
    _check_source(held, source)
    _check_length(name, stream, frames.shape[0])
    return frames.astype(np.float32, copy=False), stream.sample_rate  # a copy on big-endian only


def _wav_finished(path: str) -> bool:
    """Whether ffmpeg finished writing the decoded WAV: it fills in the header's sizes last
    (placeholders until then), making it RF64 then if it outgrew 4 GiB."""
    with open(path, "rb") as file:
        head = file.read(48)
        size = os.fstat(file.fileno()).st_size
    if len(head) < 12 or head[8:12] != b"WAVE":
        return False
    if head[:4] == b"RIFF":
        return struct.unpack("<I", head[4:8])[0] + 8 == size
    if head[:4] == b"RF64" and head[12:16] == b"ds64" and len(head) >= 28:
        return struct.unpack("<Q", head[20:28])[0] + 8 == size
    return False


def _write_error(stderr: str) -> str | None:
    """The reason in ffmpeg's message about writing its output, if it has one."""
    for line in stderr.splitlines():
        if _WRITE_ERROR.search(line):
            return line.rsplit(": ", 1)[-1].strip().rstrip(".") or line
    return None


# Writing -----------------------------------------------------------------------------------------


# The channels each encoder takes (WAV: as many as htsep writes at all).
_FORMAT_CHANNELS = {"MP3": 2, "FLAC": 8}


def _encoder_settings(
    name: str, suffix: str, sample_rate: int, bits: int, mp3_bitrate: int, mp3_preset: int
) -> dict[str, Any]:
    """soundfile's keywords for a format, or the AudioError that explains why it cannot be."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise AudioError(f"{name}: the sample rate must be a positive integer, not {sample_rate!r}")
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
        if bits != 16:  # would change nothing: refused, as --int24 --mp3 is
            raise AudioError(f"{name}: MP3 has no bit depth to choose (16 bits), not {bits}")
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
    _channels_of(name, audio)
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
