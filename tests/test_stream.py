"""Streamed separation (bounded memory) equals whole-track separation."""

import logging

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import htsep as htsep_cli
from helpers import write_clip

import htsep
import reference
from htsep import apply as apply_module
from htsep.apply import ChunkOptions, ChunkStream, NetworkRunner, OutOfDeviceMemory, zero_extended


def test_chunk_stream_taken_in_pieces_equals_taken_whole(repo):
    model = htsep.Separator("aaaa0001", repo=repo, device="cpu").bag.model(0)
    mix = torch.randn(2, 2, 30011, generator=torch.Generator().manual_seed(0))

    def new_stream() -> ChunkStream:
        return ChunkStream(
            model,
            lambda s, n: zero_extended(mix, s, n),
            start=-300,
            length=29000,
            options=ChunkOptions(batch_size=2),
        )

    whole = new_stream().take(29000)
    stream = new_stream()
    parts = [stream.take(n) for n in (1, 4999, 12000, 12000)]
    assert torch.equal(torch.cat(parts, -1), whole)
    with pytest.raises(ValueError, match="past the end"):
        stream.take(1)


@pytest.mark.parametrize(
    "rate,channels,shifts,name",
    [
        (8000, 2, 2, "mixbag"),  # model rate, shifts, weighted bag
        (22050, 2, 1, "aaaa0001"),  # resampled in and out
        (44100, 1, 2, "mixbag"),  # mono, resampled, shifts, bag
    ],
)
def test_streamed_equals_whole(tmp_path, repo, rate, channels, shifts, name):
    clip = tmp_path / "clip.wav"
    write_clip(clip, 5.3, rate=rate, channels=channels, amplitude=0.2)
    separator = htsep.Separator(name, repo=repo, device="cpu", shifts=shifts, seed=9)
    _, _, whole = separator.separate_file(clip)
    with separator.stream_file(clip, block=7001) as track:
        blocks = list(track)
    assert len(blocks) == -(-int(5.3 * rate) // 7001)  # whole blocks of 7001, then the rest
    for stem, expected in whole.items():
        streamed = torch.cat([stems[stem] for _, stems in blocks], -1)
        assert streamed.shape == expected.shape == (channels, int(5.3 * rate))
        assert (streamed - expected).abs().max() <= 1e-6 * max(1.0, expected.abs().max())
    mix = torch.cat([m for m, _ in blocks], -1)
    torch.testing.assert_close(
        mix, torch.from_numpy(sf.read(clip, dtype="float32", always_2d=True)[0].T)
    )


@pytest.mark.parametrize(
    "ext,flags", [("wav", {"bits": 32}), ("flac", {"bits": 24}), ("mp3", {"mp3_bitrate": 192})]
)
@pytest.mark.parametrize("clip_mode", ["rescale", "clamp", "none"])
def test_written_files_match_whole_track(tmp_path, repo, ext, flags, clip_mode):
    clip = tmp_path / "clip.wav"
    write_clip(clip, 3.1, rate=44100 if ext == "mp3" else 8000, amplitude=0.5)
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=1)
    _, rate, whole = separator.separate_file(clip)
    outputs = {stem: tmp_path / "out" / f"{stem}.{ext}" for stem in ("vocals", "drums")}
    got_rate, frames = separator.separate_file_to(clip, outputs, clip_mode=clip_mode, **flags)
    assert (got_rate, frames) == (rate, whole["vocals"].shape[-1])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in outputs.values()
    )  # no staging folder or temporary file left
    if ext != "wav":
        return  # lossy or quantized: the round trip is tested in test_audio
    peak = max(float(whole[s].abs().max()) for s in outputs)
    gain = 1 / max(1.01 * peak, 1.0) if clip_mode == "rescale" else 1.0
    for stem, path in outputs.items():
        written = torch.from_numpy(sf.read(path, dtype="float32", always_2d=True)[0].T)
        expected = whole[stem] * gain
        if clip_mode == "clamp":
            expected = expected.clamp(-0.99, 0.99)
        assert (written - expected).abs().max() <= 1e-6 * max(1.0, float(expected.abs().max()))


def test_two_stems_streamed(tmp_path, repo):
    clip = tmp_path / "clip.wav"
    mix = write_clip(clip, 2.2, rate=16000)
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", stems=["bass"])
    outputs = {name: tmp_path / f"{name}.wav" for name in ("bass", "minus_bass", "no_bass")}
    separator.separate_file_to(clip, outputs, two_stems="bass", clip_mode="none", bits=32)
    bass, minus, rest = (sf.read(outputs[n], dtype="float32")[0] for n in outputs)
    assert np.abs(bass + minus - mix).max() <= 1e-5
    _, _, whole = separator.separate_file(clip, all_sources=True)
    others = sum(whole[s] for s in ("drums", "other", "vocals")).numpy().T
    assert np.abs(rest - others).max() <= 1e-6


def _bag_stream(members, mix, slot=None):
    from htsep.apply import SeparationStream

    return SeparationStream(
        members,
        lambda s, n: zero_extended(mix, s, n),
        mix.shape[-1],
        shifts=2,
        generator=torch.Generator().manual_seed(3),
        options=ChunkOptions(batch_size=2),
        slot=slot,
    )


def test_device_slot_runs_members_one_at_a_time(repo, tmp_path):
    """A bag streamed through a DeviceSlot (one member's weights on the device at a time, here
    the CPU) gives the same numbers as the members run in place, and leaves them untouched."""
    from htsep.devices import DeviceSlot

    separator = htsep.Separator("mixbag", repo=repo, device="cpu")
    first, second = separator.bag.model(0), separator.bag.model(1)
    # a member of another configuration: the slot makes a new device copy for it
    wider = reference.build(reference.SOURCES_4, {**reference.SMALL, "channels": 12}, seed=5)
    other = htsep.load_model(reference.write_th(wider, tmp_path, "wider")[0])
    assert other.config != first.config and other.sources == first.sources
    members = [(first, [1.0, 0.5, 0.25, 1.0]), (second, [0.5, 1.0, 1.0, 0.25]), (other, [1] * 4)]
    before = [[p.detach().clone() for p in model.parameters()] for model, _ in members]
    mix = torch.randn(1, 2, 26000, generator=torch.Generator().manual_seed(1))
    expected = _bag_stream(members, mix).take(mix.shape[-1])
    slot = DeviceSlot("cpu")
    got = _bag_stream(members, mix, slot)
    parts = [got.take(count) for count in (9000, 9000, 8000)]
    assert torch.equal(torch.cat(parts, -1), expected)
    # 3 chunks in batches of 2, 2 shifts: 4 network calls per member, 12 in all. The members
    # take turns (a whole number of rounds), and a member's shifts share its turn.
    assert slot.loads % 3 == 0 and 3 <= slot.loads < 12
    assert all(slot.copy is not model for model, _ in members)
    for (model, _), saved in zip(members, before, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), saved, strict=True))


# --- the network runner: out of memory, batches in flight --------------------------------------


def _out_of_memory_above(monkeypatch, limit: int) -> list[int]:
    """Make every network call of more than ``limit`` chunks fail as a device out of memory
    does; -> the sizes of the calls made (failed ones included)."""
    calls: list[int] = []
    network = apply_module.run_network

    def run_network(model, windows, *args, **kwargs):
        calls.append(len(windows))
        if len(windows) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return network(model, windows, *args, **kwargs)

    monkeypatch.setattr(apply_module, "run_network", run_network)
    return calls


def test_out_of_memory_halves_the_batch_and_keeps_the_numbers(repo, monkeypatch, caplog):
    """A batch that runs out of memory is split and retried, never lost: 8 chunks per call
    become 4, then 2, logged once each; the stems are those of 2 chunks per call from the
    start, and later tracks keep the smaller size."""
    mix = torch.randn(2, 90000, generator=torch.Generator().manual_seed(3)) * 0.1
    expected = htsep.Separator("aaaa0001", repo=repo, device="cpu", batch_size=2, shifts=0)
    want = expected.separate_tensor(mix)
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", batch_size=8, shifts=0)
    calls = _out_of_memory_above(monkeypatch, 2)
    with caplog.at_level(logging.WARNING, logger="htsep.apply"):
        got = separator.separate_tensor(mix)
    chunks = len(range(0, 90000, int(0.75 * int(separator.bag.segment * 8000))))
    assert chunks >= 8
    assert calls[:3] == [8, 4, 2] and all(size <= 2 for size in calls[3:])
    assert sum(calls[2:]) == chunks  # every chunk ran exactly once after the halvings
    assert [r.getMessage() for r in caplog.records] == [
        "out of memory on cpu with 8 chunks per call: now 4 per call",
        "out of memory on cpu with 4 chunks per call: now 2 per call",
    ]
    for name in want:
        assert torch.equal(got[name], want[name])
    caplog.clear()
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="htsep.apply"):
        again = separator.separate_tensor(mix)
    assert max(calls) == 2 and not caplog.records
    assert all(torch.equal(again[name], want[name]) for name in want)


def test_a_single_chunk_out_of_memory_is_one_clear_error(repo, monkeypatch, tmp_path):
    _out_of_memory_above(monkeypatch, 0)
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", batch_size=4, shifts=0)
    with pytest.raises(OutOfDeviceMemory, match=r"^out of memory on cpu with a single chunk: "):
        separator.separate_tensor(torch.zeros(2, 20000))
    clip = tmp_path / "clip.wav"
    write_clip(clip, 1.0, rate=8000)
    result = htsep_cli(
        "--repo", str(repo), "-n", "aaaa0001", "-o", str(tmp_path / "out"), str(clip)
    )
    assert result.exit_code == 1
    assert (
        f"htsep: error: {clip}: out of memory on cpu with a single chunk: use a shorter "
        "--segment, --precision bf16/fp16 or another device"
    ) in result.stderr.splitlines()
    assert not list((tmp_path / "out").rglob("*.wav"))


class _RecordingRunner(NetworkRunner):
    """Records when each batch is started and when its result is taken."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.events: list[tuple[str, int]] = []

    def submit(self, model, windows):
        index = sum(1 for kind, _ in self.events if kind == "submit")
        self.events.append(("submit", index))
        pending = super().submit(model, windows)
        result = pending.result

        def taken():
            self.events.append(("result", index))
            return result()

        pending.result = taken
        return pending


def test_the_next_batch_starts_before_the_last_is_added_up(repo):
    """While a batch's estimates are added up (on the host), the next batch is already on its
    way (on a GPU it computes meanwhile). (test_apply checks the numbers against demucs.)"""
    model = htsep.Separator("aaaa0001", repo=repo, device="cpu").bag.model(0)
    mix = torch.randn(1, 2, 60011, generator=torch.Generator().manual_seed(0))
    runner = _RecordingRunner(batch_size=2)
    stream = ChunkStream(model, lambda s, n: zero_extended(mix, s, n), start=0, length=60011,
                         options=ChunkOptions(batch_size=2), runner=runner)  # fmt: skip
    assert stream.take(60011).shape[-1] == 60011
    batches = -(-len(stream.offsets) // 2)
    assert batches >= 3
    expected = [("submit", 0), ("submit", 1), ("result", 0)]
    for index in range(2, batches):
        expected += [("submit", index), ("result", index - 1)]
    assert runner.events == [*expected, ("result", batches - 1)]


def test_fp32_on_cuda_turns_tf32_off_for_the_call_only():
    """Inside the block cuDNN convolutions and CUDA products are IEEE float32 (torch's default
    lets cuDNN use TF32); outside, the user's settings are back, also after an error."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with apply_module.full_float32():
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with pytest.raises(KeyError), apply_module.full_float32():
        raise KeyError
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with apply_module.full_float32(enabled=False):
        assert (conv.fp32_precision, matmul.fp32_precision) == before


class _FakeMallInfo:
    def __init__(self, free: int) -> None:
        self.fordblks = free


class _FakeLibc:
    """malloc_trim and, unless ``free`` is None, mallinfo2 reporting ``free`` bytes kept."""

    def __init__(self, free: int | None) -> None:
        self.trims = 0
        if free is not None:
            self.mallinfo2 = lambda: _FakeMallInfo(free)

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


@pytest.mark.parametrize(
    "free,keep,trims",
    [(100, 512, 0), (512, 512, 0), (513, 512, 1), (100, 0, 1), (None, 512, 1)],
)
def test_freed_memory_is_handed_back_only_above_the_bound(free, keep, trims, monkeypatch):
    """Memory freed by a chunk stays for the next one up to ``keep`` bytes; more, or an
    allocator that cannot tell how much it keeps, is handed back."""
    from htsep import devices

    libc = _FakeLibc(free)
    monkeypatch.setattr(devices, "_libc", lambda: libc)
    devices.release_freed_memory(keep=keep)
    assert libc.trims == trims


def test_glibc_tells_how_much_freed_memory_it_keeps():
    from htsep import devices

    if devices._libc() is None or not hasattr(devices._libc(), "mallinfo2"):
        pytest.skip("not glibc 2.33 or later")
    kept = devices.freed_bytes()
    assert isinstance(kept, int) and kept >= 0


def test_chunk_stream_releases_freed_memory_above_the_bound(repo, monkeypatch):
    """After each network call the stream asks for memory back beyond KEEP_FREED_BYTES; with
    release_memory off it never asks."""
    model = htsep.Separator("aaaa0001", repo=repo, device="cpu").bag.model(0)
    mix = torch.randn(1, 2, 20000, generator=torch.Generator().manual_seed(0))
    calls: list[int] = []
    monkeypatch.setattr(apply_module, "release_freed_memory", lambda keep=0: calls.append(keep))
    for release in (True, False):
        options = ChunkOptions(batch_size=1, release_memory=release)
        stream = ChunkStream(model, lambda s, n: zero_extended(mix, s, n), start=0,
                             length=20000, options=options)  # fmt: skip
        stream.take(20000)
        assert calls and set(calls) == {apply_module.KEEP_FREED_BYTES}
        if release:
            count = len(calls)
    assert len(calls) == count


@pytest.mark.parametrize(
    "precision, free, expected",
    [
        ("fp32", 80 << 30, 16),  # capped
        ("fp32", 2 << 30, 7),  # (0.8 * 2048 MiB - 8 MiB) // 215 MiB
        ("bf16", 2 << 30, 5),  # 0.8 * 2048 MiB // 306 MiB
        ("fp16", 1 << 30, 2),
        ("fp32", 200 << 20, 1),  # never below one chunk
    ],
)
def test_auto_batch_size_from_the_measured_memory(monkeypatch, precision, free, expected):
    from htsep import devices

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 141 << 30))
    assert devices.auto_batch_size(torch.device("cuda", 0), precision) == expected
    assert devices.auto_batch_size(torch.device("cpu"), precision) == 1


class _PointwiseModel:
    """Stands in for a network whose estimate of each sample depends on that sample alone, so
    that the overlap-add can be recomputed outside the stream."""

    sample_rate = 1000
    audio_channels = 2
    sources = ["a", "b", "c"]

    def __init__(self, chunk: int) -> None:
        from fractions import Fraction

        self.segment = Fraction(chunk, self.sample_rate)


def _pointwise_estimate(windows: torch.Tensor) -> torch.Tensor:
    """(N, C, T) -> (N, 3, C, T): three nonlinear functions of each sample."""
    return torch.stack([windows.sin(), windows * windows - 0.3, torch.tanh(3 * windows)], 1)


class _PointwiseRunner(NetworkRunner):
    def _call(self, model, windows):
        return _pointwise_estimate(torch.cat(windows)), None


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.6])
@pytest.mark.parametrize("length", [37, 400, 1000, 1733])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_overlap_add_has_the_bits_of_the_plain_procedure(overlap, length, batch_size):
    """Every sample gets sum_k w_k * e_k added in chunk order into zeros, then divided by
    sum_k w_k: the stream (with its reused buffers and written-not-added tails) gives exactly
    those bits, whatever the overlap (above 0.5 the kept tail overlaps its new place), the
    length (shorter than a chunk, ragged) and the chunks per call."""
    chunk = 200
    signal = torch.randn(1, 2, length, generator=torch.Generator().manual_seed(length))
    model = _PointwiseModel(chunk)
    options = ChunkOptions(overlap=overlap, batch_size=batch_size)
    stream = ChunkStream(
        model,
        lambda start, count: zero_extended(signal, start, count),
        start=0,
        length=length,
        options=options,
        runner=_PointwiseRunner("cpu", batch_size=batch_size),
    )
    pieces, taken = [], 0
    while taken < length:  # uneven takes
        count = min(length - taken, 1 + taken % 97)
        pieces.append(stream.take(count))
        taken += count
    ours = torch.cat(pieces, -1)

    weights = apply_module.triangle_weights(chunk, options.transition_power)
    stride = int((1 - overlap) * chunk)
    out = torch.zeros(1, 3, 2, length)
    total = torch.zeros(length)
    for offset in range(0, length, stride):
        size = min(chunk, length - offset)
        lead = (chunk - size) // 2
        window = zero_extended(signal, offset - lead, chunk)
        piece = _pointwise_estimate(window)[..., lead : lead + size]
        out[..., offset : offset + size] += weights[:size] * piece
        total[offset : offset + size] += weights[:size]
    assert torch.equal(ours, out / total)


@pytest.mark.parametrize("how", ["dropped", "abandoned midway"])
def test_a_stream_dropped_without_close_leaves_no_decoded_copy(tmp_path, repo, monkeypatch, how):
    """The decoded float copy of an Ogg (or ffmpeg) input was removed by close() alone: a
    stream dropped without it left the copy in the temporary folder (230 MB for 10 minutes),
    after the process too."""
    import gc
    import tempfile

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    clip = tmp_path / "clip.ogg"
    x = np.random.default_rng(5).uniform(-0.3, 0.3, (16000, 2))
    sf.write(clip, x, 16000, format="OGG", subtype="VORBIS")
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0, progress=False)
    track = separator.stream_file(clip, block=4000)
    assert len(list(temporary.iterdir())) == 1  # the decoded copy
    if how == "abandoned midway":
        blocks = iter(track)
        next(blocks)
        del blocks
    del track
    gc.collect()
    assert list(temporary.iterdir()) == []
