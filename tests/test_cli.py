import subprocess
import sys

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
