"""`htsep separate` as shell scripts drive it: every input gets its --json record (duplicates,
interruptions, a model that cannot be loaded, names that are not UTF-8), records reach a
reader as each track ends, and the plan's usage errors come before the model and cover every
--shard. The command runs in this process (CliRunner) unless a real process is needed."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
from helpers import htsep, write_clip

from htsep import batch, cli


def _records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def _run(repo, out, *args):
    return htsep("--repo", str(repo), "-n", "aaaa0001", "-o", str(out), *args)


# --- usage errors of the plan: before the model, over every shard ----------------------------


@pytest.mark.parametrize("shard", ["1/2", "2/2"])
def test_two_inputs_of_one_track_folder_are_refused_in_every_shard(tmp_path, repo, shard):
    # Sorted, the folder lists a.flac, a.wav, b.wav: shard 1/2 takes a.flac and b.wav, shard
    # 2/2 a.wav alone, and each used to see no clash in its own slice.
    for name in ("a.flac", "a.wav", "b.wav"):
        write_clip(tmp_path / "album" / name, 0.3, subtype="PCM_16")
    out = tmp_path / "out"
    result = _run(repo, out, "--skip-existing", "--shard", shard, "--json", str(tmp_path / "album"))
    assert result.exit_code == 2, result.output
    assert "would be written for both" in result.stderr
    assert result.stdout == "" and not out.exists()


def test_a_clash_is_a_usage_error_before_a_model_is_downloaded(tmp_path):
    # htdemucs is not cached and the mirror unreachable (conftest): loading it would fail
    # with exit 1, so exit 2 shows the plan was checked first.
    for name in ("a.flac", "a.wav"):
        write_clip(tmp_path / "album" / name, 0.3, subtype="PCM_16")
    result = htsep("-n", "htdemucs", "-o", str(tmp_path / "out"), str(tmp_path / "album"))
    assert result.exit_code == 2, result.output
    assert "/a/{stem}.wav would be written for both" in result.stderr
    assert "download" not in result.stderr
    clip = write_clip(tmp_path / "x.wav", 0.3)
    assert clip.size
    result = htsep("-n", "htdemucs", "--filename", "x.{ext}", str(tmp_path / "x.wav"))
    assert result.exit_code == 2 and "4 stems would go to one file" in result.stderr


def test_a_pattern_keeps_the_layout_below_its_fixed_part(tmp_path, repo):
    # As the folder argument does; named one by one, two 01.wav share a track folder, and the
    # refusal says what to do.
    write_clip(tmp_path / "music" / "A" / "01.wav", 0.3)
    write_clip(tmp_path / "music" / "B" / "01.wav", 0.3, seed=1)
    write_clip(tmp_path / "music" / "B" / "C" / "02.wav", 0.3, seed=2)
    out = tmp_path / "out"
    for args, layout in [
        ([str(tmp_path / "music" / "**" / "*.wav")], ["A/01", "B/01", "B/C/02"]),
        ([str(tmp_path / "music" / "*" / "01.wav")], ["A/01", "B/01"]),
        ([str(tmp_path / "mus*" / "A" / "01.wav")], ["music/A/01"]),
        ([str(tmp_path / "music")], ["A/01", "B/01", "B/C/02"]),
    ]:
        result = _run(repo, out, "-q", "--overwrite", "--stems", "vocals", "--json", *args)
        assert result.exit_code == 0, result.output
        found = [
            Path(r["outputs"][0]).parent.relative_to(out / "aaaa0001") for r in _records(result)
        ]
        assert [p.as_posix() for p in found] == layout
    named = [str(tmp_path / "music" / folder / "01.wav") for folder in ("A", "B")]
    result = _run(repo, out, *named)
    assert result.exit_code == 2
    assert "name the folder that holds them instead" in result.stderr


# --- a record for every input ------------------------------------------------------------------


def test_inputs_reaching_one_file_each_get_a_record(tmp_path, repo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_clip(tmp_path / "a.wav", 0.3)
    os.symlink("a.wav", tmp_path / "link.wav")
    os.link(tmp_path / "a.wav", tmp_path / "hard.wav")  # another name: a track of its own
    args = ["-q", "--stems", "vocals", "--json", "a.wav", "./a.wav", "link.wav", "hard.wav"]
    result = _run(repo, "out", *args)
    assert result.exit_code == 0, result.output
    records = _records(result)
    assert [r["input"] for r in records] == ["a.wav", "./a.wav", "link.wav", "hard.wav"]
    assert [r["outputs"] for r in records] == [["out/aaaa0001/a/vocals.wav"]] * 3 + [
        ["out/aaaa0001/hard/vocals.wav"]
    ]
    assert all(r["status"] == "ok" for r in records)
    assert [r.get("same_as") for r in records] == [None, "a.wav", "a.wav", None]
    warnings = [line for line in result.stderr.splitlines() if "separated once" in line]
    assert warnings == [
        "htsep: warning: ./a.wav: the same file as a.wav; separated once",
        "htsep: warning: link.wav: the same file as a.wav; separated once",
    ]
    assert len(list((tmp_path / "out").rglob("*.wav"))) == 2


def test_a_file_two_folder_arguments_reach_is_separated_once_and_said_so(tmp_path, repo):
    """`album album/CD1`: the warning said "x: the same file as x"; it says how it came."""
    write_clip(tmp_path / "album" / "CD1" / "01.wav", 0.3)
    album = tmp_path / "album"
    result = _run(repo, tmp_path / "out", "-q", "--json", str(album), str(album / "CD1"))
    assert result.exit_code == 0, result.output
    file = str(album / "CD1" / "01.wav")
    assert [(r["input"], r.get("same_as")) for r in _records(result)] == [
        (file, None),
        (file, file),
    ]
    assert [line for line in result.stderr.splitlines() if "separated once" in line] == [
        f"htsep: warning: {file}: reached again by another folder or pattern; separated once"
    ]
    assert len(list((tmp_path / "out").rglob("*.wav"))) == 4


def test_when_no_input_names_a_file_the_run_still_ends_with_its_summary(tmp_path, repo):
    result = _run(repo, tmp_path / "out", str(tmp_path / "nothere.wav"), str(tmp_path / "gone.wav"))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == "htsep: 0 separated, 0 skipped, 2 failed (0.0 s)"


def test_a_model_that_cannot_be_loaded_fails_every_input_with_a_record(tmp_path, repo):
    write_clip(tmp_path / "a.wav", 0.3)
    write_clip(tmp_path / "b.wav", 0.3, seed=1)
    args = ["--repo", str(repo), "-n", "onehot", "-q", "--json", "-o", str(tmp_path / "out")]
    result = htsep(*args, str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), str(tmp_path / "c.wav"))
    assert result.exit_code == 1
    records = _records(result)
    assert [Path(r["input"]).name for r in records] == ["a.wav", "b.wav", "c.wav"]
    assert [r["status"] for r in records] == ["failed"] * 3
    assert "no model to separate it" in records[0]["error"] and "dead0003" in records[0]["error"]
    assert records[2]["error"].endswith("c.wav: no such file or folder")


def test_an_interrupted_batch_gives_the_unfinished_tracks_their_records(
    tmp_path, repo, monkeypatch
):
    for index in range(3):
        write_clip(tmp_path / f"t{index}.wav", 0.3, seed=index)
    separate = batch._Run._separate

    def interrupted_at_the_second(run, index):
        if index == 1:
            raise KeyboardInterrupt
        return separate(run, index)

    monkeypatch.setattr(batch._Run, "_separate", interrupted_at_the_second)
    inputs = [str(tmp_path / f"t{index}.wav") for index in range(3)]
    result = _run(repo, tmp_path / "out", "-q", "--no-pipeline", "--json", *inputs)
    assert result.exit_code == 130
    assert [(Path(r["input"]).name, r["status"]) for r in _records(result)] == [
        ("t0.wav", "ok"),
        ("t1.wav", "interrupted"),
        ("t2.wav", "interrupted"),
    ]


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file names must be UTF-8")
def test_a_name_that_is_not_utf8_has_its_bytes_in_the_record(tmp_path, repo):
    folder = os.fsencode(tmp_path)
    name = folder + b"/caf\xe9.wav"
    write_clip(tmp_path / "clip.wav", 0.3)
    os.rename(tmp_path / "clip.wav", name)
    out = os.fsdecode(folder + b"/out\xff")
    result = _run(repo, out, "-q", "--stems", "vocals", "--json", os.fsdecode(name))
    assert result.exit_code == 0, result.output
    (record,) = _records(result)
    assert base64.b64decode(record["input_bytes"]) == name
    (written,) = [base64.b64decode(value) for value in record["outputs_bytes"]]
    assert written == folder + b"/out\xff/aaaa0001/caf\xe9/vocals.wav"
    assert os.path.isfile(written)
    # Names that are UTF-8 have no such fields.
    plain = tmp_path / "plain.wav"
    write_clip(plain, 0.3)
    result = _run(repo, tmp_path / "out2", "-q", "--stems", "vocals", "--json", str(plain))
    assert result.exit_code == 0 and not {"input_bytes", "outputs_bytes"} & set(_records(result)[0])


def test_a_failed_tracks_record_lists_the_stems_it_completed(tmp_path, repo):
    # A file where the third stem's folder belongs: drums and bass are put in place, then
    # the track fails; its record names those two, which are complete and stay.
    out = tmp_path / "out"
    (out / "aaaa0001").mkdir(parents=True)
    (out / "aaaa0001" / "other").write_text("in the way")
    write_clip(tmp_path / "a.wav", 0.3)
    args = ["-q", "--json", "--filename", "{stem}/{track}.{ext}", str(tmp_path / "a.wav")]
    result = _run(repo, out, *args)
    assert result.exit_code == 1
    (record,) = _records(result)
    assert record["status"] == "failed" and "other" in record["error"]
    assert record["outputs"] == [
        str(out / "aaaa0001" / stem / "a.wav") for stem in ("drums", "bass")
    ]
    for output in record["outputs"]:
        assert sf.info(output).frames == 2400


def test_a_batch_refuses_a_bytes_input_rather_than_its_numbers(tmp_path, repo):
    from htsep import Separator
    from htsep.errors import UsageError

    runner = batch.Batch(Separator("aaaa0001", repo=repo), tmp_path / "out")
    with pytest.raises(UsageError, match="not bytes"):
        runner.run(os.fsencode(tmp_path / "a.wav"))


def test_records_are_flushed_while_a_progress_bar_is_on_screen(monkeypatch):
    class Raw(io.RawIOBase):
        def __init__(self):
            self.data = b""

        def writable(self):
            return True

        def write(self, b):
            self.data += bytes(b)
            return len(b)

    raw = Raw()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(raw)))
    report = cli._Report(2, "m", quiet=False, json_lines=True)
    track = batch.Track(
        "a.wav", Path("a.wav"), status="ok", outputs=["o.wav"], seconds=1.0, duration=1.0
    )
    report.started(0, track, 1.0)
    report.started(1, track, 1.0)  # a bar on screen while the first track's record is written
    report.finished(0, track)
    report.bar.close()
    assert json.loads(raw.data.decode().splitlines()[-1])["input"] == "a.wav"


# --- -o - and the current folder -----------------------------------------------------------


@pytest.mark.parametrize("how", ["append", "read-write", "stdin"])
def test_stdout_into_the_input_itself_is_refused(tmp_path, how):
    song = tmp_path / "s.wav"
    write_clip(song, 0.3, rate=44100)
    before = song.read_bytes()
    command = [sys.executable, "-m", "htsep", "separate", "-q", "-n", "htsep-tiny", "-o", "-"]
    command += ["--stems", "vocals"]
    with open(song, "ab" if how == "append" else "r+b") as target:
        if how == "stdin":
            with open(song, "rb") as source:
                done = subprocess.run(
                    [*command, "-"], stdin=source, stdout=target, stderr=subprocess.PIPE, text=True
                )
        else:
            done = subprocess.run(
                [*command, str(song)], stdout=target, stderr=subprocess.PIPE, text=True
            )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().endswith("standard output is this file; the stem would overwrite it")
    assert song.read_bytes() == before


def test_the_current_folder_removed_mid_batch_fails_tracks_in_one_line(tmp_path, repo, monkeypatch):
    # Relative names, and the folder they lead from removed once the second track is open:
    # its outputs, then the third track, fail in one line each; the batch goes on.
    work = tmp_path / "work"
    for index in range(3):
        write_clip(work / f"t{index}.wav", 0.3, seed=index)
    monkeypatch.chdir(work)

    class RemoveFolder(batch.BatchEvents):
        def started(self, index, track, seconds):
            if index == 1:
                for item in sorted(work.rglob("*"), reverse=True):
                    item.rmdir() if item.is_dir() else item.unlink()
                work.rmdir()

    from htsep import Separator

    separator = Separator("aaaa0001", repo=repo, stems=["vocals"])
    runner = batch.Batch(separator, "out", pipeline=False, events=RemoveFolder())
    try:
        tracks = runner.run(["t0.wav", "t1.wav", "t2.wav"])
    finally:
        os.chdir(tmp_path)
    assert [t.status for t in tracks] == ["ok", "failed", "failed"]
    assert (
        tracks[1].error == "t1.wav: the current folder was removed: relative paths lead nowhere now"
    )
    assert tracks[2].error.startswith("t2.wav: ") and "\n" not in tracks[2].error


# --- signals ------------------------------------------------------------------------------------


def test_a_signal_during_the_import_of_torch_waits_for_it_to_end():
    # In a fresh interpreter with no other thread: the handler records whether torch had
    # finished importing when a SIGINT, sent 0.2 s into the import (a second or more), reached
    # Python; without the hold it lands inside torch's own import.
    script = """
import signal, sys, time
from htsep import cli
seen = []
signal.signal(signal.SIGINT, lambda *_: seen.append("torch.nn" in sys.modules))
assert "torch" not in sys.modules
print("importing", flush=True)
cli._import_torch()
time.sleep(0.5)
print(seen, flush=True)
"""
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout.readline() == "importing\n"
    time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.strip() == "[True]"


# A child that sends itself ``signum`` at a chosen moment of the command: when a module is first
# imported (a finder ahead of the others), or when a function of htsep.cli is called.
_SIGNAL_AT = """
import importlib.abc, os, signal, sys
signum, module, function = int(sys.argv[1]), sys.argv[2], sys.argv[3]

class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signum)
        return None

sys.meta_path.insert(0, Finder())
if function:
    from htsep import cli
    real = getattr(cli, function)
    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    setattr(cli, function, signalled)
sys.argv = ["htsep", *sys.argv[4:]]
from htsep.__main__ import main
main()
"""


def _signalled(signum, module, function, *args, cwd=None):
    return subprocess.run(
        [sys.executable, "-c", _SIGNAL_AT, str(int(signum)), module, function, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_the_htsep_script_starts_where_signals_are_caught():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "htsep"]
    assert script.value == "htsep.__main__:main"


@pytest.mark.parametrize(
    ("signum", "message"),
    [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated"), (signal.SIGHUP, "hung up")],
)
@pytest.mark.parametrize(
    ("module", "function"),
    [
        ("typer", ""),  # while the command line is imported, before any handler of the command
        ("", "_given_options"),  # inside the command, before its errors are reported
    ],
)
def test_a_signal_before_the_command_runs_gets_its_line_and_exit_status(
    tmp_path, signum, message, module, function
):
    """Python's traceback for a Ctrl-C while typer was imported, and nothing at all (typer
    turns the KeyboardInterrupt into exit 130) for one while the options were read."""
    write_clip(tmp_path / "a.wav", 0.3)
    done = _signalled(
        signum, module, function, "separate", "-n", "htsep-tiny", "a.wav", cwd=tmp_path
    )
    assert (done.returncode, done.stderr) == (128 + signum, f"htsep: error: {message}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_before_the_inputs_are_searched_gives_each_input_its_record(tmp_path, signum):
    """Delivered when torch's import ends (it is held back until then), before the inputs are
    searched: each input as given gets its record, interrupted."""
    write_clip(tmp_path / "album" / "a.wav", 0.3)
    write_clip(tmp_path / "b.wav", 0.3)
    args = ["separate", "-n", "htsep-tiny", "--json", "album", "b.wav", "missing.wav"]
    done = _signalled(signum, "torch", "", *args, cwd=tmp_path)
    assert done.returncode == 128 + signum
    (line,) = done.stderr.splitlines()
    assert line.startswith("htsep: error: ") and "interrupted" in line
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["input"], r["status"], r["model"]) for r in records] == [
        (name, "interrupted", "htsep-tiny") for name in ("album", "b.wav", "missing.wav")
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["album", "b.wav"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize(
    "command",
    [
        ["models"],
        ["models", "download", "htsep-tiny"],
        ["info", "htsep-tiny"],
        ["separate", "-n", "htsep-tiny", "a.wav"],
        ["eval", "-n", "htsep-tiny", "data"],
        ["train", "--config", "tiny", "--out", "run", "data"],
    ],
    ids=lambda c: " ".join(c[:2]) if isinstance(c, list) else str(c),
)
def test_a_signal_inside_torchs_start_up_stops_every_command(tmp_path, signum, command):
    """A signal while torch's C++ start-up imports numpy: held back until torch has loaded,
    then the command stops with its line and status. `models` and `info` imported torch with
    the signals live: the signal was lost (exit 0, and the process ignored every later one) or
    aborted the process (SIGABRT)."""
    write_clip(tmp_path / "a.wav", 0.3)
    done = _signalled(signum, "numpy", "", *command, cwd=tmp_path)
    assert done.returncode == 128 + signum, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("htsep: error: "), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]


@pytest.mark.parametrize(
    ("module", "function"),
    [
        ("typer", ""),  # while the command line is imported
        ("", "_given_options"),  # while the options are read, before separate begins
    ],
)
def test_a_signal_before_separate_begins_gives_each_input_its_record(tmp_path, module, function):
    """Both windows gave the line and the exit status but no --json record at all."""
    write_clip(tmp_path / "a.wav", 0.3)
    args = ["-n", "htsep-tiny", "--json", "a.wav", "gone.wav"]
    done = _signalled(signal.SIGTERM, module, function, *args, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (143, "htsep: error: terminated\n")
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["input"], r["status"], r["model"]) for r in records] == [
        ("a.wav", "interrupted", "htsep-tiny"),
        ("gone.wav", "interrupted", "htsep-tiny"),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]
    # Without --json (or for another command) nothing goes to standard output.
    quiet = _signalled(signal.SIGTERM, module, function, "a.wav", cwd=tmp_path)
    assert (quiet.returncode, quiet.stdout) == (143, "")


def test_a_signal_while_the_inputs_are_planned_gives_each_track_its_record(tmp_path):
    """After the search, before the model is loaded: each track found gets its record."""
    write_clip(tmp_path / "album" / "a.wav", 0.3)
    write_clip(tmp_path / "album" / "b.wav", 0.3)
    args = ["separate", "-n", "htsep-tiny", "--json", "album", "gone.wav"]
    done = _signalled(signal.SIGTERM, "", "check_track_clashes", *args, cwd=tmp_path)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["input"], r["status"]) for r in records] == [
        ("album/a.wav", "interrupted"),
        ("album/b.wav", "interrupted"),
        ("gone.wav", "failed"),
    ]


# --- folders made for a failed track ---------------------------------------------------------


@pytest.mark.parametrize(
    ("clip_mode", "template", "fail_at"),
    [
        ("none", "{track}/{stem}.{ext}", 2),  # stems written side by side, block by block
        ("clamp", "{track}/{stem}.{ext}", 2),
        ("rescale", "{stem}/{track}.{ext}", 2),  # the second final file, one folder each
    ],
)
def test_a_failed_track_leaves_no_empty_folder(
    tmp_path, repo, monkeypatch, clip_mode, template, fail_at
):
    from htsep import audio
    from htsep.errors import AudioError

    write = audio.AudioWriter.write
    calls = []

    def failing(writer, block):
        if writer.target.suffix == ".wav" and "htsep-" not in str(writer.target.parent):
            calls.append(writer.target)
            if len(calls) == fail_at:
                raise AudioError(f"{writer.name}: cannot write: File too large")
        return write(writer, block)

    monkeypatch.setattr(audio.AudioWriter, "write", failing)
    write_clip(tmp_path / "a.wav", 0.3)
    out = tmp_path / "out"
    args = ["--clip-mode", clip_mode, "--filename", template, str(tmp_path / "a.wav")]
    result = _run(repo, out, "-q", *args)
    assert result.exit_code == 1 and "File too large" in result.stderr
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) if out.exists() else []
    if clip_mode == "rescale":  # the stem put in place before the failure stays, as it should
        assert left == ["aaaa0001", "aaaa0001/drums", "aaaa0001/drums/a.wav"]
    else:
        assert left == []


def test_a_path_object_whose_fspath_gives_bytes_is_named_so(tmp_path):
    from htsep.audio import file_name
    from htsep.errors import UsageError

    class Raw:
        def __fspath__(self):
            return b"/x.wav"

    with pytest.raises(UsageError, match="Raw, whose __fspath__ gives bytes"):
        file_name(Raw())
