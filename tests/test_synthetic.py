"""The synthetic multitrack dataset: htsep/synthetic.py and scripts/make_synthetic_dataset.py."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from htsep.synthetic import SOURCES, OutputExistsError, render_track, write_dataset

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_synthetic_dataset.py"
FILES = {"mixture.wav", *(f"{source}.wav" for source in SOURCES)}
RATE = 16000
SECONDS = 1.23456  # 19752.96 frames: the length is rounded, not truncated
FRAMES = 19753
TRACKS, TEST_TRACKS = 5, 1  # the default test count: max(1, 5 // 4)


def run_script(*args: object) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SCRIPT), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The script's main() in this process (no interpreter start-up): exit code, stdout, stderr."""
    spec = importlib.util.spec_from_file_location("make_synthetic_dataset", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        code = module.main(args)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def make(out: Path, seed: int) -> Path:
    result = run_script(
        out, "--tracks", TRACKS, "--seconds", SECONDS, "--seed", seed, "--sample-rate", RATE
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {TRACKS} train and {TEST_TRACKS} test tracks of ")
    return out


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def band_shares(stem: np.ndarray, rate: int) -> tuple[float, float, float]:
    """Spectral centroid (Hz) of a stem (T, C), and its shares of energy below 250 Hz and
    above 4 kHz."""
    power = np.abs(np.fft.rfft(stem.astype(np.float64).sum(axis=1))) ** 2
    frequency = np.fft.rfftfreq(len(stem), 1.0 / rate)
    total = power.sum()
    return (
        float(np.sum(frequency * power) / total),
        float(power[frequency < 250].sum() / total),
        float(power[frequency > 4000].sum() / total),
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make(tmp_path_factory.mktemp("synthetic") / "set", seed=7)


# The script ---------------------------------------------------------------------------------------


def test_same_command_same_bytes_other_seed_other_bytes(dataset: Path, tmp_path: Path) -> None:
    first = digests(dataset)
    assert first == digests(make(tmp_path / "again", seed=7))
    other = digests(make(tmp_path / "other", seed=8))
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


def test_layout(dataset: Path) -> None:
    # Only the expected files: no temporary file is left behind.
    assert sorted(path.name for path in dataset.iterdir()) == ["synthetic.json", "test", "train"]
    for split, count in (("train", TRACKS), ("test", TEST_TRACKS)):
        tracks = sorted(path.name for path in (dataset / split).iterdir())
        assert tracks == [f"synth-{index:04d}" for index in range(count)]
        for track in tracks:
            assert {path.name for path in (dataset / split / track).iterdir()} == FILES
            for name in FILES:
                info = sf.info(str(dataset / split / track / name))
                assert (info.format, info.subtype) == ("WAV", "PCM_16")
                assert (info.channels, info.samplerate, info.frames) == (2, RATE, FRAMES)


def test_mixture_is_the_sum_of_the_stems(dataset: Path) -> None:
    for folder in sorted(dataset.glob("*/synth-*")):
        stems = {
            source: sf.read(str(folder / f"{source}.wav"), dtype="int16")[0] for source in SOURCES
        }
        mixture = sf.read(str(folder / "mixture.wav"), dtype="int16")[0]
        total = sum(stem.astype(np.int32) for stem in stems.values())
        np.testing.assert_array_equal(mixture.astype(np.int32), total)
        for source, stem in stems.items():
            rms = np.sqrt(np.mean(stem.astype(np.float64) ** 2))
            assert rms > 300, f"{folder.name}/{source} is nearly silent (RMS {rms:.0f})"
        # The loudest of the float mixture and stems is scaled to -1 dBFS, 29203.6; rounding
        # moves a stem by at most 1/2 and the mixture (four rounded stems) by at most 2.
        peak = max(
            int(np.abs(audio.astype(np.int32)).max()) for audio in (mixture, *stems.values())
        )
        assert 29202 <= peak <= 29205


def test_train_and_test_tracks_differ(dataset: Path) -> None:
    hashes = digests(dataset)
    train = {hashes[f"train/synth-0000/{name}"] for name in FILES}
    test = {hashes[f"test/synth-0000/{name}"] for name in FILES}
    assert not train & test
    same_seed = [render_track(7, split, 0, 1.0, 8000)["mixture"] for split in ("train", "test")]
    assert not np.array_equal(*same_seed)


@pytest.mark.parametrize("split", ["train", "test"])
def test_existing_output_is_refused_and_left_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], split: str
) -> None:
    (tmp_path / split).mkdir()
    (tmp_path / split / "keep.txt").write_text("mine")
    argv = [str(tmp_path), "--tracks", "1", "--seconds", "0.5", "--seed", "0"]
    if split == "train":  # once end to end, in its own process
        result = run_script(*argv)
        outcome = (result.returncode, result.stdout, result.stderr)
    else:
        outcome = run_main(argv, capsys)
    assert outcome == (
        2,
        "",
        f"make_synthetic_dataset: error: {tmp_path / split} already exists: "
        "remove it or choose another folder\n",
    )
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*")) == [
        split,
        f"{split}/keep.txt",
    ]
    assert (tmp_path / split / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tracks", "0"], "--tracks must be at least 1, got 0"),
        (["--seconds", "0"], "--seconds must be a positive number, got 0.0"),
        (["--seconds", "-1"], "--seconds must be a positive number, got -1.0"),
        (["--seconds", "nan"], "--seconds must be a positive number, got nan"),
        (["--seconds", "1e-6"], "--seconds 1e-06 is shorter than one sample"),
        (["--sample-rate", "7999"], "--sample-rate must be at least 8000, got 7999"),
        (["--seed", "-1"], "--seed must be at least 0, got -1"),
        (["--test-tracks", "0"], "--test-tracks must be at least 1, got 0"),
        (["--tracks", "two"], "argument --tracks: invalid int value: 'two'"),
    ],
)
def test_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    options = {"--tracks": "1", "--seconds": "0.5", "--seed": "0"}
    options.update(zip(args[::2], args[1::2], strict=True))
    argv = [str(tmp_path / "out"), *[part for option in options.items() for part in option]]
    assert run_main(argv, capsys) == (2, "", f"make_synthetic_dataset: error: {message}\n")
    assert not (tmp_path / "out").exists()


def test_missing_arguments_in_a_real_process(tmp_path: Path) -> None:
    result = run_script(tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr == (
        "make_synthetic_dataset: error: the following arguments are required: "
        "--tracks, --seconds, --seed\n"
    )


# The library --------------------------------------------------------------------------------------


def test_render_track_shapes_and_determinism() -> None:
    first = render_track(3, "train", 2, 0.7, 11025)
    assert list(first) == [*SOURCES, "mixture"]
    for audio in first.values():
        assert (audio.dtype, audio.shape) == (np.int16, (round(0.7 * 11025), 2))
    second = render_track(3, "train", 2, 0.7, 11025)
    for name, audio in first.items():
        np.testing.assert_array_equal(audio, second[name])
    assert not np.array_equal(first["mixture"], render_track(3, "train", 3, 0.7, 11025)["mixture"])


@pytest.mark.parametrize(
    ("seed", "split", "index"), [(0, "train", 0), (1, "test", 1), (2, "train", 5)]
)
def test_sources_differ_in_spectrum(seed: int, split: str, index: int) -> None:
    rate = 22050
    stems = render_track(seed, split, index, 2.0, rate)
    shares = {source: band_shares(stems[source], rate) for source in SOURCES}
    centroid = {source: value[0] for source, value in shares.items()}
    # The bass is the low end: nearly all of its energy is below 250 Hz, its centroid the lowest.
    assert shares["bass"][1] > 0.9
    assert all(centroid["bass"] < 0.5 * centroid[source] for source in ("drums", "other", "vocals"))
    # Cymbals make the drums the only source with much energy above 4 kHz.
    high = {source: value[2] for source, value in shares.items()}
    assert high["drums"] > 0.05
    assert all(high["drums"] > 10 * high[source] for source in ("bass", "other", "vocals"))


def test_short_tracks_have_every_source() -> None:
    for seed in range(10):
        stems = render_track(seed, "train", 0, 0.1, 8000)
        assert all(np.any(stems[source] != 0) for source in SOURCES)


def test_render_track_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        render_track(0, "valid", 0, 1.0, 8000)
    with pytest.raises(ValueError, match="sample rate must be >= 8000"):
        render_track(0, "train", 0, 1.0, 4000)
    with pytest.raises(ValueError, match="seed and index must be >= 0"):
        render_track(-1, "train", 0, 1.0, 8000)


def test_write_dataset_refuses_an_existing_split(tmp_path: Path) -> None:
    write_dataset(tmp_path, tracks=1, seconds=0.2, seed=0, sample_rate=8000, test_tracks=2)
    assert len(list((tmp_path / "test").iterdir())) == 2
    before = digests(tmp_path)
    with pytest.raises(OutputExistsError, match="train already exists"):
        write_dataset(tmp_path, tracks=1, seconds=0.2, seed=1, sample_rate=8000)
    assert digests(tmp_path) == before


def test_the_same_command_can_run_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path), "--tracks", "1", "--seconds", "0.2", "--seed", "3"]
    argv += ["--sample-rate", "8000"]
    assert run_main(argv, capsys)[0] == 0
    before = digests(tmp_path)
    assert run_main(argv, capsys) == (
        0,
        f"{tmp_path} already holds this dataset (same arguments); nothing written\n",
        "",
    )
    assert digests(tmp_path) == before
    # Another recipe, or a set whose recipe file is missing (cut short), is still refused.
    other = [*argv[:-4], "4", "--sample-rate", "8000"]
    assert run_main(other, capsys)[0] == 2
    (tmp_path / "synthetic.json").unlink()
    assert run_main(argv, capsys)[0] == 2
