"""nSDR against hand-computed values, the trivial baseline, and `htsep eval` end to end on a tiny
dataset with the small random-weight model (4 sources, 8 kHz, stereo, 1.5 s segments)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from htsep.cli import app, printable
from htsep.data import find_tracks, load_track
from htsep.errors import DatasetError, UsageError
from htsep.evaluate import EvalReport, baseline_nsdr, evaluate, museval_sdr, nsdr
from htsep.separator import Separator

RATE = 8000
MUSDB = ["drums", "bass", "other", "vocals"]
runner = CliRunner()


# --- nSDR --------------------------------------------------------------------------------------


def test_nsdr_hand_computed():
    reference = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    # 10 log10((4 + eps) / (1 + eps)): 10 log10(4) = 6.0205999133 less 3.26e-8 from the eps.
    assert nsdr(reference, torch.tensor([[1.0, 1.0, 1.0, 0.0]])) == pytest.approx(
        6.0205998807, abs=1e-10
    )
    # Perfect: only the eps keeps it finite, 10 log10((4 + 1e-8) / 1e-8) = 10 log10(400000001).
    assert nsdr(reference, reference.clone()) == pytest.approx(86.0205999241, abs=1e-10)
    # Silence as the estimate: the error is the reference itself, exactly 0 dB.
    assert nsdr(reference, torch.zeros_like(reference)) == 0.0
    assert nsdr(torch.zeros(2, 3), torch.zeros(2, 3)) == 0.0


def test_nsdr_sums_over_channels_in_float64():
    reference = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    estimate = torch.tensor([[3.0, 1.0], [0.0, 2.0]])  # error energy 1 + 4 = 5, signal 25
    expected = 10 * math.log10((25 + 1e-8) / (5 + 1e-8))
    assert nsdr(reference, estimate) == pytest.approx(expected, abs=1e-12)
    # Float64 sums: float32 ones would be off by ~1e-6 dB here.
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 200_000, generator=generator)
    estimate = reference + 0.3 * torch.randn(2, 200_000, generator=generator)
    ref64, est64 = reference.numpy().astype(np.float64), estimate.numpy().astype(np.float64)
    expected = 10 * math.log10(((ref64**2).sum() + 1e-8) / (((ref64 - est64) ** 2).sum() + 1e-8))
    assert nsdr(reference, estimate) == pytest.approx(expected, abs=1e-10)
    with pytest.raises(ValueError, match=r"reference \(1, 4\) and estimate \(1, 3\) differ"):
        nsdr(torch.ones(1, 4), torch.ones(1, 3))


def test_baseline_nsdr():
    stems = torch.tensor(
        [
            [[1.0, 1.0]],  # energy 2; estimate (mix / 2) = [1, 1.5]: error 0.25
            [[1.0, 2.0]],  # energy 5; error 0 + 0.25
        ]
    )
    mixture = stems.sum(0)
    assert baseline_nsdr(mixture, stems) == pytest.approx(
        [10 * math.log10((2 + 1e-8) / (0.25 + 1e-8)), 10 * math.log10((5 + 1e-8) / (0.25 + 1e-8))]
    )
    # Equal sources: mixture / S is exact.
    same = torch.ones(4, 2, 10)
    assert baseline_nsdr(same.sum(0), same) == pytest.approx([10 * math.log10(20 / 1e-8 + 1)] * 4)


def test_report_mean_and_median():
    report = EvalReport(
        model="m",
        sources=["a", "b"],
        nsdr={"x": {"a": 1.0, "b": 4.0}, "y": {"a": 2.0, "b": 5.0}, "z": {"a": 6.0, "b": 9.0}},
    )
    assert report.tracks == ["x", "y", "z"]
    assert report.mean == {"a": 3.0, "b": 6.0}
    assert report.median == {"a": 2.0, "b": 5.0}
    assert report.sdr_mean is None and report.sdr_median is None


# --- a tiny dataset ------------------------------------------------------------------------------


def write_dataset(root: Path, tracks: dict[str, tuple[float, int]], sources=MUSDB, split="test"):
    """Tracks of (seconds, channels) whose mixture is the sum of random-tone stems."""
    for index, (name, (seconds, channels)) in enumerate(tracks.items()):
        rng = np.random.default_rng(index)
        frames = int(seconds * RATE)
        t = np.arange(frames) / RATE
        folder = root / split / name
        folder.mkdir(parents=True)
        stems = []
        for number, source in enumerate(sources):
            tone = np.sin(2 * np.pi * (110 * (number + 1)) * t)[:, None]
            stem = 0.05 * (tone + 0.3 * rng.standard_normal((frames, channels)))
            stems.append(stem.astype(np.float32))
            sf.write(folder / f"{source}.wav", stems[-1], RATE, subtype="FLOAT")
        sf.write(folder / "mixture.wav", np.sum(stems, axis=0), RATE, subtype="FLOAT")
    return root


TRACKS = {"first song": (0.9, 2), "mono song": (1.2, 1), "two chunks": (2.1, 2)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("musdb"), TRACKS)


def htsep_eval(*args: str):
    return runner.invoke(app, ["eval", *args])


def test_eval_json_equals_nsdr_of_separator_stems(dataset, small_checkpoint):
    th_path = small_checkpoint[0]
    result = htsep_eval(str(dataset), "-n", str(th_path), "--json", "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    record = json.loads(result.stdout)
    assert record["dataset"] == str(dataset) and record["split"] == "test"
    assert record["model"] == Separator(str(th_path)).name
    assert record["sources"] == MUSDB
    assert list(record["tracks"]) == sorted(TRACKS)
    assert all(list(scores) == MUSDB for scores in record["tracks"].values())

    separator = Separator(str(th_path), shifts=1, seed=0, progress=False)
    _, tracks = find_tracks(dataset, "test")
    expected = {}
    for track in tracks:
        mixture, stems = load_track(track, MUSDB)
        estimates = separator.separate_tensor(mixture, RATE, all_sources=True)
        assert estimates["vocals"].shape == stems[0].shape  # mono in, mono out
        expected[track.name] = {s: nsdr(stems[i], estimates[s]) for i, s in enumerate(MUSDB)}
    for name, scores in expected.items():
        assert record["tracks"][name] == pytest.approx(scores, abs=1e-9), name
    for source in MUSDB:
        values = [scores[source] for scores in expected.values()]
        assert record["mean"][source] == pytest.approx(float(np.mean(values)), abs=1e-9)
        assert record["median"][source] == pytest.approx(float(np.median(values)), abs=1e-9)
    # A random model is no separator: the scores are finite but not the perfect ~86 dB.
    assert all(-60 < v < 40 for scores in record["tracks"].values() for v in scores.values())


def test_eval_equals_nsdr_of_htsep_separate_files(dataset, small_checkpoint, tmp_path):
    """Against the stems `htsep separate` writes (the streaming path: equal within ~1e-6)."""
    th_path = small_checkpoint[0]
    track = dataset / "test" / "two chunks"
    out = tmp_path / "out"
    common = ["-n", str(th_path), "--shifts", "0", "-q"]
    done = runner.invoke(
        app,
        ["separate", *common, "--float32", "--clip-mode", "none", "-o", str(out), "--filename",
         "{stem}.{ext}", str(track / "mixture.wav")],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    result = htsep_eval(str(dataset), *common, "--json", "--tracks", "two chunks")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert list(record["tracks"]) == ["two chunks"]
    folder = out / Separator(str(th_path)).name
    for source in MUSDB:
        reference, _ = sf.read(track / f"{source}.wav", dtype="float32", always_2d=True)
        estimate, _ = sf.read(folder / f"{source}.wav", dtype="float32", always_2d=True)
        value = nsdr(torch.from_numpy(reference.T), torch.from_numpy(estimate.T))
        assert record["tracks"]["two chunks"][source] == pytest.approx(value, abs=1e-4)


def test_eval_table(dataset, small_checkpoint):
    th_path = small_checkpoint[0]
    args = [str(dataset), "-n", str(th_path), "--shifts", "0", "--tracks", "two chunks,mono song"]
    result = htsep_eval(*args)
    assert result.exit_code == 0, result.output
    record = json.loads(htsep_eval(*args, "--json", "-q").stdout)
    lines = result.stdout.splitlines()
    assert lines[0] == f"nSDR (dB) of {record['model']} on {dataset / 'test'}"
    assert lines[1].split() == ["track", *MUSDB]
    rows = {line[:10].strip(): line[10:].split() for line in lines[2:] if set(line) != {"-"}}
    assert list(rows) == ["mono song", "two chunks", "mean", "median"]
    for name in ["mono song", "two chunks"]:
        assert rows[name] == [f"{record['tracks'][name][s]:.2f}" for s in MUSDB]
    assert rows["mean"] == [f"{record['mean'][s]:.2f}" for s in MUSDB]
    # Progress goes to stderr, one line per track.
    assert "[1/2] mono song: drums " in result.stderr
    assert "[2/2] two chunks: drums " in result.stderr


def test_model_with_more_sources_scores_the_common_ones(tmp_path, small_checkpoint):
    root = write_dataset(tmp_path / "two", {"a": (0.5, 2)}, sources=["vocals", "drums"])
    result = htsep_eval(str(root), "-n", str(small_checkpoint[0]), "--json", "-q")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["sources"] == ["drums", "vocals"]
    assert list(record["tracks"]["a"]) == ["drums", "vocals"]
    # Said on stderr (a lone track whose bass.wav was lost looks the same), unless --sources
    # chose what to score.
    assert result.stderr.splitlines() == [
        "htsep: warning: bass, other: no stem in the dataset's tracks, so not scored "
        "(--sources lists what to score)"
    ]
    chosen = htsep_eval(str(root), "-n", str(small_checkpoint[0]), "--json", "-q",
                        "--sources", "drums,vocals")  # fmt: skip
    assert chosen.exit_code == 0 and chosen.stderr == "", chosen.output


def test_dataset_source_the_model_lacks_is_a_usage_error(tmp_path, small_checkpoint):
    root = write_dataset(tmp_path / "six", {"a": (0.5, 2)}, sources=[*MUSDB, "piano"])
    result = htsep_eval(str(root), "-n", str(small_checkpoint[0]))
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("htsep: error: model ") and "has no source 'piano'" in line
    # --sources restricts the scoring to what the model has.
    result = htsep_eval(str(root), "-n", str(small_checkpoint[0]), "--sources", "bass", "--json")
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.stdout)["tracks"]["a"]) == ["bass"]


def test_evaluate_refuses_a_source_the_model_lacks(tmp_path, small_checkpoint):
    root = write_dataset(tmp_path / "six", {"a": (0.5, 2)}, sources=["drums", "piano"])
    sources, tracks = find_tracks(root, "test")
    separator = Separator(str(small_checkpoint[0]), progress=False)
    with pytest.raises(UsageError, match="has no source 'piano'"):
        evaluate(separator, tracks, sources)
    with pytest.raises(DatasetError, match="no tracks to evaluate"):
        evaluate(separator, [], ["drums"])


@pytest.mark.parametrize(
    ("setup", "args", "code", "message"),
    [
        (None, [], 1, "{root}: no such dataset folder"),
        ("file", [], 1, "{root}: is a file, not a dataset folder"),
        ("empty", [], 1, "{root}/test: no track folders"),
        ("ok", ["--split", "train"], 1, "{root}: no train/ folder"),
        ("missing", [], 1, "{root}/test: no mixture.wav or mixture.flac in track a"),
        ("ok", ["--tracks", "a,zzz"], 2, "--tracks: no track 'zzz' in {root}/test"),
        ("ok", ["--split", "valid"], 2, "Invalid value for '--split'"),
    ],
)
def test_bad_dataset_is_one_line_and_nonzero(
    tmp_path, small_checkpoint, setup, args, code, message
):
    root = tmp_path / "data"
    if setup == "file":
        root.write_text("not a folder")
    if setup == "empty":
        (root / "test").mkdir(parents=True)
    elif setup in ("ok", "missing"):
        write_dataset(root, {"a": (0.3, 2)})
    if setup == "missing":
        (root / "test" / "a" / "mixture.wav").unlink()
    result = htsep_eval(str(root), "-n", str(small_checkpoint[0]), *args)
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    if message is not None:
        (line,) = result.stderr.splitlines()
        assert line.startswith("htsep: error: " + message.format(root=root))


@pytest.mark.parametrize("option", ["-n", "--repo", "-d", "--tracks", "--sources"])
def test_an_empty_option_is_a_usage_error_as_in_separate(dataset, option):
    """-d "" ran on the default device, --repo "" searched the current folder."""
    result = htsep_eval(str(dataset), "-n", "htsep-tiny", option, "")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert "empty value (an unset variable in a script?)" in line


def test_unknown_model_is_a_usage_error(dataset):
    result = htsep_eval(str(dataset), "-n", "no_such_model")
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("htsep: error: unknown model 'no_such_model'")


def test_names_from_files_are_escaped_in_the_table_and_progress(tmp_path, small_checkpoint):
    """A track named with a newline, an escape sequence and a byte that is not UTF-8 is one
    row and one progress line, escaped as error lines are; --json keeps the name as it is."""
    track = os.fsdecode(b"bad\nname\x1b[31m\xff")
    root = write_dataset(tmp_path / "odd", {"a": (0.3, 2)}, sources=["drums", "vocals"])
    (root / "test" / "a").rename(root / "test" / track)  # soundfile takes no such name
    args = [str(root), "-n", str(small_checkpoint[0]), "--shifts", "0"]
    result = htsep_eval(*args)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\udcff" not in result.output
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["track", "drums", "vocals"]
    assert lines[2].startswith("bad\\nname\\x1b[31m\\xff  ")
    assert [line.split()[0] for line in lines[4:]] == ["mean", "median"]
    assert "[1/1] bad\\nname\\x1b[31m\\xff: drums " in result.stderr.splitlines()[-1]
    record = json.loads(htsep_eval(*args, "--json", "-q").stdout)
    assert list(record["tracks"]) == [track]
    # The library's table leaves names to its caller's escape, source names too.
    report = EvalReport(model="m", sources=["a\nb"], nsdr={"t\r": {"a\nb": 1.0}})
    assert report.table(escape=printable).splitlines() == [
        "track      a\\nb",
        "t\\r        1.00",
        "---------------",
        "mean       1.00",
        "median     1.00",
    ]


@pytest.mark.parametrize("json_output", [True, False])
def test_a_closed_standard_output_is_a_usage_error(tmp_path, json_output):
    """As for separate: the scores would be lost, so nothing is done (no model is loaded)."""
    done = subprocess.run(
        [sys.executable, "-m", "htsep", "eval", str(tmp_path / "nowhere"), "-n", "no_such"]
        + ["--json"] * json_output,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.close(1),
    )
    what = "--json" if json_output else "the score table"
    assert (done.returncode, done.stderr) == (
        2,
        f"htsep: error: {what} writes to standard output, which is closed\n",
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("vocals,vocals", "--sources 'vocals,vocals': vocals given twice"),
        ("bass,mixture", "--sources 'bass,mixture': 'mixture' is the mixture, not a source"),
        (" , ", "--sources ' , ': expected comma-separated names"),
    ],
)
def test_bad_sources_are_usage_errors(dataset, value, message):
    result = htsep_eval(str(dataset), "-n", "no_such_model", "--sources", value)
    assert (result.exit_code, result.stderr) == (2, f"htsep: error: {message}\n")


def test_seed_without_shifts_is_ignored_with_a_warning(dataset, small_checkpoint):
    args = [str(dataset), "-n", str(small_checkpoint[0]), "--shifts", "0", "--tracks", "mono song"]
    plain = htsep_eval(*args, "--json", "-q")
    seeded = htsep_eval(*args, "--json", "-q", "--seed", "5")
    assert seeded.exit_code == 0, seeded.output
    assert seeded.stderr == (
        "htsep: warning: --seed chooses the random shifts, and --shifts 0 makes none; ignored\n"
    )
    assert seeded.stdout == plain.stdout
    # A seed with shifts is no warning.
    assert htsep_eval(*args, "--json", "-q", "--shifts", "1", "--seed", "5").stderr == ""


def test_more_channels_than_the_model_takes_is_refused_before_any_work(tmp_path, small_checkpoint):
    """eval has no --downmix: the message must not advise it. Checked from the headers before
    the first track is separated (no progress line)."""
    root = write_dataset(tmp_path / "surround", {"a": (0.3, 2), "b": (0.3, 3)})
    result = htsep_eval(str(root), "-n", str(small_checkpoint[0]))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"htsep: error: {root / 'test' / 'b' / 'mixture.wav'}: 3 audio channels, the model takes 2"
    )
    assert "[1/2]" not in result.stderr


# --- museval (optional) --------------------------------------------------------------------------


def test_museval_missing_is_a_clear_usage_error(dataset, small_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "museval", None)  # import museval now raises ImportError
    result = htsep_eval(str(dataset), "-n", str(small_checkpoint[0]), "--museval")
    assert result.exit_code == 2
    assert result.stderr == (
        "htsep: error: museval's SDR needs the museval package: pip install 'htsep[eval]'\n"
    )


def test_museval_sdr(dataset, small_checkpoint):
    museval = pytest.importorskip("museval")
    reference = torch.randn(2, 2, 3 * RATE, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(reference.shape, generator=torch.Generator().manual_seed(1))
    estimate = reference + 0.1 * noise
    values = museval_sdr(reference, estimate, RATE)
    sdr = museval.evaluate(
        reference.double().transpose(1, 2).numpy(),
        estimate.double().transpose(1, 2).numpy(),
        win=RATE,
        hop=RATE,
    )[0]
    assert values == pytest.approx(np.median(sdr, axis=1).tolist())
    assert all(15 < v < 25 for v in values)  # signal 1, noise 0.01: about 20 dB

    result = htsep_eval(
        str(dataset), "-n", str(small_checkpoint[0]), "--museval", "--json", "-q", "--tracks",
        "two chunks",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    framewise = record["museval"]
    assert list(framewise["tracks"]) == ["two chunks"]
    assert list(framewise["tracks"]["two chunks"]) == MUSDB
    assert framewise["median"] == framewise["tracks"]["two chunks"]
