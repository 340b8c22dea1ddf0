"""The synthetic multitrack dataset: htsep/synthetic.py and scripts/make_synthetic_dataset.py."""

from __future__ import annotations

import hashlib
import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import htsep.synthetic
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
        # Bounds: a track is rendered whole in memory, and htsep reads at most 384 kHz.
        (
            ["--seconds", "1e308"],
            "--seconds must be at most 300 (a track is rendered whole in memory), got 1e+308",
        ),
        (
            ["--seconds", "100000"],
            "--seconds must be at most 300 (a track is rendered whole in memory), got 100000",
        ),
        (
            ["--seconds", "60", "--sample-rate", "384000"],
            "--seconds 60 at --sample-rate 384000 is 23040000 frames a track, more than "
            "14400000 (a track is rendered whole in memory)",
        ),
        (
            ["--sample-rate", "400000"],
            "--sample-rate must be at most 384000 (the highest rate htsep reads), got 400000",
        ),
        (
            ["--sample-rate", "10000000000"],
            "--sample-rate must be at most 384000 (the highest rate htsep reads), got 10000000000",
        ),
        (["--tracks", "10001"], "--tracks must be at most 10000, got 10001"),
        (["--test-tracks", "10001"], "--test-tracks must be at most 10000, got 10001"),
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


def test_an_empty_out_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An unset variable in a script: the set would land in the current folder.
    monkeypatch.chdir(tmp_path)
    for out in ("", " "):
        argv = [out, "--tracks", "1", "--seconds", "0.1", "--seed", "0", "--sample-rate", "8000"]
        assert run_main(argv, capsys) == (
            2,
            "",
            "make_synthetic_dataset: error: OUT is an empty string "
            "(an unset variable in a script?)\n",
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("failure", "outcome"),
    [
        (
            MemoryError,
            (
                1,
                "make_synthetic_dataset: error: out of memory rendering a track of 0.1 s at "
                "8000 Hz (try fewer --seconds or a lower --sample-rate)\n",
            ),
        ),
        (
            KeyboardInterrupt,
            (
                130,
                "make_synthetic_dataset: error: interrupted: nothing was written "
                "(run the command again)\n",
            ),
        ),
    ],
    ids=["MemoryError", "KeyboardInterrupt"],
)
def test_a_failed_run_leaves_nothing_and_the_same_command_completes_the_set(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    failure: type[BaseException],
    outcome: tuple[int, str],
) -> None:
    render = htsep.synthetic.render_track

    def fail_at_the_third(seed: int, split: str, index: int, *args: float) -> object:
        if index == 2:
            raise failure()
        return render(seed, split, index, *args)

    out = tmp_path / "new" / "set"
    argv = [str(out), "--tracks", "4", "--seconds", "0.1", "--seed", "2", "--sample-rate", "8000"]
    with monkeypatch.context() as patch:
        patch.setattr(htsep.synthetic, "render_track", fail_at_the_third)
        code, stdout, stderr = run_main(argv, capsys)
    assert (code, stderr) == outcome
    # Nothing is left, not even the folders it made.
    assert list(tmp_path.iterdir()) == []
    # An existing folder is left as it was, with what it held.
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    with monkeypatch.context() as patch:
        patch.setattr(htsep.synthetic, "render_track", fail_at_the_third)
        assert run_main(argv, capsys)[0] == outcome[0]
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    code, stdout, stderr = run_main(argv, capsys)
    assert (code, stderr) == (0, "")
    assert stdout.startswith("wrote 4 train and 1 test tracks of 0.1 s at 8000 Hz")
    assert sorted(path.name for path in out.iterdir()) == [
        "keep.txt",
        "synthetic.json",
        "test",
        "train",
    ]
    assert len(list((out / "train").iterdir())) == 4


@pytest.mark.parametrize(("signum", "how"), [(signal.SIGINT, "interrupted"),
                                             (signal.SIGTERM, "terminated")])  # fmt: skip
def test_a_signal_while_the_script_starts_is_one_line(tmp_path: Path, signum: int, how: str):
    """Sent while numpy is imported (before any handler): a KeyboardInterrupt traceback."""
    script = f"""
import importlib.abc, os, runpy, sys
class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "numpy":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), {int(signum)})
        return None
sys.meta_path.insert(0, Finder())
sys.argv = ["make_synthetic_dataset", sys.argv[1], "--tracks", "1", "--seconds", "0.1",
            "--seed", "1"]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "set")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (done.returncode, done.stderr) == (
        128 + signum,
        f"make_synthetic_dataset: error: {how}: nothing was written (run the command again)\n",
    )
    assert list(tmp_path.iterdir()) == []


def test_the_same_command_run_twice_at_once_succeeds_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both render; the one that finishes second found the other's train/ in its way and
    failed, advising to remove the very set it was asked for. Forced here: while the second
    renders its last track, the first writes the whole set."""
    render = htsep.synthetic.render_track
    out = tmp_path / "set"
    arguments = (out, 2, 0.1, 5, 8000, 1)

    def the_other_finishes_first(seed: int, split: str, index: int, *args: float) -> object:
        if split == "test":
            monkeypatch.setattr(htsep.synthetic, "render_track", render)
            assert write_dataset(*arguments) is True
        return render(seed, split, index, *args)

    monkeypatch.setattr(htsep.synthetic, "render_track", the_other_finishes_first)
    assert write_dataset(*arguments) is False  # the set is there: nothing written
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert write_dataset(*arguments) is False
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.parametrize(
    ("signum", "how"),
    [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_leaves_nothing_and_the_same_command_completes_the_set(
    tmp_path: Path, signum: int, how: str
) -> None:
    out = tmp_path / "demo"
    argv = [out, "--tracks", "30", "--seconds", "2", "--seed", "1", "--sample-rate", "22050"]
    command = [sys.executable, str(SCRIPT), *map(str, argv)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        # Two tracks written (wherever the writer keeps them) before the signal comes.
        while not any(out.rglob("synth-0002")) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.005)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert (process.returncode, stdout, stderr) == (
        128 + signum,
        "",
        f"make_synthetic_dataset: error: {how}: nothing was written (run the command again)\n",
    )
    assert not out.exists()
    result = run_script(*argv)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in out.iterdir()) == ["synthetic.json", "test", "train"]
    assert len(list((out / "train").iterdir())) == 30


def test_what_a_killed_run_left_is_removed(tmp_path: Path) -> None:
    # The staging folder of a process that no longer runs, as kill -9 leaves it.
    dead = subprocess.run(
        [sys.executable, "-c", "from htsep.files import owner_tag; print(owner_tag())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    left = tmp_path / f".htsep-{dead}.0123abcd" / "train" / "synth-0000"
    left.mkdir(parents=True)
    (left / "mixture.wav").write_bytes(b"RIFF")
    assert write_dataset(tmp_path, tracks=1, seconds=0.1, seed=0, sample_rate=8000)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["synthetic.json", "test", "train"]


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
    with pytest.raises(ValueError, match="sample rate must be 8000 to 384000 Hz, got 4000"):
        render_track(0, "train", 0, 1.0, 4000)
    with pytest.raises(ValueError, match="sample rate must be 8000 to 384000 Hz, got 400000"):
        render_track(0, "train", 0, 1.0, 400_000)
    with pytest.raises(ValueError, match=r"seconds must be a number in \(0, 300\], got 1e\+308"):
        render_track(0, "train", 0, 1e308, 8000)
    with pytest.raises(ValueError, match="is 23040000 frames, more than a track may hold"):
        render_track(0, "train", 0, 60.0, 384_000)
    with pytest.raises(ValueError, match="need 1 to 10000 train and test tracks"):
        write_dataset(Path("unused"), tracks=10_001, seconds=0.1, seed=0, sample_rate=8000)
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


def test_a_file_size_limit_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """`ulimit -f` (a full disk fails the same way in libsndfile, "System error."): a
    traceback of soundfile's LibsndfileError."""
    import resource

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "set"
    args = [out, "--tracks", 1, "--seconds", 2, "--seed", 1, "--sample-rate", 8000]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limited,
    )
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("make_synthetic_dataset: error: ") and "Traceback" not in line
    assert ".wav: cannot write (File too large (ulimit -f))" in line, line
    assert list(tmp_path.iterdir()) == []
