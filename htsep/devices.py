"""Devices and host memory: choosing a device, sizing batches for it, members of a bag taking
turns on it (``DeviceSlot``), and how this process's malloc hands freed memory back to the OS.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from htsep.errors import UsageError

# Device memory of one network call on released-size chunks (7.8 s segments), measured by
# scripts/bench_gpu.py on an H200 (torch 2.11, torch.cuda.max_memory_allocated above the
# weights, least squares over 1, 2, 4 and 8 chunks): per chunk, and fixed per call. bf16 and
# fp16 need more than fp32 per chunk: autocast keeps both the float32 activations and their
# 16-bit copies. Used only to pick a default batch size.
CHUNK_BYTES = {"fp32": 215 << 20, "bf16": 306 << 20, "fp16": 306 << 20}
CALL_BYTES = {"fp32": 8 << 20, "bf16": 0, "fp16": 0}

ModelT = TypeVar("ModelT")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed: torch's OutOfMemoryError (CUDA, MPS), the
    RuntimeErrors of its CPU allocator ("can't allocate memory") and of oneDNN, which reports
    a failed allocation as "could not create a primitive" (under ``ulimit -v`` or a
    container's limit), or Python's MemoryError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(
        phrase in str(exc) for phrase in ("can't allocate memory", "could not create a primitive")
    )


@contextlib.contextmanager
def own_arithmetic(device: torch.device | str) -> Iterator[None]:
    """Autocast off on the CPU and on ``device`` inside the block: a host program's autocast
    (``torch.autocast("cpu", dtype=torch.bfloat16)`` around a call) would otherwise run the
    resampling and the networks' float32 work in 16 bits. Autocast is per thread, so this
    touches no other thread; htsep's own reduced precisions turn it back on inside."""
    kinds = dict.fromkeys(("cpu", torch.device(device).type))
    with contextlib.ExitStack() as stack:
        for kind in kinds:
            stack.enter_context(torch.autocast(kind, enabled=False))
        yield


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def parse_device(name: str | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'mps'; None picks cuda, then mps, then cpu."""
    if name is not None and not isinstance(name, (str, torch.device)):
        # torch would take a number as a CUDA index; a bool is an int too.
        raise UsageError(f"device must be a name such as 'cpu' or 'cuda:0', not {name!r}")
    try:
        device = torch.device(default_device() if name is None else name)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {name!r} (cpu, cuda, cuda:N or mps)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r}: only {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name!r}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {name!r} (cpu, cuda, cuda:N or mps)")
    elif device.type == "cpu" and device.index not in (None, 0):  # it would run on the CPU
        raise UsageError(f"device {name!r}: there is one CPU device, 'cpu'")
    return device


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags as Linux lists them in /proc/cpuinfo (x86 "flags", Arm
    "Features"); None where they cannot be read (not Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    flags: set[str] = set()
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags or None


@functools.cache
def bf16_arithmetic() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86: AVX512-BF16 or AMX-BF16; Arm:
    BF16). Elsewhere torch emulates it: a 2048x2048 bf16 product on an AVX2-only EPYC ran at
    under 1 GFLOP/s against 170 in float32. Where the CPU's flags cannot be read (not Linux),
    True: torch is left to decide."""
    flags = cpu_flags()
    return flags is None or bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def amx_bf16() -> bool:
    """Whether this CPU has AMX tiles for bfloat16 (Intel Xeon since Sapphire Rapids), which
    torch's own bfloat16 CPU kernels (its fused attention among them) multiply with. Where the
    flags cannot be read, torch's own answer (False if this torch cannot tell)."""
    flags = cpu_flags()
    if flags is None:
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(probe()) if probe is not None else False
    return "amx_bf16" in flags


def auto_batch_size(device: torch.device, precision: str = "fp32") -> int:
    """Chunks per network call: 1 on the CPU (no gain there), else what free memory holds."""
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    room = free * 0.8 - CALL_BYTES[precision]
    return int(min(max(room // CHUNK_BYTES[precision], 1), 16))


class DeviceSlot:
    """Runs the members of a bag on a device one at a time, so that device memory holds one
    member's weights whatever the bag's size. The members stay on the host (pinned, for fast
    copies to a CUDA device); the slot keeps one device copy and loads the weights of the
    member whose turn it is into it (a member of another configuration gets a new copy).

    ``turn(model)`` -> the network to call for ``model``, for one call; ``get(model)`` is the
    same without the turn, for a single thread. ``loads`` counts weight loads.

    Threads sharing a slot (one ``Separator`` used by several threads) take turns: another
    member's weights are never loaded while a call on the copy is being issued, and on CUDA
    the load waits, on the device, for the last call issued to finish with the copy.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.copy: torch.nn.Module | None = None
        self.current: object | None = None
        self.loads = 0
        self.lock = threading.RLock()
        self._used: Any = None  # CUDA event recorded after the last call issued on the copy

    @contextlib.contextmanager
    def turn(self, model: ModelT) -> Iterator[ModelT]:
        """The network for ``model`` while the block issues one call on it; other threads
        wait for their turn until the block ends."""
        with self.lock:
            network = self.get(model)
            yield network
            if self.device.type == "cuda":
                used = torch.cuda.Event()
                used.record(torch.cuda.current_stream(self.device))
                self._used = used

    def get(self, model: ModelT) -> ModelT:
        if model is self.current:
            assert self.copy is not None
            return self.copy  # type: ignore[return-value]
        if not isinstance(model, torch.nn.Module):
            raise TypeError("a device slot holds torch modules")
        if self.device.type == "cuda":
            _pin(model)
            if self._used is not None:  # a call issued from another stream may still run
                torch.cuda.current_stream(self.device).wait_event(self._used)
        if self.copy is None or getattr(self.copy, "config", None) != getattr(
            model, "config", object()
        ):
            self.copy = None  # free the old copy before making the new one
            self.copy = copy.deepcopy(model).to(self.device)
        else:
            with torch.no_grad():
                for ours, theirs in zip(_tensors(self.copy), _tensors(model), strict=True):
                    ours.copy_(theirs, non_blocking=True)
        self.current = model
        self.loads += 1
        return self.copy  # type: ignore[return-value]


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _pin(module: torch.nn.Module) -> None:
    """Page-lock a host module's tensors (once), so that copies to the GPU run asynchronously."""
    if getattr(module, "_htsep_pinned", False):
        return
    for tensor in _tensors(module):
        if tensor.device.type == "cpu":
            tensor.data = tensor.data.pin_memory()
    module._htsep_pinned = True  # type: ignore[assignment]


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h, glibc 2.33 and later)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd")
        + ("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None
    if not hasattr(libc, "malloc_trim"):
        return None
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2
    return libc


# Freed memory that glibc may keep in its heap between chunks. The next chunk's activations
# reuse it instead of pages mapped fresh from the kernel: the released htdemucs at one chunk
# per call leaves 200-350 MB free between chunks, and handing that back after every chunk
# cost about 60,000 page faults per chunk.
KEEP_FREED_BYTES = 512 << 20


def freed_bytes() -> int | None:
    """Bytes freed but kept by glibc's heap (``mallinfo2().fordblks``), or None where glibc
    cannot tell (another C library, or glibc before 2.33)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    return int(libc.mallinfo2().fordblks)


def release_freed_memory(keep: int = 0) -> None:
    """Hand memory freed by finished chunks back to the OS once glibc keeps more than ``keep``
    bytes of it (everything where it cannot tell how much it keeps). glibc keeps freed blocks
    of varying size in its heaps, and over thousands of chunks the resident size creeps up
    without it."""
    libc = _libc()
    if libc is None:
        return
    kept = freed_bytes() if keep else None
    if kept is None or kept > keep:
        libc.malloc_trim(0)


# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: blocks up to 1 GiB come from the heap instead of
    fresh mappings, and the heap is not shrunk. Network calls then stop paying page faults for
    their activations on every chunk (about 8% faster on the CPU) at the cost of a higher,
    slowly settling resident size. -> whether it took effect (False where malloc is not glibc)"""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    ok &= libc.mallopt(_M_TOP_PAD, 1 << 28)
    return bool(ok)


# --- helper threads and torch's OpenMP workers -------------------------------------------------


@functools.cache
def _openmp() -> Any:
    """The OpenMP runtime torch's CPU operators run on in this process (found among the
    loaded libraries; Linux), or None."""
    names = ("libgomp", "libiomp", "libomp")
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted(
                {line.split()[-1] for line in maps if "/" in line and any(n in line for n in names)}
            )
    except OSError:
        return None
    for path in paths:
        try:
            runtime = ctypes.CDLL(path)  # the loaded copy: dlopen counts it once more
            runtime.omp_set_num_threads.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):
            continue
        return runtime
    return None


def serial_torch_thread() -> None:
    """Make torch's CPU operators run on the calling thread alone, for that thread only (the
    initializer of the batch's helper threads: decoding and encoding).

    With OpenMP each thread that runs a parallel operator gets a team of worker threads of its
    own. Once the process holds more of them than it has CPUs, libgomp's idle workers stop
    spinning between operators and sleep, and waking them slows every parallel operator of
    the network: after a helper thread's pass over a track (the mix statistics), network calls
    took 0.90-0.93 s in bf16 against 0.77 s (an Intel Xeon with 2 cores). torch's
    ``set_num_threads`` is process-wide, but OpenMP's thread count is a per-thread setting,
    which this sets here. Without an OpenMP runtime to reach, it does nothing."""
    torch.get_num_threads()  # torch's own per-thread setup first: it would undo ours
    runtime = _openmp()
    if runtime is not None:
        runtime.omp_set_num_threads(1)


def yield_to_helper() -> None:
    """On a serial helper thread (``serial_torch_thread``) about to do CPU work beside the
    network calls, and that ends with that work: start a team of two OpenMP threads here,
    whose worker stays idle until the thread ends.

    libgomp lets the idle workers of the network's team spin between operators as long as the
    process holds no more OpenMP threads than CPUs, and makes them sleep almost at once when
    it holds more. Spinning workers took the cores from an encoding helper, and every parallel
    operator waited for the worker the scheduler had paused: in a folder of htsep-tiny tracks
    with MP3 stems (2 cores) the network calls took twice as long beside the encoding, and the
    pipeline gained nothing over --no-pipeline. One more worker puts the process above its
    CPUs whenever the network's team fills them (and changes nothing when it does not); once
    the thread has ended they spin again. No operator's thread count changes, so no result."""
    runtime = _openmp()
    if runtime is None:
        return
    runtime.omp_set_num_threads(2)
    try:
        torch.empty(1 << 18).fill_(0.0)  # one parallel operator: the team
    finally:
        runtime.omp_set_num_threads(1)
