"""Network calls filled across tracks: at the end of a track the room left in its last calls
goes to the next track's first chunks (same member, same run), and every stem keeps the bytes
it has when its track is separated alone with the same batch size.

That rests on one property of the network, checked first: in calls of one shape, a chunk's
estimate does not depend on its neighbours or its place in the call. (It does depend on the
number of chunks in the call, so calls that may be filled are always full: padded.) On the CPU
the property holds with one thread, and not with several when the threads cut a batch by
position, so the CPU runs here use one thread and turn full calls on; a CPU separation keeps
them off, and its batch size is 1. On CUDA full calls are the default; the tests marked cuda
check the property and the stems there.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import soundfile as sf
import torch
from helpers import write_clip

import htsep
from htsep import apply as apply_module
from htsep.apply import ChunkStream, NetworkRunner, segment_samples, zero_extended
from htsep.audio import read_audio
from htsep.batch import Batch, BatchEvents, OutputSettings
from htsep.errors import AudioError, UsageError
from htsep.separator import ScannedFile

FLOAT = OutputSettings(bits=32, clip_mode="none")  # the stems' float32 bits, unchanged
RUN_NETWORK = apply_module.run_network
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


@pytest.fixture
def one_thread():
    """One CPU thread, where calls of one shape treat every chunk alike (see the module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _separator(repo, device: str, name: str = "aaaa0001", **settings) -> htsep.Separator:
    separator = htsep.Separator(name, repo=repo, device=device, progress=False, **settings)
    separator.runner.full_calls = separator.options.batch_size > 1  # as on CUDA
    return separator


def _record_calls(monkeypatch) -> list[tuple[object, list[torch.Tensor]]]:
    """Every network call from now on (until the next _record_calls): (model, its windows)."""
    calls: list[tuple[object, list[torch.Tensor]]] = []

    def run_network(model, windows, *args, **kwargs):
        calls.append((model, [window.cpu() for window in windows]))
        return RUN_NETWORK(model, windows, *args, **kwargs)

    monkeypatch.setattr(apply_module, "run_network", run_network)
    return calls


def _stems(folder: Path) -> dict[str, bytes]:
    """The bytes of every stem's float32 samples below ``folder`` (not of the files: libsndfile
    stamps float WAV files with the time they were written)."""
    return {
        str(path.relative_to(folder)): sf.read(path, dtype="float32")[0].tobytes()
        for path in sorted(folder.rglob("*.wav"))
    }


def _alone(separator: htsep.Separator, clips: list[Path], out: Path) -> dict[str, bytes]:
    """The stems of each track separated by itself (a batch of one track each)."""
    for clip in clips:
        (track,) = Batch(separator, out, FLOAT).run([clip])
        assert track.status == "ok", track.error
    return _stems(out)


def _album(folder: Path, seconds: list[float], rates: list[int] | None = None) -> list[Path]:
    """Clips 1.wav, 2.wav, ... of these lengths (and rates: 8 kHz, the models')."""
    clips = [folder / f"{number}.wav" for number in range(1, len(seconds) + 1)]
    rates = rates or [8000] * len(seconds)
    for seed, (clip, length, rate) in enumerate(zip(clips, seconds, rates, strict=True)):
        write_clip(clip, length, rate=rate, seed=seed, amplitude=0.3)
    return clips


class _Progress(BatchEvents):
    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}

    def progress(self, index: int, seconds: float) -> None:
        self.seconds[index] = self.seconds.get(index, 0.0) + seconds


def _calls_when_filled(chunks: list[int], size: int) -> int:
    """Network calls of runs of ``chunks`` chunks in turn, each run's last call taking up to
    its room of the next run's first chunks."""
    calls, lent = 0, 0
    for index, count in enumerate(chunks):
        own = count - lent
        calls += -(-own // size)
        room = -own % size
        lent = min(room, chunks[index + 1]) if index + 1 < len(chunks) else 0
    return calls


# --- the property the stems rest on ----------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_calls_of_one_shape_treat_every_chunk_alike(repo, device, one_thread):
    """A chunk's estimate in a call of 4 is the same bits at every place in the call, beside
    any other chunks or silence."""
    model = htsep.Separator("aaaa0001", repo=repo, device="cpu").bag.model(0)
    runner = NetworkRunner(device, batch_size=4)
    if device == "cuda":
        model = model.to(device)
    size = segment_samples(model, None)
    generator = torch.Generator().manual_seed(5)
    chunk, *others = (torch.randn(1, 2, size, generator=generator) for _ in range(4))
    alone = runner.submit(model, [chunk, *[torch.zeros_like(chunk)] * 3]).result()[0]
    for place in range(4):
        windows = list(others)
        windows.insert(place, chunk)
        assert torch.equal(runner.submit(model, windows).result()[place], alone), place


# --- the engine: one stream fills its last call with its follower's chunks ---------------------


def _pair(model, runner, signals, follower_read=None):
    """Two chunk streams over ``signals`` on ``runner``, the second following the first."""
    second = ChunkStream(
        model,
        follower_read or functools.partial(zero_extended, signals[1]),
        start=-100,
        length=signals[1].shape[-1],
        runner=runner,
    )
    first = ChunkStream(
        model,
        functools.partial(zero_extended, signals[0]),
        start=0,
        length=signals[0].shape[-1],
        runner=runner,
        follower=lambda: second,
    )
    return first, second


def test_a_stream_fills_its_last_call_with_the_next_streams_chunks(repo, monkeypatch, one_thread):
    model = htsep.Separator("aaaa0001", repo=repo, device="cpu").bag.model(0)
    generator = torch.Generator().manual_seed(2)
    signals = [torch.randn(1, 2, n, generator=generator) for n in (41000, 26000)]
    runner = NetworkRunner(batch_size=4, full_calls=True)
    alone = [
        ChunkStream(model, functools.partial(zero_extended, signal), start=start,
                    length=signal.shape[-1], runner=runner).take(signal.shape[-1])
        for signal, start in zip(signals, (0, -100), strict=True)
    ]  # fmt: skip
    calls = _record_calls(monkeypatch)
    first, second = _pair(model, runner, signals)
    assert (len(first.offsets), len(second.offsets)) == (5, 3)
    assert torch.equal(first.take(41000), alone[0])
    assert second.submitted == 3  # all of the second's chunks went along in the first's call
    assert torch.equal(second.take(26000), alone[1])
    # 5 + 3 chunks in 2 calls of 4 (alone 3 calls: 4; 1 and 3 of padding; 3 and 1 of padding)
    assert [len(windows) for _, windows in calls] == [4, 4]
    assert all(window.any() for _, windows in calls for window in windows)


def test_a_follower_that_cannot_be_read_fills_nothing(repo, one_thread):
    """The next track's read failing (a file changed since its first pass) costs the current
    track nothing; the next one then fails on its own turn."""
    model = htsep.Separator("aaaa0001", repo=repo, device="cpu").bag.model(0)
    signal = torch.randn(1, 2, 20000, generator=torch.Generator().manual_seed(3))
    runner = NetworkRunner(batch_size=4, full_calls=True)
    expected = ChunkStream(model, functools.partial(zero_extended, signal), start=0,
                           length=20000, runner=runner).take(20000)  # fmt: skip

    def unreadable(start, length):
        raise AudioError("next.wav: truncated or corrupt audio")

    first, second = _pair(model, runner, [signal, torch.zeros(1, 2, 9000)], unreadable)
    assert torch.equal(first.take(20000), expected)  # 3 chunks and 1 of padding
    assert second.submitted == 0
    with pytest.raises(AudioError, match="truncated"):
        second.take(9000)


def test_nothing_is_filled_without_full_calls(repo):
    """A runner whose last calls are short (the CPU's) lends no room: each call is its own
    stream's, as before."""
    model = htsep.Separator("aaaa0001", repo=repo, device="cpu").bag.model(0)
    runner = NetworkRunner(batch_size=4)
    assert not runner.full_calls and NetworkRunner("cuda", batch_size=4).full_calls
    first, second = _pair(model, runner, [torch.ones(1, 2, 41000), torch.ones(1, 2, 30000)])
    first.take(41000)
    assert second.submitted == 0


# --- folder batches -------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_folder_batch_fills_calls_across_tracks(tmp_path, repo, device, monkeypatch, one_thread):
    """Four tracks of 2, 5, 3 and 1 chunks, 4 per call: 3 calls instead of 5 track by track,
    every call full, and every stem the bytes of its track separated alone. Two tracks are
    resampled; each track's progress adds up to its length."""
    clips = _album(tmp_path / "album", [2.0, 5.0, 3.3, 1.0], [8000, 22050, 8000, 44100])
    separator = _separator(repo, device, batch_size=4, shifts=0)
    expected = _alone(separator, clips, tmp_path / "alone")
    chunk = segment_samples(separator.bag.model(0), separator.options.segment)
    chunks = [len(range(0, int(s * 8000), int(0.75 * chunk))) for s in (2.0, 5.0, 3.3, 1.0)]
    assert chunks == [2, 5, 3, 1]
    calls = _record_calls(monkeypatch)
    events = _Progress()
    tracks = Batch(separator, tmp_path / "mixed", FLOAT, events=events).run([tmp_path / "album"])
    assert [t.status for t in tracks] == ["ok"] * 4
    assert events.seconds == pytest.approx({0: 2.0, 1: 5.0, 2: 3.3, 3: 1.0})
    assert sum(-(-n // 4) for n in chunks) == 5
    assert len(calls) == _calls_when_filled(chunks, 4) == 3
    assert all(len(windows) == 4 for _, windows in calls)
    assert _stems(tmp_path / "mixed") == expected and len(expected) == 16
    # and the in-memory path, alone, gives the same float32 stems
    audio, rate = read_audio(clips[1])
    stems = separator.separate_tensor(audio, rate)
    for stem, tensor in stems.items():
        written, _ = read_audio(tmp_path / "mixed" / "aaaa0001" / "2" / f"{stem}.wav")
        assert torch.equal(written, tensor)


def test_shifts_and_a_bag_fill_each_members_calls_with_its_own_chunks(
    tmp_path, repo, monkeypatch, one_thread
):
    """A bag of two with shifts=1 (the next track's run of the same member and shift fills a
    call): fewer calls, each chunk run once by its own member, the bytes of one at a time."""
    clips = _album(tmp_path / "album", [2.6, 1.2, 3.1])
    separator = _separator(repo, "cpu", "mixbag", batch_size=4, shifts=1)
    alone_calls = _record_calls(monkeypatch)
    expected = _alone(separator, clips, tmp_path / "alone")
    calls = _record_calls(monkeypatch)
    assert [t.status for t in Batch(separator, tmp_path / "mixed", FLOAT).run(clips)] == ["ok"] * 3
    assert _stems(tmp_path / "mixed") == expected and len(expected) == 12
    assert all(len(windows) == 4 for _, windows in calls + alone_calls)
    assert len(calls) < len(alone_calls)

    def chunks_per_member(recorded) -> list[int]:
        # padding is silence; every chunk of these tracks has sound
        return [
            sum(int(w.any()) for model, windows in recorded if model is member for w in windows)
            for member, _ in separator.bag.members
        ]

    assert chunks_per_member(calls) == chunks_per_member(alone_calls)
    assert all(count >= 3 for count in chunks_per_member(calls))


@pytest.mark.parametrize("next_track", ["corrupt", "skipped"])
def test_a_next_track_that_does_not_run_fills_nothing(
    tmp_path, repo, monkeypatch, one_thread, next_track
):
    """Track 2 fails to decode, or is skipped as finished: track 1's last call is padded
    instead, track 3 still fills its last call with track 4's chunks, and the stems are
    those of one track at a time."""
    clips = _album(tmp_path / "album", [2.0, 2.0, 2.0, 1.0])
    separator = _separator(repo, "cpu", batch_size=4, shifts=0)
    expected = _alone(separator, [clips[0], clips[2], clips[3]], tmp_path / "alone")
    settings = FLOAT
    if next_track == "corrupt":
        clips[1].write_bytes(b"RIFF but not a WAV file at all")
    else:  # its stems are all there already
        expected |= _alone(separator, [clips[1]], tmp_path / "mixed")
        settings = OutputSettings(bits=32, clip_mode="none", skip_existing=True)
    calls = _record_calls(monkeypatch)
    tracks = Batch(separator, tmp_path / "mixed", settings).run([tmp_path / "album"])
    status = "failed" if next_track == "corrupt" else "skipped"
    assert [t.status for t in tracks] == ["ok", status, "ok", "ok"]
    # 2 chunks each, 1 for the last: track 1 alone in one call, 3 and 4 sharing one
    assert len(calls) == 2 and all(len(windows) == 4 for _, windows in calls)
    assert sum(int(w.any()) for w in calls[0][1]) == 2
    assert _stems(tmp_path / "mixed") == expected


def test_the_cpu_default_makes_the_calls_it_made_before(tmp_path, repo, monkeypatch):
    """Batch size 1 on the CPU: no padding, nothing filled; the same calls on the same windows,
    in the same order, as one track at a time without the pipeline."""
    clips = _album(tmp_path / "album", [2.0, 3.3, 1.0])
    separator = htsep.Separator("mixbag", repo=repo, device="cpu", progress=False)
    assert separator.options.batch_size == 1 and not separator.runner.full_calls
    serial = _record_calls(monkeypatch)
    Batch(separator, tmp_path / "serial", pipeline=False).run(clips)
    calls = _record_calls(monkeypatch)
    Batch(separator, tmp_path / "piped").run(clips)
    assert len(calls) == len(serial) > 0
    for (model, windows), (their_model, theirs) in zip(calls, serial, strict=True):
        assert model is their_model and len(windows) == len(theirs) == 1
        assert torch.equal(windows[0], theirs[0]) and windows[0].any()  # no padding
    assert _stems(tmp_path / "piped") == _stems(tmp_path / "serial")


def test_a_file_scanned_for_another_separator_is_refused(tmp_path, repo):
    """A scanned file carries its separator's stream, which may already hold chunks."""
    clip = tmp_path / "clip.wav"
    write_clip(clip, 1.0)
    ours, theirs = (htsep.Separator("aaaa0001", repo=repo, device="cpu") for _ in range(2))
    scanned = ScannedFile.open(theirs, clip)
    with pytest.raises(UsageError, match="^the file was scanned for another Separator$"):
        ours.stream_file(scanned)
