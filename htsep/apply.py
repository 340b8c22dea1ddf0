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


def apply_split(
    model: SeparationModel,
    mix: torch.Tensor,
    *,
    start: int = 0,
    length: int | None = None,
    options: ChunkOptions = ChunkOptions(),
    device: torch.device | str | None = None,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """Separate the window [start, start + length) of ``mix`` chunk by chunk.

    Each chunk takes its context from ``mix`` itself (zeros beyond it), so a window may start
    before 0 or end after the signal. mix: (B, C, T) -> (B, S, C, length)
    """
    length = mix.shape[-1] - start if length is None else length
    stream = ChunkStream(
        model,
        lambda first, count: zero_extended(mix, first, count),
        start=start,
        length=length,
        options=options,
        device=device,
        progress=progress,
    )
    return stream.take(length)


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


def apply_shifts(
    model: SeparationModel,
    mix: torch.Tensor,
    *,
    shifts: int,
    generator: torch.Generator,
    options: ChunkOptions = ChunkOptions(),
    device: torch.device | str | None = None,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """The shift trick: separate ``shifts`` copies of the mix delayed by random offsets of up
    to half a second, undo each delay, and average. shifts=0 separates the mix as it is.

    mix: (B, C, T) -> (B, S, C, T)
    """
    length = mix.shape[-1]
    if shifts <= 0:
        return apply_split(model, mix, options=options, device=device, progress=progress)
    max_shift = int(0.5 * model.sample_rate)
    scaled = None if progress is None else (lambda done: progress(done / shifts))
    total: torch.Tensor | None = None
    for _ in range(shifts):
        offset = int(torch.randint(0, max_shift + 1, (1,), generator=generator))
        # Delaying the mix by (max_shift - offset) and separating from its new start is the
        # same as separating the window that starts that far before the original start.
        shifted = apply_split(
            model,
            mix,
            start=offset - max_shift,
            length=length + max_shift - offset,
            options=options,
            device=device,
            progress=scaled,
        )[..., max_shift - offset :]
        total = shifted if total is None else total + shifted
    assert total is not None
    return total / shifts


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


def standardize_mix(mix: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Normalize by the mono mix's mean and std (as the reference does before separating).

    mix: (C, T) -> (normalized (C, T), mean, std); undo with ``x * std + mean``.
    """
    # float64 statistics: the streamed path accumulates them block by block in float64 too.
    mono = mix.double().mean(0)
    mean = float(mono.mean())
    # One sample has no spread: an unbiased std would be NaN.
    std = float(mono.std()) if mono.numel() > 1 else 0.0
    std += 1e-8
    return (mix - mean) / std, mean, std


def limit_peaks(stems: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """Keep stems inside full scale before they are written.

    rescale: one gain for all stems of the track, 1 / max(1.01 * peak, 1) with the loudest
    peak among them (stems that did not clip are untouched, and the stems keep summing to
    the equally scaled mix); clamp: to +-0.99; none: unchanged.
    """
    if mode == "none":
        return dict(stems)
    if mode == "clamp":
        return {name: stem.clamp(-0.99, 0.99) for name, stem in stems.items()}
    if mode == "rescale":
        peak = max(
            (float(stem.abs().max()) for stem in stems.values() if stem.numel()), default=0.0
        )
        gain = 1 / max(1.01 * peak, 1.0)
        return {name: stem * gain for name, stem in stems.items()}
    raise ValueError(f"unknown clip mode {mode!r} (rescale, clamp or none)")


# --- streaming: the same computation, finished samples handed out in order ----------------------

Reader = Callable[[int, int], torch.Tensor]  # (start, length) -> (B, C, length), zeros outside


class ChunkStream:
    """``apply_split`` over the window [start, start + length) of a signal given by a reader,
    producing its finished samples in order with memory for about one chunk.

    A sample is finished once no later chunk covers it, i.e. when the next chunk starts after
    it. The additions happen in the same order as in ``apply_split``: same numbers.
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
    """A bag of models with shifts over a whole signal, streamed: ``take(n)`` gives the next n
    samples of what ``apply_shifts`` per member, weighted per source, would give.

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
