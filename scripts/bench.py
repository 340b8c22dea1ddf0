"""Speed of `htsep separate` against `demucs` on the same checkpoint and clip.

    python scripts/bench.py [--seconds 30] [--runs 3]

Writes demucs's HTDemucs with the released htdemucs settings and random weights through
demucs's own serializer, synthesizes a stereo 44.1 kHz clip, then runs both commands with
`--shifts 0 --float32`, alternating, and prints the median wall-clock times, their ratio and the
largest difference between the stems.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import reference  # noqa: E402  (the demucs oracle builder shared with the tests)

RATE = 44100


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="htsep-bench-"))
    model = reference.build(reference.SOURCES_4, reference.RELEASED, seed=1)
    reference.write_th(model, work / "repo", "released")
    frames = int(args.seconds * RATE)
    rng = np.random.default_rng(0)
    t = np.arange(frames) / RATE
    clip = 0.1 * np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 331 * t)], 1)
    clip += 0.05 * rng.standard_normal((frames, 2))
    sf.write(work / "clip.wav", clip.astype(np.float32), RATE, subtype="FLOAT")
    common = ["--repo", str(work / "repo"), "-n", "released", "--shifts", "0", "--float32"]
    demucs = [
        sys.executable,
        "-m",
        "demucs",
        *common,
        "-o",
        str(work / "demucs"),
        str(work / "clip.wav"),
    ]
    htsep = [
        "htsep",
        "separate",
        *common,
        "-q",
        "--overwrite",
        "-o",
        str(work / "htsep"),
        str(work / "clip.wav"),
    ]
    times: dict[str, list[float]] = {"demucs": [], "htsep": []}
    for _ in range(args.runs):
        times["demucs"].append(timed(demucs))
        times["htsep"].append(timed(htsep))
    worst = 0.0
    for stem in reference.SOURCES_4:
        ref, _ = sf.read(work / "demucs" / "released" / "clip" / f"{stem}.wav")
        ours, _ = sf.read(work / "htsep" / "released" / "clip" / f"{stem}.wav")
        worst = max(worst, float(np.abs(ref - ours).max()))
    med = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.seconds:g} s clip, {args.runs} alternating runs each"
    )
    print(f"{'':<8}{'median s':>10}{'x real time':>13}  runs")
    for name in ("demucs", "htsep"):
        runs = ", ".join(f"{value:.1f}" for value in times[name])
        print(f"{name:<8}{med[name]:>10.2f}{args.seconds / med[name]:>13.2f}  {runs}")
    print(f"ratio htsep/demucs: {med['htsep'] / med['demucs']:.2f}")
    print(f"largest stem difference: {worst:.2e}")


if __name__ == "__main__":
    main()
