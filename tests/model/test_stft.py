import math

import pytest
import torch
from demucs.htdemucs import HTDemucs as ReferenceHTDemucs

from htsep.model import stft


@pytest.mark.parametrize(
    ("n_fft", "length"), [(512, 1001), (512, 4097), (4096, 4097), (4096, 44101)]
)
def test_stft_round_trip_odd_lengths(n_fft, length):
    x = torch.randn(2, 3, length, generator=torch.Generator().manual_seed(length))
    z = stft.stft(x, n_fft, n_fft // 4)
    assert z.shape == (2, 3, n_fft // 2 + 1, length // (n_fft // 4) + 1)
    y = stft.istft(z, n_fft // 4, length)
    assert y.shape == x.shape
    assert (y - x).abs().max() < 1e-5


@pytest.mark.parametrize("length", [100, 1001, 4097, 12345])
def test_analysis_matches_reference(length):
    """The hybrid-aligned spectrogram and its inverse equal demucs's _spec/_ispec, short inputs
    (shorter than the reflect padding) included."""
    reference = ReferenceHTDemucs(["a"], nfft=512, depth=2, channels=4, t_layers=0)
    x = torch.randn(2, 2, length, generator=torch.Generator().manual_seed(0))
    z = stft.analysis(x, 512)
    assert z.shape == (2, 2, 256, math.ceil(length / 128))
    torch.testing.assert_close(z, reference._spec(x), rtol=0, atol=1e-6)
    y = stft.synthesis(z, length)
    torch.testing.assert_close(y, reference._ispec(z, length), rtol=0, atol=1e-6)


def test_analysis_does_not_mutate_input():
    x = torch.randn(1, 2, 3000)
    before = x.clone()
    stft.synthesis(stft.analysis(x, 512), 3000)
    assert torch.equal(x, before)


def test_analysis_synthesis_recovers_band_limited_interior():
    """Away from the edges (whose frames are dropped) and for a signal with nothing near
    Nyquist (whose bin is dropped), the aligned pair is a round trip."""
    rate, length = 8000, 8001
    t = torch.arange(length) / rate
    x = (torch.sin(2 * math.pi * 440 * t) + 0.5 * torch.sin(2 * math.pi * 1234.5 * t))[None]
    y = stft.synthesis(stft.analysis(x, 512), length)
    assert (y - x)[..., 512:-512].abs().max() < 1e-4
