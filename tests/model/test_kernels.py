import pytest
import torch
import torch.nn.functional as F

from htsep.model import kernels
from htsep.model.config import TransformerConfig
from htsep.model.transformer import CrossDomainTransformer

needs_onednn = pytest.mark.skipif(
    not kernels.onednn_linear_available(), reason="this torch build has no oneDNN linear ops"
)


def _operands(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 37, 48, generator=gen)
    weight = torch.randn(80, 48, generator=gen) / 7
    bias = torch.randn(80, generator=gen)
    residual = torch.randn(2, 37, 80, generator=gen)
    return x, weight, bias, residual


def test_fast_path_only_without_autograd_or_autocast():
    x = torch.randn(3, 4)
    assert not kernels.fast_path(x) and not kernels.overwritable(x)
    with torch.no_grad():
        assert kernels.overwritable(x)
        assert kernels.fast_path(x) == kernels.onednn_linear_available()
        assert not kernels.fast_path(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not kernels.fast_path(x) and not kernels.overwritable(x)


@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
def test_linear_matches_torch(activation):
    x, weight, bias, _ = _operands()
    expected = F.linear(x, weight, bias)
    if activation is not None:
        expected = getattr(F, activation)(expected)
    with torch.inference_mode():
        ours = kernels.linear(x, weight, bias, activation)
        strided = kernels.linear(x.transpose(0, 1), weight, None, activation)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    plain = F.linear(x.transpose(0, 1), weight)
    if activation is not None:
        plain = getattr(F, activation)(plain)
    torch.testing.assert_close(strided, plain, rtol=1e-5, atol=1e-6)


@needs_onednn
def test_linear_add_matches_torch_and_leaves_the_residual_alone():
    x, weight, bias, residual = _operands()
    before = residual.clone()
    with torch.inference_mode():
        ours = kernels.linear_add(x, residual, weight, bias)
        # A residual that would need broadcasting takes the plain path.
        broadcast = kernels.linear_add(x, residual[:1], weight, bias)
    torch.testing.assert_close(ours, residual + F.linear(x, weight, bias), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(broadcast, residual[:1] + F.linear(x, weight, bias))
    assert torch.equal(residual, before)


def test_transformer_inference_path_matches_autograd_path():
    """The fused inference path (oneDNN products, folded layer scales) against the plain
    differentiable one, on the same weights."""
    torch.manual_seed(0)
    config = TransformerConfig(layers=3, heads=2, hidden_scale=2.0, layer_scale_init=0.5)
    transformer = CrossDomainTransformer(16, config).eval()
    x, xt = torch.randn(2, 16, 3, 5), torch.randn(2, 16, 9)
    plain = transformer(x, xt)
    with torch.inference_mode():
        fast = transformer(x, xt)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


@needs_onednn
@pytest.mark.parametrize("batch,heads,queries,keys", [(1, 2, 7, 5), (2, 3, 1100, 37)])
def test_attention_matches_torch(batch, heads, queries, keys):
    """Blocks of queries (1100 spans three) against torch's fused attention."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, queries, 16, generator=gen) / 4
    k = torch.randn(batch, heads, keys, 16, generator=gen)
    v = torch.randn(batch, heads, keys, 16, generator=gen)
    expected = F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2)
    with torch.inference_mode():
        ours = kernels.attention(q, k, v)
    assert ours.shape == (batch, queries, heads, 16)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
