"""Every bad input: one line on stderr, a non-zero exit code, nothing half-written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import RATE, app, htsep, runner, write_clip

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
def run(tmp_path, repo):
    out = tmp_path / "out"

    def invoke(*args):
        return htsep("--repo", str(repo), *MODEL, "-o", str(out), *map(str, args))

    invoke.out = out
    invoke.repo = repo
    return invoke


def test_missing_file(run, tmp_path):
    _assert_one_line_failure(run(tmp_path / "nope.wav"), 1, "nope.wav: no such file or folder")
    assert _nothing_written(run.out)


def test_missing_file_exit_code_of_the_real_command(tmp_path, repo):
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


@pytest.mark.parametrize("value", ["mkl", "", "oneDNN2"])
def test_a_bad_products_variable_is_one_line_before_any_work(run, tmp_path, monkeypatch, value):
    from htsep.model import kernels

    write_clip(tmp_path / "a.wav", 0.5)
    monkeypatch.setenv(kernels.PRODUCTS_VARIABLE, value + " ")
    kernels.cpu_products.cache_clear()
    try:
        result = run(tmp_path / "a.wav")
    finally:
        monkeypatch.delenv(kernels.PRODUCTS_VARIABLE)
        kernels.cpu_products.cache_clear()
    if not value:  # set but empty, as an unset shell variable leaves it: the automatic choice
        assert result.exit_code == 0, result.output
        return
    _assert_one_line_failure(result, 2, f"HTSEP_CPU_PRODUCTS={value.lower()!r}: expected")
    assert _nothing_written(run.out)


@pytest.mark.parametrize("inputs,status", [(["a.wav"], 0), (["a.wav", "nope.wav"], 1)])
def test_the_real_command_exits_fast_but_completely(tmp_path, repo, inputs, status):
    """Once torch is loaded the command skips the interpreter's teardown, but not what an
    exit owes: atexit handlers run, every JSON line reaches the pipe, the status is kept."""
    write_clip(tmp_path / "a.wav", 0.5)
    argv = ["htsep", "separate", "--repo", str(repo), *MODEL, "--json", "-o", "out", *inputs]
    code = (
        "import atexit, sys; atexit.register(lambda: print('atexit ran', file=sys.stderr)); "
        f"sys.argv = {argv!r}; from htsep.cli import main; main()"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == status, done.stderr
    assert done.stderr.splitlines()[-1] == "atexit ran"
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["input"] for r in records] == inputs
    assert records[0]["status"] == "ok" and len(records[0]["outputs"]) == 4


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


def test_unwritable_output_folder(tmp_path, repo):
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    result = htsep("--repo", str(repo), *MODEL, "-o", str(blocker / "out"), str(clip))
    # Said once, before the model is loaded, naming the part in the way (not per track).
    _assert_one_line_failure(result, 1, f"{blocker} is a file, not a folder")
    assert "cannot create the output folder" in result.stderr
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
        (["--shard", "\u0661/\u0662"], "--shard"),  # int() takes Arabic-Indic digits
        (["--shard", "1_0/2_0"], "--shard"),  # and underscores
        (["--shard", "1/10000000000"], "too large"),  # it is K/N, just too many slices
        (["--shifts", "1_0"], "not a plain whole number"),  # int() reads 10
        (["--overlap", "\u0661.5"], "not a plain number"),
        (["--int24", "--float32"], "exclude each other"),
        (["--flac", "--float32"], "--float32"),
        (["--filename", "{track}/{instrument}.{ext}"], "--filename"),
        (["-d", "tpu"], "device"),
        # An unset variable in a number option: click's generic "is not a valid float".
        (["--segment", ""], "--segment: empty value (an unset variable in a script?)"),
        (["--overlap= "], "--overlap: empty value"),
        (["-j", ""], "-j: empty value"),
        (["-d", "cpu:1"], "there is one CPU device"),  # it ran on the CPU
    ],
)
def test_usage_errors_exit_2(run, tmp_path, args, phrase):
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    _assert_one_line_failure(run(*args, clip), 2, phrase)
    assert _nothing_written(run.out)


def test_output_never_overwrites_input(run, tmp_path):
    clip = run.out / "aaaa0001" / "song.wav"  # an input inside the tree htsep writes
    write_clip(clip, 0.5)
    before = clip.read_bytes()
    result = run("--filename", "song.{ext}", "--stems", "vocals", clip)
    _assert_one_line_failure(result, 1, "would overwrite an input file")
    assert clip.read_bytes() == before
    assert [p.name for p in run.out.rglob("*") if p.is_file()] == ["song.wav"]


def test_one_bad_file_does_not_stop_the_batch(run, tmp_path):
    good = tmp_path / "good.wav"
    write_clip(good, 0.5)
    bad = tmp_path / "bad.wav"
    bad.write_text("nope")
    result = run(bad, good)
    assert result.exit_code == 1
    assert len(_errors(result)) == 1
    assert (run.out / "aaaa0001" / "good" / "vocals.wav").exists()


# --- options are checked before any work (exit 2) ------------------------------------------------


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["--segment", "nan"], "--segment"),
        (["--segment", "inf"], "--segment"),
        (["--segment", "0.001"], "too short"),
        (["--seed", "99999999999999999999"], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--shifts", "-1"], "--shifts"),
        (["--shifts", "100000"], "--shifts"),
        (["--overlap", "nan"], "--overlap"),
        (["--overlap", "1"], "--overlap"),
        (["--overlap", "-0.5"], "--overlap"),
        (["--overlap", "0.99999"], "leaves no step between chunks"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "99999999"], "--batch-size"),
        (["--jobs", "-1"], "--jobs"),
        (["--jobs", "100000"], "--jobs"),
        (["--mp3", "--mp3-bitrate", "1000"], "--mp3-bitrate"),
        (["--mp3", "--mp3-bitrate", "-5"], "--mp3-bitrate"),
        (["--mp3", "--int24"], "--int24"),
        (["--mp3", "--float32"], "--float32"),
        (["--precision", "fp8"], "precision"),
        (["--filename", "{track.real}/{stem}.{ext}"], "--filename"),
        (["--filename", "{track[0]}/{stem}.{ext}"], "--filename"),
        (["--filename", "{stem!r}.{ext}"], "--filename"),
        (["--filename", "{track:>9}/{stem}.{ext}"], "--filename"),
        (["--filename", "{}/{stem}.{ext}"], "--filename"),
        (["--filename", "{track}/{stem"], "--filename"),
        (["--filename", "{track}/{stem}"], "must end with"),
        (["--filename", "{track}/{stem}.flac"], "must end with"),
        (["--filename", "/tmp/{track}/{stem}.{ext}"], "relative"),
        (["--filename", "../../{track}/{stem}.{ext}"], "relative"),
        (["--filename", "{track}.{ext}"], "add {stem}"),
        (["--filename", ""], "--filename"),
        (["-o", ""], "empty"),
        (["-n", ""], "empty"),
        (["--stems", ""], "empty"),
        (["--stems", " , "], "--stems"),
        (["--shard", ""], "empty"),
    ],
)
def test_bad_option_values_exit_2_before_any_work(run, tmp_path, args, phrase):
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    _assert_one_line_failure(run(*args, clip), 2, phrase)
    assert _nothing_written(run.out)


@pytest.mark.parametrize(
    "args,shown",
    [
        (["--overlap", "0.99999999"], "--overlap 0.99999999 leaves"),
        (["--overlap", "1.0000000001"], "got 1.0000000001"),
        (["--segment", "0.99999999"], "--segment 0.99999999 s is too short"),
        (["--segment", "1e-300"], "--segment 1e-300 s is too short"),
        (
            ["--segment", "1.50000001"],
            "--segment 1.50000001 is longer than the model's segment (1.5",
        ),
    ],
)
def test_a_refused_value_is_shown_as_given(run, tmp_path, args, shown):
    """Six significant digits showed --overlap 0.99999999 as "--overlap 1", a value that was
    not refused for the reason given."""
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    _assert_one_line_failure(run(*args, clip), 2, shown)


@pytest.mark.parametrize(
    "kind,phrase",
    [
        ("loop", "out is a symbolic link loop"),
        ("two-link loop", "out is a symbolic link loop"),
        ("dangling", "out is a symbolic link to"),
        ("file", "out is a file, not a folder"),
    ],
)
def test_an_output_folder_in_the_way_is_named(tmp_path, repo, kind, phrase):
    """-o through a link loop was a RuntimeError traceback (Path.resolve on Python 3.11), and
    -o a link to nothing failed every track with "File exists"."""
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    out = tmp_path / "out"
    if kind == "loop":
        out.symlink_to("out")
    elif kind == "two-link loop":
        out.symlink_to("other")
        (tmp_path / "other").symlink_to("out")
    elif kind == "dangling":
        out.symlink_to(tmp_path / "gone" / "folder")
    else:
        out.write_bytes(b"mine")
    result = htsep("--repo", str(repo), *MODEL, "-o", str(out / "sub"), str(clip))
    _assert_one_line_failure(result, 1, phrase)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["song.wav", "out"] + (["other"] if kind == "two-link loop" else [])
    )
    if kind == "file":
        assert out.read_bytes() == b"mine"


def test_a_failure_line_names_its_track_when_the_message_starts_like_it(
    tmp_path, repo, monkeypatch
):
    """An error about "aaaa0001/aaaa000/..." lost its "aaaa000: " prefix: the name of the file
    read was taken off the message when the message only began with the same characters."""
    monkeypatch.chdir(tmp_path)
    write_clip(tmp_path / "x.wav", 0.5)
    (tmp_path / "x.wav").rename(tmp_path / "aaaa000")  # no extension: read by its content
    (tmp_path / "aaaa0001").mkdir()
    (tmp_path / "aaaa0001" / "aaaa000").write_text("x")  # where the track's folder would go
    result = htsep("--repo", str(repo), *MODEL, "-o", ".", "aaaa000")
    _assert_one_line_failure(result, 1, "aaaa000 is a file, not a folder")
    assert _errors(result)[0].startswith("htsep: error: aaaa000: aaaa0001/"), result.stderr
    assert (tmp_path / "aaaa0001" / "aaaa000").read_text() == "x"


def test_an_output_folder_under_an_input_file_is_refused_before_the_model(
    tmp_path, repo, monkeypatch
):
    """-o song.wav/x: said once, naming the file in the way, before any track is run."""
    monkeypatch.chdir(tmp_path)
    write_clip(tmp_path / "song.wav", 0.5)
    result = htsep("--repo", str(repo), *MODEL, "-o", "song.wav/x", "song.wav")
    _assert_one_line_failure(result, 1, "song.wav is a file, not a folder")
    assert _errors(result)[0].startswith(
        "htsep: error: cannot create the output folder song.wav/x/"
    )
    assert "[1/1]" not in result.stderr


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_an_input_that_is_a_broken_link_is_named(run, tmp_path, kind):
    link = tmp_path / "song.wav"
    link.symlink_to("song.wav" if kind == "loop" else tmp_path / "gone.wav")
    phrase = "a symbolic link loop" if kind == "loop" else "a symbolic link to"
    _assert_one_line_failure(run(link), 1, f"song.wav: {phrase}")
    assert _nothing_written(run.out)


def test_an_empty_input_argument_is_a_usage_error(run, tmp_path, monkeypatch):
    """`htsep separate "$FILE"` with FILE unset must not separate the current folder."""
    write_clip(tmp_path / "here" / "song.wav", 0.5)
    monkeypatch.chdir(tmp_path / "here")
    _assert_one_line_failure(run(""), 2, "empty")
    _assert_one_line_failure(run(tmp_path / "here" / "song.wav", " "), 2, "empty")
    assert _nothing_written(run.out)


def test_options_that_would_be_ignored_are_warned_about(run, tmp_path):
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    result = run("--stems", "vocals", "--mp3-bitrate", "128", "--other-method", "minus", clip)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("htsep: warning:")]
    assert warnings == [
        "htsep: warning: --mp3-bitrate applies only with --mp3; ignored",
        "htsep: warning: --other-method applies only with --two-stems; ignored",
    ]


def test_a_warning_names_only_the_options_given(run, tmp_path):
    """--mp3-preset alone was warned about as "--mp3-bitrate and --mp3-preset apply only with
    --mp3", and with --mp3 it was taken without a word though it changes nothing (libsndfile's
    encoder has no preset: --mp3-preset 2 and 7 gave the same bytes)."""
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    alone = run("--stems", "vocals", "--mp3-preset", "3", clip)
    assert alone.exit_code == 0, alone.output
    assert "htsep: warning: --mp3-preset applies only with --mp3; ignored" in alone.stderr
    assert "--mp3-bitrate" not in alone.stderr
    files = {}
    for preset in ("2", "7"):
        out = tmp_path / preset
        done = htsep("--repo", str(run.repo), *MODEL, "-o", str(out), "--stems", "vocals",
                     "--mp3", "--mp3-preset", preset, str(clip))  # fmt: skip
        assert done.exit_code == 0, done.output
        assert "--mp3-preset has no effect" in done.stderr
        files[preset] = next(out.rglob("*.mp3")).read_bytes()
    assert files["2"] == files["7"]  # what the warning says


def test_an_empty_shard_is_not_a_failure(run, tmp_path):
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    result = htsep(
        "--repo", str(run.repo), *MODEL[:2], "-o", str(run.out), "--shard", "3/4", str(clip)
    )
    assert result.exit_code == 0, result.output
    assert _errors(result) == []
    assert result.stderr.splitlines() == ["htsep: shard 3/4 is empty (1 input); nothing to do"]
    assert _nothing_written(run.out)


def test_an_mp3_rate_problem_fails_before_the_networks_run(run, tmp_path, monkeypatch):
    import htsep.apply

    def no_network(*args, **kwargs):
        raise AssertionError("the networks ran")

    monkeypatch.setattr(htsep.apply.SeparationStream, "take", no_network)
    clip = tmp_path / "odd.wav"
    write_clip(clip, 0.5, rate=7000)
    result = run("--mp3", "--stems", "vocals", clip)
    _assert_one_line_failure(result, 1, "mp3 does not support 7000 Hz")
    assert _nothing_written(run.out)


# --- what a user has is never replaced ------------------------------------------------------------


def test_two_tracks_writing_one_file_is_a_usage_error_before_any_work(run, tmp_path):
    write_clip(tmp_path / "a" / "01.wav", 0.5, seed=1)
    write_clip(tmp_path / "b" / "01.wav", 0.5, seed=2)
    write_clip(tmp_path / "a" / "00.wav", 0.5, seed=3)
    for extra in ([], ["--skip-existing"], ["--overwrite"]):
        result = run(*extra, tmp_path / "a", tmp_path / "b")
        _assert_one_line_failure(result, 2, "would be written for both")
        assert _nothing_written(run.out)


@pytest.mark.parametrize("moment", ["before the track", "at the rename"])
def test_a_stem_that_appears_while_its_track_runs_is_not_replaced(
    run, tmp_path, monkeypatch, moment
):
    from htsep import files
    from htsep import separator as separator_module

    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    target = run.out / "aaaa0001" / "song" / "bass.wav"

    def someone_else_writes(path) -> None:
        if Path(path) == target and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"another program's file")

    if moment == "before the track":
        original = separator_module.write_stems

        def staged(separator, path, outputs, **options):
            someone_else_writes(target)
            return original(separator, path, outputs, **options)

        monkeypatch.setattr(separator_module, "write_stems", staged)
    else:
        rename = files.rename_no_replace

        def racing_rename(source, destination):
            someone_else_writes(destination)
            return rename(source, destination)

        monkeypatch.setattr(files, "rename_no_replace", racing_rename)
    for extra in ([], ["--clip-mode", "none"], ["--no-pipeline", "--int24"]):
        result = run(*extra, clip)
        _assert_one_line_failure(result, 1, "bass.")
        assert target.read_bytes() == b"another program's file"
        assert not [p.name for p in target.parent.iterdir() if p.name.startswith(".")]
        for other in target.parent.iterdir():
            other.unlink()
    # With --overwrite the file is replaced, as asked.
    result = run("--overwrite", clip)
    assert result.exit_code == 0, result.output
    assert sf.info(target).frames == RATE // 2


def test_skip_existing_keeps_the_finished_stems_of_an_unfinished_track(run, tmp_path):
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.7)
    assert run(clip).exit_code == 0
    folder = run.out / "aaaa0001" / "song"
    clean = {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / "bass.wav").unlink()
    (folder / "other.wav").unlink()
    kept = {name: (folder / name).stat().st_ino for name in ("drums.wav", "vocals.wav")}
    result = run("--skip-existing", clip)
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == clean
    assert {name: (folder / name).stat().st_ino for name in kept} == kept


def test_two_processes_on_one_output_folder_never_replace_each_others_stems(tmp_path, repo):
    clip = tmp_path / "song.wav"
    write_clip(clip, 2.0)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "htsep", "separate", "--repo", str(repo), "-n", "aaaa0001",
        "-q", "-o", str(out), str(clip),
    ]  # fmt: skip
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    codes = [first.wait(timeout=300), second.wait(timeout=300)]
    messages = first.stderr.read() + second.stderr.read()
    # One of them made every stem of this track; the other failed, saying so, without
    # replacing any file (each stem was created by exactly one process).
    assert sorted(codes) == [0, 1] or codes == [1, 1], (codes, messages)
    assert "exists" in messages and "Traceback" not in messages
    folder = out / "aaaa0001" / "song"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"{s}.wav" for s in ("drums", "bass", "other", "vocals"))
    for path in folder.iterdir():
        assert sf.info(path).frames == 2 * RATE


# --- every input is read correctly or refused in one line ----------------------------------------


def test_a_folder_input_inside_the_output_folder_is_searched(run, tmp_path, monkeypatch):
    write_clip(tmp_path / "songs" / "a.wav", 0.5)
    monkeypatch.chdir(tmp_path)
    result = run("-o", ".", "--stems", "vocals", "songs")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "aaaa0001" / "a" / "vocals.wav").is_file()
    # The tree htsep writes is not searched: a second run finds only the input.
    result = run("-o", ".", "--stems", "vocals", "--json", "--skip-existing", ".")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == ["songs/a.wav"]


@pytest.mark.parametrize("name", ["..wav", "...wav", ".wav", "....", "..."])
def test_dot_names_keep_their_stems_inside_the_model_folder(run, tmp_path, name):
    clip = tmp_path / "in" / name
    clip.parent.mkdir()
    write_clip(tmp_path / "in" / "x.wav", 0.5)
    (tmp_path / "in" / "x.wav").rename(clip)
    result = run("--stems", "vocals", clip)
    assert result.exit_code == 0, result.output
    written = [p for p in run.out.rglob("*") if p.is_file()]
    assert len(written) == 1
    folder = run.out / "aaaa0001"
    assert written[0].parent.parent == folder and written[0].parent.name not in (".", "..")


@pytest.mark.parametrize(
    "name,shown",
    [
        ("bad\nname\r.wav", "bad\\nname\\r.wav"),
        # C1 controls and Unicode's line and paragraph separators break lines too.
        ("bad\x85name\u2028x\u2029.wav", "bad\\u0085name\\u2028x\\u2029.wav"),
    ],
)
def test_a_line_break_in_a_file_name_keeps_the_error_on_one_line(run, tmp_path, name, shown):
    bad = tmp_path / name
    bad.write_text("not audio")
    result = run(bad)
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 2  # the error and the summary
    assert shown in _errors(result)[0]


@pytest.mark.parametrize(
    "name,template,phrase",
    [
        # {folder} is "." for a file named directly: ".{folder}" is "..".
        ("song.wav", ".{folder}/{stem}.{ext}", "with '.' or '..' as a part of the path"),
        ("song.wav", "x/.{folder}/.{folder}/{stem}.{ext}", "with '.' or '..' as a part"),
        # {trackext} is empty for a name without an extension: the path turns absolute.
        ("song", "{trackext}ESCAPE/{stem}.{ext}", "outside <out>/<model>"),
    ],
)
def test_template_values_cannot_lead_out_of_the_model_folder(run, tmp_path, name, template, phrase):
    """check_template tries sample values; the tracks' own values are checked when the batch
    is planned, before any work."""
    clip = tmp_path / "in" / name
    write_clip(tmp_path / "in" / "x.wav", 0.5)
    (tmp_path / "in" / "x.wav").rename(clip)
    template = template.replace("ESCAPE", str(tmp_path / "escaped"))
    result = run("--stems", "vocals", "--filename", template, clip)
    _assert_one_line_failure(result, 2, phrase)
    # The path shown is the one planned for every stem: "{stem}", not a placeholder's byte.
    (message,) = _errors(result)
    assert "/{stem}." in message and "\\x00" not in message and "\x00" not in message
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [clip]


def test_file_names_that_are_not_utf8_separate(run, tmp_path):
    """Names are bytes on Linux: one that is not UTF-8 (Latin-1 'café') is read and written
    like any other, in an output folder whose name is not UTF-8 either."""
    folder = tmp_path / "in"
    write_clip(folder / "ok.wav", 0.5)
    odd = folder / os.fsdecode(b"caf\xe9.wav")
    shutil.copyfile(folder / "ok.wav", odd)
    out = tmp_path / os.fsdecode(b"out\xff")
    result = htsep("--repo", str(run.repo), *MODEL, "-o", str(out), str(folder))
    assert result.exit_code == 0, result.output
    for track in (os.fsdecode(b"caf\xe9"), "ok"):
        assert sf.info(os.fsencode(out / "aaaa0001" / track / "vocals.wav")).frames == 4000


def test_an_input_name_too_long_for_the_file_system_fails_alone(run, tmp_path):
    good = tmp_path / "good.wav"
    write_clip(good, 0.5)
    for name in ("x" * 300 + ".wav", "x" * 300 + "/", "x" * 300 + "*.wav"):
        result = run(tmp_path / name, good, "--overwrite")
        _assert_one_line_failure(result, 1, "File name too long")
        assert (run.out / "aaaa0001" / "good" / "vocals.wav").exists()


@pytest.mark.parametrize("data", [b"", b"not audio at all\n" * 20])
def test_errors_about_standard_input_name_it_dash(tmp_path, repo, data):
    """Standard input is spooled to a temporary file; errors name '-', as it was given."""
    args = ["separate", "--repo", str(repo), *MODEL, "-o", str(tmp_path / "out"), "-"]
    result = runner.invoke(app, args, input=data)
    assert result.exit_code == 1, result.output
    errors = _errors(result)
    assert len(errors) == 1 and errors[0].startswith("htsep: error: -: "), result.stderr
    assert "htsep-stdin" not in result.stderr


@pytest.mark.parametrize("rate", [999, 384001])
def test_files_outside_the_rate_range_fail_in_one_line(run, tmp_path, rate):
    clip = tmp_path / "odd.wav"
    sf.write(clip, np.zeros((rate // 4, 2), np.float32), rate, subtype="FLOAT")
    _assert_one_line_failure(run(clip), 1, f"sample rate {rate} Hz is outside 1000..384000")
    assert _nothing_written(run.out)


def test_options_that_stdout_or_no_shifts_ignore_are_warned_about(run, tmp_path):
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    result = run("--shifts", "0", "--seed", "3", "--stems", "vocals", clip)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("htsep: warning:")]
    assert len(warnings) == 1 and "--seed" in warnings[0]
    args = ["--repo", str(run.repo), *MODEL, "-o", "-", "--stems", "vocals", "--overwrite", clip]
    result = htsep(*map(str, args))
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("htsep: warning:")]
    assert len(warnings) == 1 and "-o -" in warnings[0]


# --- formats, rates and faults end to end ---------------------------------------------------------


@pytest.mark.parametrize("rate", [44099, 7999, 1000])
def test_odd_sample_rates_separate_in_bounded_time(run, tmp_path, rate):
    clip = tmp_path / "odd.wav"
    write_clip(clip, 1.0, rate=rate)
    result = run("--stems", "vocals", clip)
    assert result.exit_code == 0, result.output
    info = sf.info(run.out / "aaaa0001" / "odd" / "vocals.wav")
    assert (info.samplerate, info.frames) == (rate, rate)


def test_a_gsm_wav_separates_and_a_truncated_rf64_fails_alone(run, tmp_path):
    gsm = tmp_path / "gsm.wav"
    audio = write_clip(tmp_path / "x.wav", 1.0)
    sf.write(gsm, audio[:, 0], RATE, format="WAV", subtype="GSM610")
    rf64 = tmp_path / "cut.wav"
    sf.write(rf64, audio, RATE, format="RF64", subtype="PCM_16")
    rf64.write_bytes(rf64.read_bytes()[: -RATE // 2])
    result = run("--stems", "vocals", gsm, rf64)
    assert result.exit_code == 1, result.output
    errors = _errors(result)
    assert len(errors) == 1 and "cut.wav" in errors[0] and "Traceback" not in result.output
    info = sf.info(run.out / "aaaa0001" / "gsm" / "vocals.wav")
    assert info.frames == sf.info(gsm).frames
    assert not (run.out / "aaaa0001" / "cut").exists()


def test_a_full_disk_names_the_stem_and_leaves_nothing(tmp_path, repo):
    """RLIMIT_FSIZE makes writes fail with EFBIG as a full disk fails with ENOSPC, with no
    root needed; the float stems staged for the rescale pass hit it first."""
    import resource
    import signal

    clip = tmp_path / "song.wav"
    write_clip(clip, 4.0)
    out = tmp_path / "out"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    done = subprocess.run(
        [sys.executable, "-m", "htsep", "separate", "--repo", str(repo), *MODEL, "-o", str(out)]
        + [str(clip)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("htsep: error:")]
    assert len(errors) == 1, done.stderr
    assert "File too large" in errors[0] and ".htsep-" not in errors[0]
    assert str(out / "aaaa0001" / "song") in errors[0]
    assert [p for p in out.rglob("*") if p.is_file() or p.name.startswith(".")] == []


def test_damaged_mp3s_give_one_line_each_from_the_real_command(tmp_path, repo):
    """libmpg123 writes its own notes on stderr ("Note: Illegal Audio-MPEG-Header", "Trying to
    resync", "Hit end of (available) data", ID3 warnings) while libsndfile reads a damaged MP3:
    the command keeps them off, so each bad file is one line, then the summary."""
    clip = tmp_path / "clip.mp3"
    sf.write(clip, np.random.default_rng(0).standard_normal((3 * RATE, 2)) * 0.1, RATE)
    data = clip.read_bytes()
    damaged = bytearray(data)
    damaged[len(data) // 3 : len(data) // 3 + 400] = np.random.default_rng(1).bytes(400)
    bad = {
        "text.mp3": b"not audio\n" * 50,
        "id3-only.mp3": b"ID3\x03\x00\x00\x00\x00\x00\x00",
        "cut.mp3": data[: len(data) // 2],
        "damaged.mp3": bytes(damaged),
    }
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    done = subprocess.run(
        [sys.executable, "-m", "htsep", "--repo", str(repo), *MODEL, "-o", str(tmp_path / "out")]
        + [str(tmp_path / name) for name in bad]
        + [str(clip)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == len(bad) + 1, done.stderr
    for line, name in zip(lines, bad, strict=False):
        assert line.startswith(f"htsep: error: {tmp_path / name}: "), done.stderr
    assert lines[-1].startswith("htsep: 1 separated, 0 skipped, 4 failed")


def test_ignored_options_are_ignored_with_their_values(run, tmp_path):
    """The warning says "ignored": a value out of range (or a bad template) in an option that
    does not apply no longer fails the run after the warning."""
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    result = run("--stems", "vocals", "--mp3-bitrate", "999", "--other-method", "minus",
                 "--shifts", "0", "--seed", "-5", "--no-split", "--overlap", "2", clip)  # fmt: skip
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("htsep: warning:")]
    assert len(warnings) == 4 and not _errors(result), result.stderr
    assert (run.out / "aaaa0001" / "song" / "vocals.wav").is_file()


def test_a_long_name_of_many_byte_characters_gets_its_stems(run, tmp_path):
    """File systems count bytes: the hidden temporary beside a 220-byte stem name took its
    first 150 characters (450 bytes of CJK) and could not be created."""
    name = "\u97f3" * 70  # 210 bytes in UTF-8
    clip = tmp_path / f"{name}.wav"
    write_clip(clip, 0.5)
    result = run("--stems", "vocals", "--filename", "{track}-{stem}.{ext}", clip)
    assert result.exit_code == 0, result.output
    assert (run.out / "aaaa0001" / f"{name}-vocals.wav").is_file()


@pytest.mark.parametrize(
    ("stdout", "reason"),
    [("/dev/full", "No space left on device"), ("a pipe its reader left", "Broken pipe")],
)
@pytest.mark.parametrize(
    "args",
    [["separate", "--json"], ["models"], ["separate", "--help"], ["info", "htsep-tiny"]],
)
def test_a_standard_output_that_fails_is_one_line_in_every_command(
    tmp_path, repo, args, stdout, reason
):
    """A full disk behind the redirection, or a reader that left (`--json ... | head -c 10`,
    where click turned the broken pipe into a silent exit 1)."""
    if stdout == "/dev/full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    clip, clip2 = tmp_path / "song.wav", tmp_path / "other.wav"
    write_clip(clip, 0.5)
    write_clip(clip2, 0.5)
    if args == ["separate", "--json"]:
        args = ["separate", "--repo", str(repo), *MODEL, "-o", str(tmp_path / "out"),
                "--json", str(clip), str(clip2)]  # fmt: skip
    if stdout == "/dev/full":
        target = os.open("/dev/full", os.O_WRONLY)
    else:
        read, target = os.pipe()
        os.close(read)  # the reader is gone before the first line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "htsep", *args],
            stdout=target,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(target)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"htsep: error: cannot write to standard output: {reason}"
    ), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) <= 3, done.stderr
    out = tmp_path / "out"
    assert not out.exists() or not [p for p in out.rglob(".*")]


@pytest.mark.parametrize("extra", [["--json"], ["-o", "-", "--stems", "vocals"]])
def test_a_closed_standard_output_is_refused_before_any_work(tmp_path, repo, extra):
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    done = subprocess.run(
        [sys.executable, "-m", "htsep", "--repo", str(repo), *MODEL, "-o", str(tmp_path / "o")]
        + [*extra, str(clip)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.close(1),
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.endswith("writes to standard output, which is closed\n"), done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_no_arguments_print_the_help_and_a_lone_flag_is_one_line():
    bare = subprocess.run(
        [sys.executable, "-m", "htsep"], capture_output=True, text=True, timeout=120
    )
    assert bare.returncode == 2 and bare.stderr.startswith("Usage: htsep [OPTIONS] COMMAND")
    assert "\\n" not in bare.stderr and "Commands:" in bare.stderr
    flag = subprocess.run(
        [sys.executable, "-m", "htsep", "-v"], capture_output=True, text=True, timeout=120
    )
    assert flag.returncode == 2 and flag.stderr == "htsep: error: Missing command.\n"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_split_takes_what_fits_whatever_the_seed(run, tmp_path, seed):
    """--no-split with the shift trick failed or worked by the random delay drawn (a track of
    one segment less a little failed with most seeds, quoting a padded length and "split it
    into chunks first"): now what cannot fit for every delay fails, naming the way out."""
    fits, tight, long = (tmp_path / f"{name}.wav" for name in ("fits", "tight", "long"))
    write_clip(fits, 0.9)  # the test model takes 1.5 s at once; the delay is up to 0.5 s
    write_clip(tight, 1.2)
    write_clip(long, 2.0)
    seeded = ("--seed", str(seed))
    assert run(*seeded, "--no-split", fits).exit_code == 0
    _assert_one_line_failure(run(*seeded, "--no-split", tight), 1, "use --shifts 0")
    _assert_one_line_failure(run(*seeded, "--no-split", long), 1, "leave out --no-split")
    done = run("--no-split", "--shifts", "0", "--overwrite", tight)
    assert done.exit_code == 0, done.output


def test_a_file_named_dash_is_read_as_a_file(run, tmp_path, monkeypatch):
    """libsndfile reads standard input for the name "-", and pathlib turns "./-" into "-":
    the file named "-" was never read (standard input was, or the run hung on a terminal)."""
    monkeypatch.chdir(tmp_path)
    write_clip(tmp_path / "clip.wav", 0.5)
    (tmp_path / "clip.wav").rename(tmp_path / "-")
    for number, given in enumerate(("./-", "[-]")):  # a path, and a pattern that matches it
        out = tmp_path / f"out{number}"
        done = subprocess.run(
            [sys.executable, "-m", "htsep", "separate", "--repo", str(run.repo), *MODEL,
             "--json", "-o", str(out), given],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        assert record["input"] == "./-" and record["duration"] == 0.5, record


def test_a_stem_name_the_file_system_encoding_cannot_spell_is_one_line(tmp_path):
    """Under LC_ALL=C without UTF-8 mode file names are ASCII: a source named "chœur" was a
    UnicodeEncodeError traceback from os.path.realpath."""
    import dataclasses

    import htsep
    from htsep.model.htdemucs import HTDemucs

    tiny = htsep.load_model("htsep-tiny")
    config = dataclasses.replace(tiny.config, sources=("drums", "bass", "other", "ch\u0153ur"))
    choir = HTDemucs(config)
    choir.load_state_dict(tiny.state_dict())
    htsep.save_model(choir, tmp_path / "choir.safetensors")
    write_clip(tmp_path / "song.wav", 0.5, rate=44100)
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "htsep", "song.wav", "-n", "./choir.safetensors", "-q"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert "cannot be a file name here (the file system encoding is ascii)" in done.stderr


def test_an_overlap_that_multiplies_the_work_is_warned_about(run, tmp_path):
    """--overlap 0.99999 is within demucs's range but puts every sample through one chunk per
    sample step: hours for a second of audio, without a word."""
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.3)

    def separate(overlap: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "htsep", str(clip), "--repo", str(run.repo), *MODEL,
             "--shifts", "0", "--overlap", overlap, "-o", str(tmp_path / overlap)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stderr

    assert separate("0.99") == (
        "htsep: warning: --overlap 0.99 puts every sample through about 100 chunks, 75 times "
        "the network calls of the default 0.25\n"
    )
    assert separate("0.9") == ""
