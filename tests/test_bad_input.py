"""Every bad input: one line on stderr, a non-zero exit code, nothing half-written."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from test_separate import RATE, htsep, repo, write_clip  # noqa: F401  (repo is a fixture)

MODEL = ["-n", "aaaa0001", "-q"]


def _errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("htsep: error:")]


def _assert_one_line_failure(result, code: int, phrase: str) -> None:
    assert result.exit_code == code, result.output
    errors = _errors(result)
    assert len(errors) == 1 and phrase in errors[0], result.stderr
    assert "Traceback" not in result.output


def _nothing_written(out) -> bool:
    return not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


@pytest.fixture
def run(tmp_path, repo):  # noqa: F811
    out = tmp_path / "out"

    def invoke(*args):
        return htsep("--repo", str(repo), *MODEL, "-o", str(out), *map(str, args))

    invoke.out = out
    return invoke


def test_missing_file(run, tmp_path):
    _assert_one_line_failure(run(tmp_path / "nope.wav"), 1, "nope.wav: no such file or folder")
    assert _nothing_written(run.out)


def test_missing_file_exit_code_of_the_real_command(tmp_path, repo):  # noqa: F811
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "htsep.cli",
            "separate",
            "--repo",
            str(repo),
            *MODEL,
            str(tmp_path / "nope.wav"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == (
        f"htsep: error: {tmp_path / 'nope.wav'}: no such file or folder"
    )


def test_folder_without_audio(run, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "readme.txt").write_text("hi")
    _assert_one_line_failure(run(folder), 1, "no audio files in this folder")


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "nan", "inf", "no_frames"])
def test_unreadable_audio(run, tmp_path, kind):
    path = tmp_path / f"{kind}.wav"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        write_clip(path, 1.0, subtype="PCM_16")
        path.write_bytes(path.read_bytes()[:60])
    elif kind == "text":
        path.write_text("this is a shopping list, not a song\n" * 20)
    elif kind in ("nan", "inf"):
        audio = np.zeros((RATE, 2), np.float32)
        audio[100, 0] = np.nan if kind == "nan" else np.inf
        sf.write(path, audio, RATE, subtype="FLOAT")
    else:
        sf.write(path, np.zeros((0, 2), np.float32), RATE, subtype="FLOAT")
    result = run(path)
    assert result.exit_code == 1, result.output
    errors = _errors(result)
    assert len(errors) == 1 and str(path) in errors[0]
    if kind in ("nan", "inf"):
        assert "NaN or infinite" in errors[0]
    assert _nothing_written(run.out)


def test_more_than_two_channels(run, tmp_path):
    path = tmp_path / "surround.wav"
    write_clip(path, 0.5, channels=6)
    _assert_one_line_failure(run(path), 1, "--downmix")
    assert _nothing_written(run.out)
    result = run("--downmix", "--stems", "vocals", path)
    assert result.exit_code == 0, result.output
    info = sf.info(run.out / "aaaa0001" / "surround" / "vocals.wav")
    assert info.channels == 1 and info.frames == RATE // 2


def test_unwritable_output_folder(tmp_path, repo):  # noqa: F811
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    result = htsep("--repo", str(repo), *MODEL, "-o", str(blocker / "out"), str(clip))
    _assert_one_line_failure(result, 1, "song.wav")
    assert blocker.read_text() == "x"


def test_unknown_model_suggests_names(tmp_path):
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    result = htsep("-n", "htdemucs_fx", str(clip))
    _assert_one_line_failure(result, 2, "htdemucs_ft")


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["--segment", "2.5"], "longer than the model's segment"),
        (["--segment", "-1"], "--segment"),
        (["--two-stems", "kazoo"], "kazoo"),
        (["--stems", "vocals,kazoo"], "kazoo"),
        (["--shard", "3/2"], "--shard"),
        (["--shard", "one/two"], "--shard"),
        (["--shard", "0/4"], "--shard"),
        (["--int24", "--float32"], "exclude each other"),
        (["--flac", "--float32"], "--float32"),
        (["--filename", "{track}/{instrument}.{ext}"], "--filename"),
        (["-d", "tpu"], "device"),
    ],
)
def test_usage_errors_exit_2(run, tmp_path, args, phrase):
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    _assert_one_line_failure(run(*args, clip), 2, phrase)
    assert _nothing_written(run.out)


def test_output_never_overwrites_input(run, tmp_path):
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    before = clip.read_bytes()
    result = run("-o", tmp_path, "--filename", "../song.{ext}", "--stems", "vocals", clip)
    _assert_one_line_failure(result, 1, "would overwrite an input file")
    assert clip.read_bytes() == before


def test_one_bad_file_does_not_stop_the_batch(run, tmp_path):
    good = tmp_path / "good.wav"
    write_clip(good, 0.5)
    bad = tmp_path / "bad.wav"
    bad.write_text("nope")
    result = run(bad, good)
    assert result.exit_code == 1
    assert len(_errors(result)) == 1
    assert (run.out / "aaaa0001" / "good" / "vocals.wav").exists()
