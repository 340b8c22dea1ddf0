"""Peak memory of `htsep separate` (and optionally `demucs`) against track length.

    python scripts/bench_memory.py [--minutes 1 10 60] [--configs small released] [--demucs]
    python scripts/bench_memory.py --keep-memory     # htsep --keep-memory instead

For each configuration a demucs HTDemucs with random weights is written with demucs's own
serializer (the released htdemucs settings, or a small one); for each length a stereo 44.1 kHz
16-bit WAV is synthesized block by block; each separation runs in its own process and its peak
resident memory (ru_maxrss from wait4) is reported side by side.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import htsep_command  # noqa: E402
from script_args import positive  # noqa: E402

import reference  # noqa: E402  (the demucs oracle builder shared with the tests)

CONFIGS = {
    # Small: every block of the architecture at a fraction of the width, 44.1 kHz.
    "small": {
        **reference.SMALL,
        "samplerate": 44100,
        "segment": Fraction(39, 5),
        "nfft": 4096,
        "depth": 4,
        "channels": 8,
    },
    "released": reference.RELEASED,
}
RATE = 44100


def write_track(path: Path, minutes: float) -> None:
    rng = np.random.default_rng(0)
    frames = int(minutes * 60 * RATE)
    block = 1 << 20
    with sf.SoundFile(path, "w", RATE, 2, subtype="PCM_16") as out:
        for start in range(0, frames, block):
            n = min(block, frames - start)
            t = (start + np.arange(n)) / RATE
            tone = 0.2 * np.sin(2 * np.pi * 220 * t)[:, None]
            out.write((tone + 0.05 * rng.standard_normal((n, 2))).astype(np.float32))


def peak_rss(command: list[str]) -> tuple[float, float]:
    """Run ``command``; -> (peak resident memory in MB, seconds)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"{command[:3]} failed: {process.stderr.read().decode()[-500:]}")
    return usage.ru_maxrss / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=positive(600), nargs="+", default=[1, 10, 60])
    parser.add_argument(
        "--configs", nargs="+", default=["small", "released"], choices=sorted(CONFIGS)
    )
    parser.add_argument("--demucs", action="store_true", help="also run demucs 4.1.0")
    parser.add_argument(
        "--keep-memory", action="store_true", help="run htsep with --keep-memory (faster)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="htsep-bench-memory-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    """Write the tracks and checkpoints under ``work`` and print one row per run."""
    tracks = {}
    for minutes in args.minutes:
        tracks[minutes] = work / f"track-{minutes:g}min.wav"
        write_track(tracks[minutes], minutes)
    baseline, _ = peak_rss([sys.executable, "-c", "import htsep.cli, htsep.separator"])
    print(
        f"baseline: importing htsep (torch {__import__('torch').__version__}) takes "
        f"{baseline:.0f} MB"
    )
    print(
        f"{'config':<10}{'minutes':>8}{'htsep MB':>10}{'htsep s':>9}"
        f"{'demucs MB':>11}{'demucs s':>10}"
    )
    for config in args.configs:
        repo = work / config
        model = reference.build(reference.SOURCES_4, CONFIGS[config], seed=1)
        reference.write_th(model, repo, config)
        for minutes, track in tracks.items():
            common = ["--repo", str(repo), "-n", config, "--shifts", "1"]
            ours, ours_s = peak_rss(
                [
                    *htsep_command(),
                    "separate",
                    *common,
                    "-q",
                    "--overwrite",
                    *(["--keep-memory"] if args.keep_memory else []),
                    "-o",
                    str(work / "htsep"),
                    str(track),
                ]
            )
            theirs = theirs_s = float("nan")
            if args.demucs:
                theirs, theirs_s = peak_rss(
                    [
                        sys.executable,
                        "-m",
                        "demucs",
                        *common,
                        "-o",
                        str(work / "demucs"),
                        str(track),
                    ]
                )
            print(
                f"{config:<10}{minutes:>8g}{ours:>10.0f}{ours_s:>9.0f}"
                f"{theirs:>11.0f}{theirs_s:>10.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
