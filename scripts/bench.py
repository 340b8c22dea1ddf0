"""Speed of `htsep separate` against `python -m demucs` (demucs 4.1.0) on the same checkpoint.

    python scripts/bench.py [--seconds 30 180] [--runs 3] [--keep DIR] [--threads N]
    python scripts/bench.py --forward [--runs 5]
    python scripts/bench.py --no-bf16            # no htsep --precision bf16 column
    python scripts/bench.py --keep-memory        # also htsep --keep-memory (more memory)
    python scripts/bench.py --baseline DIR       # also the htsep of another checkout
    python scripts/bench.py --tuned-malloc       # every command with glibc tuned to keep memory

The first line names the CPU, its vector extensions, torch's kernel level and which library
multiplies htsep's float32 matrices (htsep.model.kernels.cpu_products); every figure belongs
to it.

A demucs HTDemucs with the released htdemucs settings and random weights is written with
demucs's own serializer into a temporary checkpoint folder; deterministic stereo 44.1 kHz clips
(tones and noise at about 0.1 amplitude, 32-bit float WAV), by default of 30 s and 3 minutes,
are separated by each command, alternating, each run in its own process (start-up and model
loading included, --shifts 0, float32 output). Per clip the table gives medians of wall-clock
seconds, the ratio to demucs, the real-time factors (seconds of compute per second of audio),
the minor page faults per chunk of the clip (pages the kernel mapped fresh for the process,
start-up included) and each command's largest absolute difference from demucs's stems (SNR
for bf16, which is not exact). htsep --precision bf16 is timed where the CPU has bfloat16
arithmetic (htsep.devices.bf16_arithmetic); elsewhere a line says why not.

Then the share of htsep's time outside its network calls, from the same runs: each htsep
command runs through a small launcher (``NETWORK_TIMER``, written into the work folder) that
times every call of the network's forward pass inside the command and writes the times at
exit, so the network time and the command's time come from one process and one moment. As a
cross-check, one forward pass timed alone in this process (alternating with the commands),
times the clip's chunks, is printed too.

--forward times one forward pass of each network instead (one released-length segment), on
identical weights loaded from the same file, alternating in this process (and htsep's bfloat16
copy where the CPU has bfloat16 arithmetic), and sets them against the floor: the chunk's
FLOP count over the rate of a large float32 matrix product (torch.mm's and oneDNN's, which
differ on AMD CPUs; the floor takes the faster), and bf16's over a bfloat16 product's.

Each clip's report and --forward end with the arithmetic floor: the time of the network calls
with every product at that rate and everything else free, as a fraction of demucs's time (and
in bf16, of htsep fp32's): no htsep can reach a lower ratio on that machine.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_args import checkout, folder, positive, whole  # noqa: E402

import reference  # noqa: E402  (the demucs oracle builder shared with the tests)

RATE = 44100
SIGNATURE = "htdemucs"
# glibc keeps freed blocks for reuse instead of returning them to the kernel, so large tensors do
# not pay for fresh page faults on every call (see --tuned-malloc).
TUNED_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
    "MALLOC_TOP_PAD_": str(1 << 28),
}


def write_checkpoint(repo: Path) -> Path:
    """The released htdemucs architecture with random weights, as demucs writes it."""
    model = reference.build(reference.SOURCES_4, reference.RELEASED, seed=1)
    path, _ = reference.write_th(model, repo, SIGNATURE)
    return path


def write_clip(path: Path, seconds: float) -> None:
    """Deterministic stereo test clip: a few tones plus noise, peaks well under 1."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * RATE)) / RATE
    left = 0.05 * np.sin(2 * np.pi * 220 * t) + 0.03 * np.sin(2 * np.pi * 1375 * t)
    right = 0.05 * np.sin(2 * np.pi * 330 * t) + 0.02 * np.sin(2 * np.pi * 5000 * t)
    noise = 0.02 * rng.standard_normal((t.size, 2))
    audio = np.stack([left, right], axis=1) + noise
    sf.write(path, audio.astype(np.float32), RATE, subtype="FLOAT")


# htsep's command line with the wall-clock time of every network call recorded, for the share
# of a run spent outside them. Argument 1 is the file the call times go to (seconds, one per
# line), written by an atexit handler (htsep's exit runs those before it skips the teardown).
NETWORK_TIMER = """\
import atexit
import sys
import time
from pathlib import Path

from htsep.model import htdemucs

spent = []
untimed = htdemucs.HTDemucs.forward


def forward(self, mix):
    started = time.perf_counter()
    try:
        return untimed(self, mix)
    finally:
        spent.append(time.perf_counter() - started)


htdemucs.HTDemucs.forward = forward
report = Path(sys.argv.pop(1))
atexit.register(lambda: report.write_text("".join(f"{t!r}\\n" for t in spent)))
sys.argv[0] = "htsep"
from htsep.cli import main  # noqa: E402

main()
"""


def network_timed(command: list[str], timer: Path, report: Path) -> list[str]:
    """``command`` (``[htsep or python -m htsep, arguments...]``) through NETWORK_TIMER."""
    arguments = command[3:] if command[1:3] == ["-m", "htsep"] else command[1:]
    return [sys.executable, str(timer), str(report), *arguments]


def read_network_time(report: Path) -> list[float]:
    """Seconds of each network call that NETWORK_TIMER wrote; the file is removed."""
    calls = [float(line) for line in report.read_text().split()]
    report.unlink()
    return calls


def htsep_command() -> list[str]:
    script = Path(sys.executable).with_name("htsep")
    return [str(script)] if script.exists() else [shutil.which("htsep") or "htsep"]


def timed(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
    """Seconds ``command`` takes, run in ``cwd`` (not the caller's folder, which ``python -m``
    puts first on the module path: a checkout there would shadow --baseline's), and the minor
    page faults it took (pages the kernel mapped fresh for it)."""
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{done.stderr[-2000:]}")
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults


def compare_stems(ours: Path, theirs: Path) -> tuple[float, float]:
    """The largest absolute difference between the two sets of stems, and the SNR in dB of
    ours against theirs (all stems together)."""
    worst, signal, error = 0.0, 0.0, 0.0
    stems = sorted(theirs.glob("*.wav"))
    if not stems:
        raise RuntimeError(f"no stems under {theirs}")
    for stem in stems:
        a, _ = sf.read(ours / stem.name, dtype="float64")
        b, _ = sf.read(stem, dtype="float64")
        worst = max(worst, float(np.abs(a - b).max()))
        signal += float(np.square(b).sum())
        error += float(np.square(a - b).sum())
    return worst, 10 * np.log10(signal / error) if error else float("inf")


def bench_commands(args: argparse.Namespace, work: Path) -> None:
    from htsep.devices import bf16_arithmetic

    repo = work / "repo"
    checkpoint = write_checkpoint(repo)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.tuned_malloc:
        env.update(TUNED_MALLOC)
    common = ["--repo", str(repo), "-n", SIGNATURE, "--shifts", "0", "--float32"]
    htsep_args = [*htsep_command(), "separate", *common, "-q", "--overwrite"]
    variants: dict[str, tuple[list[str], dict[str, str]]] = {"htsep": (htsep_args, env)}
    if args.bf16 and bf16_arithmetic():
        variants["htsep bf16"] = ([*htsep_args, "--precision", "bf16"], env)
    elif args.bf16:
        print("htsep bf16: not timed: this CPU has no bfloat16 arithmetic (AVX512-BF16, AMX or "
              "Arm BF16), and htsep refuses --precision bf16 on it")  # fmt: skip
    if args.keep_memory:
        variants["htsep --keep-memory"] = ([*htsep_args, "--keep-memory"], env)
    if args.baseline:
        # The same command from another checkout (e.g. a git worktree of an older commit),
        # found before the installed htsep on the module path.
        baseline_env = dict(env, PYTHONPATH=str(args.baseline.resolve()))
        baseline_args = [sys.executable, "-m", "htsep", *htsep_args[1:]]
        variants["baseline"] = (baseline_args, baseline_env)
        if "htsep bf16" in variants:
            variants["baseline bf16"] = ([*baseline_args, "--precision", "bf16"], baseline_env)
    forward = ForwardTimer(checkpoint, args.threads)
    # The arithmetic floor of each clip (every product at the rate of a large one), with the
    # FLOP count taken on demucs's network (htsep's inference paths add small products).
    flops = chunk_flops(demucs_network(checkpoint), forward.mix)
    rates = {"fp32": matmul_rate()}
    if "htsep bf16" in variants:
        rates["bf16"] = matmul_rate(dtype=torch.bfloat16)
    timer, timer_report = work / "network_timer.py", work / "network_time.txt"
    timer.write_text(NETWORK_TIMER)
    for seconds in args.seconds:
        clip = work / f"clip{seconds:g}.wav"
        write_clip(clip, seconds)
        out = {
            name: work / f"out{seconds:g}" / name.replace(" ", "_")
            for name in ["demucs", *variants]
        }
        commands = {"demucs": ([sys.executable, "-m", "demucs", *common, "-o", str(out["demucs"]),
                                str(clip)], env)}  # fmt: skip
        for name, (command, command_env) in variants.items():
            commands[name] = ([*command, "-o", str(out[name]), str(clip)], command_env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        faults: dict[str, list[int]] = {name: [] for name in commands}
        inside: dict[str, list[list[float]]] = {name: [] for name in variants}
        network: list[float] = []
        for run in range(args.runs):
            for name, (command, command_env) in commands.items():
                if name in variants:
                    command = network_timed(command, timer, timer_report)
                seconds_taken, faults_taken = timed(command, command_env, work)
                times[name].append(seconds_taken)
                faults[name].append(faults_taken)
                if name in variants:
                    inside[name].append(read_network_time(timer_report))
            network.append(forward.time())
            print(
                f"{seconds:g} s clip, run {run + 1}/{args.runs}: "
                + ", ".join(f"{name} {t[-1]:.2f} s" for name, t in times.items())
                + f"; one htsep forward {network[-1]:.2f} s",
                flush=True,
            )
        report(args, seconds, clip, times, faults, out, statistics.median(network), inside)
        for line in floor_lines(
            flops, chunk_count(seconds), rates["fp32"], statistics.median(times["demucs"]),
            rates.get("bf16"), statistics.median(times["htsep"]), "run",
        ):  # fmt: skip
            print(line)
        print()


def report(
    args: argparse.Namespace,
    seconds: float,
    clip: Path,
    times: dict[str, list[float]],
    faults: dict[str, list[int]],
    out: dict[str, Path],
    forward: float,
    inside: dict[str, list[list[float]]],
) -> None:
    theirs = statistics.median(times["demucs"])
    print()
    print(f"{seconds:g} s stereo clip, {args.runs} runs each, medians of wall-clock seconds"
          + (", tuned malloc" if args.tuned_malloc else ""))  # fmt: skip
    names = list(times)
    width = max(12, *(len(name) + 2 for name in names))
    print(f"{'':<22}" + "".join(f"{name:>{width}}" for name in names))
    medians = [statistics.median(times[name]) for name in names]
    print(f"{'seconds':<22}" + "".join(f"{m:>{width}.2f}" for m in medians))
    print(f"{'real-time factor':<22}" + "".join(f"{m / seconds:>{width}.3f}" for m in medians))
    print(f"{'/ demucs':<22}" + "".join(f"{m / theirs:>{width}.3f}" for m in medians))
    chunks = chunk_count(seconds)
    per_chunk = [statistics.median(faults[name]) / chunks for name in names]
    print(f"{'page faults / chunk':<22}" + "".join(f"{f:>{width},.0f}" for f in per_chunk))
    for name in names[1:]:
        difference, snr = compare_stems(
            out[name] / SIGNATURE / clip.stem, out["demucs"] / SIGNATURE / clip.stem
        )
        print(f"{name}: max |stem difference| from demucs {difference:.2e}, SNR {snr:.1f} dB")
    for name in ("htsep", "baseline"):
        if f"{name} bf16" in times:
            full, reduced = times[name], times[f"{name} bf16"]
            ratios = [b / a for a, b in zip(full, reduced, strict=True)]
            print(f"{name} bf16 / {name} fp32: "
                  f"{statistics.median(reduced) / statistics.median(full):.3f} "
                  f"(median of the runs' own ratios {statistics.median(ratios):.3f})")  # fmt: skip
    for name, runs in inside.items():
        # The overhead counts the first pass's extra time (oneDNN primitives made,
        # first touches) as start-up: the share outside the network when every call costs
        # what the later calls cost (their median), beside the share outside the calls as
        # they came.
        spent = [sum(calls) for calls in runs]
        steady = [statistics.median(calls[1:] or calls) * len(calls) for calls in runs]
        shares = [1 - net / total for net, total in zip(spent, times[name], strict=True)]
        steady_shares = [1 - net / total for net, total in zip(steady, times[name], strict=True)]
        print(
            f"{name}: {len(runs[0])} network calls, {statistics.median(spent):.2f} s of "
            f"{statistics.median(times[name]):.2f} s (medians); outside them (start-up, loading, "
            f"reading, overlap-add, writing, memory) {statistics.median(shares):.1%} of the run, "
            f"{statistics.median(steady_shares):.1%} with the first call's extra time counted "
            f"outside (medians of the runs' own shares; runs: "
            + ", ".join(f"{a:.1%}/{b:.1%}" for a, b in zip(shares, steady_shares, strict=True))
            + ")"
        )
    ours = statistics.median(times["htsep"])
    print(
        f"cross-check: {chunks} chunks x {forward:.2f} s (one forward, timed alone here) = "
        f"{chunks * forward:.2f} s; htsep's run less that: {ours - chunks * forward:.2f} s, "
        f"{(ours - chunks * forward) / ours:.0%}"
    )


def chunk_count(seconds: float) -> int:
    """Chunks the released model cuts a clip into at the default overlap of 0.25."""
    segment = int(44100 * 7.8)
    stride = int(0.75 * segment)
    return -(-int(seconds * RATE) // stride)


class ForwardTimer:
    """One forward pass of htsep's network on a released-length segment, in this process."""

    def __init__(self, checkpoint: Path, threads: int | None) -> None:
        import htsep

        if threads:
            torch.set_num_threads(threads)
        self.model = htsep.load_model(checkpoint).eval()
        generator = torch.Generator().manual_seed(0)
        self.mix = torch.randn(1, 2, self.model.segment_length, generator=generator)
        with torch.inference_mode():
            self.model(self.mix)  # warm-up

    def time(self) -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            self.model(self.mix)
            return time.perf_counter() - started


def demucs_network(checkpoint: Path) -> torch.nn.Module:
    """demucs's own network from ``checkpoint``, in eval mode."""
    from demucs.states import load_model as demucs_load_model

    package = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return demucs_load_model(package).eval()


def bench_forward(args: argparse.Namespace, work: Path) -> None:
    import htsep

    if args.threads:
        torch.set_num_threads(args.threads)
    path = write_checkpoint(work / "repo")
    theirs = demucs_network(path)
    ours = htsep.load_model(path).eval()
    from htsep.devices import bf16_arithmetic

    mix = torch.randn(1, 2, ours.segment_length, generator=torch.Generator().manual_seed(0))
    models: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"demucs": theirs, "htsep": ours}
    if args.bf16 and bf16_arithmetic():
        models["htsep bf16"] = bf16(ours)
    elif args.bf16:
        print("htsep bf16: not timed: this CPU has no bfloat16 arithmetic")
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        outputs = {name: model(mix) for name, model in models.items()}  # warm-up
        for _ in range(args.runs):
            for name, model in models.items():
                started = time.perf_counter()
                model(mix)
                times[name].append(time.perf_counter() - started)
    reference_out = outputs["demucs"]
    relative = (outputs["htsep"] - reference_out).abs().max() / reference_out.abs().max()
    slow, fast = (statistics.median(times[name]) for name in ("demucs", "htsep"))
    print(
        f"one forward pass, {ours.segment_length} samples, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.runs}"
    )
    for name, seconds in times.items():
        print(
            f"{name:<8}{statistics.median(seconds):8.3f} s   runs: "
            + " ".join(f"{s:.3f}" for s in seconds)
        )
    print(f"htsep / demucs {fast / slow:.3f}; max relative difference {relative.item():.2e}")
    if "htsep bf16" in times:
        reduced = statistics.median(times["htsep bf16"])
        error = outputs["htsep bf16"] - outputs["htsep"]
        snr = 10 * torch.log10(outputs["htsep"].square().sum() / error.square().sum())
        print(f"htsep bf16 / htsep fp32 {reduced / fast:.3f}; SNR against fp32 {snr.item():.1f} dB")
    flops, rates = chunk_flops(theirs, mix), matmul_rates()
    peak = max(rates.values())
    print(
        f"one chunk is {flops / 1e9:.1f} GFLOP (convolutions, products and attention, counted on "
        f"demucs's network); fp32 2048x2048 products run at {describe_rates(rates)} here: "
        f"htsep runs at {flops / fast / 1e9:.0f} GFLOP/s ("
        + ", ".join(f"{flops / rate / fast:.0%} of {name}'s rate" for name, rate in rates.items())
        + f"), demucs at {flops / slow / 1e9:.0f} GFLOP/s"
    )
    bf16_rate = None
    if "htsep bf16" in times:
        bf16_rate = matmul_rate(dtype=torch.bfloat16)
        reduced = statistics.median(times["htsep bf16"])
        print(
            f"htsep bf16 runs at {flops / reduced / 1e9:.0f} GFLOP/s "
            f"({flops / bf16_rate / reduced:.0%} of the bf16 product rate)"
        )
    for line in floor_lines(flops, 1, peak, slow, bf16_rate, fast):
        print(line)


def bf16(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network's bfloat16 copy, as htsep --precision bf16 runs it on the CPU."""
    from htsep.model.htdemucs import bfloat16_copy

    return bfloat16_copy(model)  # type: ignore[arg-type]


def attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Products of one fused attention call, from its (batch, heads, length, dim) shapes:
    queries x keys, then weights x values, 2 FLOPs per multiply-add."""
    *batch, queries, dim = query
    keys, value_dim = key[-2], value[-1]
    return 2 * math.prod(batch) * queries * keys * (dim + value_dim)


def self_attention_flops(query, key, value, embed_dim, heads, *args, out_shape=None, **kwargs):
    """Products of nn.MultiheadAttention's fused inference path (demucs's self-attention): the
    query, key and value projections, the attention itself and the output projection."""
    *batch, queries, _ = query
    keys = key[-2]
    count = math.prod(batch)
    projections = 2 * count * embed_dim * embed_dim * (2 * queries + 2 * keys)
    return projections + 2 * count * queries * keys * 2 * embed_dim


def chunk_flops(model: torch.nn.Module, mix: torch.Tensor) -> float:
    """Floating-point operations of one forward pass: convolutions, matrix products and
    attention.

    torch's FlopCounterMode has formulas for neither the CPU's fused attention kernel (htsep's
    attention, demucs's cross-attention) nor nn.MultiheadAttention's fused inference path
    (demucs's self-attention), and counts nothing for them; both are counted here. The count
    is a property of the network, so both networks must give the same figure
    (tests/test_bench.py)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    formulas = {
        aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
        aten._native_multi_head_attention: self_attention_flops,
    }
    with (
        torch.inference_mode(),
        FlopCounterMode(display=False, custom_mapping=formulas) as counter,
    ):
        model(mix)
    return float(counter.get_total_flops())


def matmul_rates(
    size: int = 2048, runs: int = 5, dtype: torch.dtype = torch.float32
) -> dict[str, float]:
    """The best rate of ``runs`` (size x size) matrix products in ``dtype``, in FLOP/s, per
    library: torch.mm (MKL for float32 on x86, oneDNN for bfloat16) and, where torch's oneDNN
    linear ops work, oneDNN. They differ: MKL takes its AVX2 code on AMD CPUs and ran at
    169-190 GFLOP/s on a Zen 4 EPYC where oneDNN ran at 205-220."""
    from htsep.model.kernels import onednn_linear_available

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    products: dict[str, Callable[[], torch.Tensor]] = {"torch.mm": lambda: torch.mm(a, b)}
    if onednn_linear_available():
        linear = torch.ops.mkldnn._linear_pointwise
        products["oneDNN"] = lambda: linear(a, b, None, "none", [], "")
    rates = {}
    with torch.inference_mode():
        for name, product in products.items():
            product()
            best = float("inf")
            for _ in range(runs):
                started = time.perf_counter()
                product()
                best = min(best, time.perf_counter() - started)
            rates[name] = 2 * size**3 / best
    return rates


def matmul_rate(size: int = 2048, runs: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The rate of the fastest library in ``matmul_rates``, in FLOP/s."""
    return max(matmul_rates(size, runs, dtype).values())


def describe_rates(rates: dict[str, float]) -> str:
    return ", ".join(f"{name} {rate / 1e9:.0f}" for name, rate in rates.items()) + " GFLOP/s"


def floor_lines(
    flops: float,
    chunks: int,
    rate: float,
    reference: float,
    bf16_rate: float | None = None,
    fp32: float | None = None,
    what: str = "one forward pass",
) -> list[str]:
    """The arithmetic floor of ``chunks`` network calls of ``flops`` each: their time with
    every product at ``rate`` (FLOP/s, a large matrix product's, measured in the same run) and
    everything else free, as a fraction of ``reference`` (demucs's seconds for the same work).
    With ``bf16_rate`` and ``fp32`` (htsep's float32 seconds), the same in bfloat16, as a
    fraction of htsep's float32 time. No htsep can go below these ratios on this machine,
    short of products faster than that rate."""
    floor = chunks * flops / rate
    lines = [
        f"arithmetic floor: {chunks} x {flops / 1e9:.1f} GFLOP at {rate / 1e9:.0f} GFLOP/s = "
        f"{floor:.2f} s, {floor / reference:.3f} of demucs's {what} ({reference:.2f} s): the "
        f"lowest htsep / demucs ratio possible here, with everything but the products free"
    ]
    if bf16_rate is not None and fp32 is not None:
        reduced = chunks * flops / bf16_rate
        lines.append(
            f"bf16 floor: at {bf16_rate / 1e9:.0f} GFLOP/s (bf16 products, {bf16_rate / rate:.2f}x "
            f"fp32's) {reduced:.2f} s, {reduced / fp32:.3f} of htsep fp32's {what} ({fp32:.2f} s)"
        )
    return lines


def describe_machine() -> str:
    """The CPU's name and the vector extensions its figures depend on, torch's build and its
    threads: every figure this script prints belongs to this line."""
    name, flags = "unknown CPU", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    vector = [flag for flag in wanted if flag in flags] or ["(flags unknown)"]
    from htsep.model.kernels import cpu_products

    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"CPU: {name}, {os.cpu_count()} logical cores; {' '.join(vector)}; "
        f"torch {torch.__version__} ({capability} kernels, {torch.get_num_threads()} threads); "
        f"htsep multiplies through {cpu_products()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds",
        type=positive(3600),
        nargs="+",
        default=[30.0, 180.0],
        help="lengths of the clips",
    )
    parser.add_argument("--runs", type=whole(1, 1000), default=3, help="runs of each side")
    parser.add_argument("--keep", type=folder, help="work in this folder and keep it")
    parser.add_argument(
        "--threads", type=whole(1, 1024), help="torch threads (default: torch's choice)"
    )
    parser.add_argument(
        "--tuned-malloc",
        action="store_true",
        help="run both commands with glibc tuned to reuse freed memory",
    )
    parser.add_argument(
        "--no-bf16",
        dest="bf16",
        action="store_false",
        help="no htsep --precision bf16 column (it is timed only where the CPU has bf16 anyway)",
    )
    parser.add_argument(
        "--forward", action="store_true", help="time one forward pass of each network instead"
    )
    parser.add_argument("--keep-memory", action="store_true", help="also time htsep --keep-memory")
    parser.add_argument(
        "--baseline",
        type=checkout,
        help="also time the htsep of this checkout (e.g. a git worktree of an older commit)",
    )
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        work = args.keep
    else:
        work = Path(tempfile.mkdtemp(prefix="htsep-bench-"))
    print(describe_machine())
    try:
        (bench_forward if args.forward else bench_commands)(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
