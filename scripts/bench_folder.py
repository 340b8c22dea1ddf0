"""Folder throughput of `htsep separate` with and without the pipeline (the next track decoded
and the previous one encoded while a track is separated).

    python scripts/bench_folder.py [--tracks 4] [--seconds 60] [--runs 2] [--model htsep-tiny]
    python scripts/bench_folder.py --model released     # the released htdemucs layout

The folder holds deterministic stereo 44.1 kHz tracks (tones and noise) encoded as AAC in
.m4a files by ffmpeg (FLAC when ffmpeg is missing: then there is little to decode), and the
stems are written as MP3. Both settings run alternately, each in its own process; the table
gives median wall-clock seconds, their ratio, and whether both wrote the same bytes. The
gain is largest where the networks are fast next to decoding and encoding: a small model,
or a GPU.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import htsep_command  # noqa: E402
from script_args import positive, text, whole  # noqa: E402

import reference  # noqa: E402  (the demucs oracle builder shared with the tests)

RATE = 44100


def write_tracks(folder: Path, count: int, seconds: float) -> str:
    """-> the input format written (m4a or flac)."""
    folder.mkdir(parents=True)
    ffmpeg = shutil.which("ffmpeg")
    for index in range(count):
        rng = np.random.default_rng(index)
        t = np.arange(int(seconds * RATE)) / RATE
        tone = 0.1 * np.sin(2 * np.pi * (180 + 40 * index) * t)[:, None]
        audio = (tone + 0.04 * rng.standard_normal((t.size, 2))).astype(np.float32)
        wav = folder / f"track{index}.wav"
        if ffmpeg is None:
            sf.write(wav.with_suffix(".flac"), audio, RATE, subtype="PCM_16")
            continue
        sf.write(wav, audio, RATE, subtype="FLOAT")
        subprocess.run(
            [ffmpeg, "-v", "error", "-y", "-i", str(wav), "-c:a", "aac", "-b:a", "192k",
             str(wav.with_suffix(".m4a"))],
            check=True,
        )  # fmt: skip
        wav.unlink()
    return "flac" if ffmpeg is None else "m4a"


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.mp3"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=whole(1, 1000), default=4)
    parser.add_argument("--seconds", type=positive(3600), default=60.0, help="length of each track")
    parser.add_argument("--runs", type=whole(1, 1000), default=2, help="runs of each setting")
    parser.add_argument(
        "--model",
        type=text,
        default="htsep-tiny",
        help="a model name, or 'released' (random weights)",
    )
    args = parser.parse_args()
    if args.model != "released":
        from htsep import zoo
        from htsep.errors import HtsepError

        try:
            zoo.find_model(args.model)
        except HtsepError as exc:
            parser.error(f"--model: {exc}")
    work = Path(tempfile.mkdtemp(prefix="htsep-bench-folder-"))
    try:
        kind = write_tracks(work / "in", args.tracks, args.seconds)
        model = ["-n", args.model]
        if args.model == "released":
            built = reference.build(reference.SOURCES_4, reference.RELEASED, seed=1)
            reference.write_th(built, work / "repo", "htdemucs")
            model = ["--repo", str(work / "repo"), "-n", "htdemucs"]
        settings = {"--no-pipeline": [], "--pipeline": []}
        for run in range(args.runs):
            for flag, times in settings.items():
                command = [*htsep_command(), "separate", *model, "--mp3", "-q", "--overwrite"]
                out = work / flag.strip("-")
                times.append(timed([*command, flag, "-o", str(out), str(work / "in")]))
            print(
                f"run {run + 1}/{args.runs}: "
                + ", ".join(f"{flag} {times[-1]:.2f} s" for flag, times in settings.items()),
                flush=True,
            )
        serial, piped = (statistics.median(settings[f]) for f in ("--no-pipeline", "--pipeline"))
        same = outputs(work / "no-pipeline") == outputs(work / "pipeline")
        audio = args.tracks * args.seconds
        print()
        print(
            f"{args.tracks} tracks x {args.seconds:g} s, {kind} in, mp3 out, model {args.model}, "
            f"medians of {args.runs} runs (wall-clock seconds, start-up included)"
        )
        print(f"{'':<22}{'--no-pipeline':>14}{'--pipeline':>12}")
        print(f"{'seconds':<22}{serial:>14.2f}{piped:>12.2f}")
        print(f"{'real-time factor':<22}{serial / audio:>14.3f}{piped / audio:>12.3f}")
        print(f"{'pipeline / serial':<22}{piped / serial:>26.3f}")
        print(f"{'same output bytes':<22}{'yes' if same else 'NO':>26}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
