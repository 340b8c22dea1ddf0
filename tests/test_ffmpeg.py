"""htsep.audio's ffmpeg path against hostile files and faults: playlists and scripts that name
other files, ADTS AAC, decodes that must be stopped, cut containers, a full temporary folder,
inputs renamed over while they are probed, and the stream and limits a probe decides.

Tests marked ``real`` need ffmpeg and ffprobe installed and skip without them; the others put
stand-ins on PATH (shebang scripts: POSIX only)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import htsep as htsep_command

from htsep import audio
from htsep.audio import AudioReader, audio_info, read_audio, write_audio
from htsep.errors import AudioError

RATE = 44100
POSIX = sys.platform != "win32"
FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")
real = pytest.mark.skipif(FFMPEG is None or FFPROBE is None, reason="ffmpeg is not installed")
fake = pytest.mark.skipif(not POSIX, reason="the stand-in tools are shebang scripts")
# Long enough for any machine to start a process; only a hang reaches it.
PATIENCE = 60.0
# ffprobe's description of a stereo audio stream, for the stand-in ffprobes.
STEREO = {"index": 0, "codec_type": "audio", "sample_rate": "44100", "channels": 2}


def tone(channels: int, frames: int, hz: float = 440.0, level: float = 0.5) -> torch.Tensor:
    t = torch.arange(frames, dtype=torch.float64) / RATE
    wave = level * torch.sin(2 * torch.pi * hz * t)
    return torch.stack([wave * (1 - 0.5 * c) for c in range(channels)]).float()


def ffmpeg(*args: str | Path, stdout: int | None = None) -> bytes:
    done = subprocess.run([FFMPEG or "ffmpeg", "-nostdin", "-v", "error", "-y",
                           *map(str, args)], capture_output=stdout is None, stdout=stdout,
                          check=True, timeout=120)  # fmt: skip
    return done.stdout or b""


def encode(source: Path, out: Path, *options: str) -> Path:
    """``source`` encoded by ffmpeg; skips the test where this ffmpeg lacks the encoder."""
    done = subprocess.run([FFMPEG or "ffmpeg", "-nostdin", "-v", "error", "-y", "-i",
                           str(source), *options, str(out)], capture_output=True,
                          timeout=120)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"this ffmpeg cannot encode {options}: {done.stderr.decode()[:200]}")
    return out


def ffmpeg_decode(path: Path, channels: int) -> np.ndarray:
    """What ffmpeg alone decodes from ``path``: (T, C) float32, the oracle for our decode."""
    raw = ffmpeg("-i", path, "-map", "0:a:0", "-f", "f32le", "-acodec", "pcm_f32le", "-")
    return np.frombuffer(raw, "<f4").reshape(-1, channels)


def reader_whole(path: Path) -> torch.Tensor:
    with AudioReader(path) as reader:
        return reader.read(0, reader.count_frames())


def source_wav(folder: Path, frames: int = RATE, channels: int = 2, bits: int = 16) -> Path:
    path = folder / "source.wav"
    write_audio(path, tone(channels, frames), RATE, bits=bits)
    return path


def put_on_path(monkeypatch, folder: Path, tools: dict[str, str]) -> None:
    """Scripts named after tools, first on PATH (the real ones stay behind them)."""
    folder.mkdir(exist_ok=True)
    for name, text in tools.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")


def private_temporary_folder(tmp_path: Path, monkeypatch) -> Path:
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie no one reaps has ended too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def wait_for(path: Path) -> str:
    deadline = time.monotonic() + PATIENCE
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text().strip()


# 1. Playlists and scripts ------------------------------------------------------------------------


def _reads_show_in_atime(path: Path) -> bool:
    """Whether reading ``path`` updates its access time here (relatime does once the access time
    is older than the modification time; noatime never)."""
    _forget_reads(path)
    path.read_bytes()
    return path.stat().st_atime_ns != 0


def _forget_reads(path: Path) -> None:
    os.utime(path, ns=(0, path.stat().st_mtime_ns))


@real
@pytest.mark.parametrize("kind", ["hls", "ffconcat"])
@pytest.mark.parametrize("name", ["x.m4a", "x.aac", "x.opus", "x"])
def test_playlists_and_scripts_are_refused_and_nothing_they_name_is_read(tmp_path, kind, name):
    """ffmpeg recognises an HLS playlist or an ffconcat script by its content: named like
    audio, either had htsep separate another local file."""
    secret = tmp_path / "secret"
    secret.mkdir()
    private = secret / ("private.ts" if kind == "hls" else "private.wav")
    source = source_wav(tmp_path, RATE // 2)
    ffmpeg("-i", source, *(["-c:a", "aac", "-f", "mpegts"] if kind == "hls" else []), private)
    path = tmp_path / name
    if kind == "hls":
        path.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:0.5,\n{private}\n"
                        "#EXT-X-ENDLIST\n")  # fmt: skip
    else:
        path.write_text("ffconcat version 1.0\nfile secret/private.wav\n")
    # The crafted file works: ffmpeg on its own decodes the private file through it.
    assert len(ffmpeg("-i", path, "-f", "f32le", "-")) > 4 * RATE // 4
    watched = _reads_show_in_atime(private)
    _forget_reads(private)
    for function in (read_audio, audio_info, AudioReader):
        with pytest.raises(AudioError) as excinfo:
            function(path)
        assert str(excinfo.value) == (
            f"{path}: a playlist or script that refers to other files; not read"
        )
    if watched:
        assert private.stat().st_atime_ns == 0, "the file the playlist names was read"


@fake
def test_a_probed_playlist_is_refused_even_if_ffmpeg_ignored_the_whitelist(tmp_path, monkeypatch):
    path = tmp_path / "x.m4a"
    path.write_text("#EXTM3U\n")
    marker = tmp_path / "ffmpeg-ran"
    probe = {"streams": [STEREO], "format": {"format_name": "hls", "duration": "2.0"}}
    put_on_path(monkeypatch, tmp_path / "bin", {
        "ffprobe": f"#!/bin/sh\necho '{json.dumps(probe)}'\n",
        "ffmpeg": f"#!/bin/sh\ntouch '{marker}'\n",
    })  # fmt: skip
    with pytest.raises(AudioError) as excinfo:
        read_audio(path)
    assert str(excinfo.value) == f"{path}: {audio._REFERS}"
    assert not marker.exists()


@real
def test_a_format_outside_the_whitelist_is_not_audio(tmp_path):
    """A PNG named .m4a: ffmpeg would read it as a picture (image2 or png_pipe)."""
    picture = tmp_path / "x.png"
    ffmpeg("-f", "lavfi", "-i", "color=size=8x8", "-frames:v", "1", picture)
    path = tmp_path / "cover.m4a"
    path.write_bytes(picture.read_bytes())
    with pytest.raises(AudioError) as excinfo:
        read_audio(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: not a recognised audio file (ffmpeg takes it for "), message
    assert message.endswith(", which htsep does not read)") and "\n" not in message


# 2. ADTS AAC ------------------------------------------------------------------------------------


@real
@pytest.mark.parametrize(("name", "options"), [
    ("clip.aac", []),
    ("tagged.aac", ["-write_id3v2", "1", "-metadata", "title=a tag in front"]),
    ("clip", []),
])  # fmt: skip
def test_adts_aac_decodes(tmp_path, name, options):
    """ADTS frames begin 0xFFF1, an MPEG sync with layer bits 00: not an MP3 that libsndfile
    failed to open, but a stream for ffmpeg."""
    frames = RATE
    source = source_wav(tmp_path, frames)
    path = encode(source, tmp_path / name, "-c:a", "aac", *options, "-f", "adts")
    assert path.read_bytes().startswith(b"ID3" if options else b"\xff\xf1")
    expected = torch.from_numpy(ffmpeg_decode(path, 2).T.copy())
    got, rate = read_audio(path)
    assert rate == RATE and torch.equal(got, expected)
    assert torch.equal(reader_whole(path), expected)
    # And the codec kept the tone: the length within two AAC frames, the level of the middle.
    assert abs(got.shape[1] - frames) <= 2048
    middle = got[:, frames // 4 : 3 * frames // 4]
    rms = middle.square().mean(dim=1).sqrt() * 2**0.5
    assert torch.allclose(rms, torch.tensor([0.5, 0.25]), rtol=0.05)


@real
def test_aac_in_mp4_reads_as_ffmpeg_decodes_it_with_its_start_aligned(tmp_path, repo):
    """As the README says: an M4A reads at the length ffmpeg decodes (the encoder's padding at
    the end kept, past the stated duration), and the encoder's priming is skipped, so a sound
    that starts at frame N of the source starts at frame N of what htsep reads."""
    frames, onset = RATE, 10_000
    wave = tone(2, frames)
    wave[:, :onset] = 0
    write_audio(tmp_path / "source.wav", wave, RATE, bits=16)
    path = encode(tmp_path / "source.wav", tmp_path / "x.m4a", "-c:a", "aac", "-b:a", "192k")
    info = audio_info(path)
    expected = torch.from_numpy(ffmpeg_decode(path, 2).T.copy())
    got, rate = read_audio(path)
    assert rate == RATE and torch.equal(got, expected)
    assert info.frames == frames < got.shape[1] <= frames + 2048  # the stated length, exceeded
    heard = int(torch.nonzero(got[0].abs() > 0.05)[0])
    assert abs(heard - onset) <= 32, heard  # the priming (1024 frames) is not in front
    # And the stems have that length too (the 8 kHz test model: resampled there and back).
    out = tmp_path / "out"
    done = htsep_command("--repo", str(repo), "-n", "aaaa0001", "-q", "-o", str(out), str(path))
    assert done.exit_code == 0, done.output
    stems = sorted((out / "aaaa0001" / "x").iterdir())
    assert len(stems) == 4 and all(sf.info(stem).frames == got.shape[1] for stem in stems)


def test_mpeg_sync_needs_a_layer(tmp_path):
    """The signature check by itself: layer bits 00 (ADTS) or a reserved version is no MP3."""
    cases = {
        b"\xff\xfb\x90\x64": True,  # MPEG-1 layer III, 128 kbps, 44.1 kHz
        b"\xff\xf3\x90\x64": True,  # MPEG-2 layer III
        b"\xff\xfd\x90\x64": True,  # MPEG-1 layer II
        b"\xff\xf1\x50\x80": False,  # ADTS, MPEG-4
        b"\xff\xf9\x50\x80": False,  # ADTS, MPEG-2
        b"\xff\xeb\x90\x64": False,  # reserved version
        b"\xff\xfb\xf0\x64": False,  # bitrate index 15
    }
    for head, mpeg in cases.items():
        path = tmp_path / "head.bin"
        path.write_bytes(head + bytes(60))
        assert audio._starts_like_audio(str(path)) is mpeg, head
        tag = b"ID3\x04\x00\x00\x00\x00\x00\x05" + bytes(5)
        path.write_bytes(tag + head + bytes(60))
        assert audio._starts_like_audio(str(path)) is mpeg, head


# 3. Stopping a decode ---------------------------------------------------------------------------

# A shell that starts a child and waits: SIGKILL to the shell alone would leave the child
# holding ffmpeg's pipes, so the whole group must go.
SLEEPING_FFMPEG = """#!/bin/sh
sleep 1000 &
echo "$$ $!" > '{pids}'
wait
"""


def _kill_all(*pids: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _m4a(tmp_path: Path) -> Path:
    return encode(source_wav(tmp_path, RATE // 2), tmp_path / "song.m4a", "-c:a", "aac")


@real
@fake
@pytest.mark.parametrize("function", [read_audio, AudioReader])
def test_stop_decoders_kills_a_hanging_decode(tmp_path, monkeypatch, function):
    path = _m4a(tmp_path)
    temporary = private_temporary_folder(tmp_path, monkeypatch)
    pids = tmp_path / "pids"
    put_on_path(monkeypatch, tmp_path / "bin", {"ffmpeg": SLEEPING_FFMPEG.format(pids=pids)})
    raised: list[BaseException] = []

    def decode() -> None:
        try:
            function(path)
        except BaseException as exc:
            raised.append(exc)

    worker = threading.Thread(target=decode, name="htsep-decode", daemon=True)
    worker.start()
    shell, child = map(int, wait_for(pids).split())
    try:
        started = time.monotonic()
        audio.stop_decoders()
        worker.join(PATIENCE)
        took = time.monotonic() - started
        assert not worker.is_alive(), "the decode was not stopped"
    finally:  # a decode that was not stopped must not hold the test run for 1000 s
        _kill_all(shell, child)
    assert len(raised) == 1 and isinstance(raised[0], audio.DecodingStopped), raised
    assert str(raised[0]) == f"{path}: decoding stopped"
    assert gone(shell) and gone(child)
    assert os.listdir(temporary) == []
    print(f"stopped {took:.3f} s after stop_decoders()")
    assert not audio._RUNNING


@real
@fake
def test_a_decode_begun_before_stop_decoders_starts_no_tool_after_it(tmp_path, monkeypatch):
    """stop_decoders between ffprobe and ffmpeg: ffmpeg never starts. A decode begun after the
    call runs as usual."""
    path = _m4a(tmp_path)
    marker = tmp_path / "ffmpeg-ran"
    put_on_path(monkeypatch, tmp_path / "bin",
                {"ffmpeg": f"#!/bin/sh\ntouch '{marker}'\nexec '{FFMPEG}' \"$@\"\n"})  # fmt: skip
    probe = audio._probe

    def probe_then_stop(*args, **kwargs):
        found = probe(*args, **kwargs)
        audio.stop_decoders()
        return found

    monkeypatch.setattr(audio, "_probe", probe_then_stop)
    with pytest.raises(audio.DecodingStopped):
        read_audio(path)
    assert not marker.exists()
    monkeypatch.setattr(audio, "_probe", probe)
    got, _ = read_audio(path)
    assert marker.exists()
    assert torch.equal(got, torch.from_numpy(ffmpeg_decode(path, 2).T.copy()))


INTERRUPTED_SCRIPT = """
import sys
from htsep.audio import read_audio
try:
    read_audio(sys.argv[1])
except KeyboardInterrupt:
    print("interrupted")
"""


@real
@fake
def test_ctrl_c_in_the_main_thread_kills_the_tool(tmp_path, monkeypatch):
    path = _m4a(tmp_path)
    pids = tmp_path / "pids"
    put_on_path(monkeypatch, tmp_path / "bin", {"ffmpeg": SLEEPING_FFMPEG.format(pids=pids)})
    script = subprocess.Popen([sys.executable, "-c", INTERRUPTED_SCRIPT, str(path)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    shell, child = map(int, wait_for(pids).split())
    try:
        script.send_signal(signal.SIGINT)
        out, _ = script.communicate(timeout=PATIENCE)
        assert out == "interrupted\n"
        assert gone(shell) and gone(child)
    finally:
        script.kill()
        _kill_all(shell, child)


@fake
def test_a_killed_tool_names_the_signal(tmp_path, monkeypatch):
    path = tmp_path / "song.m4a"
    path.write_bytes(b"not something libsndfile knows")
    probe = {"streams": [STEREO], "format": {}}
    put_on_path(monkeypatch, tmp_path / "bin", {
        "ffprobe": f"#!/bin/sh\necho '{json.dumps(probe)}'\n",
        "ffmpeg": "#!/bin/sh\nkill -9 $$\n",
    })  # fmt: skip
    with pytest.raises(AudioError) as excinfo:
        read_audio(path)
    assert str(excinfo.value) == f"{path}: ffmpeg cannot read it: killed by signal 9"


# Wrappers around the real tools that leave a child behind holding their stdout and stderr.
LINGERING_TOOL = """#!/bin/sh
sleep 300 &
echo "$!" >> '{pids}'
exec '{tool}' "$@"
"""


@real
@fake
@pytest.mark.parametrize("function", [read_audio, AudioReader, audio_info])
def test_a_child_the_tool_leaves_running_is_not_waited_for(tmp_path, monkeypatch, function):
    """A tool that exits while a child of its own still holds its pipes: htsep takes what the
    tool wrote, and the child goes with the tool's process group."""
    path = _m4a(tmp_path)
    expected = torch.from_numpy(ffmpeg_decode(path, 2).T.copy())
    pids = tmp_path / "pids"
    put_on_path(monkeypatch, tmp_path / "bin", {
        "ffprobe": LINGERING_TOOL.format(pids=pids, tool=FFPROBE),
        "ffmpeg": LINGERING_TOOL.format(pids=pids, tool=FFMPEG),
    })  # fmt: skip
    results: list[object] = []

    def decode() -> None:
        try:
            got = function(path)
            results.append(reader_whole(path) if isinstance(got, AudioReader) else got)
            if isinstance(got, AudioReader):
                got.close()
        except BaseException as exc:
            results.append(exc)

    worker = threading.Thread(target=decode, name="htsep-decode", daemon=True)
    worker.start()
    worker.join(PATIENCE)  # far below the children's 300 s
    children = [int(pid) for pid in pids.read_text().split()] if pids.exists() else []
    try:
        assert not worker.is_alive(), "htsep waited for the tool's child"
        deadline = time.monotonic() + PATIENCE  # SIGKILL takes effect soon, not at once
        while not all(gone(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert children and all(gone(pid) for pid in children)
    finally:
        _kill_all(*children)
    assert len(results) == 1
    if function is audio_info:
        assert results[0] == audio.AudioInfo(RATE, 2, RATE // 2)  # the length the M4A states
    elif function is read_audio:
        assert torch.equal(results[0][0], expected)
    else:
        assert torch.equal(results[0], expected)


# 4. Cut containers ------------------------------------------------------------------------------


@real
@pytest.mark.parametrize(("suffix", "options"), [
    (".m4a", ["-c:a", "aac", "-movflags", "+faststart"]),
    (".mka", ["-c:a", "flac"]),
    (".webm", ["-c:a", "libopus"]),
    (".wma", ["-c:a", "wmav2"]),
    (".tta", []),
])  # fmt: skip
def test_cut_containers_are_refused_whole_ones_read(tmp_path, suffix, options):
    """ffmpeg decodes a cut file as far as it goes and exits 0: the length the container states
    shows the cut."""
    frames = 4 * RATE
    source = source_wav(tmp_path, frames)
    path = encode(source, tmp_path / f"whole{suffix}", *options)
    got, rate = read_audio(path)
    # Lossy codecs keep or trim their priming and padding: within a couple of frames (Opus
    # decodes at 48 kHz).
    assert abs(got.shape[1] * RATE / rate - frames) <= 2048, got.shape
    assert torch.equal(reader_whole(path), got)
    # What ffmpeg alone makes of its first 60%: a short decode and exit status 0.
    _assert_cut_is_refused(path, tmp_path / f"cut{suffix}", 0.6, frames)


def _assert_cut_is_refused(path: Path, cut: Path, kept: float, frames: int) -> None:
    """``cut``, the first ``kept`` of ``path``'s bytes, decodes short in ffmpeg alone (exit
    status 0) and is refused by both readers in one line as truncated."""
    data = path.read_bytes()
    cut.write_bytes(data[: int(len(data) * kept)])
    assert 0 < ffmpeg_decode(cut, 2).shape[0] < frames * (kept + 0.1)
    for function in (read_audio, AudioReader):
        with pytest.raises(AudioError) as excinfo:
            function(cut)
        message = str(excinfo.value)
        assert message.startswith(f"{cut}: truncated or corrupt audio (") and "\n" not in message


def _matroska_with(tmp_path: Path, kind: str, suffix: str, codec: str, frames: int) -> Path:
    """A Matroska or WebM file whose audio stream is not the file's only stream: a cover
    picture (an attached_pic stream), an attached file, or a second audio stream."""
    source = source_wav(tmp_path, frames)
    path = tmp_path / f"whole{suffix}"
    if kind == "two audio streams":
        extra = ["-i", str(source), "-map", "0", "-map", "1"]
    else:
        attached = tmp_path / ("cover.png" if kind == "cover picture" else "notes.txt")
        if kind == "cover picture":
            ffmpeg("-f", "lavfi", "-i", "color=c=red:s=8x8", "-frames:v", "1", attached)
        else:
            attached.write_text("liner notes\n")
        mimetype = "image/png" if kind == "cover picture" else "text/plain"
        extra = ["-attach", str(attached), "-metadata:s:t", f"mimetype={mimetype}"]
    return encode(source, path, *extra, "-c:a", codec)


@real
@pytest.mark.parametrize(("kind", "suffix", "codec"), [
    ("cover picture", ".mka", "libopus"),
    ("attached file", ".mka", "flac"),
    ("two audio streams", ".mka", "flac"),
    ("two audio streams", ".webm", "libopus"),
])  # fmt: skip
def test_cut_matroska_with_more_streams_is_refused(tmp_path, kind, suffix, codec):
    """Matroska states a length for the whole file only, which is the audio's only where no
    other stream has a timeline; each track's DURATION tag states the audio's own."""
    frames = 4 * RATE
    path = _matroska_with(tmp_path, kind, suffix, codec, frames)
    probed = json.loads(
        subprocess.run(
            [
                FFPROBE or "ffprobe",
                "-v",
                "error",
                "-show_entries",
                "format=nb_streams",
                "-of",
                "json",
                str(path),
            ],
            capture_output=True,
            check=True,
            timeout=120,
        ).stdout
    )
    assert probed["format"]["nb_streams"] == 2  # fmt: skip
    got, rate = read_audio(path)
    assert abs(got.shape[1] * RATE / rate - frames) <= 2048, got.shape
    assert torch.equal(got, torch.from_numpy(ffmpeg_decode(path, 2).T.copy()))
    _assert_cut_is_refused(path, tmp_path / f"cut{suffix}", 0.5, frames)


# 5. A full temporary folder ---------------------------------------------------------------------

DECODE_SIZE_LIMIT_SCRIPT = """
import resource, sys
from htsep.audio import AudioReader, AudioError
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    AudioReader(sys.argv[1])
except AudioError as exc:
    print(exc)
"""


@real
@pytest.mark.skipif(not POSIX, reason="RLIMIT_FSIZE")
def test_decoding_into_a_size_limited_folder_names_the_reason(tmp_path):
    """2 s decoded to floats is 700 kB, beyond a 200 kB limit: ffmpeg is stopped by SIGXFSZ
    (or told EFBIG); the error says why, as libsndfile's path does, and leaves nothing."""
    path = encode(source_wav(tmp_path, 2 * RATE), tmp_path / "song.m4a", "-c:a", "aac")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    done = subprocess.run([sys.executable, "-c", DECODE_SIZE_LIMIT_SCRIPT, str(path)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(temporary)})  # fmt: skip
    assert done.stdout == f"{path}: cannot decode it into {temporary}: File too large\n", (
        done.stdout + done.stderr
    )
    assert os.listdir(temporary) == []


# What ffmpeg 5.1 does when the disk fills as it writes its trailer: the header keeps its
# placeholder sizes, the message goes to stderr, the exit status is 0.
FULL_DISK_FFMPEG = """#!{python}
import struct, sys
out = sys.argv[-1]
with open(out, "wb") as file:
    file.write(b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE")
    file.write(b"fmt " + struct.pack("<IHHIIHH", 16, 3, 2, 44100, 352800, 8, 32))
    file.write(b"data" + struct.pack("<I", 0xFFFFFFFF) + bytes(8 * 1000))
sys.stderr.write("[out#0/wav @ 0x55d0c0ffee00] Error writing trailer of " + out
                 + ": No space left on device\\n")
"""


@fake
def test_a_trailer_that_could_not_be_written_is_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "song.m4a"
    path.write_bytes(b"not something libsndfile knows")
    temporary = private_temporary_folder(tmp_path, monkeypatch)
    probe = {"streams": [STEREO], "format": {}}
    put_on_path(monkeypatch, tmp_path / "bin", {
        "ffprobe": f"#!/bin/sh\necho '{json.dumps(probe)}'\n",
        "ffmpeg": FULL_DISK_FFMPEG.format(python=sys.executable),
    })  # fmt: skip
    with pytest.raises(AudioError) as excinfo:
        AudioReader(path)
    assert str(excinfo.value) == (
        f"{path}: cannot decode it into {temporary}: No space left on device"
    )
    assert os.listdir(temporary) == []


def test_unfinished_wav_headers_are_told_from_finished_ones(tmp_path):
    path = tmp_path / "decoded.wav"
    write_audio(path, tone(2, 1000), RATE, bits=32)
    assert audio._wav_finished(str(path))
    data = bytearray(path.read_bytes())
    data[4:8] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    assert not audio._wav_finished(str(path))
    path.write_bytes(bytes(data[:8]) + b"WAVE")
    assert not audio._wav_finished(str(path))


# 6. Counting a file without a stated length -----------------------------------------------------


@real
def test_info_of_a_file_without_a_length_counts_without_holding_the_samples(tmp_path):
    """Matroska written to a pipe states no duration: the frames are counted as ffmpeg decodes
    them, in blocks, never held (10 s of stereo floats would be 3.5 MB)."""
    frames = 10 * RATE
    source = source_wav(tmp_path, frames)
    path = tmp_path / "piped.mka"
    with open(path, "wb") as out:
        ffmpeg("-i", source, "-c:a", "flac", "-f", "matroska", "-", stdout=out.fileno())
    whole, _ = read_audio(path)
    assert whole.shape[1] == frames  # lossless: the source's length
    tracemalloc.start()
    try:
        info = audio_info(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (info.sample_rate, info.channels, info.frames) == (RATE, 2, frames)
    assert peak < frames * 2 * 4 // 8, peak


# 7. An input renamed over while it is probed ----------------------------------------------------

# ffprobe as it is, then another file renamed over the input, before ffmpeg runs.
RENAMING_FFPROBE = """#!{python}
import os, subprocess, sys
done = subprocess.run([{ffprobe!r}, *sys.argv[1:]], close_fds=False)  # /dev/fd/N included
os.replace({other!r}, {path!r})
sys.exit(done.returncode)
"""


def _renamed_over(tmp_path: Path, monkeypatch) -> tuple[Path, torch.Tensor]:
    frames = RATE // 2
    source = source_wav(tmp_path, frames)
    path = encode(source, tmp_path / "song.mka", "-c:a", "flac")
    other_source = tmp_path / "other.wav"
    write_audio(other_source, torch.rand(2, frames // 3) - 0.5, RATE)
    other = encode(other_source, tmp_path / "other.mka", "-c:a", "flac")
    put_on_path(monkeypatch, tmp_path / "bin", {"ffprobe": RENAMING_FFPROBE.format(
        python=sys.executable, ffprobe=FFPROBE, other=str(other), path=str(path))})  # fmt: skip
    return path, read_audio(source)[0]


@real
@fake
@pytest.mark.parametrize("function", [read_audio, reader_whole])
def test_a_file_renamed_over_the_input_is_not_read(tmp_path, monkeypatch, function):
    """The tools read the descriptor htsep holds: the file it opened, whole (as libsndfile's
    path does), not the one now under its name."""
    path, original = _renamed_over(tmp_path, monkeypatch)
    got = function(path)
    got = got[0] if isinstance(got, tuple) else got
    assert not (tmp_path / "other.mka").exists()  # the rename happened
    assert torch.equal(got, original)


@real
@fake
def test_a_file_renamed_over_the_input_is_refused_where_tools_read_names(tmp_path, monkeypatch):
    """Without /dev/fd the tools open the name: the swap is found after decoding."""
    path, _ = _renamed_over(tmp_path, monkeypatch)
    monkeypatch.setattr(audio, "_ffmpeg_source", lambda name, held: audio._Source(
        f"file:{name}", ()))  # fmt: skip
    for function in (read_audio, AudioReader):
        (tmp_path / "other.mka").write_bytes(path.read_bytes())  # to be renamed over it again
        with pytest.raises(AudioError) as excinfo:
            function(path)
        assert str(excinfo.value) == f"{path}: replaced while it was being opened; not used"


# 8. What the probe decides ----------------------------------------------------------------------


def _probed(tmp_path: Path, monkeypatch, stream: dict) -> tuple[Path, Path]:
    path = tmp_path / "song.mka"
    path.write_bytes(b"not something libsndfile knows")
    marker = tmp_path / "ffmpeg-ran"
    probe = {"streams": [{"index": 0, "codec_type": "audio", **stream}], "format": {}}
    put_on_path(monkeypatch, tmp_path / "bin", {
        "ffprobe": f"#!/bin/sh\necho '{json.dumps(probe)}'\n",
        "ffmpeg": f"#!/bin/sh\ntouch '{marker}'\n",
    })  # fmt: skip
    return path, marker


@fake
@pytest.mark.parametrize(("stream", "phrase"), [
    ({"sample_rate": "44100", "channels": 65}, "has more than 64 channels (65)"),
    ({"sample_rate": "500", "channels": 2}, "sample rate 500 Hz is outside 1000..384000 Hz"),
    ({"sample_rate": "768000", "channels": 2}, "sample rate 768000 Hz is outside 1000..384000 Hz"),
])  # fmt: skip
def test_channels_and_rates_are_refused_before_decoding(tmp_path, monkeypatch, stream, phrase):
    path, marker = _probed(tmp_path, monkeypatch, stream)
    for function in (read_audio, audio_info, AudioReader):
        with pytest.raises(AudioError) as excinfo:
            function(path)
        assert str(excinfo.value) == f"{path}: {phrase}"
    assert not marker.exists()


WARNING_FFMPEG = """#!/bin/sh
printf '[matroska,webm @ 0x55d0c0ffee00] File ended prematurely\\n' >&2
head -c 800 /dev/zero
"""


@fake
def test_warnings_lose_the_demuxer_address(tmp_path, monkeypatch, caplog):
    path, _ = _probed(tmp_path, monkeypatch, {"sample_rate": "44100", "channels": 2})
    (tmp_path / "bin" / "ffmpeg").write_text(WARNING_FFMPEG)
    with caplog.at_level("WARNING", logger="htsep.audio"):
        got, _ = read_audio(path)
    assert got.shape == (2, 100) and not got.any()
    assert [r.getMessage() for r in caplog.records] == [f"{path}: ffmpeg: File ended prematurely"]


@real
@pytest.mark.parametrize("default", [None, 0, 1])
def test_the_default_stream_is_read_else_the_first(tmp_path, default):
    """Two audio streams (stereo and mono, so that each shows): the one marked default is read;
    with neither marked, the first."""
    stereo, mono = tmp_path / "stereo.wav", tmp_path / "mono.wav"
    write_audio(stereo, tone(2, RATE // 2, 440), RATE)
    write_audio(mono, tone(1, RATE // 3, 660), RATE)
    path = tmp_path / "two.mka"
    dispositions = ["0", "0"]
    if default is not None:
        dispositions[default] = "default"
    ffmpeg("-i", stereo, "-i", mono, "-map", "0", "-map", "1", "-c:a", "flac",
           "-disposition:a:0", dispositions[0], "-disposition:a:1", dispositions[1],
           path)  # fmt: skip
    expected = read_audio(mono if default == 1 else stereo)[0]
    got, _ = read_audio(path)
    assert torch.equal(got, expected)
    assert torch.equal(reader_whole(path), expected)
    assert audio_info(path).channels == expected.shape[0]


@real
@fake
def test_an_interrupted_batch_stops_the_next_tracks_decode(tmp_path, monkeypatch):
    """Ctrl-C while the pipeline decodes the next track in the background: the batch stops
    that ffmpeg rather than waiting for it (an endless or slow input held the exit)."""
    from helpers import write_clip

    from htsep import Separator
    from htsep.batch import Batch, BatchEvents

    first = tmp_path / "first.wav"
    write_clip(first, 1.0, rate=RATE)
    path = _m4a(tmp_path)
    private_temporary_folder(tmp_path, monkeypatch)
    pids = tmp_path / "pids"
    put_on_path(monkeypatch, tmp_path / "bin", {"ffmpeg": SLEEPING_FFMPEG.format(pids=pids)})

    class Interrupt(BatchEvents):
        def progress(self, index, seconds):
            wait_for(pids)  # the next track's decode is running now
            raise KeyboardInterrupt

    raised: list[BaseException] = []

    def run() -> None:
        batch = Batch(
            Separator("htsep-tiny", stems=["vocals"]), tmp_path / "out", events=Interrupt()
        )
        try:
            batch.run([first, path])
        except BaseException as exc:
            raised.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        worker.join(PATIENCE)
        assert not worker.is_alive(), "the batch waited for the decode"
    finally:
        if pids.exists():
            _kill_all(*map(int, pids.read_text().split()))
    assert len(raised) == 1 and type(raised[0]) is KeyboardInterrupt, raised
    shell, child = map(int, pids.read_text().split())
    assert gone(shell) and gone(child)


@real
def test_32_bit_alac_is_decoded_by_ffmpeg(tmp_path):
    """libsndfile 1.2 opens 32-bit ALAC in CAF and decodes it as noise (off by up to 1.5):
    the track was separated without a word. ffmpeg's decoder reads the samples written."""
    if "ALAC_32" not in sf.available_subtypes("CAF"):
        pytest.skip("this libsndfile cannot write ALAC")
    x = np.random.default_rng(1).uniform(-0.5, 0.5, (5000, 1))
    path = tmp_path / "alac32.caf"
    sf.write(path, x, 44100, subtype="ALAC_32")
    got, rate = read_audio(path)
    assert rate == 44100 and got.shape == (1, 5000)
    assert np.abs(got.numpy().T - x).max() < 1e-7
    with AudioReader(path) as reader:
        assert torch.equal(reader.read(0, 5000), got)
    info = audio_info(path)  # its length as the container states it (whole packets)
    assert (info.sample_rate, info.channels) == (44100, 1) and info.frames >= 5000


@fake
def test_alac_of_more_than_16_bits_without_ffmpeg_is_refused(tmp_path, monkeypatch):
    if "ALAC_32" not in sf.available_subtypes("CAF"):
        pytest.skip("this libsndfile cannot write ALAC")
    path = tmp_path / "alac32.caf"
    sf.write(path, np.zeros((100, 1)), 44100, subtype="ALAC_32")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(AudioError) as caught:
        read_audio(path)
    assert str(caught.value).startswith(f"{path}: reading .caf files needs ffmpeg")
