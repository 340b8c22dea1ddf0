"""Pure STFT helpers for the spectral branch.

Dimensions: B batch, C audio channels, F frequency bins, N frames, T samples.

The hybrid model needs a spectrogram whose frame count is exactly ``ceil(T / hop)``, so that
every convolution on the spectral branch lines up with the waveform branch. Plain centred STFT
gives ``T / hop + 1`` frames; we reflect-pad by 1.5 hops on both sides (plus the remainder to a
hop multiple), then keep the frames that start inside the signal.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from htsep.model import kernels


def _window(n_fft: int, device: torch.device) -> torch.Tensor:
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float32, device=device)


def stft(signal: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """Centred, normalized STFT with a periodic Hann window, always computed in float32.

    signal: (..., T) real -> (..., n_fft // 2 + 1, T // hop + 1) complex
    """
    *batch, length = signal.shape
    flat = signal.reshape(-1, length).float()
    spec = torch.stft(
        flat,
        n_fft,
        hop_length,
        window=_window(n_fft, flat.device),
        normalized=True,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    return spec.reshape(*batch, *spec.shape[-2:])


def istft(spec: torch.Tensor, hop_length: int, length: int) -> torch.Tensor:
    """Inverse of ``stft``. spec: (..., n_fft // 2 + 1, N) complex -> (..., length) float32."""
    *batch, bins, frames = spec.shape
    n_fft = 2 * (bins - 1)
    flat = spec.reshape(-1, bins, frames)
    if flat.dtype != torch.complex64:
        flat = flat.to(torch.complex64)
    if kernels.cuda_formulation(flat):
        return overlap_add_istft(flat, hop_length, length).reshape(*batch, length)
    signal = torch.istft(
        flat,
        n_fft,
        hop_length,
        window=_window(n_fft, flat.device),
        normalized=True,
        center=True,
        length=length,
    )
    return signal.reshape(*batch, length)


def overlap_add_istft(spec: torch.Tensor, hop_length: int, length: int) -> torch.Tensor:
    """``torch.istft`` of ``istft`` (centred, normalized, periodic Hann window) as its steps:
    inverse FFT of each frame, window, overlap-add, division by the summed squared window.
    The same arithmetic, without the check that the window envelope is nowhere zero, which
    torch makes on the host: on a CUDA device that check waits for the device, so the host
    could not prepare the next network call while this one runs. (For what ``synthesis``
    asks, two empty frames on each side at hop n_fft / 4, the envelope is at least 1.25 over
    the samples returned and 1.5 over those it keeps.)
    spec: (B, n_fft // 2 + 1, N) complex64 -> (B, length) float32."""
    batch, bins, frames = spec.shape
    n_fft = 2 * (bins - 1)
    window = _window(n_fft, spec.device)
    # The imaginary parts of the DC and Nyquist bins have no real signal to become: the CPU's
    # FFT ignores them, while cuFFT's complex-to-real transform (which assumes a Hermitian
    # input) spreads them over every sample. The network's spectra have them, so on an H200
    # both htsep and demucs came out 6e-4 (relative) away from their CPU and float64 results.
    # Setting them to zero gives every device the CPU's signal.
    spec = spec.clone()
    parts = torch.view_as_real(spec)
    parts[:, 0, :, 1] = 0
    parts[:, -1, :, 1] = 0
    pieces = torch.fft.irfft(spec, n=n_fft, dim=1, norm="ortho") * window[:, None]
    total = n_fft + hop_length * (frames - 1)
    signal = F.fold(pieces, (1, total), (1, n_fft), stride=(1, hop_length)).view(batch, total)
    start = n_fft // 2
    end = min(start + length, total)
    envelope = _window_envelope(n_fft, hop_length, frames, start, end, spec.device)
    signal = signal[:, start:end] / envelope
    if end - start < length:
        signal = F.pad(signal, (0, length - (end - start)))
    return signal


@functools.lru_cache(maxsize=16)
def _window_envelope(
    n_fft: int, hop_length: int, frames: int, start: int, end: int, device: torch.device
) -> torch.Tensor:
    """Samples [start, end) of the sum of the squared, shifted windows that overlap-add weights
    each sample with. Checked once, when first made, against torch's bound (an envelope under
    1e-11 is an error there too: the division would blow the signal up). Made outside inference
    mode even when first asked for inside it: the cached tensor also serves training, where an
    inference tensor cannot be saved for the backward pass."""
    with torch.inference_mode(False):
        squared = _window(n_fft, device).square()[None, :, None].expand(1, n_fft, frames)
        total = n_fft + hop_length * (frames - 1)
        folded = F.fold(squared, (1, total), (1, n_fft), stride=(1, hop_length)).view(total)
        envelope = folded[start:end].clone()
    if end > start and float(envelope.abs().min()) < 1e-11:
        raise ValueError(
            f"inverse STFT: the window envelope vanishes ({n_fft}-sample frames at hop "
            f"{hop_length}, samples {start}-{end})"
        )
    return envelope


def _reflect_pad(signal: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Reflect padding that also works when the signal is shorter than the padding: zeros are
    appended first (on the right where possible) until a reflection fits, as the reference does."""
    length = signal.shape[-1]
    biggest = max(left, right)
    if length <= biggest:
        extra = biggest - length + 1
        extra_right = min(right, extra)
        extra_left = extra - extra_right
        signal = F.pad(signal, (extra_left, extra_right))
        left, right = left - extra_left, right - extra_right
    shape = signal.shape
    flat = signal.reshape(-1, 1, shape[-1])
    padded = F.pad(flat, (left, right), mode="reflect")
    return padded.reshape(*shape[:-1], padded.shape[-1])


def frames_for(length: int, hop_length: int) -> int:
    return math.ceil(length / hop_length)


def analysis(signal: torch.Tensor, n_fft: int) -> torch.Tensor:
    """The hybrid-aligned spectrogram of the network's input.

    signal: (..., T) -> (..., n_fft // 2, ceil(T / hop)) complex, hop = n_fft // 4.
    """
    hop = n_fft // 4
    length = signal.shape[-1]
    frames = frames_for(length, hop)
    pad = 3 * hop // 2
    padded = _reflect_pad(signal, pad, pad + frames * hop - length)
    spec = stft(padded, n_fft, hop)
    # Frames 0, 1 and the last two are centred in the reflected padding: drop them, and the
    # Nyquist bin, so that both axes are powers of the stride.
    return spec[..., :-1, 2 : 2 + frames]


def synthesis(spec: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of ``analysis``: (..., n_fft // 2, ceil(T / hop)) complex -> (..., T) float32."""
    bins = spec.shape[-2]
    hop = bins // 2
    frames = spec.shape[-1]
    pad = 3 * hop // 2
    full = F.pad(spec, (2, 2, 0, 1))  # zero Nyquist bin, two empty frames on each side
    signal = istft(full, hop, frames * hop + 2 * pad)
    return signal[..., pad : pad + length]
