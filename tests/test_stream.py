"""Streamed separation (bounded memory) equals whole-track separation."""

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import write_clip

import htsep
import reference
from htsep.apply import ChunkOptions, ChunkStream, zero_extended


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
