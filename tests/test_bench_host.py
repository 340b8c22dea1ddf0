"""scripts/bench_host.py runs, and compares a baseline checkout in the same process."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_host_runs_with_a_baseline():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_host.py"), "--seconds", "20",
         "--batch", "2", "--runs", "2", "--baseline", str(ROOT)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("host side of a 20-s separation, 2 chunks per call")
    assert any(line.strip().startswith("htsep: ") for line in lines)
    ratio = float(lines[-1].rsplit(":", 1)[1])
    assert 0.2 < ratio < 5  # the same code on both sides
