"""Separation around the network: chunking with cross-faded overlap-add, the shift trick, and
bags of models. Tensors in, tensors out; no files.

Dimensions: B batch, S sources, C audio channels, T samples.

The procedure is the reference's: the track is seen as extended with silence on both sides;
each chunk of one segment is centred in a model-sized window of real neighbouring audio; chunk
outputs are weighted by a triangle and normalized by the summed weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import torch

from htsep.devices import DeviceSlot, release_freed_memory

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
    precision: the network's arithmetic; release_memory: hand memory freed by each network call
    back to the OS (see ``release_freed_memory``).
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
) -> torch.Tensor:
    """One network call on a batch of chunks: (N, C, T) windows -> (N, S, C, T) float32 on
    the CPU. Reduced precision uses autocast (the model keeps its STFT in float32)."""
    batch = torch.cat(windows)
    target = torch.device(device) if device is not None else batch.device
    if target.type == "cuda":
        batch = batch.pin_memory().to(target, non_blocking=True)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with (
        torch.inference_mode(),
        torch.autocast(target.type, dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        return model(batch.to(target)).to("cpu", torch.float32)


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
    ) -> None:
        self.model, self.read, self.start, self.length = model, read, start, length
        self.slot = slot
        self.options, self.device, self.progress = options, device, progress
        self.chunk = segment_samples(model, options.segment)
        if not options.split:
            self.chunk = max(self.chunk, length)
        self.stride = int((1 - options.overlap) * self.chunk) if options.split else self.chunk
        if self.stride <= 0:
            raise ValueError(f"overlap {options.overlap} leaves no stride between chunks")
        self.weights = triangle_weights(self.chunk, options.transition_power)
        self.offsets = list(range(0, length, self.stride))
        self.next_chunk = 0
        self.base = 0  # window position of the accumulators' first sample
        self.sum: torch.Tensor | None = None  # (B, S, C, chunk) weighted estimates
        self.total = torch.zeros(self.chunk)
        self.ready: list[torch.Tensor] = []
        self.ready_length = 0

    def _finish_until(self, position: int) -> None:
        count = position - self.base
        if count <= 0 or self.sum is None:
            return
        self.ready.append(self.sum[..., :count] / self.total[:count])
        self.ready_length += count
        self.sum = torch.cat([self.sum[..., count:], torch.zeros_like(self.sum[..., :count])], -1)
        self.total = torch.cat([self.total[count:], torch.zeros(count)])
        self.base = position

    def _advance(self) -> None:
        group = self.offsets[self.next_chunk : self.next_chunk + self.options.batch_size]
        sizes = [min(self.chunk, self.length - offset) for offset in group]
        windows = [
            self.read(self.start + offset - (self.chunk - size) // 2, self.chunk)
            for offset, size in zip(group, sizes, strict=True)
        ]
        batch = windows[0].shape[0]
        model = self.model if self.slot is None else self.slot.get(self.model)
        estimates = run_network(model, windows, self.device, self.options.precision)
        if self.sum is None:
            self.sum = estimates.new_zeros(batch, *estimates.shape[1:3], self.chunk)
        for index, (offset, size) in enumerate(zip(group, sizes, strict=True)):
            self._finish_until(offset)
            lead = (self.chunk - size) // 2
            piece = estimates[index * batch : (index + 1) * batch, ..., lead : lead + size]
            self.sum[..., :size] += self.weights[:size] * piece
            self.total[:size] += self.weights[:size]
            if self.progress is not None:
                self.progress(1 / len(self.offsets))
        del estimates
        if self.options.release_memory:
            release_freed_memory()
        self.next_chunk += len(group)
        if self.next_chunk == len(self.offsets):
            self._finish_until(self.length)

    def take(self, count: int) -> torch.Tensor:
        """The next ``count`` finished samples: (B, S, C, count)."""
        while self.ready_length < count:
            if self.next_chunk >= len(self.offsets):
                raise ValueError("read past the end of the window")
            self._advance()
        joined = torch.cat(self.ready, -1) if len(self.ready) > 1 else self.ready[0]
        out, rest = joined[..., :count], joined[..., count:]
        self.ready = [rest] if rest.shape[-1] else []
        self.ready_length -= count
        return out


class SeparationStream:
    """A bag of models with the shift trick over a whole signal, streamed: ``take(n)`` gives
    the next n samples of the estimate. Each member separates ``shifts`` copies of the signal
    delayed by random offsets of up to half a second (shifts=0: the signal as it is), the
    delays are undone and the copies averaged; the members' estimates are then weighted per
    source.

    members: (model, weights per source); offsets are drawn from ``generator`` member by member,
    in the order the in-memory path draws them. slot: run the members through it, one at a
    time on its device (the models themselves stay where they are).
    """

    def __init__(
        self,
        members: Sequence[tuple[SeparationModel, Sequence[float]]],
        read: Reader,
        length: int,
        *,
        shifts: int,
        generator: torch.Generator,
        options: ChunkOptions = ChunkOptions(),
        device: torch.device | str | None = None,
        progress: ProgressCallback | None = None,
        slot: DeviceSlot | None = None,
    ) -> None:
        self.streams: list[tuple[list[tuple[ChunkStream, int]], torch.Tensor]] = []
        total = None
        runs = len(members) * max(shifts, 1)
        share = None if progress is None else (lambda done: progress(done / runs))
        for model, weights in members:
            weight = torch.tensor([float(w) for w in weights])
            total = weight if total is None else total + weight
            max_shift = int(0.5 * model.sample_rate)
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
                        device=device,
                        progress=share,
                        slot=slot,
                    ),
                    skip,
                )
                for start, skip in starts
            ]
            self.streams.append((runs_of_member, weight))
        assert total is not None
        self.total = total
        self.shifts = shifts
        self.started = False

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
            if self.shifts:
                summed = summed / self.shifts
            weighted = summed * weight.view(1, -1, 1, 1)
            estimate = weighted if estimate is None else estimate + weighted
        assert estimate is not None
        return estimate / self.total.view(1, -1, 1, 1)
