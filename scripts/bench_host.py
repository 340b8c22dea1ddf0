"""The host's share of a separation: overlap-add and assembling the stems, without the network.

    python scripts/bench_host.py [--seconds 240] [--batch 16] [--runs 8] [--baseline ../old]

A runner that returns a fixed estimate at once stands in for the network calls, so what is
timed is what the host does around them: on a GPU that work has to hide behind the next call,
and on an H200 it was about half of a bf16 separation's time. With ``--baseline`` the
``htsep/apply.py`` of another checkout runs too, alternating with this one in one process, and
the ratio of each pair is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import torch

import htsep.apply

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_args import checkout, positive, whole  # noqa: E402

CHUNK = 343980  # the released htdemucs segment at 44.1 kHz


class _Model:
    segment_length = CHUNK
    sample_rate = 44100
    audio_channels = 2
    sources = ["drums", "bass", "other", "vocals"]
    segment = Fraction(CHUNK, 44100)


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_apply", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_apply"] = module
    spec.loader.exec_module(module)
    return module


def once(module: ModuleType, mix: torch.Tensor, estimate: torch.Tensor, batch: int) -> float:
    class Runner(module.NetworkRunner):  # type: ignore[name-defined,misc]
        def submit(self, model: object, windows: list[torch.Tensor]) -> object:
            return module.PendingBatch([(estimate[: len(windows)], None)])

    length = mix.shape[-1]
    stream = module.SeparationStream(
        [(_Model(), [1.0] * 4)],
        lambda start, count: module.zero_extended(mix, start, count),
        length,
        shifts=1,
        generator=torch.Generator().manual_seed(0),
        options=module.ChunkOptions(batch_size=batch),
        runner=Runner("cpu", "fp32", batch, full_calls=False),
    )
    started = time.perf_counter()
    stream.take(length)  # as Separator.separate_tensor takes it: the whole track at once
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=positive(3600), default=240.0)
    parser.add_argument("--batch", type=whole(1, 1024), default=16, help="chunks per network call")
    parser.add_argument("--runs", type=whole(1, 1000), default=8)
    parser.add_argument("--baseline", type=checkout, help="another checkout to compare with")
    args = parser.parse_args()
    mix = torch.randn(1, 2, int(args.seconds * 44100))
    estimate = torch.randn(args.batch, 4, 2, CHUNK)
    modules = {"htsep": htsep.apply}
    if args.baseline is not None:
        modules["baseline"] = _load(args.baseline / "htsep" / "apply.py")
    times: dict[str, list[float]] = {name: [] for name in modules}
    for run in range(args.runs):
        order = list(modules.items())
        for name, module in order if run % 2 else order[::-1]:
            times[name].append(once(module, mix, estimate, args.batch))
    print(
        f"host side of a {args.seconds:g}-s separation, {args.batch} chunks per call, "
        f"{torch.get_num_threads()} threads, median of {args.runs}:"
    )
    for name, values in times.items():
        print(
            f"  {name}: {statistics.median(values):.3f} s ({', '.join(f'{v:.2f}' for v in values)})"
        )
    if "baseline" in times:
        ratios = [a / b for a, b in zip(times["htsep"], times["baseline"], strict=True)]
        print(f"  htsep / baseline, median of the pairs' ratios: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
