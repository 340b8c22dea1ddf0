"""Separation around the network: chunking with cross-faded overlap-add, the shift trick, and
bags of models. Tensors in, tensors out; no files.

Dimensions: B batch, S sources, C audio channels, T samples.

The procedure is the reference's: the track is seen as extended with silence on both sides;
each chunk of one segment is centred in a model-sized window of real neighbouring audio; chunk
outputs are weighted by a triangle and normalized by the summed weights.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import torch

from htsep.devices import KEEP_FREED_BYTES, DeviceSlot, out_of_memory, release_freed_memory
from htsep.errors import HtsepError, InputLengthError
from htsep.model.htdemucs import HTDemucs, bfloat16_copy

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float], None]  # called with the fraction of the work just done
Reader = Callable[[int, int], torch.Tensor]  # (start, length) -> (B, C, length), zeros outside


class SeparationModel(Protocol):
    """What separation needs of a network (htsep.model.HTDemucs satisfies it)."""

    @property
    def sources(self) -> list[str]: ...

    @property
    def sample_rate(self) -> int: ...

    @property
    def audio_channels(self) -> int: ...

    @property
    def segment(self) -> Fraction: ...

    def __call__(self, mix: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class ChunkOptions:
    """How one model is applied to a long signal.

    segment: chunk length in seconds (None: the model's own); overlap: fraction of a chunk
    shared with the next; transition_power: sharpness of the cross-fade; batch_size: chunks run
    through the network at once; split: False runs the whole signal as a single chunk;
    precision: the network's arithmetic; release_memory: hand memory freed by the network calls
    back to the OS once more than ``KEEP_FREED_BYTES`` of it is kept (see
    ``release_freed_memory``).
    """

    segment: Fraction | None = None
    overlap: float = 0.25
    transition_power: float = 1.0
    batch_size: int = 1
    split: bool = True
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast; the STFT stays float32)
    release_memory: bool = True


def triangle_weights(length: int, power: float = 1.0) -> torch.Tensor:
    """Cross-fade weights of a chunk: 1, 2, ... up to the middle, then back down, scaled to a
    peak of 1 and raised to ``power``. -> (length,)"""
    rising = torch.arange(1, length // 2 + 1, dtype=torch.float32)
    falling = torch.arange(length - length // 2, 0, -1, dtype=torch.float32)
    weights = torch.cat([rising, falling])
    return (weights / weights.max()) ** power


def zero_extended(signal: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """signal[..., start:start + length] where indices outside the signal read as zeros.

    signal: (..., T) -> (..., length)
    """
    total = signal.shape[-1]
    lo, hi = max(start, 0), min(start + length, total)
    if lo >= hi:
        return signal.new_zeros(*signal.shape[:-1], length)
    if lo == start and hi == start + length:
        return signal[..., lo:hi]
    return torch.nn.functional.pad(signal[..., lo:hi], (lo - start, start + length - hi))


def segment_samples(model: SeparationModel, segment: Fraction | None) -> int:
    seconds = model.segment if segment is None else segment
    return int(model.sample_rate * seconds)


def run_network(
    model: SeparationModel,
    windows: list[torch.Tensor],
    device: torch.device | str | None,
    precision: str,
    *,
    on_device: bool = False,
) -> torch.Tensor:
    """One network call on a batch of chunks: (N, C, T) windows -> (N, S, C, T) float32 on
    the CPU (``on_device``: left on the device, the call possibly still running there).

    bf16 on the CPU runs the network's bfloat16 copy (``bfloat16_copy``: bfloat16 weights and
    activations, float32 norm statistics, STFT and output); other reduced precisions, and
    models that are not HTDemucs, use autocast (the model keeps its STFT in float32)."""
    batch = torch.cat(windows)
    target = torch.device(device) if device is not None else batch.device
    if target.type == "cuda":
        batch = batch.pin_memory().to(target, non_blocking=True)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype is torch.bfloat16 and target.type == "cpu" and isinstance(model, HTDemucs):
        model, dtype = bfloat16_copy(model), None
    with (
        torch.inference_mode(),
        torch.autocast(target.type, dtype=dtype or torch.float32, enabled=dtype is not None),
        full_float32(target.type == "cuda" and dtype is None),
    ):
        out = model(batch.to(target)).float()
    return out if on_device else out.to("cpu")


@contextlib.contextmanager
def full_float32(enabled: bool = True) -> Iterator[None]:
    """CUDA convolutions and matrix products in IEEE float32 inside the block: torch lets cuDNN
    round convolution inputs to TF32 (10-bit mantissas) by default, and a user may have allowed
    it for matrix products, which is not fp32 the way the reference computes it. The settings
    are process-wide: blocks in several threads share them, the first to enter saves the
    host's settings and the last to leave puts them back."""
    if not enabled:
        yield
        return
    _FULL_FLOAT32.enter()
    try:
        yield
    finally:
        _FULL_FLOAT32.leave()


class _Float32Settings:
    """The TF32 switches, set to IEEE while any ``full_float32`` block runs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0  # blocks inside, in every thread
        self.saved: list[tuple[Any, str, object]] = []

    @staticmethod
    def wanted() -> list[tuple[Any, str, object]]:
        cudnn: Any = torch.backends.cudnn
        matmul: Any = torch.backends.cuda.matmul
        if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
            # torch >= 2.9: the per-backend precision API (mixing it with allow_tf32 is an error).
            return [(cudnn.conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
        return [(cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]

    def enter(self) -> None:
        with self.lock:
            if self.depth == 0:
                settings = self.wanted()
                self.saved = [(owner, name, getattr(owner, name)) for owner, name, _ in settings]
                for owner, name, value in settings:
                    setattr(owner, name, value)
            self.depth += 1

    def leave(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                for owner, name, value in self.saved:
                    setattr(owner, name, value)
                self.saved = []


_FULL_FLOAT32 = _Float32Settings()


class OutOfDeviceMemory(HtsepError):
    """A single chunk does not fit in the device's memory."""


class PendingBatch:
    """The output of network calls that may still be running or copying back to the host;
    ``result()`` waits for it: (N, S, C, T) float32 on the CPU. ``part`` selects some rows
    (the chunks of one stream in a call that several share)."""

    def __init__(self, parts: list[tuple[torch.Tensor, Any]], rows: slice = slice(None)) -> None:
        self.parts = parts  # (host tensor, CUDA event to wait for or None)
        self.rows = rows

    def result(self) -> torch.Tensor:
        for _, event in self.parts:
            if event is not None:
                event.synchronize()
        tensors = [tensor for tensor, _ in self.parts]
        return (tensors[0] if len(tensors) == 1 else torch.cat(tensors))[self.rows]

    def part(self, start: int, stop: int | None) -> PendingBatch:
        """Rows [start, stop) of this output, pending."""
        return PendingBatch(self.parts, slice(start, stop))


class NetworkRunner:
    """Network calls for the streams of one separation: ``batch_size`` chunks per call, on a
    device, with members of a bag taking turns there through ``slot``.

    On a CUDA device a call's output is copied to page-locked host memory on a second stream
    while the next call computes, so the device does not wait for the host. A call that runs
    out of device memory is split in halves and retried (the smaller size is kept for every
    later call, and logged once per halving); only a single chunk that does not fit is an
    error (``OutOfDeviceMemory``).

    full_calls (default: on CUDA): every call has exactly ``batch_size`` chunks, the last
    ones padded with silence whose estimates are dropped, so that a chunk's numbers never
    depend on how many chunks share its call; room at the end of a track may then go to the
    next track's chunks (see ``ChunkStream``). Off, a track's last call is as short as its
    last chunks.
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        precision: str = "fp32",
        batch_size: int = 1,
        slot: DeviceSlot | None = None,
        *,
        full_calls: bool | None = None,
    ) -> None:
        self.device = None if device is None else torch.device(device)
        self.precision, self.batch_size, self.slot = precision, batch_size, slot
        if full_calls is None:
            full_calls = self.device is not None and self.device.type == "cuda"
        self.full_calls = full_calls
        self._copies: Any = None  # the CUDA stream for device-to-host copies, made on first use

    def submit(self, model: SeparationModel, windows: list[torch.Tensor]) -> PendingBatch:
        """Start the network on the windows ((B, C, T) each, at most ``batch_size``) -> their
        estimates (len(windows) * B, S, C, T), pending."""
        parts: list[tuple[torch.Tensor, Any]] = []
        start = 0
        while start < len(windows):
            group = windows[start : start + self.batch_size]
            size = self.batch_size if self.full_calls else len(group)  # chunks in the call
            try:
                parts.append(self._call(model, group))
            except Exception as exc:
                if not out_of_memory(exc):
                    raise
                if size == 1:
                    raise OutOfDeviceMemory(
                        f"out of memory on {self.device or 'the CPU'} with a single chunk: "
                        "use a shorter --segment, --precision bf16/fp16 or another device"
                    ) from None
            else:
                start += len(group)
                continue
            # Outside the except block, so that the failed call's tensors are freed first.
            self.batch_size = size // 2
            logger.warning(
                "out of memory on %s with %d chunks per call: now %d per call",
                self.device or "the CPU",
                size,
                self.batch_size,
            )
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.empty_cache()
        return PendingBatch(parts)

    def _call(
        self, model: SeparationModel, windows: list[torch.Tensor]
    ) -> tuple[torch.Tensor, Any]:
        if self.slot is None:
            return self._issue(model, windows)
        with self.slot.turn(model) as network:
            return self._issue(network, windows)

    def _issue(
        self, network: SeparationModel, windows: list[torch.Tensor]
    ) -> tuple[torch.Tensor, Any]:
        rows = sum(window.shape[0] for window in windows)  # the estimates kept
        padding = self.batch_size - len(windows) if self.full_calls else 0
        if padding > 0:
            windows = windows + [torch.zeros_like(windows[0])] * padding
        if self.device is None or self.device.type != "cuda":
            out = run_network(network, windows, self.device, self.precision)
            return (out[:rows] if padding > 0 else out), None
        out = run_network(network, windows, self.device, self.precision, on_device=True)
        out = out[:rows]
        if self._copies is None:
            self._copies = torch.cuda.Stream(self.device)
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        self._copies.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copies):
            host.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._copies)
        out.record_stream(self._copies)  # not reused by the allocator before the copy ran
        return host, done


def plan_bag(
    weights: Sequence[Sequence[float]], wanted: Sequence[int]
) -> tuple[list[int], list[list[float]]]:
    """Which members of a bag must run to produce the ``wanted`` sources, and their weights.

    A member runs only if it carries weight for a wanted source. Among the members that run,
    a source that none of them is weighted for gets equal weights, so that every source still
    has an estimate (used for "add" complements when only some members run).
    -> (member indices, weights of those members x sources)
    """
    sources = len(weights[0])
    running = [m for m, row in enumerate(weights) if any(row[s] for s in wanted)]
    plan = [list(map(float, weights[m])) for m in running]
    for source in range(sources):
        if not any(row[source] for row in plan):
            for row in plan:
                row[source] = 1.0
    return running, plan


def mix_statistics(read: Reader, length: int, block: int) -> tuple[float, float]:
    """Mean and std of the mono mix of the signal ``read`` gives over [0, length), by which
    the mix is normalized before separating (as the reference does), read ``block`` samples
    at a time. -> (mean, std + 1e-8); normalize with (x - mean) / std, undo with x * std + mean.

    The std is unbiased, 0 for a single sample (whose spread an unbiased estimate leaves
    undefined). Blocks are combined with Chan et al.'s pairwise update in float64, so a long
    track loses no precision.
    """
    count, mean, squares = 0, 0.0, 0.0
    for start in range(0, length, block):
        mono = read(start, min(block, length - start)).double().mean(0)
        n = mono.numel()
        block_mean = float(mono.mean())
        block_squares = float(((mono - block_mean) ** 2).sum())
        delta = block_mean - mean
        total = count + n
        mean += delta * n / total
        squares += block_squares + delta * delta * count * n / total
        count = total
    std = (squares / (count - 1)) ** 0.5 if count > 1 else 0.0
    return mean, std + 1e-8


# --- streaming: the same computation, finished samples handed out in order ----------------------


class ChunkStream:
    """One model over the window [start, start + length) of a signal given by a reader, chunk
    by chunk, producing its finished samples in order with memory for about one chunk. Each
    chunk takes its context from the signal itself (zeros beyond it), so a window may start
    before 0 or end after the signal.

    A sample is finished once no later chunk covers it, i.e. when the next chunk starts after
    it; how the samples are taken (all at once or in pieces) does not change the numbers.

    follower: gives the stream that runs after this one with the same model (the next
    track's), or None. When the runner makes full calls, the room this stream's last call
    leaves (padding otherwise) goes to the follower's first chunks, whose estimates the
    follower keeps until it runs: at most one call's worth. Every chunk still gets the bits
    it gets alone, because every call then has the same shape. Measured with direct calls: a
    chunk's estimate changes in the last bits with the number of chunks in its call (on the
    CPU; GPU kernels are chosen by shape too), not with its neighbours; on a CPU running
    several threads it also changes with its place in the call, which decides how the
    threads cut the work. So the CPU, whose batch size is 1, neither pads nor fills unless
    its runner is told to (the tests do, with one thread).
    """

    def __init__(
        self,
        model: SeparationModel,
        read: Reader,
        *,
        start: int,
        length: int,
        options: ChunkOptions = ChunkOptions(),
        device: torch.device | str | None = None,
        progress: ProgressCallback | None = None,
        slot: DeviceSlot | None = None,
        runner: NetworkRunner | None = None,
        follower: Callable[[], ChunkStream | None] | None = None,
    ) -> None:
        self.model, self.read, self.start, self.length = model, read, start, length
        self.options, self.progress, self.follower = options, progress, follower
        if runner is None:
            runner = NetworkRunner(device, options.precision, options.batch_size, slot)
        self.runner = runner
        self.chunk = segment_samples(model, options.segment)
        if not options.split:
            self.chunk = max(self.chunk, length)
        self.stride = int((1 - options.overlap) * self.chunk) if options.split else self.chunk
        if self.stride <= 0:
            raise ValueError(f"overlap {options.overlap} leaves no stride between chunks")
        self.weights = triangle_weights(self.chunk, options.transition_power)
        self.offsets = list(range(0, length, self.stride))
        self.submitted = 0  # chunks handed to the runner
        self.pending: list[tuple[list[int], PendingBatch]] = []  # (offsets, estimates), in order
        self.base = 0  # window position of the accumulators' first sample
        self.sum: torch.Tensor | None = None  # (B, S, C, chunk) weighted estimates
        self.spare: torch.Tensor | None = None  # the other buffer the unfinished tail moves to
        self.total = torch.zeros(self.chunk, dtype=torch.float32)
        self.filled = 0  # leading samples of the accumulators that hold sums (the rest: none)
        self.ready: list[torch.Tensor] = []
        self.ready_length = 0

    def _finish_until(self, position: int) -> None:
        """Hand out the samples before ``position``, and move the unfinished ones (the overlap
        with later chunks) to the front of the other buffer: no new buffer, and no zeros
        written, per chunk (the samples past ``filled`` are written, not added, by the next
        chunk)."""
        count = position - self.base
        if count <= 0 or self.sum is None:
            return
        self.ready.append(self.sum[..., :count] / self.total[:count])
        self.ready_length += count
        rest = max(self.filled - count, 0)
        if self.spare is None:
            self.spare = torch.empty_like(self.sum)
        self.spare[..., :rest] = self.sum[..., count : count + rest]
        self.sum, self.spare = self.spare, self.sum
        self.total[:rest] = self.total[count : count + rest].clone()
        self.filled = rest
        self.base = position

    def _add(self, piece: torch.Tensor) -> None:
        """Add a chunk's weighted estimate at the accumulators' start: where earlier chunks left
        sums, sum += weights * piece (the reference's two roundings); past them, the product
        is written, which 0 + product would equal."""
        size = piece.shape[-1]
        assert self.sum is not None
        both = min(self.filled, size)
        weights = self.weights[:size]
        self.sum[..., :both] += weights[:both] * piece[..., :both]
        torch.mul(weights[both:], piece[..., both:], out=self.sum[..., both:size])
        self.total[:both] += weights[:both]
        self.total[both:size] = weights[both:]
        self.filled = max(self.filled, size)

    def _submit(self) -> None:
        """Start the network on the next batch of chunks (and the follower's first chunks,
        when this batch leaves room in a call)."""
        group = self.offsets[self.submitted : self.submitted + self.runner.batch_size]
        windows = self._windows(group)
        lent = self._lend(self.runner.batch_size - len(group), windows[0].shape)
        if lent is None:
            self._adopt(group, self.runner.submit(self.model, windows))
            return
        follower, their_group, theirs = lent
        pending = self.runner.submit(self.model, windows + theirs)
        rows = sum(window.shape[0] for window in windows)
        self._adopt(group, pending.part(0, rows))
        follower._adopt(their_group, pending.part(rows, None))

    def _windows(self, group: list[int]) -> list[torch.Tensor]:
        """The model-sized windows around the chunks at ``group``'s offsets: (B, C, chunk)."""
        return [
            self.read(self.start + offset - (self.chunk - size) // 2, self.chunk)
            for offset, size in ((o, self._size(o)) for o in group)
        ]

    def _adopt(self, group: list[int], pending: PendingBatch) -> None:
        self.pending.append((group, pending))
        self.submitted += len(group)

    def _lend(
        self, room: int, shape: torch.Size
    ) -> tuple[ChunkStream, list[int], list[torch.Tensor]] | None:
        """Up to ``room`` next chunks of the follower, to fill a call: (follower, their
        offsets, their windows), or None when there is no room, no follower of this model on
        this runner, or its windows cannot be read (it then fails on its own turn)."""
        if room <= 0 or self.follower is None or not self.runner.full_calls:
            return None
        try:
            follower = self.follower()
            if follower is None or follower.model is not self.model:
                return None
            if follower.runner is not self.runner or follower.chunk != self.chunk:
                return None
            group = follower.offsets[follower.submitted : follower.submitted + room]
            windows = follower._windows(group)
        except HtsepError as exc:
            logger.debug("no chunks of the next track in this call: %s", exc)
            return None
        if not windows or any(window.shape != shape for window in windows):
            return None
        return follower, group, windows

    def _size(self, offset: int) -> int:
        return min(self.chunk, self.length - offset)

    def _advance(self) -> None:
        """Overlap-add the oldest batch in flight, after starting the next one: on a device
        that computes asynchronously, the next batch runs while this one is added up."""
        if not self.pending:
            self._submit()
        if self.submitted < len(self.offsets):
            self._submit()
        group, pending = self.pending.pop(0)
        estimates = pending.result()
        batch = estimates.shape[0] // len(group)
        if self.sum is None:
            self.sum = estimates.new_empty(batch, *estimates.shape[1:3], self.chunk)
        for index, offset in enumerate(group):
            self._finish_until(offset)
            size = self._size(offset)
            lead = (self.chunk - size) // 2
            self._add(estimates[index * batch : (index + 1) * batch, ..., lead : lead + size])
            if self.progress is not None:
                self.progress(1 / len(self.offsets))
        del estimates, pending
        if self.options.release_memory:
            release_freed_memory(keep=KEEP_FREED_BYTES)
        if not self.pending and self.submitted == len(self.offsets):
            self._finish_until(self.length)

    def take(self, count: int) -> torch.Tensor:
        """The next ``count`` finished samples: (B, S, C, count)."""
        while self.ready_length < count:
            if not self.pending and self.submitted >= len(self.offsets):
                raise ValueError("read past the end of the window")
            self._advance()
        joined = torch.cat(self.ready, -1) if len(self.ready) > 1 else self.ready[0]
        out, rest = joined[..., :count], joined[..., count:]
        self.ready = [rest] if rest.shape[-1] else []
        self.ready_length -= count
        return out


def _all_ones(weights: torch.Tensor) -> bool:
    return bool((weights == 1).all())


def _check_whole(model: SeparationModel, segment: Fraction | None, length: int, shift: int) -> None:
    """A signal run as one chunk (split=False) must fit the model's chunk with room for the
    shift trick's delay of up to ``shift`` samples: whether a random delay fits would
    otherwise decide, seed by seed, whether the track separates."""
    limit = segment_samples(model, segment)
    if length + shift <= limit:
        return
    rate = model.sample_rate
    tried = f"{length} samples ({length / rate:.2f} s)"
    if length <= limit:
        raise InputLengthError(
            f"{tried} and the shift trick's delay of up to {shift / rate:g} s do not fit in "
            f"one chunk of {limit} samples ({limit / rate:.2f} s) without splitting: "
            "use --shifts 0, or leave out --no-split"
        )
    raise InputLengthError(
        f"{tried} do not fit in one chunk of {limit} samples ({limit / rate:.2f} s) "
        "without splitting: leave out --no-split"
    )


class SeparationStream:
    """A bag of models with the shift trick over a whole signal, streamed: ``take(n)`` gives
    the next n samples of the estimate. Each member separates ``shifts`` copies of the signal
    delayed by random offsets of up to half a second (shifts=0: the signal as it is), the
    delays are undone and the copies averaged; the members' estimates are then weighted per
    source.

    members: (model, weights per source); offsets are drawn from ``generator`` member by member,
    in the order the in-memory path draws them. places: each member's place in its bag (None:
    0, 1, ...): the draws of the members left out before it (a bag's members that serve only
    stems not wanted) are made and dropped, so that a member's offsets, and so its estimate,
    are those of a run of the whole bag. slot: run the members through it, one at a
    time on its device (the models themselves stay where they are). runner: the network calls'
    runner, shared with other separations (default: one made from device, options and slot).

    ``progress`` and ``following`` may be set after the stream is made. following: gives the
    separation that runs next on the same runner (the next track's), or None; each run's last
    call may then take the first chunks of the same member's same run there (see
    ``ChunkStream``). It is asked when such a call is made, and may wait for that track.
    """

    def __init__(
        self,
        members: Sequence[tuple[SeparationModel, Sequence[float]]],
        read: Reader,
        length: int,
        *,
        shifts: int,
        generator: torch.Generator,
        places: Sequence[int] | None = None,
        options: ChunkOptions = ChunkOptions(),
        device: torch.device | str | None = None,
        progress: ProgressCallback | None = None,
        slot: DeviceSlot | None = None,
        runner: NetworkRunner | None = None,
        following: Callable[[], SeparationStream | None] | None = None,
    ) -> None:
        if runner is None:
            runner = NetworkRunner(device, options.precision, options.batch_size, slot)
        self.progress, self.following = progress, following
        self.streams: list[tuple[list[tuple[ChunkStream, int]], torch.Tensor]] = []
        total = None
        self.runs = len(members) * max(shifts, 1)
        if places is None:
            places = range(len(members))
        if len(places) != len(members) or list(places) != sorted(set(places)):
            raise ValueError(f"places must rise, one per member, not {list(places)}")
        drawn = 0  # members whose offsets were drawn
        for member, ((model, weights), place) in enumerate(zip(members, places, strict=True)):
            weight = torch.tensor([float(w) for w in weights], dtype=torch.float32)
            total = weight if total is None else total + weight
            max_shift = int(0.5 * model.sample_rate)  # every member's: they share the rate
            if not options.split:
                _check_whole(model, options.segment, length, max_shift if shifts else 0)
            for _ in range((place - drawn) * shifts):  # those of the members left out
                torch.randint(0, max_shift + 1, (1,), generator=generator)
            drawn = place + 1
            offsets = [
                int(torch.randint(0, max_shift + 1, (1,), generator=generator))
                for _ in range(shifts)
            ]
            if not offsets:
                starts = [(0, 0)]
            else:
                starts = [(offset - max_shift, max_shift - offset) for offset in offsets]
            runs_of_member = [
                (
                    ChunkStream(
                        model,
                        read,
                        start=start,
                        length=length + skip,
                        options=options,
                        progress=self._share,
                        runner=runner,
                        follower=functools.partial(self._run_after, member, run),
                    ),
                    skip,
                )
                for run, (start, skip) in enumerate(starts)
            ]
            self.streams.append((runs_of_member, weight))
        assert total is not None
        self.total = total
        self.shifts = shifts
        self.started = False

    def _share(self, done: float) -> None:
        if self.progress is not None:
            self.progress(done / self.runs)

    def _run_after(self, member: int, run: int) -> ChunkStream | None:
        """This run of this member in the separation that follows, if there is one."""
        following = None if self.following is None else self.following()
        if following is None or len(following.streams) != len(self.streams):
            return None
        runs, _ = following.streams[member]
        return runs[run][0] if run < len(runs) else None

    def take(self, count: int) -> torch.Tensor:
        """The next ``count`` samples of the estimate: (B, S, C, count)."""
        if not self.started:  # drop the head of each shifted window, before the signal starts
            for runs, _ in self.streams:
                for stream, skip in runs:
                    if skip:
                        stream.take(skip)
            self.started = True
        estimate = None
        for runs, weight in self.streams:
            summed = None
            for stream, _ in runs:
                block = stream.take(count)
                summed = block if summed is None else summed + block
            assert summed is not None
            # Dividing or multiplying by exactly 1 changes no bit, so those passes over the
            # block (a whole track's stems in separate_tensor) are left out.
            if self.shifts > 1:
                summed = summed / self.shifts
            weighted = summed if _all_ones(weight) else summed * weight.view(1, -1, 1, 1)
            estimate = weighted if estimate is None else estimate + weighted
        assert estimate is not None
        if _all_ones(self.total):
            return estimate
        return estimate / self.total.view(1, -1, 1, 1)
