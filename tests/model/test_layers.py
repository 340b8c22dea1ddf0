import pytest
import torch
from demucs.demucs import DConv as ReferenceDConv

from htsep.model import layers
from htsep.model.layers import DConv


def _dconv_pair() -> tuple[DConv, ReferenceDConv]:
    torch.manual_seed(0)
    reference = ReferenceDConv(8, compress=4, depth=2, init=0.5, gelu=True)
    ours = DConv(8, depth=2, compress=4, dilate=True, init=0.5)
    with torch.no_grad():
        for branch, layer in zip(ours.branches, reference.layers, strict=True):
            layer[1].weight.normal_()
            layer[4].bias.normal_()
            layer[6].scale.uniform_(0.3, 1.0)
            pairs = [
                (branch.conv_in, layer[0]),
                (branch.norm_in, layer[1]),
                (branch.conv_out, layer[3]),
                (branch.norm_out, layer[4]),
            ]
            for mine, theirs in pairs:
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
            branch.scale.copy_(layer[6].scale)
    return ours, reference


@pytest.mark.parametrize("grad,chunk", [(True, None), (False, None), (False, 1)])
def test_dconv_matches_reference_on_every_row(grad, chunk, monkeypatch):
    """The spectral DConv convolves along time for each frequency row independently, exactly
    as demucs's DConv applied to the rows folded into the batch; with and without autograd
    (the inference path fuses the layer scale, adds in place, and runs rows in chunks: here
    all at once, or one by one)."""
    if chunk is not None:
        monkeypatch.setattr(layers, "_DCONV_CHUNK_ELEMENTS", chunk)
    ours, reference = _dconv_pair()
    x = torch.randn(2, 8, 3, 20)  # (B, C, F, T)
    rows = x.permute(0, 2, 1, 3).reshape(6, 8, 20)
    with torch.no_grad():
        expected = reference(rows).reshape(2, 3, 8, 20).permute(0, 2, 1, 3)
    before = x.clone()
    with torch.set_grad_enabled(grad):
        rows_out = ours(x)
        time_out = ours(x[:, :, 1])
    assert torch.equal(x, before)  # the caller's tensor is never written
    torch.testing.assert_close(rows_out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(time_out, expected[:, :, 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 8, 1, 20), (1, 8, 20), (3, 8, 5, 7)])
def test_dconv_inference_never_writes_its_input(shape):
    """Single rows and single items make the (B*F, C, T) fold a view: still no write-back."""
    ours, _ = _dconv_pair()
    x = torch.randn(shape)
    before = x.clone()
    with torch.inference_mode():
        ours(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("freq", [True, False])
def test_encoder_output_owns_only_its_own_storage(freq):
    """An encoder's output lives on as a skip connection until its decoder runs: in inference
    it must not be a view that keeps the rewrite conv's twice-as-large output alive. Its values
    equal the autograd path's."""
    torch.manual_seed(0)
    dconv = DConv(8, depth=2, compress=4, dilate=True, init=0.5)
    layer = layers.EncoderLayer(
        4, 8, freq=freq, kernel_size=8, stride=4, norm=False, norm_groups=1, dconv=dconv,
        rewrite=True, context=0,
    )  # fmt: skip
    x = torch.randn(2, 4, 64, 30) if freq else torch.randn(2, 4, 240)
    with torch.inference_mode():
        out = layer(x)
    assert out.untyped_storage().nbytes() == out.numel() * out.element_size()
    torch.testing.assert_close(out, layer(x).detach())
