"""Sample-rate conversion on demand, block by block, with the numbers of a whole conversion.

The converter is torchaudio's windowed sinc (``sinc_interp_hann``, lowpass width 6, rolloff
0.99). Output sample ``p`` (time ``p / new``) is the sum over input samples ``i`` (time
``i / orig``, zeros beyond the ends) of ``x[i] * k(i / orig - p / new)``, where ``k`` depends
on the time offset only. Two means compute it:

- polyphase: torchaudio itself, when the rates reduced by their gcd are small (every standard
  rate from 8 to 384 kHz against 44.1 or 48 kHz). Its kernel holds ``new`` phases of about
  ``orig`` taps (reduced rates), so it is fast there, and it keeps the numbers htsep produced
  so far.
- direct: for other pairs (44099, 7999, 383999 Hz, ...) that kernel would take gigabytes,
  so ``k`` is evaluated at the exact offsets of each output sample (integer arithmetic, no
  drift over hours), ``taps`` input samples per output, block by block. The phases repeat
  every ``new`` outputs (reduced), so the kernel values are computed once per phase into a
  table when it is small enough. Memory O(block * taps), time O(outputs * taps).

Both read the input as zeros outside it, so any range of outputs can be computed from the
matching input range with the kernel's margin: ``ResampledSignal`` serves random reads of a
resampled signal that is never held whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torchaudio.functional as AF

from htsep.devices import own_arithmetic
from htsep.errors import UsageError

Reader = Callable[[int, int], torch.Tensor]  # (start, length) -> (..., length), zeros outside
Method = Literal["auto", "polyphase", "direct"]

LOWPASS_WIDTH = 6  # zero crossings of the sinc on each side (torchaudio's default)
ROLLOFF = 0.99  # cutoff as a fraction of the lower Nyquist frequency (torchaudio's default)
# Largest gcd-reduced rate left to torchaudio: 384000 against 44100 reduces to 1280 / 147, the
# largest among standard rates. torchaudio's kernel takes (reduced new) x (reduced orig + taps)
# values and each output costs (reduced orig + taps) products, so above this it grows fast.
POLYPHASE_LIMIT = 1280
TABLE_LIMIT = 1 << 23  # most kernel values (phases x taps) kept in a table: 32 MB in float32
BLOCK_VALUES = 1 << 21  # channels x outputs x taps gathered at once by the direct method


def resampled_length(length: int, orig: int, new: int) -> int:
    """ceil(length * new / orig), torchaudio's output length."""
    _check_rates(orig, new)
    if orig == new:
        return length
    return -(-length * new // orig)


def kernel_phases(orig: int, new: int) -> int:
    """Distinct kernels of the conversion: outputs ``p`` and ``p + new // gcd`` share one."""
    return new // math.gcd(orig, new)


class ResampledSignal:
    """Random access to ``source`` (given by a reader) converted from ``orig`` to ``new`` Hz.

    read(start, length) -> (..., length), equal to slicing the whole resampled signal (zeros
    outside it) up to float rounding.
    """

    def __init__(
        self, read: Reader, length: int, orig: int, new: int, *, method: Method = "auto"
    ) -> None:
        _check_rates(orig, new)
        self.source = read
        self.orig, self.new = orig, new
        self.polyphase = orig != new and _polyphase(orig, new, method)
        gcd = math.gcd(orig, new)
        self.frame_in, self.frame_out = orig // gcd, new // gcd
        # torchaudio's kernel reaches ceil(6 * orig / (0.99 * min(orig, new))) samples to each
        # side (lowpass width 6, rolloff 0.99, reduced rates); whole frames of margin cover it.
        reach = math.ceil(
            LOWPASS_WIDTH * self.frame_in / (ROLLOFF * min(self.frame_in, self.frame_out))
        )
        self.margin = reach // self.frame_in + 2
        self.length = resampled_length(length, orig, new)
        self._kernel: _DirectKernel | None = None

    def read(self, start: int, length: int) -> torch.Tensor:
        if self.orig == self.new:
            return self.source(start, length)
        lo, hi = max(start, 0), min(start + length, self.length)
        probe = self.source(0, 0)
        out = probe.new_zeros(*probe.shape[:-1], length)
        if lo >= hi:
            return out
        with own_arithmetic(out.device):  # a caller's autocast would convolve in 16 bits
            converted = self._polyphase(lo, hi) if self.polyphase else self._direct(lo, hi)
        out[..., lo - start : hi - start] = converted
        return out

    def _polyphase(self, lo: int, hi: int) -> torch.Tensor:
        """Outputs [lo, hi) through torchaudio, on whole frames around them."""
        first = lo // self.frame_out - self.margin
        last = -(-hi // self.frame_out) + self.margin
        block = self.source(first * self.frame_in, (last - first) * self.frame_in)
        converted = AF.resample(block, self.orig, self.new)
        offset = first * self.frame_out
        return converted[..., lo - offset : hi - offset]

    def _direct(self, lo: int, hi: int) -> torch.Tensor:
        """Outputs [lo, hi) from the input samples their kernels reach, read at once."""
        kernel = self._kernel
        begin, end = _DirectKernel.input_span(self.orig, self.new, lo, hi)
        block = self.source(begin, end - begin)
        if kernel is None or kernel.dtype != block.dtype or kernel.device != block.device:
            kernel = _DirectKernel(self.orig, self.new, block.dtype, block.device, table=True)
            self._kernel = kernel
        flat = block.reshape(-1, block.shape[-1])
        return kernel.convert(flat, begin, lo, hi).reshape(*block.shape[:-1], hi - lo)


class _DirectKernel:
    """torchaudio's kernel evaluated at each output's exact offsets.

    Rates reduced by their gcd to ``o`` (orig) and ``n`` (new): output ``p`` sits at input
    position ``p * o / n``; its taps are the inputs ``floor(p * o / n) - reach + l`` for
    ``l < taps``, at offsets ``((l - reach) * n - phase) / (o * n)`` in reduced time units,
    ``phase = p * o mod n``, all exact integers before the one division.
    """

    def __init__(
        self, orig: int, new: int, dtype: torch.dtype, device: torch.device, *, table: bool
    ) -> None:
        gcd = math.gcd(orig, new)
        self.o, self.n = orig // gcd, new // gcd
        self.dtype, self.device = dtype, device
        self.reach, self.taps = _reach_and_taps(orig, new)
        self.cutoff = ROLLOFF * min(self.o, self.n)  # reduced units, as torchaudio's base_freq
        self.table: torch.Tensor | None = None
        if table and self.n * self.taps <= TABLE_LIMIT:
            rows = max(1, (1 << 18) // self.taps)
            phases = torch.arange(self.n, device=device)
            self.table = torch.cat([self._evaluate(part) for part in phases.split(rows)])

    @staticmethod
    def input_span(orig: int, new: int, lo: int, hi: int) -> tuple[int, int]:
        """Input samples [begin, end) that outputs [lo, hi) read."""
        reach, taps = _reach_and_taps(orig, new)
        return lo * orig // new - reach, (hi - 1) * orig // new - reach + taps

    def _evaluate(self, phases: torch.Tensor) -> torch.Tensor:
        """phases: (P,) int64 -> kernel values (P, taps), in float64 then cast to the dtype."""
        offsets = torch.arange(-self.reach, self.taps - self.reach, device=self.device)
        numerators = offsets * self.n - phases[:, None]  # (P, taps), exact
        t = numerators.double() * (self.cutoff / (self.o * self.n))  # in sinc zero crossings
        window = torch.cos(t * (math.pi / (2 * LOWPASS_WIDTH))) ** 2
        angle = t * math.pi
        sinc = torch.where(angle == 0, 1.0, torch.sin(angle) / angle)
        # torchaudio clamps t to the window's edge, where both factors vanish: zero outright.
        values = torch.where(t.abs() < LOWPASS_WIDTH, sinc * window, 0.0)
        return (values * (self.cutoff / self.o)).to(self.dtype)

    def convert(self, signal: torch.Tensor, offset: int, lo: int, hi: int) -> torch.Tensor:
        """Outputs [lo, hi): signal (B, S) holds inputs [offset, offset + S), zeros outside
        -> (B, hi - lo)."""
        batch = signal.shape[0]
        out = signal.new_empty(batch, hi - lo)
        step = max(256, BLOCK_VALUES // (max(batch, 1) * self.taps))
        for begin in range(lo, hi, step):
            end = min(begin + step, hi)
            positions = torch.arange(begin, end, device=self.device) * self.o
            firsts = positions.div(self.n, rounding_mode="floor") - self.reach  # (P,)
            phases = positions - (firsts + self.reach) * self.n
            kernel = (
                self._evaluate(phases) if self.table is None else self.table.index_select(0, phases)
            )
            first, last = int(firsts[0]), int(firsts[-1]) + self.taps
            window = _zero_extended(signal, first - offset, last - first)
            gathered = window.unfold(-1, self.taps, 1)[:, firsts - first]  # (B, P, taps)
            out[:, begin - lo : end - lo] = torch.einsum("bpl,pl->bp", gathered, kernel)
        return out


def _reach_and_taps(orig: int, new: int) -> tuple[int, int]:
    """Input samples the kernel reaches on each side of an output, and taps per output."""
    reach = math.ceil(LOWPASS_WIDTH * orig / (ROLLOFF * min(orig, new)))
    return reach, 2 * reach + 1


def _zero_extended(signal: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """signal[:, start : start + length] with zeros outside it (a view when inside)."""
    lo, hi = max(start, 0), min(start + length, signal.shape[-1])
    if lo == start and hi == start + length:
        return signal[:, lo:hi]
    out = signal.new_zeros(signal.shape[0], length)
    if lo < hi:
        out[:, lo - start : hi - start] = signal[:, lo:hi]
    return out


def _polyphase(orig: int, new: int, method: Method) -> bool:
    if method not in ("auto", "polyphase", "direct"):
        raise ValueError(f"unknown resampling method {method!r}")
    if method != "auto":
        return method == "polyphase"
    gcd = math.gcd(orig, new)
    return max(orig, new) // gcd <= POLYPHASE_LIMIT


def _check_rates(orig: int, new: int) -> None:
    for rate in (orig, new):
        if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
            raise UsageError(f"sample rates must be positive integers, got {rate!r}")
