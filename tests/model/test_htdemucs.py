from fractions import Fraction

import pytest
import torch

from htsep.errors import InputLengthError
from htsep.model import ConvConfig, HTDemucs, HTDemucsConfig, STFTConfig, TransformerConfig


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_released_parameter_counts():
    htdemucs = HTDemucs(HTDemucsConfig(sources=("drums", "bass", "other", "vocals")))
    assert _params(htdemucs) == 41_984_456
    six = HTDemucsConfig(
        sources=("drums", "bass", "other", "vocals", "guitar", "piano"),
        transformer=TransformerConfig(bottom_channels=0),
    )
    assert _params(HTDemucs(six)) == 27_414_996


def tiny(channels=2, sources=("a", "b", "c"), **kwargs) -> HTDemucsConfig:
    return HTDemucsConfig(
        sources=sources,
        audio_channels=channels,
        sample_rate=8000,
        segment=Fraction(1, 2),
        stft=STFTConfig(n_fft=256),
        conv=ConvConfig(channels=4, depth=2, dconv_compress=2),
        transformer=TransformerConfig(layers=2, heads=2, bottom_channels=0),
        **kwargs,
    )


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("length", [1, 777, 4000])
def test_shapes_over_odd_lengths_and_channel_counts(channels, length):
    torch.manual_seed(0)
    model = HTDemucs(tiny(channels)).eval()
    mix = torch.randn(2, channels, length)
    with torch.no_grad():
        out = model(mix)
    assert out.shape == (2, 3, channels, length)
    assert torch.isfinite(out).all()


def test_forward_does_not_mutate_input():
    model = HTDemucs(tiny()).eval()
    mix = torch.randn(1, 2, 1234)
    before = mix.clone()
    with torch.no_grad():
        model(mix)
    assert torch.equal(mix, before)


def test_batch_items_are_independent():
    torch.manual_seed(0)
    model = HTDemucs(tiny()).eval()
    mix = torch.randn(3, 2, 3000)
    with torch.no_grad():
        together = model(mix)
        alone = model(mix[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-6)


def test_longer_than_segment_is_an_error():
    model = HTDemucs(tiny()).eval()
    with pytest.raises(InputLengthError, match="longer than the model's segment"):
        model(torch.zeros(1, 2, 4001))


def test_wrong_channel_count_is_an_error():
    model = HTDemucs(tiny(channels=2)).eval()
    with pytest.raises(ValueError, match=r"\(batch, 2, time\)"):
        model(torch.zeros(1, 1, 100))


def test_silence_stays_finite():
    model = HTDemucs(tiny()).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 2, 4000))
    assert torch.isfinite(out).all()


def test_training_step_reaches_every_parameter():
    """Training mode runs on the given length (no padding) and backpropagates everywhere."""
    torch.manual_seed(0)
    model = HTDemucs(tiny()).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("scale"):
                param.fill_(0.5)  # layer scales start tiny: give every branch a real gradient
    mix = torch.randn(2, 2, 4000)
    out = model(mix)
    assert out.shape == (2, 3, 2, 4000)
    out.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_inference_path_matches_autograd_path():
    """Without autograd the network fuses and reuses buffers (in-place GLU and GELU, folded
    layer scales, oneDNN products, DConv rows in chunks): same numbers as the plain path."""
    torch.manual_seed(0)
    model = HTDemucs(tiny()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.uniform_(0.3, 1.0) if name.endswith(("scale", "weight")) else param.normal_()
    mix = torch.randn(2, 2, 3001)
    before = mix.clone()
    plain = model(mix).detach()
    with torch.inference_mode():
        fast = model(mix)
    assert torch.equal(mix, before)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
