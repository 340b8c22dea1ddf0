import torch
from demucs.demucs import DConv as ReferenceDConv
from torch import nn

from htsep.model.layers import DConv, normalize_rows


def test_normalize_rows_is_groupnorm_per_row():
    x = torch.randn(2, 6, 5, 13)  # (B, C, F, T)
    norm = nn.GroupNorm(1, 6)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    rows = x.permute(0, 2, 1, 3).reshape(10, 6, 13)
    expected = norm(rows).reshape(2, 5, 6, 13).permute(0, 2, 1, 3)
    torch.testing.assert_close(normalize_rows(x, norm.weight, norm.bias), expected)


def test_dconv_matches_reference_on_every_row():
    """The spectral DConv convolves along time for each frequency row independently, exactly
    as demucs's DConv applied to the rows folded into the batch."""
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
    x = torch.randn(2, 8, 3, 20)  # (B, C, F, T)
    rows = x.permute(0, 2, 1, 3).reshape(6, 8, 20)
    expected = reference(rows).reshape(2, 3, 8, 20).permute(0, 2, 1, 3)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x[:, :, 1]), expected[:, :, 1], rtol=1e-5, atol=1e-6)
