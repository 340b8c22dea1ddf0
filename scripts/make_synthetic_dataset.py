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
The set is written in a hidden folder inside OUT and moved into place once complete: a run that
fails (exit code 1) or is interrupted (Ctrl-C: 130, SIGTERM: 143) leaves OUT as it was, so the
same command can simply be run again.
"""

from __future__ import annotations

import signal
import sys

_STOPPING = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
if __name__ == "__main__":
    # Ctrl-C or SIGTERM while numpy and soundfile load (a tenth of a second) is held back until
    # the handlers are set, then stops the command with its one line, not a traceback.
    _HELD = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPPING)

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NoReturn  # noqa: E402

from htsep import files  # noqa: E402
from htsep.interrupts import Terminated, signals_as_interrupts  # noqa: E402
from htsep.synthetic import (  # noqa: E402
    MAX_FRAMES,
    MAX_SAMPLE_RATE,
    MAX_SECONDS,
    MAX_TRACKS,
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
    parser.add_argument("out", help="dataset folder (must hold no train/ or test/)")
    parser.add_argument(
        "--tracks", type=int, required=True, help=f"number of train tracks (1 to {MAX_TRACKS})"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        required=True,
        help=f"length of every track: at most {MAX_SECONDS:g} s and {MAX_FRAMES} frames "
        f"({MAX_FRAMES / MAX_SAMPLE_RATE:g} s at {MAX_SAMPLE_RATE} Hz), since a track is "
        "rendered whole in memory, about 120 bytes a frame (1.7 GB at most)",
    )
    parser.add_argument("--seed", type=int, required=True, help="seed (>= 0) of the whole set")
    parser.add_argument(
        "--sample-rate",
        type=int,
        default=44100,
        help=f"Hz, {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} (default 44100)",
    )
    parser.add_argument(
        "--test-tracks",
        type=int,
        help=f"number of test tracks (1 to {MAX_TRACKS}, default max(1, tracks // 4))",
    )
    args = parser.parse_args(argv)
    _check(parser, args)

    started = time.perf_counter()
    with signals_as_interrupts():
        try:
            try:
                written = write_dataset(
                    Path(args.out),
                    args.tracks,
                    args.seconds,
                    args.seed,
                    args.sample_rate,
                    args.test_tracks,
                )
            except BaseException:
                # What an interruption left between a temporary's creation and its removal.
                files.remove_unfinished()
                raise
        except OutputExistsError as error:
            parser.error(f"{error}: remove it or choose another folder")
        except OSError as error:  # no "[Errno 5]" in the line
            said = error.strerror or str(error)
            return _fail(f"{error.filename}: {said}" if error.filename else said, 1)
        except MemoryError:
            return _fail(
                f"out of memory rendering a track of {args.seconds:g} s at {args.sample_rate} Hz "
                "(try fewer --seconds or a lower --sample-rate)",
                1,
            )
        except KeyboardInterrupt as stop:
            return _stopped(stop)
    test_tracks = default_test_tracks(args.tracks) if args.test_tracks is None else args.test_tracks
    if not written:
        print(f"{args.out} already holds this dataset (same arguments); nothing written")
        return 0
    print(
        f"wrote {args.tracks} train and {test_tracks} test tracks of {args.seconds:g} s at "
        f"{args.sample_rate} Hz to {args.out} in {time.perf_counter() - started:.1f} s"
    )
    return 0


def _check(parser: _Parser, args: argparse.Namespace) -> None:
    """Refuse (exit code 2) arguments ``write_dataset`` would refuse, or could not carry out."""
    if not args.out.strip():
        parser.error("OUT is an empty string (an unset variable in a script?)")
    for option, value in (("--tracks", args.tracks), ("--test-tracks", args.test_tracks)):
        if value is not None and value < 1:
            parser.error(f"{option} must be at least 1, got {value}")
        if value is not None and value > MAX_TRACKS:
            parser.error(f"{option} must be at most {MAX_TRACKS}, got {value}")
    if not (math.isfinite(args.seconds) and args.seconds > 0):
        parser.error(f"--seconds must be a positive number, got {args.seconds}")
    if args.seconds > MAX_SECONDS:
        parser.error(
            f"--seconds must be at most {MAX_SECONDS:g} (a track is rendered whole in memory), "
            f"got {args.seconds:g}"
        )
    if args.seed < 0:
        parser.error(f"--seed must be at least 0, got {args.seed}")
    if args.sample_rate < MIN_SAMPLE_RATE:
        parser.error(f"--sample-rate must be at least {MIN_SAMPLE_RATE}, got {args.sample_rate}")
    if args.sample_rate > MAX_SAMPLE_RATE:
        parser.error(
            f"--sample-rate must be at most {MAX_SAMPLE_RATE} (the highest rate htsep reads), "
            f"got {args.sample_rate}"
        )
    frames = round(args.seconds * args.sample_rate)
    if frames < 1:
        parser.error(f"--seconds {args.seconds} is shorter than one sample")
    if frames > MAX_FRAMES:
        parser.error(
            f"--seconds {args.seconds:g} at --sample-rate {args.sample_rate} is {frames} frames "
            f"a track, more than {MAX_FRAMES} (a track is rendered whole in memory)"
        )


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _stopped(stop: KeyboardInterrupt) -> int:
    signum = stop.signum if isinstance(stop, Terminated) else signal.SIGINT
    how = {signal.SIGINT: "interrupted", signal.SIGHUP: "hung up"}.get(signum, "terminated")
    return _fail(f"{how}: nothing was written (run the command again)", 128 + signum)


if __name__ == "__main__":
    try:
        with signals_as_interrupts():
            signal.pthread_sigmask(signal.SIG_SETMASK, _HELD)  # one that came is raised here
            code = main()
    except KeyboardInterrupt as stop:
        code = _stopped(stop)
    sys.exit(code)
