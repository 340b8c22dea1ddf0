"""Resampling cost and quality, every rate side by side with 44100 <-> 48000.

    .venv/bin/python scripts/bench_resample.py [--threads N] [--seconds 2 60]

Cost: each case runs in a fresh process (peak resident memory is a high-water mark), converting
stereo float32 noise of the given length; "extra MB" is the peak beyond the input and the
process before the call (the output included), "s" the best of three calls.
Quality: max |direct - torchaudio| on standard pairs (the direct method forced; float32 and
float64 input), and the error of band-limited multi-sines (up to 0.2 x the lower rate) converted
one way (against the sines evaluated at the output instants) and there and back.
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_args import positive, whole  # noqa: E402

RATES = (48000, 44099, 7999, 1000, 384000, 383999)
STANDARD_PAIRS = ((48000, 44100), (44100, 48000), (22050, 44100), (32000, 44100), (96000, 44100))
MODEL_RATE = 44100


def resample(signal, orig: int, new: int, method: str = "auto"):
    """The whole conversion of ``signal`` (..., T), read from htsep's ResampledSignal in the
    blocks separation reads it in."""
    import torch

    from htsep.apply import zero_extended
    from htsep.resample import ResampledSignal

    converted = ResampledSignal(
        lambda start, count: zero_extended(signal, start, count),
        signal.shape[-1],
        orig,
        new,
        method=method,  # type: ignore[arg-type]
    )
    block = 1 << 18
    return torch.cat(
        [
            converted.read(s, min(block, converted.length - s))
            for s in range(0, converted.length, block)
        ],
        -1,
    )


def one_case(orig: int, new: int, seconds: float, threads: int) -> None:
    """Runs in the child: prints 'method extra_mb seconds'."""
    import torch

    from htsep import resample as R

    torch.set_num_threads(threads)
    signal = torch.randn(2, round(orig * seconds))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(3):
        start = time.perf_counter()
        resample(signal, orig, new)
        times.append(time.perf_counter() - start)
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    gcd = math.gcd(orig, new)
    method = "polyphase" if max(orig, new) // gcd <= R.POLYPHASE_LIMIT else "direct"
    print(method, f"{extra:.0f}", f"{min(times):.3f}")


def cost(seconds: list[float], threads: int) -> None:
    print(f"\ncost, stereo float32, {threads} thread(s): extra MB / s")
    header = "".join(f"{f'{s:g} s':>22}" for s in seconds)
    print(f"{'conversion':<18}{'method':<11}{header}")
    for rate in RATES:
        for orig, new in ((rate, MODEL_RATE), (MODEL_RATE, rate)):
            cells, method = [], ""
            for duration in seconds:
                args = [sys.executable, __file__, "--case", str(orig), str(new), str(duration)]
                args += ["--threads", str(threads)]
                out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
                method, extra, took = out.split()
                cells.append(f"{extra:>10} MB {took:>7} s")
            print(f"{f'{orig}->{new}':<18}{method:<11}" + "".join(f"{c:>22}" for c in cells))


def sines(rate: int, length: int, freqs: list[float]):
    import torch

    t = torch.arange(length, dtype=torch.float64) / rate
    return sum(torch.sin(2 * math.pi * f * t + 0.3 * i) for i, f in enumerate(freqs)) / len(freqs)


def quality() -> None:
    import torch
    import torchaudio.functional as AF

    print("\nmax |direct - torchaudio|, randn (2, 3, 1 s + 17)")
    generator = torch.Generator().manual_seed(0)
    for orig, new in STANDARD_PAIRS:
        x = torch.randn(2, 3, orig + 17, generator=generator)
        f32 = (resample(x, orig, new, method="direct") - AF.resample(x, orig, new)).abs().max()
        d64 = resample(x.double(), orig, new, method="direct") - AF.resample(x.double(), orig, new)
        exact = (resample(x, orig, new, method="direct") - AF.resample(x.double(), orig, new)).abs()
        print(
            f"{orig:>6}->{new:<6} float32 {f32:.1e}  float64 {d64.abs().max():.1e}  "
            f"(direct float32 vs torchaudio float64 {exact.max():.1e})"
        )
    print("\nband-limited multi-sine (0.067, 0.133, 0.2 x lower rate), 1 s, 50 ms edges off")
    for rate in RATES[1:] + (11025, 8000, 48000):
        low = min(rate, MODEL_RATE)
        freqs = [0.2 * low * k / 3 for k in (1, 2, 3)]
        x = sines(rate, rate, freqs).float()
        y = resample(x, rate, MODEL_RATE)
        ref = sines(MODEL_RATE, y.shape[-1], freqs)
        edge, back_edge = MODEL_RATE // 20, rate // 20
        one_way = (y - ref)[edge:-edge].abs().max()
        back = resample(y, MODEL_RATE, rate)[: x.shape[-1]]
        round_trip = (back - x)[back_edge:-back_edge].abs().max()
        print(f"{rate:>6}: {rate}->44100 {one_way:.1e}   round trip {round_trip:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", nargs=3, type=positive(), metavar=("ORIG", "NEW", "SECONDS"))
    parser.add_argument("--threads", type=whole(1, 1024), default=1)
    parser.add_argument("--seconds", nargs="+", type=positive(3600), default=[2, 60])
    args = parser.parse_args()
    if args.case:
        orig, new, seconds = args.case
        for rate in (orig, new):
            if rate != int(rate) or not 1000 <= rate <= 384000:
                parser.error(f"--case: {rate:g} Hz is not a whole rate from 1000 to 384000")
        if seconds > 3600:
            parser.error(f"--case: {seconds:g} s is out of range (at most 3600)")
        one_case(int(orig), int(new), seconds, args.threads)
        return
    with open("/proc/cpuinfo") as cpuinfo:
        names = [line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line]
    model = names[0] if names else platform.processor()
    print(f"CPU: {model}")
    cost(args.seconds, args.threads)
    quality()


if __name__ == "__main__":
    main()
