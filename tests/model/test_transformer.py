import math

import pytest
import torch
from torch import nn

from htsep.model.config import TransformerConfig
from htsep.model.transformer import (
    Attention,
    CrossDomainTransformer,
    TransformerLayer,
    sequence_norm,
    sin_embedding_1d,
    sin_embedding_2d,
)


def test_sin_embedding_1d_formula():
    length, dim, period = 37, 16, 10000.0
    emb = sin_embedding_1d(length, dim, period).double()
    half = dim // 2
    for pos in (0, 1, 17, 36):
        for j in range(half):
            phase = pos / period ** (j / (half - 1))
            assert emb[pos, j].item() == pytest.approx(math.cos(phase), abs=1e-5)
            assert emb[pos, half + j].item() == pytest.approx(math.sin(phase), abs=1e-5)


def test_sin_embedding_2d_formula_time_major():
    dim, rows, frames, period = 16, 5, 7, 10000.0
    emb = sin_embedding_2d(dim, rows, frames, period)
    assert emb.shape == (rows * frames, dim)
    half = dim // 2
    for frame in (0, 3, 6):
        for row in (0, 2, 4):
            token = emb[frame * rows + row].double()  # time-major: frame outer, row inner
            for k in range(half // 2):
                omega = period ** (-2 * k / half)
                assert token[2 * k].item() == pytest.approx(math.sin(frame * omega), abs=1e-5)
                assert token[2 * k + 1].item() == pytest.approx(math.cos(frame * omega), abs=1e-5)
                assert token[half + 2 * k].item() == pytest.approx(math.sin(row * omega), abs=1e-5)
                assert token[half + 2 * k + 1].item() == pytest.approx(
                    math.cos(row * omega), abs=1e-5
                )


def test_sequence_norm_is_one_group_groupnorm():
    x = torch.randn(3, 11, 8)
    norm = nn.GroupNorm(1, 8)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    expected = norm(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(sequence_norm(x, norm.weight, norm.bias), expected)


@pytest.mark.parametrize("cross", [False, True])
def test_attention_matches_torch_multihead(cross):
    torch.manual_seed(0)
    dim, heads = 32, 4
    ours = Attention(dim, heads, dropout=0.0).eval()
    theirs = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    with torch.no_grad():
        theirs.in_proj_weight.copy_(ours.in_proj.weight)
        theirs.in_proj_bias.copy_(ours.in_proj.bias)
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(2, 9, dim)
    context = torch.randn(2, 5, dim) if cross else None
    source = context if cross else x
    expected = theirs(x, source, source, need_weights=False)[0]
    torch.testing.assert_close(ours(x, context), expected, rtol=1e-5, atol=1e-6)


def _config(**kwargs):
    return TransformerConfig(layers=3, heads=2, hidden_scale=2.0, **kwargs)


def test_cross_layer_requires_context():
    layer = TransformerLayer(8, _config(), cross=True)
    with pytest.raises(ValueError, match="other stream"):
        layer(torch.randn(1, 4, 8))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    transformer = CrossDomainTransformer(16, _config(dropout=0.5))
    x, xt = torch.randn(2, 16, 3, 5), torch.randn(2, 16, 9)
    transformer.eval()
    with torch.no_grad():
        first = transformer(x, xt)
        second = transformer(x, xt)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    transformer.train()
    with torch.no_grad():
        third = transformer(x, xt)
    assert not torch.allclose(third[0], first[0])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    transformer = CrossDomainTransformer(16, _config(dropout=0.1)).train()
    x, xt = torch.randn(2, 16, 3, 5), torch.randn(2, 16, 9)
    out_x, out_t = transformer(x, xt)
    (out_x.square().mean() + out_t.square().mean()).backward()
    for name, param in transformer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
