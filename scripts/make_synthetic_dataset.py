"""Write a deterministic synthetic multitrack dataset in the MUSDB18-HQ layout.

    python scripts/make_synthetic_dataset.py OUT --tracks N --seconds S --seed K
        [--sample-rate 44100] [--test-tracks M]

writes ``OUT/train/synth-0000/{mixture,drums,bass,other,vocals}.wav`` ... (N tracks) and
``OUT/test/synth-0000/...`` (M tracks, default max(1, N // 4)): stereo 16-bit PCM, S seconds
each, where every mixture is exactly the sum of its four stems. The same command always writes
the same bytes; test tracks never repeat train tracks. See ``htsep/synthetic.py`` for the sound
design. An existing ``OUT/train`` or ``OUT/test`` is an error (exit code 2) and is left as it is,
unless it is the complete set this very command wrote before (``OUT/synthetic.json`` records
the arguments): then nothing is written and the exit code is 0, so the command can be rerun.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import NoReturn

from htsep.synthetic import (
    MIN_SAMPLE_RATE,
    OutputExistsError,
    default_test_tracks,
    write_dataset,
)

PROG = "make_synthetic_dataset"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``make_synthetic_dataset: error: ...``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="dataset folder (must hold no train/ or test/)")
    parser.add_argument("--tracks", type=int, required=True, help="number of train tracks")
    parser.add_argument("--seconds", type=float, required=True, help="length of every track")
    parser.add_argument("--seed", type=int, required=True, help="seed (>= 0) of the whole set")
    parser.add_argument("--sample-rate", type=int, default=44100, help="Hz (default 44100)")
    parser.add_argument(
        "--test-tracks", type=int, help="number of test tracks (default max(1, tracks // 4))"
    )
    args = parser.parse_args(argv)
    if args.tracks < 1:
        parser.error(f"--tracks must be at least 1, got {args.tracks}")
    if args.test_tracks is not None and args.test_tracks < 1:
        parser.error(f"--test-tracks must be at least 1, got {args.test_tracks}")
    if not (math.isfinite(args.seconds) and args.seconds > 0):
        parser.error(f"--seconds must be a positive number, got {args.seconds}")
    if args.seed < 0:
        parser.error(f"--seed must be at least 0, got {args.seed}")
    if args.sample_rate < MIN_SAMPLE_RATE:
        parser.error(f"--sample-rate must be at least {MIN_SAMPLE_RATE}, got {args.sample_rate}")
    if round(args.seconds * args.sample_rate) < 1:
        parser.error(f"--seconds {args.seconds} is shorter than one sample")

    started = time.perf_counter()
    try:
        written = write_dataset(
            args.out, args.tracks, args.seconds, args.seed, args.sample_rate, args.test_tracks
        )
    except OutputExistsError as error:
        parser.error(f"{error}: remove it or choose another folder")
    except OSError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    test_tracks = default_test_tracks(args.tracks) if args.test_tracks is None else args.test_tracks
    if not written:
        print(f"{args.out} already holds this dataset (same arguments); nothing written")
        return 0
    print(
        f"wrote {args.tracks} train and {test_tracks} test tracks of {args.seconds:g} s at "
        f"{args.sample_rate} Hz to {args.out} in {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
