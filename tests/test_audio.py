"""htsep.audio: round trips per format, one-line errors for every bad file, atomic writes, and
decoding through ffmpeg (real when installed, a stand-in that speaks its output format always)."""

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from htsep import audio
from htsep.audio import AudioInfo, audio_info, read_audio, write_audio
from htsep.errors import AudioError

RATE = 44100
POSIX = sys.platform != "win32"


def noise(channels: int, frames: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Uniform noise in [-scale, scale): (channels, frames) float32."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(channels, frames, generator=generator) * 2 - 1) * scale


def sine(channels: int, frames: int, rate: int, hz: float = 440.0) -> torch.Tensor:
    t = torch.arange(frames, dtype=torch.float64) / rate
    return (0.5 * torch.sin(2 * torch.pi * hz * t)).float().expand(channels, -1).contiguous()


def assert_audio_error(excinfo: pytest.ExceptionInfo, path: Path, phrase: str) -> None:
    message = str(excinfo.value)
    assert message.startswith(f"{path}: "), message
    assert phrase in message, message
    assert "\n" not in message


# Round trips ------------------------------------------------------------------------------------


def test_float_wav_is_exact_and_keeps_values_beyond_full_scale(tmp_path):
    x = noise(2, 10007, scale=3.0)
    path = tmp_path / "float.wav"
    write_audio(path, x, RATE, bits=32)
    y, rate = read_audio(path)
    assert rate == RATE and y.dtype == torch.float32 and y.is_contiguous()
    assert torch.equal(y, x)
    assert sf.info(path).subtype == "FLOAT"


@pytest.mark.parametrize(
    ("suffix", "bits", "tolerance", "subtype"),
    [
        (".wav", 16, 1 / 32767, "PCM_16"),
        (".wav", 24, 2**-22, "PCM_24"),
        (".flac", 16, 1 / 32767, "PCM_16"),
        (".flac", 24, 2**-22, "PCM_24"),
    ],
)
def test_integer_round_trip_within_one_step(tmp_path, suffix, bits, tolerance, subtype):
    x = noise(2, 10007)
    x[:, :2] = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # full scale both ways
    path = tmp_path / f"clip{suffix}"
    write_audio(path, x, RATE, bits=bits)
    y, rate = read_audio(path)
    assert rate == RATE and y.shape == x.shape and y.dtype == torch.float32
    assert (y - x).abs().max().item() <= tolerance + 1e-7
    assert sf.info(path).subtype == subtype


def steps_oracle(x: np.ndarray, bits: int) -> np.ndarray:
    """What an integer file must hold for samples ``x``: the nearest step (numpy's rint, half to
    even) at full scale 2^(bits-1), clipped to the integer range, as soundfile reads it back."""
    full_scale = 2.0 ** (bits - 1)
    steps = np.rint(np.clip(x.astype(np.float64), -1, 1) * full_scale)
    return np.clip(steps, -full_scale, full_scale - 1) / full_scale


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
@pytest.mark.parametrize("bits", [16, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_integer_samples_round_to_the_nearest_step(tmp_path, suffix, bits, dtype):
    """libsndfile floors float samples into WAV (a DC bias of half a step) but rounds them into
    FLAC: htsep rounds itself, so each container holds rint(x * 2^(bits-1)), written in blocks
    as streaming does, with values beyond full scale clipped."""
    step = 2.0 ** (1 - bits)
    special = [v * step for v in (0.6, -0.4, 1.5, -1.5, 0.5, -0.5, 2.5, 0.49999, 1e6)]
    loud = [1.0, -1.0, 1.5, -3.0, 1 - step / 4, 0.0, 0.0, 0.0, 0.0]
    edges = torch.tensor([special, loud], dtype=dtype)
    x = torch.cat([edges, noise(2, 20_000, seed=bits).to(dtype)], dim=1)
    path = tmp_path / f"steps{suffix}"
    with audio.AudioWriter(path, RATE, 2, bits=bits) as writer:
        for block in x.split(7001, dim=1):
            writer.write(block)
    expected = steps_oracle(x.numpy().T, bits)  # (T, C)
    assert np.array_equal(sf.read(path, dtype="float64")[0], expected)
    assert np.array_equal(read_audio(path)[0].numpy(), expected.T.astype(np.float32))


def test_integer_stems_have_no_dc_bias(tmp_path):
    """The reported case: 0.6, -0.4 and 1.5 steps come back as 1, 0 and 2 (not 0, -1, 1) in
    WAV as in FLAC."""
    for suffix in (".wav", ".flac"):
        write_audio(tmp_path / f"w{suffix}", torch.tensor([[0.6, -0.4, 1.5]]) / 32768, RATE)
        assert sf.read(tmp_path / f"w{suffix}", dtype="int16")[0].tolist() == [1, 0, 2]


def test_float_wav_bytes_do_not_depend_on_the_time_of_writing(tmp_path):
    """libsndfile stamps float WAVs with a PEAK chunk holding the time: htsep writes none, so
    the same stem written a second later is the same bytes."""
    x = noise(2, 1000, scale=2.0)
    write_audio(tmp_path / "first.wav", x, RATE, bits=32)
    time.sleep(1.1)
    write_audio(tmp_path / "second.wav", x, RATE, bits=32)
    first = (tmp_path / "first.wav").read_bytes()
    assert first == (tmp_path / "second.wav").read_bytes()
    assert b"PEAK" not in first
    assert torch.equal(read_audio(tmp_path / "first.wav")[0], x)


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
@pytest.mark.parametrize("rate", [8000, 192000])
@pytest.mark.parametrize("channels", [1, 2])
def test_extreme_rates_and_mono(tmp_path, suffix, rate, channels):
    x = noise(channels, rate // 10 + 3, scale=0.9, seed=rate)
    path = tmp_path / f"clip{suffix}"
    write_audio(path, x, rate, bits=24)
    y, read_rate = read_audio(path)
    assert read_rate == rate and y.shape == (channels, rate // 10 + 3)
    assert (y - x).abs().max().item() <= 2**-22 + 1e-7
    assert audio_info(path) == AudioInfo(rate, channels, rate // 10 + 3)


@pytest.mark.parametrize(
    ("suffix", "subtype", "tolerance"),
    [
        (".wav", "PCM_16", 1 / 32767),
        (".wav", "PCM_24", 2**-22),
        (".wav", "PCM_32", 2**-30),
        (".wav", "FLOAT", 0.0),
        (".wav", "DOUBLE", 0.0),
        (".flac", "PCM_24", 2**-22),
        (".aiff", "PCM_16", 1 / 32767),
        (".ogg", "VORBIS", 0.05),
    ],
)
def test_reads_files_written_by_others(tmp_path, suffix, subtype, tolerance):
    """Files written by soundfile directly, in (T, C) order, come back as (C, T) float32."""
    frames = 0.5 * np.sin(np.arange(4001)[:, None] * np.array([[0.01, 0.02, 0.03]]))
    frames = frames.astype(np.float32)  # (T, 3): three channels, none alike
    path = tmp_path / f"other{suffix}"
    sf.write(path, frames, 16000, subtype=subtype)
    y, rate = read_audio(path)
    assert rate == 16000 and y.dtype == torch.float32 and y.is_contiguous()
    assert y.shape == (3, 4001)
    assert np.abs(y.numpy() - frames.T).max() <= tolerance + 1e-7


def test_mono_file_reads_as_one_channel(tmp_path):
    path = tmp_path / "mono.wav"
    sf.write(path, np.full(100, 0.25, np.float32), RATE, subtype="FLOAT")
    y, _ = read_audio(path)
    assert y.shape == (1, 100) and torch.all(y == 0.25)


def test_unknown_extension_is_still_read_by_soundfile(tmp_path):
    path = tmp_path / "clip.audio"
    sf.write(path, np.zeros((50, 2), np.float32), RATE, format="WAV", subtype="FLOAT")
    y, rate = read_audio(path)
    assert y.shape == (2, 50) and rate == RATE


@pytest.mark.parametrize(("rate", "channels"), [(44100, 2), (48000, 1), (22050, 2), (8000, 1)])
def test_mp3_round_trip(tmp_path, rate, channels):
    """MP3 is lossy and may pad: same rate and channels, at least the input's length (within two
    frames of 1152), and the same sine at the best alignment."""
    x = sine(channels, rate, rate)
    path = tmp_path / "sine.mp3"
    write_audio(path, x, rate)
    y, read_rate = read_audio(path)
    assert read_rate == rate and y.shape[0] == channels
    assert x.shape[1] <= y.shape[1] <= x.shape[1] + 2 * 1152
    assert 0.4 < y.abs().max().item() < 0.6
    reference = x[0].numpy()
    correlations = [
        np.corrcoef(reference, y[0, lag : lag + x.shape[1]].numpy())[0, 1]
        for lag in range(y.shape[1] - x.shape[1] + 1)
    ]
    assert max(correlations) > 0.98


@pytest.mark.parametrize(("rate", "kbps"), [(44100, 128), (44100, 320), (22050, 64)])
def test_mp3_bitrate_sets_file_size(tmp_path, rate, kbps):
    """Constant bitrate: 2 s of noise take kbps * 250 bytes, give or take headers and a frame."""
    path = tmp_path / "noise.mp3"
    write_audio(path, noise(2, 2 * rate, scale=0.5), rate, mp3_bitrate=kbps)
    expected = kbps * 1000 / 8 * 2
    assert abs(path.stat().st_size - expected) < 0.05 * expected


def test_mp3_bitrate_is_clamped_to_the_rate_range(tmp_path):
    """320 kbps does not exist at 22.05 kHz (MPEG-2 tops out at 160): the file gets 160."""
    path = tmp_path / "noise.mp3"
    write_audio(path, noise(2, 2 * 22050, scale=0.5), 22050, mp3_bitrate=320)
    assert abs(path.stat().st_size - 40000) < 2000


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [8000, 16000, 22050, 32000, 44100, 48000])
def test_an_mp3_is_exactly_as_long_as_its_audio_or_refused(tmp_path, rate, channels):
    """Below 64 kbps at 44.1 kHz (and the like elsewhere) libsndfile's encoder wrote no
    Xing/Info tag, so decoders could not drop its delay and padding: the stem started 1105
    samples late and ran long, with no word. Every bitrate now gives a file that decodes to
    exactly the samples written (as libsndfile reads it back), or an AudioError naming the
    lowest bitrate that does."""
    # Noise low-passed well below every rate's band (a 64-tap Hann window): encoded nearly
    # intact at any bitrate, and unlike a tone it matches itself at one lag only.
    white = np.random.default_rng(rate).standard_normal((channels, rate + 777 + 63))
    smooth = np.stack([np.convolve(row, np.hanning(64), mode="valid") for row in white])
    x = torch.from_numpy(0.3 * smooth / np.abs(smooth).max()).float()
    refused, lowest_taken = [], None
    for kbps in (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 128, 160, 320):
        path = tmp_path / f"{kbps}.mp3"
        try:
            write_audio(path, x, rate, mp3_bitrate=kbps)
        except AudioError as exc:
            refused.append((kbps, str(exc)))
            assert not path.exists()
            continue
        lowest_taken = kbps if lowest_taken is None else lowest_taken
        y, _ = sf.read(path, dtype="float32", always_2d=True)
        assert y.shape == (x.shape[1], channels), kbps
        best = max(np.corrcoef(x[0].numpy(), np.roll(y[:, 0], lag))[0, 1] for lag in range(-3, 4))
        assert best > 0.9, (kbps, best)  # in place, not ~1100 samples late
    assert lowest_taken is not None
    for kbps, message in refused:
        assert kbps < lowest_taken
        assert f"use --mp3-bitrate {lowest_taken} or more" in message, message


# Clamping and inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "bits"), [(".wav", 16), (".wav", 24), (".flac", 16)])
def test_integer_formats_clamp_instead_of_wrapping(tmp_path, suffix, bits):
    x = torch.tensor([[1.5, -2.0, 0.5, 1.0001]])
    before = x.clone()
    path = tmp_path / f"loud{suffix}"
    write_audio(path, x, RATE, bits=bits)
    y, _ = read_audio(path)
    assert torch.allclose(y, torch.tensor([[1.0, -1.0, 0.5, 1.0]]), atol=1e-4)
    assert torch.equal(x, before)  # the caller's tensor is not clamped in place


def test_mp3_is_clamped_too(tmp_path):
    """LAME itself has no full scale: a sine at 3x full scale would decode with peaks near 3."""
    path = tmp_path / "loud.mp3"
    write_audio(path, sine(1, RATE // 4, RATE) * 6, RATE)
    y, _ = read_audio(path)
    assert 0.9 < y.abs().max().item() < 1.3


def test_write_accepts_other_dtypes_and_non_contiguous_views(tmp_path):
    x = noise(3, 1001, scale=0.5).double()[::2]  # (2, 1001) float64 view with a stride
    path = tmp_path / "view.wav"
    write_audio(path, x, RATE, bits=32)
    y, _ = read_audio(path)
    assert torch.equal(y, x.float())


# Bad files --------------------------------------------------------------------------------------


def _wav_bytes(tmp_path: Path, seconds: float = 0.5, **kwargs) -> bytes:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    path = scratch / "source.wav"
    frames = np.random.default_rng(0).uniform(-0.5, 0.5, (int(RATE * seconds), 2))
    sf.write(path, frames.astype(np.float32), RATE, **kwargs)
    return path.read_bytes()


def _make_bad_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A broken file of the given kind and the phrase its error must contain."""
    if kind == "missing":
        return tmp_path / "missing.wav", "no such file"
    if kind == "folder":
        (tmp_path / "folder.wav").mkdir()
        return tmp_path / "folder.wav", "is a folder"
    if kind == "empty":
        (tmp_path / "empty.wav").write_bytes(b"")
        return tmp_path / "empty.wav", "is empty (0 bytes)"
    if kind.startswith("text"):
        path = tmp_path / f"shopping{kind.removeprefix('text')}"
        path.write_text("eggs, flour, milk\n" * 30)
        return path, "not a recognised audio file"
    if kind == "wav_header_only":
        path = tmp_path / "cut.wav"
        path.write_bytes(_wav_bytes(tmp_path, subtype="PCM_16")[:50])
        return path, "truncated or corrupt audio"
    if kind in ("wav_before_data", "flac_header_cut"):
        source = tmp_path / ("source.wav" if kind.startswith("wav") else "source.flac")
        sf.write(source, np.zeros((100, 2), np.float32), RATE, subtype="PCM_16")
        path = tmp_path / f"cut{source.suffix}"
        path.write_bytes(source.read_bytes()[: 40 if kind.startswith("wav") else 20])
        return path, "truncated or corrupt audio"
    if kind == "wav_half":
        data = _wav_bytes(tmp_path, subtype="PCM_24")
        path = tmp_path / "half.wav"
        path.write_bytes(data[: len(data) // 2])
        return path, "truncated or corrupt audio"
    if kind in ("flac_half", "aiff_half"):
        suffix = "." + kind.split("_")[0]
        source = tmp_path / f"source{suffix}"
        frames = np.random.default_rng(1).uniform(-0.5, 0.5, (RATE // 2, 2))
        sf.write(source, frames, RATE, subtype="PCM_16")
        data = source.read_bytes()
        path = tmp_path / f"half{suffix}"
        path.write_bytes(data[: len(data) // 2])
        return path, "truncated or corrupt audio"
    if kind == "no_frames":
        path = tmp_path / "silence.wav"
        sf.write(path, np.zeros((0, 2), np.float32), RATE, subtype="FLOAT")
        return path, "contains no audio"
    if kind == "huge":
        path = tmp_path / "huge.wav"
        frames = np.zeros((1000, 2))
        frames[500, 1] = -1e300
        sf.write(path, frames, RATE, subtype="DOUBLE")
        return path, "contains samples beyond float32's range (as large as 1e+300)"
    if kind in ("nan", "inf"):
        path = tmp_path / f"{kind}.wav"
        frames = np.zeros((1000, 2), np.float32)
        frames[500, 1] = np.nan if kind == "nan" else -np.inf
        sf.write(path, frames, RATE, subtype="FLOAT")
        return path, "contains NaN or infinite samples"
    raise AssertionError(kind)


HEADER_KINDS = [
    "missing", "folder", "empty", "text.wav", "text.flac", "text.mp3", "text.aiff",
    "wav_header_only", "wav_before_data", "flac_header_cut", "wav_half", "aiff_half",
    "no_frames",
]  # fmt: skip


@pytest.mark.parametrize("kind", [*HEADER_KINDS, "flac_half", "nan", "inf", "huge"])
def test_read_audio_rejects_bad_files_in_one_line(tmp_path, kind):
    path, phrase = _make_bad_file(tmp_path, kind)
    with pytest.raises(AudioError) as excinfo:
        read_audio(path)
    assert_audio_error(excinfo, path, phrase)


@pytest.mark.parametrize("kind", ["nan", "huge"])
def test_reader_rejects_samples_float32_cannot_hold(tmp_path, kind):
    """The streaming reader says the same of each read as read_audio of the whole file."""
    path, phrase = _make_bad_file(tmp_path, kind)
    with audio.AudioReader(path) as reader:
        assert reader.read(0, 500).abs().max() == 0
        with pytest.raises(AudioError) as excinfo:
            reader.read(400, 200)
    assert_audio_error(excinfo, path, phrase)


@pytest.mark.parametrize("kind", HEADER_KINDS)
def test_audio_info_rejects_bad_headers_in_one_line(tmp_path, kind):
    path, phrase = _make_bad_file(tmp_path, kind)
    with pytest.raises(AudioError) as excinfo:
        audio_info(path)
    assert_audio_error(excinfo, path, phrase)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_flac_cut_anywhere_is_reported_as_truncated(tmp_path, fraction):
    source = tmp_path / "source.flac"
    sf.write(source, np.random.default_rng(2).uniform(-0.5, 0.5, (RATE, 2)), RATE)
    path = tmp_path / "cut.flac"
    path.write_bytes(source.read_bytes()[: int(source.stat().st_size * fraction)])
    with pytest.raises(AudioError) as excinfo:
        read_audio(path)
    assert_audio_error(excinfo, path, "truncated or corrupt audio")


def _wav_declaring(
    path: Path, data_size: int, riff_size: int | None = None, length: int | None = None
) -> Path:
    """A 24-bit stereo WAV (block align 6) at 96 kHz of 0.5 s whose header declares
    ``data_size`` bytes of samples (``riff_size``: data_size + 36 unless given), as a sparse
    file of ``length`` bytes (as many as it holds unless given)."""
    frames = np.random.default_rng(3).uniform(-0.5, 0.5, (48000, 2))
    sf.write(path, frames, 96000, subtype="PCM_24", format="WAV")
    data = bytearray(path.read_bytes())
    at = data.index(b"data")
    assert at == 36  # a plain header: RIFF size = data size + 36
    data[at + 4 : at + 8] = data_size.to_bytes(4, "little")
    riff = data_size + 36 if riff_size is None else riff_size
    data[4:8] = (riff % 2**32).to_bytes(4, "little")  # as a writer's uint32 wraps
    path.write_bytes(bytes(data))
    if length is not None:
        os.truncate(path, length)
    return path


SOX_UNKNOWN = 0x7FFFF000 // 6 * 6  # sox's "unknown length" for a block align of 6
_NEEDS_FFMPEG = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="no ffmpeg here")


@pytest.mark.parametrize(
    ("data_size", "riff_size"),
    [
        (0xFFFFFFFF, None),  # the data size alone
        (0xFFFFFFFF, 0xFFFFFFFF),  # ffmpeg writing to a pipe
        (SOX_UNKNOWN, None),  # sox writing to a pipe
        # 0, libsndfile's no frames: read through ffmpeg (it was "contains no audio")
        pytest.param(0, None, marks=_NEEDS_FFMPEG),
        pytest.param(0, 0, marks=_NEEDS_FFMPEG),
        pytest.param(0, 0xFFFFFFFF, marks=_NEEDS_FFMPEG),
    ],
)
def test_wav_with_a_streaming_placeholder_size_is_read(tmp_path, data_size, riff_size):
    """Writers that cannot seek back (pipes) leave a placeholder as the data size: not a cut."""
    path = _wav_declaring(tmp_path / "streamed.wav", data_size, riff_size)
    y, rate = read_audio(path)
    assert y.shape == (2, 48000) and rate == 96000
    whole, _ = read_audio(_wav_declaring(tmp_path / "plain.wav", 48000 * 6, None))
    assert torch.equal(y, whole)
    assert audio_info(path) == audio_info(tmp_path / "plain.wav")


def test_a_zero_data_size_without_ffmpeg_says_what_it_needs(tmp_path, monkeypatch):
    path = _wav_declaring(tmp_path / "streamed.wav", 0, None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(AudioError) as caught:
        read_audio(path)
    assert str(caught.value) == (
        f"{path}: its data chunk states 0 bytes (the size a writer that could not seek back "
        "leaves); reading it needs ffmpeg, which is not installed"
    )


@pytest.mark.parametrize(
    "data_size",
    [
        96000 * 6 * 3600,  # 2,073,600,000 bytes: 1 h at 96 kHz, 24 bits, stereo
        96000 * 6 * 3800,  # 2,188,800,000: over 2 GiB
        0x7FFFF000,  # sox's placeholder, but not a multiple of 6 as sox's would be
        SOX_UNKNOWN + 6,
        0xFFFFFFC6,  # the largest multiple of 6 whose RIFF size fits 32 bits
        0xFFFFFFFE,  # a RIFF size of data + 36 wraps round 2^32
    ],
)
def test_large_wav_cut_short_is_refused(tmp_path, data_size):
    """A 2 to 4 GiB WAV that holds half a second of its samples is cut, not streamed."""
    path = _wav_declaring(tmp_path / "cut.wav", data_size)
    with pytest.raises(AudioError) as excinfo:
        read_audio(path)
    assert_audio_error(excinfo, path, "truncated or corrupt audio (the file ends before its")


@pytest.mark.parametrize("data_size", [96000 * 6 * 3800, 0xFFFFFFC6])
def test_whole_wav_of_over_2_gib_is_read(tmp_path, data_size):
    """The same headers over a (sparse) file that holds every byte they declare."""
    path = _wav_declaring(tmp_path / "long.wav", data_size, length=44 + data_size)
    assert audio_info(path) == AudioInfo(96000, 2, data_size // 6)
    with audio.AudioReader(path) as reader:
        assert reader.read(reader.frames - 10, 10).shape == (2, 10)


@pytest.mark.skipif(not POSIX or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.wav"
    write_audio(path, noise(1, 10), RATE)
    path.chmod(0)
    with pytest.raises(AudioError) as excinfo:
        read_audio(path)
    assert_audio_error(excinfo, path, "cannot read: Permission denied")


# Bad writes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rate", "options", "x", "phrase"),
    [
        ("out.ogg", RATE, {}, noise(2, 10), "cannot write .ogg files (use one of: .wav, .flac"),
        ("out", RATE, {}, noise(2, 10), "cannot write a file without an extension"),
        ("out.flac", RATE, {"bits": 32}, noise(2, 10), "FLAC has no 32-bit float samples"),
        ("out.wav", RATE, {"bits": 8}, noise(2, 10), "WAV takes 16, 24 or 32 bits, not 8"),
        ("out.mp3", 96000, {}, noise(2, 10), "mp3 does not support 96000 Hz"),
        ("out.mp3", RATE, {"mp3_bitrate": 500}, noise(2, 10), "mp3 bitrate must be 8 to 320"),
        ("out.mp3", RATE, {"mp3_preset": 1}, noise(2, 10), "mp3 preset must be 2 (best)"),
        ("out.wav", 0, {}, noise(2, 10), "sample rate must be a positive integer"),
        ("out.wav", RATE, {}, noise(1, 10)[0], "expected (channels, time) audio"),
        ("out.wav", RATE, {}, noise(1000, 2), "is it (time, channels)?"),
        ("out.wav", RATE, {}, torch.tensor([[0.0, float("nan")]]), "NaN or infinite samples"),
        ("out.flac", RATE, {}, torch.tensor([[0.0, float("inf")]]), "NaN or infinite samples"),
        (
            "out.wav",
            RATE,
            {"bits": 32},
            torch.tensor([[0.0, 1e300]], dtype=torch.float64),
            "the audio to write has samples beyond float32's range",
        ),
    ],
)
def test_write_audio_rejects_bad_requests_in_one_line(tmp_path, name, rate, options, x, phrase):
    path = tmp_path / name
    with pytest.raises(AudioError) as excinfo:
        write_audio(path, x, rate, **options)
    assert_audio_error(excinfo, path, phrase)
    assert os.listdir(tmp_path) == []


def test_write_creates_missing_folders(tmp_path):
    path = tmp_path / "a" / "b" / "c.flac"
    write_audio(path, noise(2, 100, scale=0.5), RATE)
    assert read_audio(path)[0].shape == (2, 100)


def test_write_under_a_file_fails_in_one_line(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    path = blocker / "out" / "song.wav"
    with pytest.raises(AudioError) as excinfo:
        write_audio(path, noise(2, 10), RATE)
    assert_audio_error(excinfo, path, "cannot create folder")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(not POSIX or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_write_into_read_only_folder_fails_in_one_line(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    path = folder / "song.wav"
    try:
        with pytest.raises(AudioError) as excinfo:
            write_audio(path, noise(2, 10), RATE)
    finally:
        folder.chmod(0o755)
    assert_audio_error(excinfo, path, "cannot write: Permission denied")
    assert os.listdir(folder) == []


def test_refused_temporary_is_reported_in_one_line(tmp_path, monkeypatch):
    """The unwritable-folder case above, as seen by root too: creating the temporary fails."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(audio.os, "open", refuse)
    path = tmp_path / "song.wav"
    with pytest.raises(AudioError) as excinfo:
        write_audio(path, noise(2, 10), RATE)
    assert str(excinfo.value) == f"{path}: cannot write: Permission denied"
    assert os.listdir(tmp_path) == []


def test_write_onto_a_folder_fails_and_cleans_up(tmp_path):
    """The rename is the last step: its failure is reported and the temporary removed."""
    path = tmp_path / "taken.wav"
    (path / "inside").mkdir(parents=True)
    with pytest.raises(AudioError) as excinfo:
        write_audio(path, noise(2, 10), RATE)
    assert_audio_error(excinfo, path, "cannot write:")
    assert sorted(os.listdir(tmp_path)) == ["taken.wav"] and path.is_dir()


# Atomic writes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".mp3"])
def test_successful_write_leaves_only_the_file(tmp_path, suffix):
    path = tmp_path / f"song{suffix}"
    write_audio(path, noise(2, 4000, scale=0.5), RATE)
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_written_file_gets_the_usual_permissions(tmp_path):
    """Not mkstemp's 0600: a written stem is as readable as any file the user creates."""
    umask = os.umask(0o022)
    os.umask(umask)
    path = tmp_path / "song.wav"
    write_audio(path, noise(2, 10), RATE)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize(
    ("failure", "raised"),
    [(KeyboardInterrupt, KeyboardInterrupt), (sf.LibsndfileError, AudioError)],
)
@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, failure, raised, existing):
    """A write interrupted halfway (Ctrl-C, or libsndfile failing) leaves neither a temporary
    nor a partial file, and an existing file at the destination is untouched."""
    path = tmp_path / "song.wav"
    if existing:
        path.write_bytes(b"the previous take")
    seen_during_write: list[list[str]] = []
    original_write = sf.SoundFile.write

    def write_half_then_fail(self, data):
        original_write(self, data[: len(data) // 2])
        self.flush()
        seen_during_write.append(sorted(os.listdir(tmp_path)))
        raise failure(2) if failure is sf.LibsndfileError else failure()

    monkeypatch.setattr(sf.SoundFile, "write", write_half_then_fail)
    with pytest.raises(raised) as excinfo:
        write_audio(path, noise(2, 10000, scale=0.5), RATE)
    if raised is AudioError:
        assert_audio_error(excinfo, path, "cannot write: ")
    # The half-written data went to a hidden temporary beside the destination, never to it.
    (during,) = seen_during_write
    temporaries = [name for name in during if name != "song.wav"]
    assert len(temporaries) == 1
    assert temporaries[0].startswith(".song.wav.") and temporaries[0].endswith(".tmp")
    assert ("song.wav" in during) == existing
    assert os.listdir(tmp_path) == (["song.wav"] if existing else [])
    if existing:
        assert path.read_bytes() == b"the previous take"


# ffmpeg -----------------------------------------------------------------------------------------


def test_ffmpeg_missing_is_a_clear_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    path = tmp_path / "song.m4a"
    path.write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))
    for function in (read_audio, audio_info):
        with pytest.raises(AudioError) as excinfo:
            function(path)
        assert_audio_error(
            excinfo, path, "reading .m4a files needs ffmpeg, which is not installed (install it"
        )


def test_unknown_extension_without_ffmpeg_is_not_audio(tmp_path, monkeypatch):
    monkeypatch.setattr(audio.shutil, "which", lambda name: None)
    path = tmp_path / "notes.txt"
    path.write_text("not audio")
    with pytest.raises(AudioError) as excinfo:
        read_audio(path)
    assert_audio_error(excinfo, path, "not a recognised audio file")


# Both stand-ins check that they are given the input htsep opened (as /dev/fd/N where there is
# one) and the whitelists that keep ffmpeg to that one file.
FAKE_FFPROBE = """#!{python}
import json, os, sys
args = sys.argv[1:]
url = args[-1]
assert args[args.index("-of") + 1] == "json" and url.startswith("file:"), args
assert os.path.samefile(url[len("file:"):], {path!r}), args
assert args[args.index("-protocol_whitelist") + 1] == "file", args
print(json.dumps({probe}, indent=4))
"""

FAKE_FFMPEG = """#!{python}
import os, sys
args = sys.argv[1:]
url = args[args.index("-i") + 1]
assert url.startswith("file:") and os.path.samefile(url[len("file:"):], {path!r}), args
assert "mov" in args[args.index("-format_whitelist") + 1].split(","), args
assert args[args.index("-f") + 1] == "f32le" and args[-1] == "-", args
error = {error!r}
if error is not None:
    sys.stderr.write(error.replace("URL", url) + "\\nsecond line, not for the message\\n")
    sys.exit(1)
with open({raw!r}, "rb") as raw:
    sys.stdout.buffer.write(raw.read())
"""


def _fake_ffmpeg(tmp_path: Path, monkeypatch, path: Path, probe: dict, raw: bytes,
                 error: str | None = None) -> None:  # fmt: skip
    """Put stand-ins for ffprobe and ffmpeg first on PATH. They check the arguments we rely on
    and print exactly what the real tools print for them: ffprobe's JSON (sample_rate as a
    string, channels as a number) and ffmpeg's headerless interleaved little-endian float32."""
    folder = tmp_path / "fake-bin"
    folder.mkdir()
    (folder / "signal.f32").write_bytes(raw)
    values = {"python": sys.executable, "path": str(path), "probe": repr(probe)}
    scripts = {
        "ffprobe": FAKE_FFPROBE.format(**values),
        "ffmpeg": FAKE_FFMPEG.format(**values, raw=str(folder / "signal.f32"), error=error),
    }
    for tool, script in scripts.items():
        (folder / tool).write_text(script)
        (folder / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(not POSIX, reason="the stand-in tools are shebang scripts")
def test_ffmpeg_output_is_parsed_into_channels_first(tmp_path, monkeypatch):
    """This tests our side of the contract only (argument layout, ffprobe's JSON, the f32le
    byte order and interleaving), against stand-ins: no codec is exercised here."""
    signal = np.stack([np.linspace(-1, 1, 999), np.linspace(0.5, -0.25, 999)]).astype(np.float32)
    path = tmp_path / "song.m4a"
    path.write_bytes(b"not something libsndfile knows")
    probe = {
        "programs": [],
        "streams": [
            {
                "index": 0,
                "codec_type": "audio",
                "sample_rate": "22050",
                "channels": 2,
                "duration": "0.045306",
            }
        ],
        "format": {"duration": "0.045306"},
    }
    raw = signal.T.astype("<f4").tobytes()  # (T, C) interleaved, as ffmpeg writes it
    _fake_ffmpeg(tmp_path, monkeypatch, path, probe, raw)
    y, rate = read_audio(path)
    assert rate == 22050 and y.dtype == torch.float32 and y.is_contiguous()
    assert torch.equal(y, torch.from_numpy(signal))
    assert audio_info(path) == AudioInfo(22050, 2, round(0.045306 * 22050))


@pytest.mark.skipif(not POSIX, reason="the stand-in tools are shebang scripts")
@pytest.mark.parametrize(
    "first_line",
    ["URL: Invalid data found when processing input",
     "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55ab471137c0] Invalid data found when processing input"],
)  # fmt: skip
def test_ffmpeg_failure_gives_its_first_line(tmp_path, monkeypatch, first_line):
    """ffmpeg's first line, less the input's URL or the demuxer's address it starts with."""
    path = tmp_path / "broken.opus"
    path.write_bytes(b"garbage")
    stream = {"index": 0, "codec_type": "audio", "sample_rate": "48000", "channels": 1}
    probe = {"streams": [stream], "format": {}}
    _fake_ffmpeg(tmp_path, monkeypatch, path, probe, b"", error=first_line)
    with pytest.raises(AudioError) as excinfo:
        read_audio(path)
    message = str(excinfo.value)
    assert message == f"{path}: ffmpeg cannot read it: Invalid data found when processing input"


@pytest.mark.skipif(not POSIX, reason="the stand-in tools are shebang scripts")
def test_ffmpeg_file_without_audio_stream(tmp_path, monkeypatch):
    path = tmp_path / "silent-film.mp4"
    path.write_bytes(b"video only")
    _fake_ffmpeg(tmp_path, monkeypatch, path, {"programs": [], "streams": []}, b"")
    with pytest.raises(AudioError) as excinfo:
        read_audio(path)
    assert_audio_error(excinfo, path, "has no audio stream")


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
@pytest.mark.parametrize(("suffix", "codec", "exact"), [(".m4a", "aac", False),
                                                        (".m4a", "alac", True),
                                                        (".mka", "pcm_f32le", True)])  # fmt: skip
def test_real_ffmpeg_decodes_what_it_encoded(tmp_path, suffix, codec, exact):
    x = sine(2, RATE // 2, RATE) * torch.tensor([[1.0], [0.5]])
    source = tmp_path / "source.wav"
    write_audio(source, x, RATE, bits=32 if codec == "pcm_f32le" else 16)
    path = tmp_path / f"encoded{suffix}"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(source), "-c:a", codec,
                    str(path)], check=True)  # fmt: skip
    y, rate = read_audio(path)
    info = audio_info(path)
    assert rate == RATE and y.shape[0] == 2 and (info.sample_rate, info.channels) == (RATE, 2)
    if exact:
        reference, _ = read_audio(source)
        assert torch.equal(y, reference)
        assert info.frames == x.shape[1]
    else:
        # AAC frames are 1024 samples; how much priming and padding is trimmed depends on the
        # ffmpeg build (5.1 here: 22528 decoded, 22050 stated).
        assert abs(y.shape[1] - x.shape[1]) <= 2048
        assert abs(info.frames - y.shape[1]) <= 2048
        # The abrupt start overshoots; the level of the middle is the sine's (RMS = peak / sqrt 2).
        middle = y[:, y.shape[1] // 4 : -y.shape[1] // 4]
        rms = middle.square().mean(dim=1).sqrt() * 2**0.5
        assert torch.allclose(rms, torch.tensor([0.5, 0.25]), rtol=0.1)


def test_extension_sets_are_consistent():
    assert audio.AUDIO_EXTENSIONS == audio.SOUNDFILE_EXTENSIONS | audio.FFMPEG_EXTENSIONS
    assert not audio.SOUNDFILE_EXTENSIONS & audio.FFMPEG_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in audio.AUDIO_EXTENSIONS)
    assert {".wav", ".flac", ".mp3", ".m4a"} <= audio.AUDIO_EXTENSIONS
    assert audio.WRITE_FORMATS == ("wav", "flac", "mp3")


# Containers, encodings and truncation -----------------------------------------------------------

# Every (format, subtype) this libsndfile writes and reads back, as small stereo files (mono where
# the format has one channel only).
_WRITABLE: list[tuple[str, str]] = [
    (fmt, subtype)
    for fmt in sorted(sf.available_formats())
    if fmt not in ("RAW", "SD2")  # RAW has no header; SD2 keeps its header in a resource fork
    for subtype in sorted(sf.available_subtypes(fmt))
]
# Formats whose header states no length: only a cut that splits a frame can show.
_NO_LENGTH = {"IRCAM", "PAF", "PVF", "XI"}


def _container_file(folder: Path, fmt: str, subtype: str, frames: int = 6000) -> Path | None:
    """A valid file of ``fmt``/``subtype`` or None if libsndfile cannot write or read it here."""
    path = folder / f"source-{fmt}-{subtype}.bin"
    signal = 0.4 * np.sin(np.arange(frames)[:, None] * np.array([[0.01, 0.023]]))
    for channels in (2, 1):
        try:
            sf.write(path, signal[:, :channels].astype(np.float32), 8000, format=fmt,
                     subtype=subtype)  # fmt: skip
            with sf.SoundFile(path) as handle:
                handle.read(16)
            return path
        except (sf.LibsndfileError, RuntimeError, ValueError):
            path.unlink(missing_ok=True)
    return None


@pytest.mark.parametrize(("fmt", "subtype"), _WRITABLE)
def test_every_container_reads_whole_or_refuses_in_one_line(tmp_path, fmt, subtype):
    """Whole files of every encoding: read in place, or (no seeking in it) decoded front to back
    by AudioReader, with random reads equal to the whole read. Encodings libsndfile opens but
    cannot decode (AIFF DWVW) are refused in one line."""
    path = _container_file(tmp_path, fmt, subtype)
    if path is None:
        pytest.skip(f"libsndfile cannot write {fmt} {subtype} here")
    try:
        whole, rate = read_audio(path)
    except AudioError as exc:
        assert subtype.startswith("DWVW"), exc
        assert str(exc) == (
            f"{path}: truncated or corrupt audio, or an encoding this libsndfile cannot decode "
            f"({fmt} {subtype}: Internal psf_fseek() failed)"
        )
        return
    info = audio_info(path)
    assert (info.sample_rate, info.channels) == (rate, whole.shape[0])
    assert rate == (44100 if fmt == "XI" else 8000)  # XI instruments have no sample rate
    with audio.AudioReader(path, block_frames=1000) as reader:
        assert reader.count_frames() == whole.shape[1]
        for start, length in [(2500, 700), (-10, 50), (0, 3000), (whole.shape[1] - 5, 20)]:
            block = reader.read(start, length)
            lo, hi = max(start, 0), min(start + length, whole.shape[1])
            expected = whole[:, lo:hi]
            assert block.shape == (whole.shape[0], length)
            assert torch.allclose(block[:, lo - start : hi - start], expected, atol=1e-6)
        reader.check_unchanged()
    assert os.listdir(tmp_path) == [path.name]  # no decoded temporary left beside it


@pytest.mark.parametrize(("fmt", "subtype"), _WRITABLE)
def test_every_container_cut_is_refused_or_complete(tmp_path, fmt, subtype):
    """A file cut in its header, its middle or its last bytes is refused in one line, or (a cut
    of trailing metadata only) reads as the whole; never silently short, except where the
    header states no length and the cut falls between frames."""
    path = _container_file(tmp_path, fmt, subtype)
    if path is None:
        pytest.skip(f"libsndfile cannot write {fmt} {subtype} here")
    try:
        whole, _ = read_audio(path)
    except AudioError:
        pytest.skip("refused whole (see the test above)")
    data = path.read_bytes()
    for cut in sorted({30, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1}):
        cut_path = tmp_path / f"cut-{cut}.bin"
        cut_path.write_bytes(data[:cut])
        for function in (read_audio, lambda p: (_reader_whole(p), None)):
            try:
                got = function(cut_path)[0]
            except AudioError as exc:
                message = str(exc)
                assert message.startswith(f"{cut_path}: ") and "\n" not in message
                continue
            if fmt in _NO_LENGTH or fmt in ("MP3", "OGG"):
                assert got.shape[1] <= whole.shape[1] + 2048
            else:
                assert got.shape == whole.shape, (cut, got.shape, whole.shape)


def _reader_whole(path: Path) -> torch.Tensor:
    with audio.AudioReader(path) as reader:
        frames = reader.count_frames()
        return reader.read(0, frames)


@pytest.mark.parametrize("what", ["RF64", "W64", "AU", "CAF", "AIFF", "NIST", "FLAC", "OGG"])
def test_cut_containers_name_the_truncation(tmp_path, what):
    """The hostile tester's cases: RF64, W64 and AU files cut in half were half-separated."""
    path = _container_file(tmp_path, what, "VORBIS" if what == "OGG" else "PCM_16", 20000)
    assert path is not None
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 1])
    for function in (read_audio, audio_info, _reader_whole):
        if function is audio_info and what == "FLAC":
            continue  # FLAC's cut shows when its frames are decoded
        with pytest.raises(AudioError) as excinfo:
            function(path)
        assert_audio_error(excinfo, path, "truncated or corrupt audio")


# Inputs that change while they are read ---------------------------------------------------------


def _float_wav(path: Path, frames: int = 20000, seed: int = 0) -> torch.Tensor:
    x = noise(2, frames, scale=0.5, seed=seed)
    write_audio(path, x, RATE, bits=32)
    return x


def test_input_cut_after_the_first_pass_fails_the_read(tmp_path):
    path = tmp_path / "song.wav"
    _float_wav(path)
    with audio.AudioReader(path) as reader:
        assert reader.count_frames() == 20000
        os.truncate(path, path.stat().st_size // 2)
        with pytest.raises(AudioError) as excinfo:
            reader.read(15000, 1000)
        assert_audio_error(excinfo, path, "changed while it was being read")
        with pytest.raises(AudioError):
            reader.check_unchanged()


def test_input_rewritten_in_place_fails(tmp_path):
    """Same length, other samples: the size cannot tell, the change time can."""
    path = tmp_path / "song.wav"
    _float_wav(path)
    with audio.AudioReader(path) as reader:
        reader.count_frames()
        reader.read(0, 1000)
        time.sleep(0.05)  # past the file system's clock tick, as any real rewrite is
        with open(path, "r+b") as handle:  # in place: same inode, same length
            handle.seek(5000)
            handle.write(bytes(4000))
        with pytest.raises(AudioError) as excinfo:
            reader.check_unchanged()
        assert_audio_error(excinfo, path, "changed while it was being read (rewritten in place)")
        with pytest.raises(AudioError):
            reader.read(1000, 1000)


def test_input_shorter_than_counted_fails_even_unnoticed(tmp_path, monkeypatch):
    """A short read within [0, frames) is never padded with zeros as if the track went on."""
    path = tmp_path / "song.wav"
    _float_wav(path)
    with audio.AudioReader(path) as reader:
        reader.count_frames()
        monkeypatch.setattr(reader, "check_unchanged", lambda: None)
        os.truncate(path, path.stat().st_size - 8000)
        with pytest.raises(AudioError) as excinfo:
            reader.read(19000, 1000)
        assert_audio_error(excinfo, path, "changed while it was read (")


def test_input_replaced_by_rename_keeps_reading_the_opened_file(tmp_path):
    """Editors save by renaming a new file over the old: the reader goes on with the file it
    opened, whose samples stay whole and consistent."""
    path = tmp_path / "song.wav"
    x = _float_wav(path, seed=1)
    with audio.AudioReader(path) as reader:
        reader.count_frames()
        _float_wav(tmp_path / "new.wav", 5000, seed=2)
        os.replace(tmp_path / "new.wav", path)
        assert torch.equal(reader.read(0, 20000), x)
        reader.check_unchanged()


@pytest.mark.skipif(not POSIX, reason="FIFOs")
@pytest.mark.parametrize("function", [read_audio, audio_info, audio.AudioReader])
def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path, function):
    path = tmp_path / "pipe.wav"
    os.mkfifo(path)
    script = (
        "import sys\nfrom htsep import audio\n"
        f"try:\n    audio.{function.__name__}(sys.argv[1])\n"
        "except audio.AudioError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.stdout == f"{path}: is not a regular file\n", done.stderr


# Writing: no replacing, labels, full disks ------------------------------------------------------


def test_no_replace_keeps_a_file_that_appeared_meanwhile(tmp_path):
    path = tmp_path / "vocals.wav"
    with (
        pytest.raises(AudioError) as excinfo,
        audio.AudioWriter(path, RATE, 2, replace=False) as writer,
    ):
        writer.write(noise(2, 1000, scale=0.5))
        path.write_bytes(b"another program's file")
    assert str(excinfo.value) == (
        f"{path}: exists already (created by another program while htsep wrote it); not replaced"
    )
    assert path.read_bytes() == b"another program's file"
    assert os.listdir(tmp_path) == ["vocals.wav"]


def test_no_replace_writes_when_nothing_is_there(tmp_path):
    path = tmp_path / "vocals.flac"
    x = noise(2, 1000, scale=0.5)
    write_audio(path, x, RATE, replace=False)
    assert read_audio(path)[0].shape == (2, 1000)
    assert os.listdir(tmp_path) == ["vocals.flac"]


def test_label_names_the_file_in_errors(tmp_path):
    staged = tmp_path / ".staging" / "vocals.wav"
    with pytest.raises(AudioError) as excinfo:
        write_audio(staged, noise(2, 10), RATE, bits=8, label="out/song/vocals.flac")
    assert str(excinfo.value).startswith("out/song/vocals.flac: WAV takes 16, 24 or 32 bits")
    with pytest.raises(AudioError) as excinfo:
        write_audio(staged, noise(1, 10)[0], RATE, label="out/song/vocals.flac")
    assert str(excinfo.value).startswith("out/song/vocals.flac: expected (channels, time)")


def test_written_file_is_synced_before_the_rename(tmp_path, monkeypatch):
    """A power loss must not leave an empty file under the final name: the data is flushed
    before the rename that publishes it."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1]
    )
    write_audio(tmp_path / "song.wav", noise(2, 100), RATE)
    assert events[:2] == ["fsync", "rename"]


def test_full_disk_is_named_not_system_error(tmp_path, monkeypatch):
    """libsndfile reports a failed write as "System error": the reason comes from the OS."""
    path = tmp_path / "drums.wav"

    def fail(self, data):
        raise sf.LibsndfileError(2)  # SFE_SYSTEM, libsndfile's "System error"

    def no_space(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sf.SoundFile, "write", fail)
    monkeypatch.setattr(audio.os, "write", no_space)
    with pytest.raises(AudioError) as excinfo:
        write_audio(path, noise(2, 1000), RATE, label="out/drums.wav")
    assert str(excinfo.value) == "out/drums.wav: cannot write: No space left on device"
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full") or not os.path.isdir("/proc/self/fd"),
                    reason="/dev/full and /proc/self/fd")  # fmt: skip
@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_full_disk_is_named_where_a_second_write_would_succeed(tmp_path, suffix):
    """A real failed write: after a first block, libsndfile's descriptor is turned into
    /dev/full (every write fails with ENOSPC) while the temporary's name still takes writes,
    as a full ext4 may after the failed allocation. The reason is libsndfile's own."""
    path = tmp_path / f"drums{suffix}"
    label = f"out/drums{suffix}"
    with (
        pytest.raises(AudioError) as excinfo,
        audio.AudioWriter(path, RATE, 2, label=label) as writer,
    ):
        writer.write(noise(2, 10_000))
        (temporary,) = tmp_path.iterdir()
        for fd in map(int, os.listdir("/proc/self/fd")):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") == str(temporary):
                    full = os.open("/dev/full", os.O_WRONLY)
                    os.dup2(full, fd)
                    os.close(full)
        writer.write(noise(2, 100_000))
    assert str(excinfo.value) == f"out/drums{suffix}: cannot write: No space left on device"
    assert os.listdir(tmp_path) == []


FILE_SIZE_LIMIT_SCRIPT = """
import resource, sys, torch
from htsep.audio import write_audio, AudioError
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    write_audio(sys.argv[1], torch.rand(2, {frames}) - 0.5, 44100, bits={bits})
except AudioError as exc:
    print(exc)
"""


@pytest.mark.skipif(not POSIX, reason="RLIMIT_FSIZE")
@pytest.mark.parametrize(("suffix", "bits", "frames"), [(".wav", 32, 100_000),
                                                        (".flac", 16, 400_000)])  # fmt: skip
def test_file_size_limit_is_named(tmp_path, suffix, bits, frames):
    """The real failure, without root: a process limited to 200 kB gets EFBIG (Python ignores
    SIGXFSZ), the same path as a full disk."""
    path = tmp_path / f"big{suffix}"
    script = FILE_SIZE_LIMIT_SCRIPT.format(frames=frames, bits=bits)
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.stdout == f"{path}: cannot write: File too large\n", done.stderr
    assert os.listdir(tmp_path) == []


DECODE_SIZE_LIMIT_SCRIPT = """
import resource, sys
from htsep.audio import AudioReader, AudioError
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    AudioReader(sys.argv[1])
except AudioError as exc:
    print(exc)
"""


@pytest.mark.skipif(not POSIX, reason="RLIMIT_FSIZE")
def test_decoding_into_a_size_limited_folder_names_the_reason(tmp_path):
    """An Ogg is decoded into a float temporary (2 s: 700 kB) that outgrows a 200 kB limit:
    the error names the OS's reason, as the writer's do, not libsndfile's "System error"."""
    path = tmp_path / "song.ogg"
    sf.write(path, sine(2, 2 * RATE, RATE).numpy().T, RATE, subtype="VORBIS")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    done = subprocess.run([sys.executable, "-c", DECODE_SIZE_LIMIT_SCRIPT, str(path)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(temporary)})  # fmt: skip
    assert done.stdout == f"{path}: cannot decode it into {temporary}: File too large\n", (
        done.stdout + done.stderr
    )
    assert os.listdir(temporary) == []


@pytest.mark.skipif(not POSIX or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_tmpfs_is_named(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here")
    try:
        path = disk / "song.wav"
        with pytest.raises(AudioError) as excinfo:
            write_audio(path, noise(2, 100_000), RATE, bits=32)
        assert str(excinfo.value) == f"{path}: cannot write: No space left on device"
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# Damage inside compressed streams, pad bytes, headerless names ---------------------------------


def _bitwise_ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32 the slow way: polynomial 0x04C11DB7, most significant bit first, no
    inversions (the Ogg specification's definition)."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


def test_ogg_checksum_is_the_specifications():
    rng = np.random.default_rng(3)
    for size in (0, 1, 27, 255, 1000):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert audio._ogg_crc(data) == _bitwise_ogg_crc(data)


def _damaged(path: Path, at: float, size: int, seed: int) -> Path:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + size] = np.random.default_rng(seed).bytes(size)
    out = path.with_name(f"damaged-{path.name}")
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate", "channels"),
    [
        ("OGG", "VORBIS", 44100, 2),
        ("OGG", "VORBIS", 8000, 1),
        ("OGG", "OPUS", 48000, 1),
        ("OGG", "FLAC", 22050, 2),
        ("MP3", "MPEG_LAYER_III", 44100, 2),
        ("MP3", "MPEG_LAYER_III", 22050, 2),
        ("MP3", "MPEG_LAYER_III", 8000, 1),
    ],
)
def test_damage_inside_ogg_and_tagged_mp3_is_refused(tmp_path, fmt, subtype, rate, channels):
    """Bytes overwritten in the middle: libogg drops the page and libmpg123 the frames without a
    word, so these read as shorter files (a third of a second gone from a 3-s Vorbis file).
    Ogg pages carry checksums and page numbers; an MP3 whose Xing/Info tag counts its frames
    has an exact length. Whole files read as before."""
    if subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"libsndfile cannot write {fmt} {subtype} here")
    path = tmp_path / f"clip.{'ogg' if fmt == 'OGG' else 'mp3'}"
    signal = np.random.default_rng(0).standard_normal((3 * rate + 17, channels)) * 0.1
    sf.write(path, signal, rate, format=fmt, subtype=subtype)
    whole, _ = read_audio(path)
    assert whole.shape == (channels, 3 * rate + 17)
    damaged = _damaged(path, 1 / 3, 400, seed=1)
    for function in (read_audio, _reader_whole):
        with pytest.raises(AudioError) as excinfo:
            function(damaged)
        assert_audio_error(excinfo, damaged, "truncated or corrupt audio")
    if fmt == "OGG":  # the pages are checked when the file is opened
        with pytest.raises(AudioError):
            audio_info(damaged)


def test_mp3_without_a_frame_count_is_read_as_far_as_it_goes(tmp_path):
    """Without a Xing/Info tag an MP3's length is libsndfile's estimate from its size: fewer
    frames than estimated is no proof of damage."""
    path = tmp_path / "clip.mp3"
    sf.write(path, np.zeros((8000, 1)), 8000, format="MP3")
    data = bytearray(path.read_bytes())
    at = 4 + 9  # MPEG-2.5 mono: the tag follows 9 bytes of side information
    assert data[at : at + 4] in (b"Xing", b"Info")
    data[at : at + 4] = b"None"  # no tag: the first frame is an ordinary (silent) frame
    path.write_bytes(bytes(data))
    assert not audio._mp3_exact_length(str(path))
    got, rate = read_audio(path)
    assert rate == 8000 and got.shape[0] == 1 and got.shape[1] > 0


def test_a_wav_missing_the_pad_byte_after_odd_data_is_refused(tmp_path):
    """A GSM 6.10 WAV of 69 blocks has 4485 bytes of data and a pad byte. Without the pad byte
    libsndfile still opens it, and decodes the last block wrong."""
    path = tmp_path / "gsm.wav"
    sf.write(path, 0.5 * np.sin(np.arange(22051) / 10), 44100, subtype="GSM610")
    data = path.read_bytes()
    read_audio(path)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[:-1])
    wrong, _ = sf.read(cut)  # what libsndfile alone makes of it
    assert np.abs(wrong - sf.read(path)[0]).max() > 0.1
    for function in (read_audio, audio_info, _reader_whole):
        with pytest.raises(AudioError) as excinfo:
            function(cut)
        assert_audio_error(excinfo, cut, "riff size")


def test_raw_names_are_read_by_their_content(tmp_path):
    """soundfile takes a .raw name for headerless samples and asks for their rate: a WAV named
    .raw is read as the WAV, headerless bytes are refused in one line (never a TypeError)."""
    x = noise(2, 3000, scale=0.5)
    wav = tmp_path / "a.wav"
    write_audio(wav, x, RATE, bits=32)
    for name in ("a.raw", "b.RAW"):
        named = tmp_path / name
        shutil.copy(wav, named)
        got, rate = read_audio(named)
        assert rate == RATE and torch.equal(got, x)
        assert audio_info(named).channels == 2
    junk = tmp_path / "junk.raw"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    for function in (read_audio, audio_info, _reader_whole):
        with pytest.raises(AudioError) as excinfo:
            function(junk)
        assert_audio_error(excinfo, junk, "headerless audio")


def test_chained_ogg_is_refused_not_read_in_part(tmp_path):
    """Two Ogg files joined (a chain, as `cat a.ogg b.ogg` makes) read as the first alone in
    libsndfile, without a word: refused in one line."""
    first, second = tmp_path / "a.ogg", tmp_path / "b.ogg"
    sf.write(first, np.zeros((8000, 1)), 8000, format="OGG", subtype="VORBIS")
    sf.write(second, np.full((8000, 1), 0.1), 8000, format="OGG", subtype="VORBIS")
    chain = tmp_path / "chain.ogg"
    chain.write_bytes(first.read_bytes() + second.read_bytes())
    with sf.SoundFile(chain) as handle:
        assert handle.frames == 8000  # what libsndfile alone makes of it: the first link
    for function in (read_audio, audio_info, _reader_whole):
        with pytest.raises(AudioError) as excinfo:
            function(chain)
        assert_audio_error(excinfo, chain, "chained stream begins at byte")


@pytest.mark.parametrize("change", ["chmod", "same mode", "link", "xattr"])
def test_a_change_of_metadata_alone_is_not_a_rewrite(tmp_path, change):
    """The change time moves with chmod (even to the same mode), a hard link or an extended
    attribute: the track failed as "rewritten in place" though not a byte had changed."""
    path = tmp_path / "song.wav"
    x = _float_wav(path)
    with audio.AudioReader(path) as reader:
        reader.count_frames()
        first = reader.read(0, 1000)
        time.sleep(0.05)  # past the file system's clock tick
        if change == "chmod":
            path.chmod(0o600)
        elif change == "same mode":
            path.chmod(path.stat().st_mode & 0o777)
        elif change == "link":
            os.link(path, tmp_path / "again.wav")
        else:
            try:
                os.setxattr(path, "user.htsep-test", b"1")
            except OSError as exc:
                pytest.skip(f"no user extended attributes here ({exc.strerror})")
        reader.check_unchanged()
        rest = reader.read(1000, 19000)
    assert torch.equal(torch.cat([first, rest], dim=1), x)


def test_a_rewrite_whose_times_were_set_back_fails(tmp_path):
    """Same length, other samples, the modification time put back (touch -r), also after a
    link was made (the link count moved, which made the change time go unchecked)."""
    path = tmp_path / "song.wav"
    _float_wav(path)
    with audio.AudioReader(path) as reader:
        reader.count_frames()
        reader.read(0, 1000)
        before = path.stat()
        time.sleep(0.05)
        os.link(path, tmp_path / "again.wav")
        with open(path, "r+b") as handle:
            handle.seek(5000)
            handle.write(bytes(4000))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        with pytest.raises(AudioError) as excinfo:
            reader.check_unchanged()
        assert_audio_error(excinfo, path, "changed while it was being read (rewritten in place)")


@pytest.mark.parametrize(("suffix", "most"), [(".mp3", 2), (".flac", 8)])
def test_more_channels_than_a_format_holds_is_said_so(tmp_path, suffix, most):
    """libsndfile said "Format not recognised"."""
    if suffix == ".mp3" and "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile cannot write MP3")
    write_audio(tmp_path / f"ok{suffix}", torch.zeros(most, 1000), 44100)
    with pytest.raises(AudioError) as caught:
        write_audio(tmp_path / f"x{suffix}", torch.zeros(most + 1, 1000), 44100)
    assert str(caught.value) == (
        f"{tmp_path / f'x{suffix}'}: {suffix[1:].upper()} holds at most {most} channels, "
        f"not {most + 1} (use WAV)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ok{suffix}"]


def test_a_sample_rate_given_as_text_is_shown_as_text(tmp_path):
    with pytest.raises(AudioError, match="must be a positive integer, not '44100'$"):
        write_audio(tmp_path / "x.wav", torch.zeros(2, 10), "44100")
