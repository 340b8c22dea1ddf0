import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import typer
from typer.testing import CliRunner

import htsep
from htsep.cli import app
from htsep.errors import DownloadError

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"htsep {htsep.__version__}"


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = result.output.split("Commands:")[1].split()
    for command in ("separate", "info", "eval", "train", "models"):
        assert command in listed


def test_console_script_installed():
    result = subprocess.run(
        [sys.executable, "-m", "htsep.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.startswith("htsep ")


def test_info_reads_a_demucs_checkpoint(small_checkpoint):
    th_path, _, _ = small_checkpoint
    result = runner.invoke(app, ["info", str(th_path)])
    assert result.exit_code == 0, result.output
    assert "sources: drums, bass, other, vocals" in result.output
    assert "segment: 3/2 s (12000 samples)" in result.output


def test_info_missing_file_is_one_line_and_a_usage_error(tmp_path):
    """As `separate -n ./x.th` says it (exit 2, the code of an unknown model); info said 1."""
    result = subprocess.run(
        [sys.executable, "-m", "htsep.cli", "info", str(tmp_path / "x.th")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == f"htsep: error: {tmp_path / 'x.th'}: no such checkpoint file\n"
    assert result.stdout == ""


def test_models_lists_the_registry_and_cache_state(tmp_path, monkeypatch):
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "955717e8-8726e21a.th").write_bytes(b"placeholder")  # as demucs would have cached it
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line[:1] != " "}
    assert set(lines) == {"htdemucs", "htdemucs_6s", "htdemucs_ft", "htsep-tiny"}
    assert "shipped" in lines["htsep-tiny"]
    assert "cached" in lines["htdemucs"] and "not downloaded" in lines["htdemucs_ft"]
    assert "guitar, piano" in lines["htdemucs_6s"]
    assert "4 members" in lines["htdemucs_ft"]


def test_models_download_failure_names_url_and_offline_route():
    result = runner.invoke(app, ["models", "download", "-q", "htdemucs"])
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert "127.0.0.1:9/unreachable/955717e8-8726e21a.th" in line
    assert "--repo" in line


def test_models_download_unknown_name_is_a_usage_error():
    result = runner.invoke(app, ["models", "download", "htdemucs_fx"])
    assert result.exit_code == 2
    assert "did you mean 'htdemucs_ft'" in result.stderr


def test_models_download_of_a_file_path_is_a_usage_error(tmp_path):
    """It printed "evil -> evil.th" and exit 0 whatever the file held."""
    evil = tmp_path / "evil.th"
    evil.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["models", "download", "htsep-tiny", str(evil)])
    assert result.exit_code == 2
    assert result.stderr == (
        f"htsep: error: {evil}: a checkpoint file's path, not a model name: nothing to "
        "download (give it to -n as it is)\n"
    )


def test_demucs_habits_and_verbose_after_the_command():
    from htsep.cli import demucs_style

    assert demucs_style(["song.mp3", "-n", "htdemucs_ft", "--two-stems", "vocals"]) == [
        "separate", "song.mp3", "-n", "htdemucs_ft", "--two-stems", "vocals",
    ]  # fmt: skip
    assert demucs_style(["separate", "a.wav", "-v"]) == ["-v", "separate", "a.wav"]
    assert demucs_style(["info", "--verbose", "x.th"]) == ["--verbose", "info", "x.th"]
    assert demucs_style(["separate", "--", "-v"]) == ["separate", "--", "-v"]
    for args in (["models", "list"], ["eval", "d"], ["train", "d"], ["--version"], []):
        assert demucs_style(args) == args
    # "-o=DIR" as demucs's argparse reads it (click made a folder named "=DIR"); flags with
    # "=" and anything after "--" are left for click to refuse or take as they are.
    assert demucs_style(["a.wav", "-o=stems", "-n=x=y", "-j=2", "-q=1", "--", "-o=b"]) == [
        "separate", "a.wav", "-o", "stems", "-n", "x=y", "-j", "2", "-q=1", "--", "-o=b",
    ]  # fmt: skip


def test_options_before_the_command_go_to_it(tmp_path, monkeypatch):
    """`htsep -q separate song.wav` separated a file named "separate" (and failed on it): a
    command name after options is the command, unless a file of that name is here or it is an
    option's value."""
    from htsep.cli import demucs_style

    monkeypatch.chdir(tmp_path)
    assert demucs_style(["-q", "separate", "a.wav"]) == ["separate", "-q", "a.wav"]
    assert demucs_style(["-n", "htsep-tiny", "-v", "separate", "a.wav"]) == [
        "-v", "separate", "-n", "htsep-tiny", "a.wav",
    ]  # fmt: skip
    assert demucs_style(["--json", "info", "x.th"]) == ["info", "--json", "x.th"]
    # An option's value, an input before it, after "--", or a file here: inputs, as before.
    for args in (["-o", "separate", "a.wav"], ["a.wav", "separate"], ["-q", "--", "separate"]):
        assert demucs_style(args) == ["separate", *args]
    (tmp_path / "separate").write_bytes(b"")
    assert demucs_style(["-q", "separate"]) == ["separate", "-q", "separate"]


def test_options_before_the_command_separate(tmp_path, repo):
    from helpers import write_clip

    write_clip(tmp_path / "song.wav", 0.5)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "htsep", "-q", "separate", "--repo", str(repo), "-n", "aaaa0001"]
        + ["-o", str(out), str(tmp_path / "song.wav")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert len(list((out / "aaaa0001" / "song").iterdir())) == 4


def test_a_first_argument_that_is_not_a_command_separates(tmp_path, repo):
    from helpers import write_clip

    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "htsep", str(clip), "--repo", str(repo), "-n", "aaaa0001"]
        + ["--two-stems", "vocals", "-o", str(out), "-q", "-v"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (out / "aaaa0001" / "song").iterdir()) == [
        "no_vocals.wav",
        "vocals.wav",
    ]
    assert "loaded aaaa0001" in done.stderr  # -v after the command took effect


def test_registry_names_work_for_info_and_load_model():
    result = runner.invoke(app, ["info", "htsep-tiny"])
    assert result.exit_code == 0, result.output
    assert "parameters: 1,127,424" in result.output
    assert htsep.load_model("htsep-tiny").sources == ["drums", "bass", "other", "vocals"]
    result = runner.invoke(app, ["info", "htdemucs_ft"])
    assert result.exit_code == 1 and "bag of 4 networks" in result.output
    result = runner.invoke(app, ["info", "htdemucs_fx"])
    assert result.exit_code == 2 and "htdemucs_ft" in result.output


def test_models_list_is_the_listing():
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0
    assert listed.output == runner.invoke(app, ["models"]).output
    assert listed.output.splitlines()[0].split()[0] == "htdemucs"


def test_pipes_stdin_to_stdout_give_the_bytes_of_files(tmp_path, repo):
    from helpers import write_clip

    clip = tmp_path / "song.wav"
    write_clip(clip, 0.8)
    common = ["--repo", str(repo), "-n", "aaaa0001", "-q", "--stems", "vocals", "--flac"]
    files_run = runner.invoke(app, ["separate", *common, "-o", str(tmp_path / "out"), str(clip)])
    assert files_run.exit_code == 0, files_run.output
    expected = (tmp_path / "out" / "aaaa0001" / "song" / "vocals.flac").read_bytes()
    done = subprocess.run(
        [sys.executable, "-m", "htsep", "-", *common, "-o", "-"],
        input=clip.read_bytes(),
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected
    assert done.stderr == b""  # -q: nothing else, and never on stdout


def test_a_full_temporary_folder_under_stdout_names_that_folder(tmp_path, repo):
    """With -o -, a full TMPDIR was reported under the hidden stem path of a folder that was
    gone by the time the line was read."""
    import resource

    from helpers import write_clip

    clip = tmp_path / "song.wav"
    write_clip(clip, 4.0)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    common = ["--repo", str(repo), "-n", "aaaa0001", "-q", "--stems", "vocals"]
    done = subprocess.run(
        [sys.executable, "-m", "htsep", str(clip), *common, "-o", "-"],
        capture_output=True,
        env={**os.environ, "TMPDIR": str(temporary)},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)),
        timeout=300,
    )
    assert done.returncode == 1
    lines = done.stderr.decode().splitlines()
    assert lines[0] == (
        f"htsep: error: {clip}: the stem for standard output (made in {temporary}): "
        "cannot write: File too large"
    ), lines
    assert done.stdout == b""
    assert os.listdir(temporary) == []


def test_pipes_refuse_what_cannot_go_to_one_stream(tmp_path, repo):
    from helpers import write_clip

    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    common = ["separate", "--repo", str(repo), "-n", "aaaa0001", "-q", "-o", "-"]
    for extra, phrase in [
        ([str(clip)], "one stem to standard output, not 4"),
        (["--stems", "vocals", str(clip), str(clip.with_name("b.wav"))], "not 2"),
        (["--two-stems", "vocals", str(clip)], "not 2"),
        (["--stems", "vocals", "--json", str(clip)], "--json"),
        (["--stems", "vocals", "-", "-"], "only once"),
    ]:
        if "b.wav" in extra[-1]:
            write_clip(clip.with_name("b.wav"), 0.5)
        result = runner.invoke(app, [*common, *extra])
        assert result.exit_code == 2, result.output
        assert phrase in result.stderr and result.stdout == ""


def test_a_full_disk_while_reading_stdin_is_one_line(tmp_path, repo, monkeypatch):
    import errno
    import shutil

    def full(source, target, length=0):
        target.write(b"RIFF")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    result = runner.invoke(
        app,
        ["separate", "--repo", str(repo), "-n", "aaaa0001", "-q", "-o", str(tmp_path / "o"), "-"],
        input=b"RIFF....",
    )
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[0] == (
        f"htsep: error: -: cannot keep standard input in {tmp_path}: No space left on device"
    )
    assert result.stderr.splitlines()[1].startswith("htsep: 0 separated, 0 skipped, 1 failed")
    assert list(tmp_path.iterdir()) == []

    # Standard input fails alone, at its place among the inputs: the batch goes on, and
    # --json gives each input its record (the whole batch stopped, with no record at all).
    from helpers import write_clip

    clips = tmp_path.parent / f"{tmp_path.name}-clips"
    write_clip(clips / "a.wav", 0.5)
    write_clip(clips / "b.wav", 0.5)
    out = tmp_path / "o"
    args = ["separate", "--repo", str(repo), "-n", "aaaa0001", "-q", "--json", "-o", str(out)]
    result = runner.invoke(
        app, [*args, str(clips / "a.wav"), "-", str(clips / "b.wav")], input=b"RIFF...."
    )
    assert result.exit_code == 1, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["input"], r["status"]) for r in records] == [
        (str(clips / "a.wav"), "ok"),
        ("-", "failed"),
        (str(clips / "b.wav"), "ok"),
    ]
    assert records[1]["error"] == (
        f"-: cannot keep standard input in {tmp_path}: No space left on device"
    )
    assert sorted(p.name for p in (out / "aaaa0001").iterdir()) == ["a", "b"]


# --- help at 80 columns ----------------------------------------------------------------------

COMMANDS = [[], ["separate"], ["info"], ["eval"], ["train"], ["models"]]
COMMANDS += [["models", "list"], ["models", "download"]]
# Python types as metavars (typer's <bool>, <list[str]>, <int range>, {inputs}...): a user
# reads `--flac <bool>` as `--flac true`.
TYPE_METAVAR = re.compile(r"<(bool|int|float|str|path|list|dict|tuple|text|integer|choice)\b")


def _help(command: list[str]) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def _click_command(command: list[str]):
    found = typer.main.get_command(app)
    for name in command:
        found = found.commands[name]
    return found


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "htsep")
def test_help_reads_at_80_columns(command):
    text = _help(command)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text
    assert not TYPE_METAVAR.search(text), TYPE_METAVAR.search(text)
    assert not re.search(r"\{[a-z_]+\}\.\.\.", text)  # {inputs}... in the usage line
    # Every description has room: no continuation is indented past column 34, so at least
    # 46 of the 80 columns are left for the text.
    assert max(len(line) - len(line.lstrip()) for line in lines if line.strip()) <= 34
    for param in _click_command(command).params:
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("-"):
                assert re.search(rf"(^|[ ,]){re.escape(name)}\b", text, re.M), name


@pytest.mark.parametrize("group", [[], ["models"]], ids=["htsep", "models"])
def test_command_lists_are_not_cut(group):
    text = _help(group)
    listing = text[text.index("Commands:") :].splitlines()[1:]
    for line in filter(None, listing):
        name, summary = line.split(maxsplit=1)
        first = (_click_command([*group, name]).help or "").strip().split("\n\n")[0]
        assert summary == " ".join(first.split()), line


def test_separate_help_has_panels_choices_and_no_values_on_flags():
    text = _help(["separate"])
    # 135 lines at 80 columns with rich's table (descriptions ~20 characters wide).
    assert len(text.splitlines()) < 90
    assert text.startswith("Usage: htsep separate [OPTIONS] INPUT...\n")
    sections = [line for line in text.splitlines() if re.fullmatch(r"[A-Z][a-z]+:", line)]
    assert sections == [
        "Arguments:", "Model:", "Stems:", "Output:", "Speed:", "Batch:", "Options:",
    ]  # fmt: skip
    for shown in [
        "-d, --device cpu|cuda[:N]|mps",
        "--precision fp32|bf16|fp16",
        "--clip-mode rescale|clamp|none",
        "--other-method add|minus|none",
        "--two-stems STEM",
        "--shard K/N",
        "--segment SECONDS",
        "-j, --jobs N",
        "[default: {track}/{stem}.{ext}]",
        "the first available of cuda, mps, cpu",
        "a fraction of a chunk",
        "(default: the model's)",
    ]:
        assert shown in " ".join(text.split()), shown
    command = _click_command(["separate"])
    flags = [p for p in command.params if getattr(p, "is_flag", False)]
    assert {"--flac", "--mp3", "--int24", "--no-split", "--json"} <= {
        name for flag in flags for name in flag.opts
    }
    for flag in flags:
        names = ", ".join(flag.opts)
        if flag.secondary_opts:
            names += " / " + ", ".join(flag.secondary_opts)
        assert re.search(rf"^  {re.escape(names)}  ", text, re.M), names  # no value after it


def test_a_flag_takes_no_value(tmp_path, repo, monkeypatch):
    """`--flac true x.wav`: the flag takes no value, so `true` is an input, and one that does
    not exist: the usual one-line error naming it; x.wav is still separated, as FLAC."""
    from helpers import write_clip

    monkeypatch.chdir(tmp_path)
    write_clip(tmp_path / "x.wav", 0.5)
    out = tmp_path / "out"
    common = ["separate", "--repo", str(repo), "-n", "aaaa0001", "-q", "-o", str(out)]
    result = runner.invoke(app, [*common, "--stems", "vocals", "--flac", "true", "x.wav"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("htsep: error:")]
    assert errors == ["htsep: error: true: no such file or folder"]
    assert [p.name for p in (out / "aaaa0001").rglob("*.*")] == ["vocals.flac"]
    glued = runner.invoke(app, [*common, "--flac=true", "x.wav"])
    assert glued.exit_code == 2 and "'--flac' does not take a value" in glued.output


# --- offline advice --------------------------------------------------------------------------
# conftest points HTSEP_MIRROR at a closed port: every download fails at once.

UNREACHABLE = "could not download http://127.0.0.1:9/unreachable/955717e8-8726e21a.th: "


def _download_failure(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"htsep: error: {UNREACHABLE}")
    assert "HTSEP_MIRROR" in line and "htsep.Separator" not in line
    # The mirror is set here (to an address where nothing listens): it is to be checked, not
    # set (the advice said "set HTSEP_MIRROR" while it was the address that failed).
    assert "check HTSEP_MIRROR (the mirror's URL the download came from)" in line
    assert "set HTSEP_MIRROR" not in line
    return line


def test_offline_advice_of_separate(tmp_path):
    from helpers import write_clip

    write_clip(tmp_path / "song.wav", 0.5)
    line = _download_failure(
        ["separate", "-q", "-o", str(tmp_path / "o"), str(tmp_path / "song.wav")]
    )
    assert "run 'htsep models download htdemucs' on a machine with network" in line
    assert "-n PATH or --repo DIR" in line and "-n htsep-tiny" in line
    assert not (tmp_path / "o").exists()


def test_offline_advice_of_info():
    line = _download_failure(["info", "htdemucs"])
    assert "run 'htsep models download htdemucs' on a machine with network" in line
    assert "htsep info htsep-tiny" in line and "-n " not in line


def test_offline_advice_of_train(tmp_path):
    line = _download_failure(
        [
            "train",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "run"),
            "--init",
            "htdemucs",
            "-q",
        ]
    )
    assert "--init needs these weights: run 'htsep models download htdemucs'" in line
    assert "or give --init a checkpoint file path" in line
    assert "train from a named config without --init (--config tiny)" in line


def test_offline_advice_of_models_download():
    line = _download_failure(["models", "download", "-q", "htdemucs"])
    assert "run 'htsep models download htdemucs' on a machine with network" in line
    assert "-n htsep-tiny" in line


def test_offline_advice_of_the_python_api():
    """Without a command line, the library's own words: its API, not a command's options."""
    with pytest.raises(DownloadError) as caught:
        htsep.Separator("htdemucs")
    message = str(caught.value)
    assert message.startswith(UNREACHABLE) and "\n" not in message
    assert caught.value.problem == message.split("; ")[0]
    assert caught.value.file_name == "955717e8-8726e21a.th"
    for words in ["htsep.Separator(name)", "HTSEP_MIRROR", "repo=DIR", "'htsep-tiny'"]:
        assert words in message, words
    for words in ["-n ", "--repo", "htsep models", "htsep info"]:
        assert words not in message, words


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["separate", "--bogus", "x.wav"], "No such option: --bogus"),
        (["separate"], "Missing argument 'INPUT...'."),
        (["separate", "--flac=true", "x.wav"], "Option '--flac' does not take a value."),
        (["separate", "--clip-mode", "tanh", "x.wav"], "Invalid value for '--clip-mode'"),
        (["eval", "data", "--split", "valid"], "Invalid value for '--split'"),
        (["models", "frob"], "No such command 'frob'."),
        (["info"], "Missing argument 'CHECKPOINT'."),
    ],
)
def test_click_usage_errors_are_one_line_exit_2(args, line):
    """click's own usage errors read like every other error: one line, exit 2, no usage block."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"htsep: error: {line}")


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_a_reader_that_leaves_early_is_an_error_even_unbuffered(tmp_path, repo, unbuffered):
    """`-o - | head -c 10`: under PYTHONUNBUFFERED stdout is a raw stream whose short write (what
    the pipe held when its reader left) was taken for the whole stem, and the run exited 0."""
    from helpers import write_clip

    clip = tmp_path / "song.wav"
    write_clip(clip, 3.0)  # a float32 stem of 192 kB: more than a pipe holds
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    common = ["--repo", str(repo), "-n", "aaaa0001", "-q", "--stems", "vocals", "--float32"]
    process = subprocess.Popen(
        [sys.executable, "-m", "htsep", str(clip), *common, "-o", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    assert len(os.read(process.stdout.fileno(), 10)) > 0
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 1
    error, summary = stderr.splitlines()
    assert error == f"htsep: error: {clip}: standard output was closed before the stem was written"
    assert re.fullmatch(r"htsep: 0 separated, 0 skipped, 1 failed \([0-9.]+ s\)", summary)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_a_full_standard_output_is_one_line(tmp_path, repo, unbuffered):
    from helpers import write_clip

    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    common = ["--repo", str(repo), "-n", "aaaa0001", "-q", "--stems", "vocals"]
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [sys.executable, "-m", "htsep", str(clip), *common, "-o", "-"],
            stdout=full,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": unbuffered},
            text=True,
            timeout=300,
        )
    assert done.returncode == 1
    error, summary = done.stderr.splitlines()
    assert error == (
        f"htsep: error: {clip}: cannot write the stem to standard output: No space left on device"
    )
    assert re.fullmatch(r"htsep: 0 separated, 0 skipped, 1 failed \([0-9.]+ s\)", summary)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_a_failed_copy_to_stdout_fails_the_track_not_after_its_success(tmp_path):
    """The stem was copied after the track was reported done: a full disk behind `-o - >`
    printed "1 stems in ..." and then an error without the track's name or the summary."""
    from helpers import write_clip

    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    command = [sys.executable, "-m", "htsep", str(clip), "-n", "htsep-tiny", "--stems", "drums"]
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [*command, "-o", "-"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=300
        )
    assert done.returncode == 1
    error = f"htsep: error: {clip}: cannot write the stem to standard output: No space left on"
    assert f"{error} device\n" in done.stderr
    assert re.search(r"\nhtsep: 0 separated, 0 skipped, 1 failed \([0-9.]+ s\)\n$", done.stderr)
    assert " stem in " not in done.stderr and " stems in " not in done.stderr
    with open(tmp_path / "drums.wav", "wb") as target:
        done = subprocess.run(
            [*command, "-o", "-"], stdout=target, stderr=subprocess.PIPE, text=True, timeout=300
        )
    assert done.returncode == 0, done.stderr
    assert "[1/1] song.wav: 1 stem in " in done.stderr  # one stem, not "1 stems"
    assert (tmp_path / "drums.wav").read_bytes()[:4] == b"RIFF"


@pytest.mark.parametrize("kind", ["file", "fifo", "link"])
def test_an_output_folder_in_the_way_fails_before_the_model_is_downloaded(tmp_path, kind):
    """-o naming a file was found only when the first stem was written, after htdemucs was
    downloaded: offline, the download error came instead (HTSEP_MIRROR is unreachable here)."""
    from helpers import write_clip

    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    blocker = tmp_path / "blocker"
    if kind == "fifo":
        os.mkfifo(blocker)
    else:
        blocker.write_bytes(b"mine")
    out = blocker
    if kind == "link":
        out = tmp_path / "link"
        out.symlink_to(blocker)
    result = runner.invoke(app, ["separate", "-q", str(clip), "-o", str(out / "sub")])
    assert result.exit_code == 1, result.output
    what = {
        "file": "is a file, not a folder",
        "fifo": "is a named pipe (FIFO), not a folder",
        "link": "is a symbolic link to a file, not to a folder",
    }[kind]
    assert result.stderr == (
        f"htsep: error: cannot create the output folder {out / 'sub' / 'htdemucs'}: {out} {what}\n"
    )
    assert not (tmp_path / "htsep-cache").exists() or not any((tmp_path / "htsep-cache").rglob("*"))
    if kind != "fifo":
        assert blocker.read_bytes() == b"mine"


def test_a_closed_standard_input_is_named_closed(tmp_path, repo):
    done = subprocess.run(
        [sys.executable, "-m", "htsep", "-", "--repo", str(repo), "-n", "aaaa0001", "-q"]
        + ["-o", str(tmp_path / "out")],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.close(0),
    )
    assert done.returncode == 2
    assert done.stderr == "htsep: error: '-' reads audio from standard input, which is closed\n"


def test_native_messages_are_muted_and_ours_are_not():
    """After own_stderr, a muted section drops what is written on descriptor 2 itself (as C
    libraries write), from any thread, while sys.stderr (all of htsep's lines) still reaches
    the terminal; descriptor 2 is back when the last section ends. A library caller who never
    called own_stderr keeps its descriptors as they are."""
    program = "\n".join([
        "import os, sys, threading",
        "from htsep.quiet import native_stderr_muted, own_stderr",
        "with native_stderr_muted():",
        "    os.write(2, b'before own_stderr\\n')",
        "own_stderr()",
        "with native_stderr_muted():",
        "    os.write(2, b'native\\n')",
        "    with native_stderr_muted():",
        "        os.write(2, b'nested\\n')",
        "    thread = threading.Thread(target=lambda: print('from a thread', file=sys.stderr))",
        "    thread.start(); thread.join()",
        "    os.write(2, b'still muted\\n')",
        "    print('ours', file=sys.stderr)",
        "os.write(2, b'after\\n')",
    ])  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "before own_stderr\nfrom a thread\nours\nafter\n"


def test_muting_without_a_free_descriptor_lets_the_work_go_on():
    """Under `ulimit -n` the os.dup(2) of the muting failed with a traceback (EMFILE) and
    stopped the batch: without descriptors to spare, nothing is muted."""
    program = "\n".join([
        "import os, resource, sys",
        "from htsep.quiet import native_stderr_muted, own_stderr",
        "own_stderr()",
        "held = []",
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))",
        "try:",
        "    while True: held.append(os.open(os.devnull, os.O_RDONLY))",
        "except OSError: pass",
        "with native_stderr_muted():",
        "    os.write(2, b'not muted\\n')",
        "for fd in held[:4]: os.close(fd)",
        "with native_stderr_muted():",
        "    os.write(2, b'muted\\n')",
        "os.write(2, b'after\\n')",
    ])  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "not muted\nafter\n"


def test_the_progress_bar_prints_no_warning_of_its_own(tmp_path, repo):
    """The bar's total was the length rounded to 0.01 s while the progress added up to the
    exact length: for most tracks tqdm printed "TqdmWarning: clamping frac to range [0, 1]"
    and a line of its source on stderr."""
    from helpers import write_clip

    clip = tmp_path / "song.wav"
    write_clip(clip, 1.004)
    done = subprocess.run(
        [sys.executable, "-m", "htsep", str(clip), "--repo", str(repo), "-n", "aaaa0001",
         "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "frac" not in done.stderr, done.stderr


def test_a_removed_current_folder_is_one_line(tmp_path):
    """In a folder removed under it, `import torch` died in MKL's loader ("Intel oneMKL FATAL
    ERROR"), exit 2, the code of usage errors."""
    gone = tmp_path / "gone"
    gone.mkdir()
    code = (
        "import os, sys; os.chdir(sys.argv[1]); os.rmdir(sys.argv[1]); "
        "sys.argv = ['htsep', 'models']; from htsep.cli import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(gone)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert done.stderr == (
        "htsep: error: the current folder was removed: cd into a folder that exists and run again\n"
    )


def test_log_lines_are_escaped_and_warnings_marked():
    """A cache folder or checkpoint path with a newline or an escape sequence split the log
    line (and coloured the terminal); warnings came without "warning:"."""
    import logging

    from htsep.cli import _LogLine

    def line(level: int, message: str) -> str:
        record = logging.LogRecord("htsep.zoo", level, __file__, 1, message, None, None)
        return _LogLine().format(record)

    assert line(logging.WARNING, "/tmp/ca\x1b[31m\nche/x.th: SHA-256 does not match") == (
        "htsep: warning: /tmp/ca\\x1b[31m\\nche/x.th: SHA-256 does not match"
    )
    assert line(logging.INFO, "loaded a\u2028b") == "htsep: loaded a\\u2028b"


def test_stdout_to_a_terminal_is_refused(tmp_path, repo):
    """-o - wrote a WAV's bytes onto the terminal (as gzip and others refuse to)."""
    import pty

    from helpers import write_clip

    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "htsep", str(clip), "--repo", str(repo), "-n", "aaaa0001",
             "--stems", "vocals", "-o", "-"],
            stdout=terminal, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(terminal)
        os.close(controller)
    assert done.returncode == 2
    assert done.stderr.startswith("htsep: error: -o - writes the stem's bytes to standard output")


def _json_records(result) -> list[tuple[str, str]]:
    return [
        (os.path.basename(r["input"]), r["status"])
        for r in map(json.loads, result.stdout.splitlines())
    ]


def test_an_interruption_leaves_every_input_its_record(tmp_path, repo, monkeypatch):
    # Interrupted at the first track: the second, whose stems are there (skipped), and the
    # third, which names nothing (failed), had their fate settled by the plan but had no
    # record yet; they used to get none, or "interrupted".
    from helpers import htsep as separate
    from helpers import write_clip

    from htsep import batch, separator

    write_clip(tmp_path / "t0.wav", 0.3)
    write_clip(tmp_path / "t1.wav", 0.3, seed=1)
    out = tmp_path / "out"
    for stem in ("drums", "bass", "other", "vocals"):
        write_clip(out / "aaaa0001" / "t1" / f"{stem}.wav", 0.3)
    inputs = [str(tmp_path / name) for name in ("t0.wav", "t1.wav", "gone.wav")]
    args = ["--repo", str(repo), "-n", "aaaa0001", "-o", str(out), "-q", "--json"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(batch._Run, "_separate", interrupted)
        result = separate(*args, "--skip-existing", "--no-pipeline", *inputs)
    assert result.exit_code == 130
    assert _json_records(result) == [
        ("t0.wav", "interrupted"),
        ("t1.wav", "skipped"),
        ("gone.wav", "failed"),
    ]
    # Interrupted while the model loads (a download): every input gets its record too.
    with monkeypatch.context() as patch:
        patch.setattr(separator.Separator, "__init__", interrupted)
        result = separate(*args, "--skip-existing", *inputs)
    assert result.exit_code == 130
    assert _json_records(result) == [
        ("t0.wav", "interrupted"),
        ("t1.wav", "interrupted"),
        ("gone.wav", "failed"),
    ]


def test_shards_give_each_input_one_record_when_the_output_folder_cannot_be_made(tmp_path, repo):
    # Every process of a job used to print the records of every input, its slice's or not:
    # four shards, four records per input.
    from helpers import htsep as separate
    from helpers import write_clip

    names = [f"t{index}.wav" for index in range(3)]
    for index, name in enumerate(names):
        write_clip(tmp_path / "album" / name, 0.3, seed=index)
    (tmp_path / "out").write_text("a file where the output folder goes")
    seen = []
    for shard in ("1/4", "2/4", "3/4", "4/4"):
        args = ["--repo", str(repo), "-n", "aaaa0001", "-o", str(tmp_path / "out"), "--json"]
        result = separate(*args, "--shard", shard, str(tmp_path / "album"))
        assert result.exit_code == 1, result.output
        assert "cannot create the output folder" in result.stderr
        assert {status for _, status in _json_records(result)} <= {"failed"}
        seen += [name for name, _ in _json_records(result)]
    assert sorted(seen) == names


# --- found by a hostile audit of the options (2026-12-06) --------------------------------------


def _command_line(*args: str):
    """``htsep ARGS`` as the script reads them (``demucs_style`` first), in this process."""
    from htsep.cli import demucs_style

    return runner.invoke(app, demucs_style(list(args)))


@pytest.fixture
def tiny_clip(tmp_path, monkeypatch):
    import numpy as np
    import soundfile as sf

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "s.wav", 0.1 * rng.standard_normal((8000, 2)), 44100)
    return tmp_path


def test_a_checkpoint_named_dot_slash_without_a_suffix_is_that_file(tiny_clip):
    """The README's own example: -n ./mymodel said "unknown model 'mymodel'" (pathlib drops the
    './', and the plain name went to the registry); a Path given to load_model is a file."""
    import shutil
    from pathlib import Path

    shutil.copyfile(Path(htsep.__file__).parent.parent / "models" / "htsep-tiny.safetensors",
                    tiny_clip / "mymodel")  # fmt: skip
    result = _command_line("-q", "-n", "./mymodel", "-o", "out", "--stems", "vocals", "s.wav")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tiny_clip / "out").glob("*/s/*")] == ["vocals.wav"]
    assert htsep.load_model(Path("mymodel")).sources
    refused = _command_line("-q", "-n", "./s.wav", "-o", "out2", "s.wav")
    assert refused.exit_code == 1 and "not a checkpoint" in refused.output, refused.output


def test_stems_given_twice_are_both_written(tiny_clip):
    args = ["-q", "-n", "htsep-tiny", "-o", "out", "--stems", "vocals", "--stems=drums", "s.wav"]
    result = _command_line(*args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tiny_clip / "out").glob("*/s/*")) == ["drums.wav", "vocals.wav"]
    empty = _command_line("-q", "-n", "htsep-tiny", "--stems", "vocals", "--stems", "", "s.wav")
    assert empty.exit_code == 2 and "empty value" in empty.output


def test_v_in_a_cluster_of_flags_and_as_an_options_value(tiny_clip):
    clustered = _command_line("-qv", "-n", "htsep-tiny", "-o", "out", "--stems", "bass", "s.wav")
    assert clustered.exit_code == 0, clustered.output  # "No such option: -v" before
    valued = _command_line("-q", "-n", "htsep-tiny", "-o", "-v", "--stems", "bass", "s.wav")
    assert valued.exit_code == 0, valued.output
    assert (tiny_clip / "-v" / "htsep-tiny" / "s" / "bass.wav").is_file()


def test_an_attached_short_option_value_is_checked_as_a_plain_number(tiny_clip):
    result = _command_line("-n", "htsep-tiny", "-j1_0", "s.wav")
    assert result.exit_code == 2 and "-j '1_0': not a plain whole number" in result.output


def test_mp3_preset_out_of_range_is_ignored_without_mp3_and_refused_with_it(tiny_clip):
    ignored = _command_line("-q", "-n", "htsep-tiny", "--mp3-preset", "9", "--stems", "bass",
                            "s.wav")  # fmt: skip
    assert ignored.exit_code == 0, ignored.output
    assert "--mp3-preset applies only with --mp3; ignored" in ignored.output
    refused = _command_line("-q", "-n", "htsep-tiny", "--mp3", "--mp3-preset", "9", "s.wav")
    assert refused.exit_code == 2
    assert "--mp3-preset must be 2 (best) to 7 (fastest), not 9" in refused.output
