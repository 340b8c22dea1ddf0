"""scripts/bench_gpu.py --smoke on the CPU: the GPU benchmark runs every section at toy sizes and
reports real figures (parity against demucs 4.1.0 included), so that it still works on the day a
GPU machine is lent. Each test runs the script in its own process, as it runs there."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_gpu.py"
SECTIONS = ("parity", "precision", "memory", "speed", "folder")
HEADERS = ["(a) parity:", "(d) precision:", "(c) memory:", "(b) speed:", "(e) folder:"]

# bf16 as if this CPU had bfloat16 arithmetic (torch emulates it; the toy model is small), so
# that the reduced-precision paths of every section run here too.
FORCE_BF16 = """
import runpy, sys
import htsep.separator
for name, module in list(sys.modules.items()):
    if name.startswith("htsep") and hasattr(module, "bf16_arithmetic"):
        module.bf16_arithmetic = lambda: True
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(tmp_path: Path, *args: str, force_bf16: bool = False) -> tuple[str, dict[str, Any]]:
    """Run the smoke benchmark on the CPU -> (stdout, the --json record); exit status 0."""
    out = tmp_path / "bench.json"
    command = [str(SCRIPT), "--smoke", "--device", "cpu", "--json", str(out), *args]
    prefix = [sys.executable, "-c", FORCE_BF16] if force_bf16 else [sys.executable]
    done = subprocess.run(
        [*prefix, *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _figures(section: dict[str, Any]) -> list[float]:
    """Every number a section recorded, its own duration aside."""
    found: list[float] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for item in node.values():
                walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif _finite(node):
            found.append(node)

    walk({key: value for key, value in section.items() if key != "section_seconds"})
    return found


def _check_every_section_reported(stdout: str, record: dict[str, Any]) -> None:
    """Each section printed its header, then figures or explicit skips, in order."""
    positions = [stdout.index(header) for header in HEADERS]
    assert positions == sorted(positions)
    ends = [*positions[1:], stdout.index("\nGoals")]
    for position, following in zip(positions, ends, strict=True):
        lines = stdout[position:following].strip().splitlines()[1:]
        assert lines, f"nothing printed after {stdout[position:].splitlines()[0]!r}"
    for name in SECTIONS:
        skipped = [skip for skip in record["skips"] if skip["section"] == name]
        assert _figures(record["sections"][name]) or skipped, name
        assert all(skip["reason"] for skip in skipped)
        assert _finite(record["sections"][name]["section_seconds"])


def test_smoke_run_on_the_cpu(tmp_path):
    stdout, record = _run(tmp_path)
    assert record["mode"] == "smoke" and record["device"] == "cpu"
    assert record["machine"]["cpu"] and record["machine"]["torch"]
    _check_every_section_reported(stdout, record)
    sections = record["sections"]

    # Parity: htsep against demucs 4.1.0, an independent implementation (so not exactly 0),
    # for one forward pass and for a chunked separation; batched (2) against one chunk a call.
    parity = sections["parity"]
    for step in ("forward", "separation"):
        assert 0 < parity[step]["htsep_cpu_vs_demucs_cpu"] < 1e-4, parity
    assert parity["separation"]["htsep_cpu_vs_htsep_cpu"] < 1e-4

    # Quality: the shipped htsep-tiny separates the synthetic track well above the baseline.
    precision = sections["precision"]
    assert _finite(precision["tiny_nsdr_db"]["fp32"])
    assert precision["tiny_nsdr_db"]["fp32"] > precision["tiny_baseline_nsdr_db"] + 3

    memory = sections["memory"]["fp32"]
    assert memory["batches"] == [1, 2]
    assert all(used > 0 for used in memory["peak_bytes"])
    assert _finite(memory["per_chunk_bytes"]) and _finite(memory["fixed_bytes"])
    lines = sections["memory"]["devices_lines"]
    assert lines[0].startswith("CHUNK_BYTES = {") and lines[1].startswith("CALL_BYTES = {")
    assert sections["memory"]["devices_lines_copyable"] is False  # a CPU figure

    speed = sections["speed"]["fp32"]
    assert speed["auto"]["batch_size"] == 1  # htsep's choice on a CPU
    assert speed["2"]["batch_size"] == 2 and speed["1"]["batch_size"] == 1
    for setting in ("auto", "1", "2", "network"):
        assert _finite(speed[setting]["times_real_time"]) and speed[setting]["seconds"] > 0

    folder = sections["folder"]
    assert folder["tracks"] == 2
    for key in ("pipeline", "no_pipeline"):
        assert folder[key]["times_real_time"] > 0

    # What this CPU lacks is skipped with its reason in every section that would use it.
    reasons = {(skip["section"], skip["what"]): skip["reason"] for skip in record["skips"]}
    for missing in {"bf16", "fp16"} - set(record["precisions"]):
        for name in ("precision", "memory", "speed"):
            assert missing in reasons[name, missing], (name, missing)
    assert "fp16 needs a CUDA device" in stdout

    goals = {row["goal"]: row for row in record["goals"]}
    assert goals["fp32 parity, htsep cpu vs demucs cpu"]["status"] == "PASS"
    assert goals["fp32 parity, htsep cpu vs htsep cpu"]["status"] == "PASS"
    assert "PASS" in stdout.split("\nGoals")[1]


def test_smoke_run_with_bf16(tmp_path):
    """The reduced-precision bookkeeping (SNR, nSDR change, per-chunk ratio, speed table, goals)
    runs before a GPU does: bf16 on the CPU, forced."""
    stdout, record = _run(tmp_path, force_bf16=True)
    assert record["precisions"] == ["fp32", "bf16"]
    _check_every_section_reported(stdout, record)
    sections = record["sections"]
    precision = sections["precision"]
    assert 20 < precision["released_snr_db"]["bf16"] < 90
    assert 20 < precision["tiny_snr_db"]["bf16"] < 90
    assert abs(precision["tiny_nsdr_change_db"]["bf16"]) < 1
    assert _finite(sections["memory"]["bf16"]["per_chunk_bytes"])
    assert '"bf16": ' in sections["memory"]["devices_lines"][0]  # its own per-chunk bytes
    assert sections["speed"]["bf16"]["auto"]["times_real_time"] > 0
    assert sections["folder"]["precision"] == "bf16"
    goals = {row["goal"]: row for row in record["goals"]}
    for name in ("bf16 SNR vs fp32, released (random weights)", "bf16 SNR vs fp32, htsep-tiny"):
        assert goals[name]["status"] == "PASS", goals[name]
    assert goals["bf16 speed, auto batch"]["status"] in ("PASS", "FAIL")


def test_out_of_time_skips_and_still_reports(tmp_path):
    """A budget spent before the first section: every section says so, the run ends normally
    with the summary and the JSON."""
    stdout, record = _run(tmp_path, "--budget", "1")
    assert stdout.count("all: skipped: out of time") == len(SECTIONS)
    assert {skip["section"] for skip in record["skips"]} == set(SECTIONS)
    assert all(row["status"] == "n/a" for row in record["goals"])
    assert "\nGoals" in stdout
