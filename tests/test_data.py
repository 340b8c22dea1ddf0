"""Datasets in the MUSDB18-HQ layout: discovery, validation messages that name the track at
fault, and decoding, on tiny WAV/FLAC files written per test."""

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from htsep.data import Track, find_tracks, load_track
from htsep.errors import DatasetError, UsageError

RATE = 8000
FRAMES = 300
MUSDB = ["drums", "bass", "other", "vocals"]


def write(path: Path, frames: int = FRAMES, rate: int = RATE, channels: int = 2, seed: int = 0):
    """A random float WAV/FLAC file; -> its samples (T, C)."""
    audio = np.random.default_rng(seed).uniform(-0.5, 0.5, (frames, channels)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, rate, subtype="FLOAT" if path.suffix == ".wav" else "PCM_24")
    return audio


def make_track(root: Path, name: str, sources=MUSDB, split="test", ext=".wav", **kwargs):
    folder = root / split / name
    write(folder / f"mixture{ext}", **kwargs)
    for index, source in enumerate(sources):
        write(folder / f"{source}{ext}", seed=index + 1, **kwargs)
    return folder


def test_happy_path(tmp_path):
    make_track(tmp_path, "B track")
    make_track(tmp_path, "A track", channels=1, frames=450)
    make_track(tmp_path, "ignored", split="train")
    (tmp_path / "test" / "A track" / "notes.txt").write_text("not audio")
    (tmp_path / "test" / ".hidden").mkdir()

    sources, tracks = find_tracks(tmp_path, "test")

    assert sources == MUSDB
    assert [t.name for t in tracks] == ["A track", "B track"]
    first = tracks[0]
    assert first == Track(
        name="A track",
        folder=tmp_path / "test" / "A track",
        mixture=tmp_path / "test" / "A track" / "mixture.wav",
        stems={s: tmp_path / "test" / "A track" / f"{s}.wav" for s in MUSDB},
        sample_rate=RATE,
        frames=450,
        channels=1,
    )
    assert list(first.stems) == MUSDB
    assert (tracks[1].frames, tracks[1].channels) == (FRAMES, 2)


def test_load_track_returns_channels_first_float32(tmp_path):
    folder = tmp_path / "test" / "song"
    mix = write(folder / "mixture.flac", frames=257, channels=2)
    stems = {s: write(folder / f"{s}.flac", frames=257, seed=i + 1) for i, s in enumerate(MUSDB)}
    sources, (track,) = find_tracks(tmp_path, "test")

    mixture, loaded = load_track(track, ["vocals", "drums"])

    assert mixture.dtype == loaded.dtype == torch.float32
    assert mixture.shape == (2, 257) and loaded.shape == (2, 2, 257)
    # 24-bit FLAC: within one step of 2^-23 of what was written.
    assert np.abs(mixture.numpy() - mix.T).max() < 2**-22
    assert np.abs(loaded[0].numpy() - stems["vocals"].T).max() < 2**-22
    assert np.abs(loaded[1].numpy() - stems["drums"].T).max() < 2**-22


def test_sources_in_musdb_order_then_alphabetical(tmp_path):
    for name in ["one", "two"]:
        make_track(tmp_path, name, sources=["vocals", "piano", "bass", "guitar", "drums"])
    sources, tracks = find_tracks(tmp_path, "test")
    assert sources == ["drums", "bass", "vocals", "guitar", "piano"]
    assert list(tracks[0].stems) == sources


def test_requested_sources_keep_their_order_and_ignore_other_files(tmp_path):
    make_track(tmp_path, "one", sources=MUSDB + ["piano"])
    make_track(tmp_path, "two", sources=MUSDB)
    sources, tracks = find_tracks(tmp_path, "test", ["vocals", "bass"])
    assert sources == ["vocals", "bass"]
    assert [list(t.stems) for t in tracks] == [["vocals", "bass"], ["vocals", "bass"]]


def test_any_split_name_and_source_names(tmp_path):
    make_track(tmp_path, "x", sources=["speech", "noise"], split="train")
    sources, tracks = find_tracks(tmp_path, "train")
    assert sources == ["noise", "speech"] and [t.name for t in tracks] == ["x"]


def error(root: Path, split: str = "test", sources=None) -> str:
    with pytest.raises(DatasetError) as caught:
        find_tracks(root, split, sources)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_root_and_split(tmp_path):
    assert error(tmp_path / "nowhere") == f"{tmp_path / 'nowhere'}: no such dataset folder"
    (tmp_path / "test").mkdir()
    assert error(tmp_path, "train") == (
        f"{tmp_path}: no train/ folder (expected {tmp_path}/train/<track>/mixture.wav)"
    )


def test_no_tracks(tmp_path):
    (tmp_path / "test").mkdir()
    assert error(tmp_path) == f"{tmp_path / 'test'}: no track folders"
    (tmp_path / "test" / "song.stem.mp4").write_bytes(b"")
    assert "1 .stem.mp4 files but no track folders" in error(tmp_path)


def test_missing_mixture_names_the_tracks(tmp_path):
    make_track(tmp_path, "good")
    make_track(tmp_path, "bad one")
    make_track(tmp_path, "bad two")
    for name in ["bad one", "bad two"]:
        (tmp_path / "test" / name / "mixture.wav").unlink()
    assert error(tmp_path) == (
        f"{tmp_path / 'test'}: no mixture.wav or mixture.flac in track bad one, bad two"
    )


def test_missing_requested_source_names_the_track(tmp_path):
    make_track(tmp_path, "good")
    make_track(tmp_path, "no vocals", sources=["drums", "bass", "other"])
    assert error(tmp_path, sources=MUSDB) == "no vocals in track no vocals"


def test_inconsistent_sources_name_the_tracks(tmp_path):
    make_track(tmp_path, "a")
    make_track(tmp_path, "b", sources=MUSDB + ["piano"])
    make_track(tmp_path, "c", sources=["drums", "bass", "other"])
    assert error(tmp_path) == (
        "sources differ across tracks: vocals is in 2 of 3 tracks, missing in c; "
        "piano is in 1 of 3 tracks, missing in a, c"
    )


def test_track_with_only_a_mixture(tmp_path):
    make_track(tmp_path, "lonely", sources=[])
    assert error(tmp_path) == "track lonely: no source files beside the mixture"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"frames": FRAMES - 1}, f"vocals.wav has {FRAMES - 1} frames, mixture.wav {FRAMES}"),
        ({"rate": 16000}, f"vocals.wav has 16000 Hz, mixture.wav {RATE}"),
        ({"channels": 1}, "vocals.wav has 1 channels, mixture.wav 2"),
    ],
)
def test_stem_that_does_not_match_its_mixture(tmp_path, kwargs, expected):
    make_track(tmp_path, "fine")
    folder = make_track(tmp_path, "odd")
    write(folder / "vocals.wav", **kwargs)
    assert error(tmp_path) == f"{folder}: {expected}"


def test_sample_rates_differ_across_tracks(tmp_path):
    make_track(tmp_path, "a")
    make_track(tmp_path, "b")
    make_track(tmp_path, "c", rate=16000)
    assert error(tmp_path) == (
        f"tracks have different sample rates: {RATE} Hz in a, b; 16000 Hz in c"
    )


def test_same_stem_in_two_formats(tmp_path):
    folder = make_track(tmp_path, "twice")
    write(folder / "bass.flac")
    assert error(tmp_path) == f"{folder}: both bass.flac and bass.wav; keep one of them"


def test_unreadable_stem_names_its_file(tmp_path):
    folder = make_track(tmp_path, "broken")
    (folder / "drums.wav").write_bytes(b"RIFF....garbage")
    message = error(tmp_path)
    assert message.startswith(f"{folder / 'drums.wav'}: ")


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ([], "no sources requested"),
        (["bass", "vocals", "bass"], "bass given twice"),
        (["mixture"], "'mixture' is the mixture, not a source"),
    ],
)
def test_bad_requested_sources_are_usage_errors(tmp_path, sources, expected):
    """A bad request, not a bad dataset: refused before the dataset is read (none here)."""
    with pytest.raises(UsageError) as caught:
        find_tracks(tmp_path / "nowhere", "test", sources)
    assert str(caught.value) == expected


@pytest.mark.parametrize("unreadable", ["test", "test/a"])
def test_a_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch, unreadable):
    """As chmod 000 does for a user without root's capabilities: one line, not a traceback."""
    make_track(tmp_path, "a")
    listing = Path.iterdir

    def iterdir(path):
        if path == tmp_path / unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert error(tmp_path) == f"{tmp_path / unreadable}: cannot read: Permission denied"


def test_a_folder_whose_entries_cannot_be_examined_is_named(tmp_path, monkeypatch):
    """A split folder that can be listed but not entered (chmod a-x): its entries cannot be
    examined, and the folder is what to fix."""
    make_track(tmp_path, "a")
    examine = os.stat

    def stat(path, *args, **kwargs):
        if Path(path).parent == tmp_path / "test":
            raise PermissionError(13, "Permission denied", str(path))
        return examine(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    assert error(tmp_path) == f"{tmp_path / 'test'}: cannot read: Permission denied"


def test_a_dataset_that_is_a_broken_link_is_named(tmp_path):
    (tmp_path / "data").symlink_to("gone")
    assert error(tmp_path / "data") == (
        f"{tmp_path / 'data'}: is a symbolic link to gone, which does not exist"
    )


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda path: path.symlink_to("gone.wav"), "is a symbolic link to gone.wav, which does "
         "not exist"),
        (lambda path: path.symlink_to(path), "is a symbolic link loop"),
        (lambda path: os.mkfifo(path), "is a named pipe (FIFO), not an audio file"),
        (lambda path: path.symlink_to(os.devnull), "is a character device, not an audio file"),
        (lambda path: path.mkdir(), "is a folder, not an audio file"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("sources", [None, ["vocals"]])
def test_a_source_that_is_no_regular_file_is_named(tmp_path, make, what, sources):
    """Refused as what it is, never opened (a FIFO would block), never left out of the scores
    (it was: the other sources were scored, or "no vocals in track a")."""
    folder = make_track(tmp_path, "a")
    (folder / "vocals.wav").unlink()
    make(folder / "vocals.wav")
    assert error(tmp_path, sources=sources) == f"{folder / 'vocals.wav'}: {what}"
    # Not used, it is ignored like any other file.
    sources, _ = find_tracks(tmp_path, "test", ["drums"])
    assert sources == ["drums"]


def test_load_track_rejects_an_unknown_source(tmp_path):
    make_track(tmp_path, "a")
    _, (track,) = find_tracks(tmp_path, "test")
    with pytest.raises(DatasetError, match=r"a: no stem 'piano'$"):
        load_track(track, ["piano"])


def test_load_track_notices_a_file_changed_since_discovery(tmp_path):
    folder = make_track(tmp_path, "a")
    _, (track,) = find_tracks(tmp_path, "test")
    write(folder / "bass.wav", frames=FRAMES + 5)
    with pytest.raises(DatasetError, match=r"bass\.wav has shape \(2, 305\), mixture\.wav"):
        load_track(track, MUSDB)
