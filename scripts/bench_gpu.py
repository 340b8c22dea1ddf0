"""htsep on a GPU machine (H100, H200): parity, quality at reduced precision, memory, speed.

    python scripts/bench_gpu.py [--budget 480] [--json results.json] [--device cuda:0]
    python scripts/bench_gpu.py --smoke [--device cpu]    # toy sizes, a minute at most
    python scripts/bench_gpu.py --only parity,memory       # some sections only

The sections run in this order, most important first; each prints its figures as soon as it
has them:

(a) parity: the released htdemucs architecture with random weights, written by demucs's own
    serializer; htsep fp32 on the device against htsep fp32 on the CPU and against demucs 4.1.0
    on the device, for one forward pass and for a chunked separation (max |a - b| / max |b|;
    goal 1e-4). On CUDA, where TF32 is allowed (torch's default for cuDNN convolutions), the
    device figures are measured again with TF32 off, to tell rounding from a bug.
(d) precision: SNR of the bf16 and fp16 stems against the fp32 ones (released architecture,
    random weights), and the shipped htsep-tiny on synthetic tracks from htsep.synthetic
    (held-out seed 20261124, as tests/test_tiny_model.py; 4 tracks of 8 s give 9.55 dB on the
    CPU per models/htsep-tiny.md): mean nSDR per precision and its change from fp32.
(c) memory: peak device memory (torch.cuda.max_memory_allocated above the weights) of one
    network call on a batch of b chunks, at several b per precision; the slope is the memory
    per chunk, the intercept the memory of a call. Prints the values for devices.CHUNK_BYTES
    and devices.CALL_BYTES.
(b) speed: times real time of Separator.separate_tensor on a 4-minute track (default shifts=1,
    overlap 0.25) per precision, with the automatic batch size and with batch sizes 1, 4, 8,
    16 and 32; the network's share of it; fp32 with TF32 off.
(e) folder: 16 tracks of 30 s through htsep.batch.Batch, with and without the pipeline.

Then the goals, PASS or FAIL: fp32 parity <= 1e-4, bf16 >= 300x real time, bf16 SNR >= 30 dB.

A global budget (--budget, default 8 minutes, from the start of the script) bounds the run:
a measurement that would not fit in what is left is skipped ("skipped: out of time"), and an
alarm at the deadline stops the one in progress; a batch that does not fit on the device is
"OOM at batch N"; either way the script goes on and ends with the summary (and --json). On an
H200 the whole run took 96 to 127 s (three runs, 2026-12-04; the figures are in the README's
"On a GPU"); the default budget leaves room for the smoke run and start-up in one 10-minute
command.

On the GPU machine, from the repository root: the script needs htsep's dependencies (soundfile,
with cffi and pycparser, is not in the stock image) and, for the oracle, demucs 4.1.0, julius
and omegaconf (all carried as wheels, installed with --no-deps); without demucs the parity
against it is skipped and the checkpoint is written by htsep itself.
htsep need not be installed: the script imports it from this checkout. First a smoke run
(30 s; every code path on the device), then the real one:

    PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py --smoke && \\
    PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py --json $OUT/bench_gpu.json

--smoke runs the same code at toy sizes: a small released-like architecture (tests/reference.py
SMALL, 8 kHz), seconds of audio, batch sizes 1 and 2, two tracks, and the precisions this device
has (on a CPU: fp32, bf16 only with bfloat16 arithmetic; fp16 needs CUDA). tests/test_bench_gpu.py
runs it on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

STARTED = time.monotonic()  # the budget counts from here

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
from script_args import new_file, positive, text, whole  # noqa: E402


def _import_htsep_from_checkout() -> None:
    """Make ``import htsep`` work from this checkout when htsep is not installed (a bare GPU
    machine): the package from the repository root, its model registry from models/."""
    try:
        importlib.import_module("htsep")
    except ImportError:
        sys.path.insert(0, str(ROOT))
    try:
        importlib.import_module("htsep.registry")
    except ImportError:
        folder = ROOT / "models"
        spec = importlib.util.spec_from_file_location(
            "htsep.registry", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["htsep.registry"] = module
        spec.loader.exec_module(module)


_import_htsep_from_checkout()

import htsep  # noqa: E402
import htsep.devices  # noqa: E402
from htsep.apply import run_network  # noqa: E402
from htsep.batch import Batch, OutputSettings  # noqa: E402
from htsep.evaluate import baseline_nsdr, nsdr  # noqa: E402
from htsep.model.config import released_config, tiny_config  # noqa: E402
from htsep.separator import Separator  # noqa: E402
from htsep.synthetic import SOURCES, render_track  # noqa: E402

try:
    import reference  # the demucs oracle builder shared with the tests (needs demucs, omegaconf)

    ORACLE_PROBLEM: str | None = None
except ImportError as exc:
    reference = None  # type: ignore[assignment]
    ORACLE_PROBLEM = f"demucs oracle unavailable ({type(exc).__name__}: {exc})"

HELD_OUT_SEED = 20261124  # the synthetic tracks of tests/test_tiny_model.py, never trained on
TINY_RATE = 44100
PRECISIONS = ("fp32", "bf16", "fp16")
SECTIONS = ("parity", "precision", "memory", "speed", "folder")
LETTERS = {"parity": "a", "speed": "b", "memory": "c", "precision": "d", "folder": "e"}
GOAL_PARITY = 1e-4
GOAL_SPEED = 300.0
GOAL_SNR = 30.0
MIB, GIB = 1 << 20, 1 << 30


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is: the real run's or the smoke run's."""

    name: str
    model: str  # "released", or "small": tests/reference.py SMALL (8 kHz) with 1 s segments
    parity_seconds: float
    parity_batch: int | None  # chunks per call of the device's separation; None: automatic
    tiny_tracks: int
    tiny_seconds: float
    memory_batches: tuple[int, ...]
    track_seconds: float
    speed_batches: tuple[int, ...]  # in the order they run, most telling first
    repeats: int  # runs of each speed setting (the fastest counts)
    folder_tracks: int
    folder_seconds: float
    reserve: float  # seconds kept for the summary after the deadline's alarm
    prior: float  # guessed seconds of a first measurement whose cost nothing predicts yet


FULL = Sizes(
    name="full",
    model="released",
    parity_seconds=20.0,
    parity_batch=None,
    tiny_tracks=4,
    tiny_seconds=8.0,
    memory_batches=(1, 2, 4, 8),
    track_seconds=240.0,
    speed_batches=(16, 32, 8, 4, 1),
    repeats=2,
    folder_tracks=16,
    folder_seconds=30.0,
    reserve=10.0,
    prior=30.0,
)
SMOKE = Sizes(
    name="smoke",
    model="small",
    parity_seconds=2.5,
    parity_batch=2,
    tiny_tracks=1,
    tiny_seconds=2.0,
    memory_batches=(1, 2),
    track_seconds=2.0,
    speed_batches=(2, 1),
    repeats=1,
    folder_tracks=2,
    folder_seconds=1.0,
    reserve=2.0,
    prior=5.0,
)


# --- budget and reporting ----------------------------------------------------------------------


class OutOfTime(Exception):
    """The budget's deadline passed while a measurement ran."""


class Budget:
    """The time left before the deadline (the budget from the script's start, less a reserve for
    the summary); ``arm`` sets an alarm that raises OutOfTime in the main thread at the deadline."""

    def __init__(self, seconds: float, reserve: float) -> None:
        self.deadline = STARTED + seconds - reserve
        self.expired = False

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, expected: float) -> bool:
        return not self.expired and self.left() >= expected

    def arm(self) -> None:
        if self.left() <= 0:
            self.expired = True
        elif hasattr(signal, "setitimer"):
            signal.signal(signal.SIGALRM, self._expire)
            signal.setitimer(signal.ITIMER_REAL, self.left())

    def disarm(self) -> None:
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _expire(self, signum: int, frame: Any) -> None:
        self.expired = True
        raise OutOfTime


class Report:
    """Prints as it goes and keeps every figure and skip for the summary and --json."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {section: {} for section in SECTIONS}
        self.skips: list[dict[str, str]] = []

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def put(self, section: str, path: tuple[str, ...], value: Any) -> None:
        node = self.data[section]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    def get(self, section: str, *path: str) -> Any:
        node: Any = self.data[section]
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    def skip(self, section: str, what: str, reason: str) -> None:
        self.say(f"  {what}: skipped: {reason}")
        self.skips.append({"section": section, "what": what, "reason": reason})


# --- the machine and the model -----------------------------------------------------------------


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def tf32_allowed() -> bool:
    """Whether CUDA fp32 convolutions or matrix products may round through TF32."""
    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """CUDA fp32 convolutions and matrix products in full float32 (no TF32) inside."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def describe_machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "htsep_commit": git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_multiprocessors=props.multi_processor_count,
            tf32_cudnn=bool(torch.backends.cudnn.allow_tf32),
            tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
            cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        )
    return info


def print_machine(report: Report, info: dict[str, Any]) -> None:
    if "gpu" in info:
        report.say(
            f"GPU: {info['gpu']}, {info['gpu_memory_bytes'] / GIB:.1f} GiB, compute capability "
            f"{info['gpu_capability']}, {info['gpu_multiprocessors']} multiprocessors; TF32 "
            f"allowed for cuDNN convolutions: {info['tf32_cudnn']}, for matrix products: "
            f"{info['tf32_matmul']}; cudnn.benchmark {info['cudnn_benchmark']}"
        )
    else:
        report.say(f"device: {info['device']} (no GPU)")
    report.say(
        f"torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, Python "
        f"{info['python']}; CPU: {info['cpu']}, {info['cpu_count']} logical cores, "
        f"{info['torch_threads']} torch threads; htsep {info['htsep_commit']}"
    )


def available_precisions(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The precisions htsep runs on ``device``, and why each other one is left out."""
    missing: dict[str, str] = {}
    if device.type != "cuda":
        missing["fp16"] = "fp16 needs a CUDA device (htsep refuses it elsewhere)"
    if device.type == "cpu" and not htsep.devices.bf16_arithmetic():
        missing["bf16"] = (
            "bf16: this CPU has no bfloat16 arithmetic (htsep.devices.bf16_arithmetic() is "
            "False; htsep refuses it here)"
        )
    elif device.type == "cuda" and not torch.cuda.is_bf16_supported():
        missing["bf16"] = "bf16: this GPU has no bfloat16 support"
    return [p for p in PRECISIONS if p not in missing], missing


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values for the parameters a fresh model sets to constants (norms, layer scales,
    biases), as tests/reference.py does for the demucs oracle."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                continue
            if "scale" in name:
                param.copy_(torch.rand(param.shape, generator=generator) * 0.7 + 0.3)
            elif name.endswith("weight"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def write_checkpoint(sizes: Sizes, folder: Path, use_demucs: bool) -> tuple[Path, Any, str]:
    """The benchmark's checkpoint with random weights: demucs's own writer when demucs is here
    (-> path, the demucs model loaded back from the same package, description), else htsep's
    (-> path, None, description)."""
    if use_demucs:
        assert reference is not None
        kwargs = reference.RELEASED
        if sizes.model == "small":
            kwargs = {**reference.SMALL, "segment": Fraction(1)}
        model = reference.build(reference.SOURCES_4, kwargs, seed=1)
        path, oracle = reference.write_th(model, folder, "htdemucs")
        writer = "demucs's serializer"
    else:
        make = released_config if sizes.model == "released" else tiny_config
        rate = 44100 if sizes.model == "released" else 8000
        torch.manual_seed(1)
        network = htsep.HTDemucs(make(SOURCES, rate, 2)).eval()
        randomize(network, seed=2)
        path = htsep.save_model(network, folder / "htdemucs.safetensors")
        oracle, writer = None, "htsep.save_model"
    loaded = htsep.load_model(path)
    parameters = sum(p.numel() for p in loaded.parameters())
    name = "released htdemucs" if sizes.model == "released" else "small released-like"
    if not use_demucs and sizes.model == "small":
        name = "htsep tiny_config"
    what = (
        f"{name} architecture, random weights ({parameters:,} parameters, "
        f"{loaded.sample_rate} Hz, {loaded.segment_length}-sample segment), written by {writer}"
    )
    return path, oracle, what


# --- helpers shared by the sections ------------------------------------------------------------


def clip_signal(seconds: float, rate: int, seed: int) -> torch.Tensor:
    """A deterministic stereo clip (2, T): tones under a quarter of the rate, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    nyquist = rate / 2
    left = 0.05 * np.sin(2 * np.pi * 220 * t) + 0.03 * np.sin(2 * np.pi * 0.17 * nyquist * t)
    right = 0.05 * np.sin(2 * np.pi * 330 * t) + 0.02 * np.sin(2 * np.pi * 0.23 * nyquist * t)
    audio = np.stack([left, right]) + 0.02 * rng.standard_normal((2, t.size))
    return torch.from_numpy(audio.astype(np.float32))


def relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, in float64."""
    ours, ref = ours.detach().cpu().double(), ref.detach().cpu().double()
    return float((ours - ref).abs().max() / ref.abs().max())


def snr_db(ref: torch.Tensor, estimate: torch.Tensor) -> float:
    """10 log10(sum ref^2 / sum (ref - estimate)^2) over every element; NaN if not finite."""
    ref, estimate = ref.double(), estimate.double()
    if not torch.isfinite(estimate).all():
        return math.nan
    error = float((ref - estimate).square().sum())
    return math.inf if error == 0 else 10 * math.log10(float(ref.square().sum()) / error)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def stacked(stems: dict[str, torch.Tensor], sources: list[str]) -> torch.Tensor:
    return torch.stack([stems[name] for name in sources])  # (S, C, T)


@dataclass
class Bench:
    """What every section needs: settings, the device, the checkpoint, the report."""

    sizes: Sizes
    device: torch.device
    budget: Budget
    report: Report
    work: Path
    checkpoint: Path
    oracle: Any  # the demucs model (CPU, fp32) or None
    oracle_problem: str | None
    precisions: list[str]
    missing: dict[str, str]
    parity_clip: torch.Tensor | None = None
    parity_stems: torch.Tensor | None = None  # htsep fp32 on the device, of parity_clip
    seconds_per_second: dict[str, float] = field(default_factory=dict)  # slowest speed seen
    running: str | None = None  # the measurement in progress

    def separator(self, **settings: Any) -> Separator:
        return Separator(str(self.checkpoint), device=str(self.device), progress=False, **settings)

    def attempt(
        self,
        section: str,
        what: str,
        run: Callable[[], Any],
        expected: float = 0.0,
        batch: int | None = None,
    ) -> Any:
        """``run()``, or None after printing why not: out of time, OOM, or an error."""
        if not self.budget.fits(expected):
            self.report.skip(section, what, "out of time")
            return None
        self.running = what  # named if the deadline's alarm stops it
        value = None
        try:
            value = run()
        except OutOfTime:
            raise
        except torch.cuda.OutOfMemoryError:
            free_memory(self.device)
            reason = "OOM" if batch is None else f"OOM at batch {batch}"
            self.report.skip(section, what, reason)
        except Exception as exc:
            traceback.print_exc()
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.report.skip(section, what, f"error: {type(exc).__name__}: {message}")
        self.running = None
        return value

    def timed_separation(
        self, separator: Separator, audio: torch.Tensor
    ) -> tuple[float, dict[str, torch.Tensor]]:
        """Seconds of one separate_tensor call, the device synchronized on both sides."""
        synchronize(self.device)
        started = time.perf_counter()
        stems = separator.separate_tensor(audio)
        synchronize(self.device)
        return time.perf_counter() - started, stems


# --- (a) parity ------------------------------------------------------------------------------


def section_parity(bench: Bench) -> None:
    """htsep fp32 on the device against htsep on the CPU and demucs on the device."""
    section, device, report = "parity", bench.device, bench.report
    dev = device.type
    model = htsep.load_model(bench.checkpoint)
    length = model.segment_length
    mix = torch.randn(1, model.audio_channels, length, generator=torch.Generator().manual_seed(0))
    report.put(section, ("device",), str(device))
    if bench.oracle is None:
        report.skip(section, "against demucs", bench.oracle_problem or "no oracle")

    cpu: dict[str, torch.Tensor] = {}

    def on_cpu() -> None:
        cpu["htsep"] = run_network(model, [mix], "cpu", "fp32")
        if bench.oracle is not None:
            with torch.inference_mode():
                cpu["demucs"] = bench.oracle(mix)
        # The independent truth both fp32 results are rounded from: htsep in float64.
        with torch.inference_mode():
            cpu["float64"] = copy.deepcopy(model).double()(mix.double())

    bench.attempt(section, "forward pass on the CPU", on_cpu)
    if "htsep" not in cpu:
        return

    def forward(key: str) -> None:
        ours_model = copy.deepcopy(model).to(device)
        ours = run_network(ours_model, [mix], device, "fp32")
        figures = {f"htsep_{dev}_vs_htsep_cpu": relative(ours, cpu["htsep"])}
        figures[f"htsep_{dev}_vs_float64"] = relative(ours, cpu["float64"])
        figures["htsep_cpu_vs_float64"] = relative(cpu["htsep"], cpu["float64"])
        if bench.oracle is not None:
            oracle = copy.deepcopy(bench.oracle).to(device)
            with torch.inference_mode():
                theirs = oracle(mix.to(device)).cpu()
            figures[f"htsep_{dev}_vs_demucs_{dev}"] = relative(ours, theirs)
            figures["htsep_cpu_vs_demucs_cpu"] = relative(cpu["htsep"], cpu["demucs"])
            figures[f"demucs_{dev}_vs_demucs_cpu"] = relative(theirs, cpu["demucs"])
            figures[f"demucs_{dev}_vs_float64"] = relative(theirs, cpu["float64"])
            del oracle
        del ours_model
        free_memory(device)
        for name, value in figures.items():
            report.put(section, (key, name), value)
        label = "forward, TF32 off" if key.endswith("ieee") else "forward"
        report.say(
            f"  {label}, one {length}-sample segment: "
            + "; ".join(f"{name.replace('_', ' ')} {value:.1e}" for name, value in figures.items())
        )

    bench.attempt(section, "forward pass on the device", lambda: forward("forward"))
    retry_ieee = device.type == "cuda" and tf32_allowed()
    if retry_ieee:

        def forward_ieee() -> None:
            with ieee_fp32():
                forward("forward_ieee")

        bench.attempt(section, "forward pass, TF32 off", forward_ieee)

    # A chunked separation: overlap-add over several chunks, batched on the device.
    clip = clip_signal(bench.sizes.parity_seconds, model.sample_rate, seed=2)
    bench.parity_clip = clip
    results: dict[str, torch.Tensor] = {}

    def separate_cpu() -> None:
        separator = Separator(
            str(bench.checkpoint), device="cpu", shifts=0, batch_size=1, progress=False
        )
        results["cpu"] = stacked(separator.separate_tensor(clip), separator.sources)

    bench.attempt(section, "separation on the CPU", separate_cpu)

    def separate_device(key: str) -> None:
        separator = bench.separator(shifts=0, batch_size=bench.sizes.parity_batch)
        batch = separator.options.batch_size
        ours = stacked(separator.separate_tensor(clip), separator.sources)
        if key == "separation":
            bench.parity_stems = ours
        figures = {}
        if "cpu" in results:
            figures[f"htsep_{dev}_vs_htsep_cpu"] = relative(ours, results["cpu"])
        if bench.oracle is not None:
            import demucs.apply

            oracle = copy.deepcopy(bench.oracle)
            mono = clip.mean(0)
            mean, std = mono.mean(), mono.std() + 1e-8  # as demucs's own separate does
            theirs = demucs.apply.apply_model(
                oracle,
                ((clip - mean) / std)[None],
                shifts=0,
                split=True,
                overlap=0.25,
                device=device,
                progress=False,
            )[0]
            figures[f"htsep_{dev}_vs_demucs_{dev}"] = relative(ours, theirs.cpu() * std + mean)
            del oracle
        free_memory(device)
        for name, value in figures.items():
            report.put(section, (key, name), value)
        label = "separation, TF32 off" if key.endswith("ieee") else "separation"
        report.say(
            f"  {label}, {bench.sizes.parity_seconds:g} s clip, overlap 0.25, {dev} batch "
            f"{batch}, CPU batch 1: "
            + "; ".join(f"{name.replace('_', ' ')} {value:.1e}" for name, value in figures.items())
        )

    bench.attempt(section, "separation on the device", lambda: separate_device("separation"))
    if retry_ieee:

        def separate_ieee() -> None:
            with ieee_fp32():
                separate_device("separation_ieee")

        bench.attempt(section, "separation, TF32 off", separate_ieee)


# --- (d) precision -----------------------------------------------------------------------------


def section_precision(bench: Bench) -> None:
    """bf16 and fp16 stems against fp32: SNR (released architecture), nSDR (htsep-tiny)."""
    section, report = "precision", bench.report
    reduced = [p for p in ("bf16", "fp16") if p in bench.precisions]
    for precision in ("bf16", "fp16"):
        if precision in bench.missing:
            report.skip(section, precision, bench.missing[precision])

    clip = bench.parity_clip
    if clip is None:
        rate = htsep.load_model(bench.checkpoint).sample_rate
        clip = clip_signal(bench.sizes.parity_seconds, rate, seed=2)
    reference_stems: dict[str, torch.Tensor] = {}

    def fp32_stems() -> torch.Tensor:
        if bench.parity_stems is not None:
            return bench.parity_stems
        separator = bench.separator(shifts=0, batch_size=bench.sizes.parity_batch)
        return stacked(separator.separate_tensor(clip), separator.sources)

    if reduced:
        stems = bench.attempt(section, "fp32 stems of the released architecture", fp32_stems)
        if stems is not None:
            reference_stems["fp32"] = stems
    for precision in reduced:
        if "fp32" not in reference_stems:
            break

        def released(precision: str = precision) -> None:
            separator = bench.separator(
                shifts=0, batch_size=bench.sizes.parity_batch, precision=precision
            )
            ours = stacked(separator.separate_tensor(clip), separator.sources)
            value = snr_db(reference_stems["fp32"], ours)
            worst = relative(ours, reference_stems["fp32"])
            report.put(section, ("released_snr_db", precision), value)
            report.put(section, ("released_relative", precision), worst)
            report.say(
                f"  released architecture (random weights), {clip.shape[-1]} samples: "
                f"{precision} stems against fp32: SNR {value:.1f} dB, max relative "
                f"difference {worst:.1e}"
                + ("" if math.isfinite(value) else " (non-finite stems: overflow?)")
            )

        bench.attempt(section, f"{precision} SNR, released architecture", released)
        free_memory(bench.device)

    # htsep-tiny on synthetic tracks with known stems.
    sizes = bench.sizes
    report.put(section, ("tiny_tracks",), sizes.tiny_tracks)
    report.put(section, ("tiny_seconds",), sizes.tiny_seconds)
    tracks: list[tuple[torch.Tensor, torch.Tensor]] = []

    def render() -> None:
        for index in range(sizes.tiny_tracks):
            audio = render_track(HELD_OUT_SEED, "test", index, sizes.tiny_seconds, TINY_RATE)
            as_float = {
                k: torch.from_numpy(a.T.astype(np.float32) / 32768) for k, a in audio.items()
            }
            tracks.append((as_float["mixture"], torch.stack([as_float[s] for s in SOURCES])))

    bench.attempt(section, "synthetic tracks", render)
    if len(tracks) != sizes.tiny_tracks:
        return
    baseline = float(np.mean([baseline_nsdr(mixture, stems) for mixture, stems in tracks]))
    report.put(section, ("tiny_baseline_nsdr_db",), baseline)
    estimates: dict[str, list[torch.Tensor]] = {}

    def tiny(precision: str) -> None:
        separator = Separator(
            "htsep-tiny", device=str(bench.device), shifts=0, precision=precision, progress=False
        )
        outputs, scores = [], []
        for mixture, stems in tracks:
            out = stacked(separator.separate_tensor(mixture, TINY_RATE), list(SOURCES))
            outputs.append(out)
            scores.append([nsdr(stems[s], out[s]) for s in range(len(SOURCES))])
        estimates[precision] = outputs
        mean = float(np.mean(scores))
        report.put(section, ("tiny_nsdr_db", precision), mean)
        line = (
            f"  htsep-tiny, synthetic tracks: {sizes.tiny_tracks} of {sizes.tiny_seconds:g} s: "
            f"{precision} mean nSDR {mean:.2f} dB"
        )
        if precision == "fp32":
            line += f" (trivial baseline mixture / 4: {baseline:.2f} dB)"
        else:
            change = mean - report.data[section]["tiny_nsdr_db"]["fp32"]
            value = snr_db(torch.cat(estimates["fp32"], -1), torch.cat(outputs, -1))
            report.put(section, ("tiny_nsdr_change_db", precision), change)
            report.put(section, ("tiny_snr_db", precision), value)
            line += f", change from fp32 {change:+.3f} dB; stems against fp32: SNR {value:.1f} dB"
        report.say(line)

    for precision in ["fp32", *reduced]:
        if precision != "fp32" and "fp32" not in estimates:
            break
        bench.attempt(section, f"htsep-tiny {precision}", partial(tiny, precision))
        free_memory(bench.device)


# --- (c) memory --------------------------------------------------------------------------------


class ResidentPeak:
    """Peak resident memory of this process on Linux: writing 5 to /proc/self/clear_refs resets
    VmHWM to the current size. The CPU's stand-in for torch.cuda's peak statistics."""

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(f"no {key} in /proc/self/status")

    @classmethod
    def problem(cls) -> str | None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            cls._status("VmHWM")
        except OSError as exc:
            return f"peak resident memory cannot be reset here ({exc})"
        return None

    @classmethod
    def measure(cls, run: Callable[[], Any]) -> int:
        htsep.devices.release_freed_memory()
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        base = cls._status("VmRSS")
        run()
        return cls._status("VmHWM") - base


def peak_bytes(device: torch.device, run: Callable[[], Any]) -> int:
    """Peak memory ``run`` allocates above what was allocated before it."""
    if device.type != "cuda":
        return ResidentPeak.measure(run)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def section_memory(bench: Bench) -> None:
    """Peak memory of one network call on b chunks, at several b: the slope is per chunk."""
    section, device, report = "memory", bench.device, bench.report
    cuda = device.type == "cuda"
    kind = "torch.cuda.max_memory_allocated" if cuda else "peak resident memory (VmHWM)"
    report.put(section, ("kind",), kind)
    if not cuda:
        problem = ResidentPeak.problem()
        if problem is not None:
            report.skip(section, "all", problem)
            return
    for precision, reason in bench.missing.items():
        report.skip(section, precision, reason)
    chunk = htsep.load_model(bench.checkpoint).segment_length
    report.say(f"  {kind} above the weights, one network call of b chunks of {chunk} samples")
    slopes = memory_slopes(bench)
    free_memory(device)
    if not slopes or min(slopes.values()) <= 0:
        report.skip(section, "CHUNK_BYTES", "no positive slope")
        return
    fixed = {p: max(report.get(section, p, "fixed_bytes") or 0.0, 0.0) for p in slopes}
    per_chunk = {p: math.ceil(slopes[p] / MIB) for p in slopes}
    per_call = {p: math.ceil(fixed[p] / MIB) for p in slopes}
    where = torch.cuda.get_device_name(device) if cuda else f"{cpu_name()} (CPU)"
    lines = [
        "CHUNK_BYTES = {" + ", ".join(f'"{p}": {per_chunk[p]} << 20' for p in per_chunk) + "}",
        "CALL_BYTES = {" + ", ".join(f'"{p}": {per_call[p]} << 20' for p in per_call) + "}",
        f"# measured by scripts/bench_gpu.py on {where}, torch {torch.__version__}: {kind}, "
        f"{chunk}-sample chunks",
    ]
    report.put(section, ("chunk_bytes",), {p: v * MIB for p, v in per_chunk.items()})
    report.put(section, ("call_bytes",), {p: v * MIB for p, v in per_call.items()})
    report.put(section, ("devices_lines",), lines)
    report.put(section, ("devices_lines_copyable",), cuda)
    report.say(
        "  the measured values for htsep/devices.py"
        + ("" if cuda else " (measured on the CPU: NOT for devices.py)")
        + ":"
    )
    for line in lines:
        report.say(f"  {line}")
    if cuda:
        for precision in bench.precisions:
            if precision not in per_chunk:
                continue
            now = htsep.devices.auto_batch_size(device, precision)
            measured_chunk = {**htsep.devices.CHUNK_BYTES, precision: per_chunk[precision] * MIB}
            measured_call = {**htsep.devices.CALL_BYTES, precision: per_call[precision] * MIB}
            with (
                mock.patch.object(htsep.devices, "CHUNK_BYTES", measured_chunk),
                mock.patch.object(htsep.devices, "CALL_BYTES", measured_call),
            ):
                measured = htsep.devices.auto_batch_size(device, precision)
            report.put(section, ("auto_batch_size", precision), {"now": now, "measured": measured})
            report.say(
                f"  auto_batch_size({precision}) with the free memory now: {now} with the values "
                f"in devices.py, {measured} with these (the formula caps it at 16)"
            )


def memory_slopes(bench: Bench) -> dict[str, float]:
    """Per precision, the peak at each batch size and the least-squares line through them:
    -> {precision: bytes per chunk}."""
    section, device, report = "memory", bench.device, bench.report
    model = htsep.load_model(bench.checkpoint).to(device)
    channels, chunk = model.audio_channels, model.segment_length
    slopes: dict[str, float] = {}
    for precision in bench.precisions:
        points: list[tuple[int, int]] = []
        # cuBLAS and cuDNN set up their workspaces on a first call: not the chunks' memory.
        bench.attempt(
            section,
            f"{precision} warm-up",
            partial(run_network, model, [torch.zeros(1, channels, chunk)], device, precision),
        )
        for batch in bench.sizes.memory_batches:
            windows = [torch.randn(1, channels, chunk) for _ in range(batch)]
            call = partial(run_network, model, windows, device, precision)
            used = bench.attempt(
                section,
                f"{precision} batch {batch}",
                partial(peak_bytes, device, call),
                batch=batch,
            )
            free_memory(device)
            if used is None:
                break  # a larger batch does not fit either
            points.append((batch, used))
            report.say(f"  {precision} batch {batch}: {used / MIB:,.0f} MiB")
        report.put(section, (precision, "batches"), [b for b, _ in points])
        report.put(section, (precision, "peak_bytes"), [used for _, used in points])
        if len(points) < 2:
            report.skip(section, f"{precision} per-chunk fit", "fewer than two batch sizes ran")
            continue
        batches, peaks = (
            np.array(values, dtype=np.float64) for values in zip(*points, strict=True)
        )
        slope, intercept = np.polyfit(batches, peaks, 1)
        slopes[precision] = float(slope)
        report.put(section, (precision, "per_chunk_bytes"), float(slope))
        report.put(section, (precision, "fixed_bytes"), float(intercept))
        ratio = (
            ""
            if precision == "fp32" or "fp32" not in slopes
            else (f" ({slope / slopes['fp32']:.2f}x fp32)")
        )
        report.say(
            f"  {precision}: {slope / MIB:,.0f} MiB per chunk{ratio}, "
            f"{intercept / MIB:,.0f} MiB fixed (least squares over batches "
            f"{', '.join(str(b) for b, _ in points)})"
        )
    return slopes


# --- (b) speed ---------------------------------------------------------------------------------


def section_speed(bench: Bench) -> None:
    """Times real time of separate_tensor on a long track, per precision and batch size."""
    section, device, report, sizes = "speed", bench.device, bench.report, bench.sizes
    rate = htsep.load_model(bench.checkpoint).sample_rate
    track = clip_signal(sizes.track_seconds, rate, seed=1)
    report.put(section, ("track_seconds",), sizes.track_seconds)
    report.say(
        f"  Separator.separate_tensor, {sizes.track_seconds:g} s track at {rate} Hz, shifts=1, "
        f"overlap 0.25; the fastest of {sizes.repeats} run(s) counts"
    )
    for precision, reason in bench.missing.items():
        report.skip(section, precision, reason)
    order = [p for p in ("bf16", "fp32", "fp16") if p in bench.precisions]
    settings = ["auto", *map(str, sizes.speed_batches), "network"]
    runs: list[tuple[str, str]] = [(p, s) for p in order for s in settings]
    if device.type == "cuda" and tf32_allowed():
        runs.append(("fp32_ieee", "auto"))  # what exact fp32 would cost
    for precision, setting in runs:
        if setting == "network":
            bench.attempt(
                section,
                f"{precision} network alone",
                partial(network_share, bench, precision, track.shape[-1]),
            )
            continue
        batch = None if setting == "auto" else int(setting)
        label = f"{precision} batch {setting}"
        auto = report.get(section, precision, "auto")
        if auto is not None and auto["batch_size"] == batch:
            report.put(section, (precision, setting), auto)
            report.say(f"  {label}: the automatic batch size, measured above")
            continue
        bench.attempt(
            section,
            label,
            partial(speed_run, bench, precision, batch, setting, track),
            expected=expected_speed_seconds(bench, precision),
            batch=batch,
        )
        free_memory(device)
    columns = ["auto", *map(str, sorted(sizes.speed_batches))]
    table: list[tuple[str, ...]] = [("", *columns)]
    for precision in [*order, "fp32_ieee"]:
        row = report.get(section, precision)
        if not row:
            continue
        cells = [f"{row[key]['times_real_time']:.1f}x" if key in row else "-" for key in columns]
        table.append((precision, *cells))
    if len(table) > 1:
        report.say("  times real time (- : not measured):")
        for line in table:
            report.say("    " + "".join(f"{cell:>10}" for cell in line))


def expected_speed_seconds(bench: Bench, precision: str) -> float:
    """What a speed setting is likely to cost: the slowest rate seen so far (this precision's
    if any) times the track and the runs, plus loading; the size's guess before any."""
    key = precision.removesuffix("_ieee")
    rate = bench.seconds_per_second.get(key) or max(bench.seconds_per_second.values(), default=0)
    if not rate:
        return bench.sizes.prior
    return rate * bench.sizes.track_seconds * bench.sizes.repeats * 1.2 + 2


def speed_run(
    bench: Bench, precision: str, batch: int | None, setting: str, track: torch.Tensor
) -> None:
    device, report, sizes = bench.device, bench.report, bench.sizes
    ieee = precision == "fp32_ieee"
    with ieee_fp32() if ieee else contextlib.nullcontext():
        separator = bench.separator(precision="fp32" if ieee else precision, batch_size=batch)
        chosen = separator.options.batch_size
        seconds: list[float] = []
        peak = None
        for run in range(sizes.repeats):
            if run and not bench.budget.fits(seconds[-1] * 1.2):
                break
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            elapsed, _ = bench.timed_separation(separator, track)
            seconds.append(elapsed)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
    best = min(seconds)
    key = precision.removesuffix("_ieee")
    per_second = max(seconds) / sizes.track_seconds
    bench.seconds_per_second[key] = max(bench.seconds_per_second.get(key, 0.0), per_second)
    figure = {
        "batch_size": chosen,
        "seconds": best,
        "times_real_time": sizes.track_seconds / best,
        "runs": seconds,
        "peak_device_bytes": peak,
    }
    report.put("speed", (precision, setting), figure)
    report.say(
        f"  {precision} batch {setting}{f' ({chosen})' if setting == 'auto' else ''}: "
        f"{best:.2f} s, {sizes.track_seconds / best:.1f}x real time"
        + (f", peak {peak / GIB:.1f} GiB" if peak is not None else "")
        + f" (runs: {', '.join(f'{s:.2f}' for s in seconds)} s)"
    )


def network_share(bench: Bench, precision: str, samples: int) -> None:
    """The network calls alone of a separation at the automatic batch size: what the rest of
    separate_tensor (reading, overlap-add, copies) costs shows as the difference."""
    device, report = bench.device, bench.report
    model = htsep.load_model(bench.checkpoint).to(device)
    batch = report.get("speed", precision, "auto", "batch_size")
    if batch is None:
        batch = htsep.devices.auto_batch_size(device, precision)
    chunk = model.segment_length
    stride = int(0.75 * chunk)
    chunks = math.ceil(samples / stride)
    calls = math.ceil(chunks / batch)
    windows = [torch.randn(1, model.audio_channels, chunk) for _ in range(min(batch, chunks))]
    # The output stays on the device: what copying it back and overlap-adding cost shows in
    # the rest of separate_tensor.
    run_network(model, windows, device, precision, on_device=True)  # warm-up
    timed = min(calls, 3)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(timed):
        run_network(model, windows, device, precision, on_device=True)
    synchronize(device)
    seconds = (time.perf_counter() - started) / timed * calls
    total = report.get("speed", precision, "auto", "seconds")
    figure = {
        "batch_size": batch,
        "calls": calls,
        "seconds": seconds,
        "times_real_time": samples / model.sample_rate / seconds,
    }
    report.put("speed", (precision, "network"), figure)
    rest = "" if total is None else f"; the rest of separate_tensor: {total - seconds:.2f} s"
    report.say(
        f"  {precision} network alone: {calls} calls of {batch} chunks, about {seconds:.2f} s "
        f"({figure['times_real_time']:.1f}x real time){rest}"
    )
    del model
    free_memory(device)


# --- (e) folder --------------------------------------------------------------------------------


def section_folder(bench: Bench) -> None:
    """A folder of tracks through htsep.batch.Batch, with and without the pipeline."""
    section, report, sizes = "folder", bench.report, bench.sizes
    precision = "bf16" if "bf16" in bench.precisions else "fp32"
    rate = htsep.load_model(bench.checkpoint).sample_rate
    folder = bench.work / "folder"
    folder.mkdir()
    for index in range(sizes.folder_tracks):
        audio = clip_signal(sizes.folder_seconds, rate, seed=100 + index)
        sf.write(folder / f"track{index:02d}.wav", audio.T.numpy(), rate, subtype="PCM_16")
    audio_seconds = sizes.folder_tracks * sizes.folder_seconds
    separator = bench.separator(precision=precision)
    report.put(section, ("tracks",), sizes.folder_tracks)
    report.put(section, ("track_seconds",), sizes.folder_seconds)
    report.put(section, ("precision",), precision)
    report.put(section, ("batch_size",), separator.options.batch_size)
    report.say(
        f"  {sizes.folder_tracks} WAV tracks of {sizes.folder_seconds:g} s, {precision}, batch "
        f"{separator.options.batch_size}, shifts=1, 16-bit WAV stems, clip mode rescale"
    )
    # The weights' first copy to the device is not the pipeline's cost.
    bench.attempt(section, "warm-up", lambda: separator.separate_tensor(clip_signal(1, rate, 0)))
    rate_guess = bench.seconds_per_second.get(precision)
    expected = sizes.prior if rate_guess is None else 2 * rate_guess * audio_seconds + 5

    def run(pipeline: bool) -> None:
        out = bench.work / f"out-{'pipeline' if pipeline else 'plain'}"
        batch = Batch(separator, out, OutputSettings(overwrite=True), pipeline=pipeline)
        synchronize(bench.device)
        started = time.perf_counter()
        tracks = batch.run([str(folder)])
        seconds = time.perf_counter() - started
        failed = [track for track in tracks if track.status != "ok"]
        if failed or len(tracks) != sizes.folder_tracks:
            raise RuntimeError(failed[0].error if failed else f"{len(tracks)} tracks ran")
        key = "pipeline" if pipeline else "no_pipeline"
        report.put(section, (key, "seconds"), seconds)
        report.put(section, (key, "times_real_time"), audio_seconds / seconds)
        report.say(
            f"  {'with' if pipeline else 'without'} the pipeline: {seconds:.2f} s, "
            f"{audio_seconds / seconds:.1f}x real time"
        )
        shutil.rmtree(out, ignore_errors=True)

    for pipeline in (True, False):
        label = "with the pipeline" if pipeline else "without the pipeline"
        bench.attempt(section, label, partial(run, pipeline), expected=expected)
    with_, without = (report.get(section, k, "seconds") for k in ("pipeline", "no_pipeline"))
    if with_ and without:
        report.put(section, ("speedup",), without / with_)
        report.say(f"  the pipeline: {without / with_:.2f}x the throughput without it")


# --- the summary -------------------------------------------------------------------------------


def goals(report: Report, device: torch.device) -> list[dict[str, Any]]:
    dev = device.type
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: float, lower_is_better: bool, unit: str):
        if value is None or not math.isfinite(value):
            status = "n/a"
            value = None
        elif lower_is_better:
            status = "PASS" if value <= target else "FAIL"
        else:
            status = "PASS" if value >= target else "FAIL"
        rows.append(
            {"goal": name, "value": value, "target": target, "unit": unit, "status": status}
        )

    def worst(*paths: tuple[str, ...]) -> float | None:
        values = [report.get("parity", *path) for path in paths]
        found = [v for v in values if v is not None]
        return max(found) if found else None

    add(
        f"fp32 parity, htsep {dev} vs float64",
        report.get("parity", "forward", f"htsep_{dev}_vs_float64"),
        GOAL_PARITY,
        True,
        "relative",
    )
    for other in ("htsep_cpu", f"demucs_{dev}"):
        name = f"htsep_{dev}_vs_{other}"
        add(
            f"fp32 parity, {name.replace('_', ' ')}",
            worst(("forward", name), ("separation", name)),
            GOAL_PARITY,
            True,
            "relative",
        )
        if report.get("parity", "forward_ieee") is not None:
            add(
                f"fp32 parity, TF32 off, {name.replace('_', ' ')}",
                worst(("forward_ieee", name), ("separation_ieee", name)),
                GOAL_PARITY,
                True,
                "relative",
            )
    add(
        "bf16 speed, auto batch",
        report.get("speed", "bf16", "auto", "times_real_time"),
        GOAL_SPEED,
        False,
        "x real time",
    )
    add(
        "bf16 SNR vs fp32, released (random weights)",
        report.get("precision", "released_snr_db", "bf16"),
        GOAL_SNR,
        False,
        "dB",
    )
    add(
        "bf16 SNR vs fp32, htsep-tiny",
        report.get("precision", "tiny_snr_db", "bf16"),
        GOAL_SNR,
        False,
        "dB",
    )
    return rows


def print_goals(report: Report, rows: list[dict[str, Any]]) -> None:
    report.say("\nGoals")
    width = max(len(row["goal"]) for row in rows) + 2
    report.say(f"  {'goal':<{width}}{'value':>14}{'target':>14}  status")
    for row in rows:
        value, target, unit = row["value"], row["target"], row["unit"]
        if unit == "relative":
            shown, goal = ("-" if value is None else f"{value:.1e}"), f"<= {target:.0e}"
        elif unit == "dB":
            shown, goal = ("-" if value is None else f"{value:.1f} dB"), f">= {target:g} dB"
        else:
            shown, goal = ("-" if value is None else f"{value:.1f}x"), f">= {target:g}x"
        report.say(f"  {row['goal']:<{width}}{shown:>14}{goal:>14}  {row['status']}")


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


# --- main --------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Bench], None]] = {
    "parity": section_parity,
    "precision": section_precision,
    "memory": section_memory,
    "speed": section_speed,
    "folder": section_folder,
}
TITLES = {
    "parity": "fp32 parity against htsep on the CPU and demucs 4.1.0",
    "precision": "reduced precision against fp32: SNR, and nSDR of htsep-tiny",
    "memory": "peak memory per chunk",
    "speed": "speed of one long track",
    "folder": "a folder of tracks, with and without the pipeline",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes (a minute on a CPU)")
    parser.add_argument(
        "--device", type=text, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--budget", type=positive(), default=480.0, help="seconds for the whole run (default 480)"
    )
    parser.add_argument("--json", type=new_file, help="also write every figure to this JSON file")
    parser.add_argument(
        "--only",
        type=text,
        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default all)",
    )
    parser.add_argument(
        "--threads",
        type=whole(1, 1024),
        help="torch CPU threads (default: 1 with --smoke, whose toy sizes gain nothing from more "
        "and on a busy machine lose much to OpenMP threads waiting on each other; else torch's)",
    )
    parser.add_argument(
        "--no-demucs",
        action="store_true",
        help="run without the demucs oracle (checkpoint written by htsep)",
    )
    args = parser.parse_args(argv)
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in SECTIONS]
        if unknown:
            parser.error(f"--only: no section {', '.join(unknown)} (of {', '.join(SECTIONS)})")
        args.only = wanted
    if not args.budget > 0:
        parser.error("--budget must be positive")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    cuda = torch.cuda.is_available()
    threads = args.threads or (1 if args.smoke else None)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        device = htsep.devices.parse_device(args.device or ("cuda" if cuda else "cpu"))
    except htsep.HtsepError as exc:
        print(f"bench_gpu: error: {exc}", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    report = Report()
    budget = Budget(args.budget, sizes.reserve)
    info = describe_machine(device)
    print_machine(report, info)
    precisions, missing = available_precisions(device)
    oracle_problem = "--no-demucs" if args.no_demucs else ORACLE_PROBLEM
    work = Path(tempfile.mkdtemp(prefix="htsep-bench-gpu-"))
    record: dict[str, Any] = {
        "mode": sizes.name,
        "device": str(device),
        "budget_seconds": args.budget,
        "machine": info,
        "precisions": precisions,
    }
    try:
        path, oracle, what = write_checkpoint(sizes, work / "repo", oracle_problem is None)
        report.say(f"{sizes.name} run, budget {args.budget:g} s; model: {what}")
        if oracle_problem is not None:
            report.say(f"no demucs: {oracle_problem}")
        bench = Bench(
            sizes, device, budget, report, work, path, oracle, oracle_problem, precisions, missing
        )
        run_sections(bench, args.only or list(SECTIONS))
        rows = goals(report, device)
        print_goals(report, rows)
        record["goals"] = rows
    finally:
        budget.disarm()
        shutil.rmtree(work, ignore_errors=True)
        elapsed = time.monotonic() - STARTED
        record.update(sections=report.data, skips=report.skips, elapsed_seconds=elapsed)
        report.say(f"\n{elapsed:.1f} s in all")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(finite_or_none(record), indent=2, allow_nan=False))
            report.say(f"figures written to {args.json}")
    return 0


def run_sections(bench: Bench, names: list[str]) -> None:
    """Each section in order, under the budget's alarm: what the deadline cuts short, or an
    error, is reported and the next section starts (or is skipped, once out of time)."""
    report = bench.report
    bench.budget.arm()
    try:
        for name in [name for name in SECTIONS if name in names]:
            started = time.monotonic()
            try:
                report.say(f"\n({LETTERS[name]}) {name}: {TITLES[name]}")
                if not bench.budget.fits(0):
                    report.skip(name, "all", "out of time")
                    continue
                try:
                    RUNNERS[name](bench)
                except OutOfTime:
                    raise
                except Exception as exc:
                    traceback.print_exc()
                    report.skip(name, "the rest", f"error: {type(exc).__name__}: {exc}")
                free_memory(bench.device)
            except OutOfTime:  # the alarm, wherever it struck in this section
                what = f"{bench.running} and the rest" if bench.running else "the rest"
                report.skip(name, what, "out of time")
                bench.running = None
            report.put(name, ("section_seconds",), time.monotonic() - started)
    finally:
        bench.budget.disarm()


if __name__ == "__main__":
    sys.exit(main())
