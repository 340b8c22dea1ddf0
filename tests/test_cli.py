import subprocess
import sys
import tempfile

from typer.testing import CliRunner

import htsep
from htsep.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"htsep {htsep.__version__}"


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "info" in result.output


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


def test_info_missing_file_is_one_line_and_nonzero(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "htsep.cli", "info", str(tmp_path / "x.th")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
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


def test_a_first_argument_that_is_not_a_command_separates(tmp_path, repo):
    from test_separate import write_clip

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
    from test_separate import write_clip

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


def test_pipes_refuse_what_cannot_go_to_one_stream(tmp_path, repo):
    from test_separate import write_clip

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
    assert result.stderr.strip() == (
        f"htsep: error: -: cannot keep standard input in {tmp_path}: No space left on device"
    )
    assert list(tmp_path.iterdir()) == []
