"""Sample-rate conversion, whole or on demand block by block, with the same numbers.

torchaudio's sinc resampler computes output frames of ``new`` samples (rates reduced by their
gcd), each from an input window of ``orig`` samples plus a kernel margin, the input read as zeros
beyond its ends. So any aligned range of output frames can be computed from the matching input
range with a margin of whole frames: ``ResampledSignal`` serves random reads of a resampled
signal that is never held whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torchaudio.functional as AF

Reader = Callable[[int, int], torch.Tensor]  # (start, length) -> (..., length), zeros outside


def resample(signal: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Whole-signal conversion: (..., T) -> (..., ceil(T * new / orig))."""
    return signal if orig == new else AF.resample(signal, orig, new)


def resampled_length(length: int, orig: int, new: int) -> int:
    if orig == new:
        return length
    gcd = math.gcd(orig, new)
    return math.ceil((new // gcd) * length / (orig // gcd))


class ResampledSignal:
    """Random access to ``resample(source, orig, new)`` where ``source`` is given by a reader.

    read(start, length) -> (..., length), equal to slicing the whole resampled signal (zeros
    outside it) up to float rounding.
    """

    def __init__(self, read: Reader, length: int, orig: int, new: int) -> None:
        self.source = read
        self.orig, self.new = orig, new
        gcd = math.gcd(orig, new)
        self.frame_in, self.frame_out = orig // gcd, new // gcd
        # torchaudio's kernel reaches ceil(6 * orig / (0.99 * min(orig, new))) samples to each
        # side (lowpass width 6, rolloff 0.99, reduced rates); whole frames of margin cover it.
        reach = math.ceil(6 * self.frame_in / (0.99 * min(self.frame_in, self.frame_out)))
        self.margin = reach // self.frame_in + 2
        self.length = resampled_length(length, orig, new)

    def read(self, start: int, length: int) -> torch.Tensor:
        lo, hi = max(start, 0), min(start + length, self.length)
        if self.orig == self.new:
            return self.source(start, length)
        probe = self.source(0, 0)
        out = probe.new_zeros(*probe.shape[:-1], length)
        if lo >= hi:
            return out
        first = lo // self.frame_out - self.margin
        last = -(-hi // self.frame_out) + self.margin
        block = self.source(first * self.frame_in, (last - first) * self.frame_in)
        converted = AF.resample(block, self.orig, self.new)
        offset = first * self.frame_out
        out[..., lo - start : hi - start] = converted[..., lo - offset : hi - offset]
        return out
