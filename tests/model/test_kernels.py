import pytest
import torch
import torch.nn.functional as F

from htsep.errors import UsageError
from htsep.model import kernels
from htsep.model.config import TransformerConfig
from htsep.model.transformer import CrossDomainTransformer

PATHS = ["blas", "onednn"] if kernels.onednn_linear_available() else ["blas"]


@pytest.fixture(params=PATHS)
def products(request, monkeypatch):
    """Each CPU inference path in turn, whichever this CPU would pick."""
    monkeypatch.setattr(kernels, "cpu_products", lambda: request.param)
    return request.param


def _operands(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 37, 48, generator=gen)
    weight = torch.randn(80, 48, generator=gen) / 7
    bias = torch.randn(80, generator=gen)
    residual = torch.randn(2, 37, 80, generator=gen)
    return x, weight, bias, residual


def test_fast_path_only_without_autograd_or_autocast():
    x = torch.randn(3, 4)
    assert kernels.fast_path(x) is None and not kernels.overwritable(x)
    with torch.no_grad():
        assert kernels.overwritable(x)
        assert kernels.fast_path(x) == kernels.cpu_products()
        assert kernels.fast_path(x.double()) is None
        assert kernels.fast_path(x.bfloat16()) == kernels.cpu_products()  # --precision bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert kernels.fast_path(x) is None and not kernels.overwritable(x)


@pytest.mark.parametrize(
    "capability,variable,expected",
    [
        ("AVX512", None, "onednn"),
        ("AVX512_BF16", None, "onednn"),
        ("AVX2", None, "blas"),
        ("DEFAULT", None, "blas"),
        ("AVX2", "onednn", "onednn"),
        ("AVX512", "blas", "blas"),
        ("AVX512", " BLAS ", "blas"),
    ],
)
def test_the_cpu_products_follow_torch_kernels(monkeypatch, capability, variable, expected):
    """oneDNN where torch runs AVX-512 kernels, BLAS elsewhere; the variable overrides, and
    oneDNN is only taken where its ops work."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    if variable is None:
        monkeypatch.delenv(kernels.PRODUCTS_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(kernels.PRODUCTS_VARIABLE, variable)
    kernels.cpu_products.cache_clear()
    try:
        available = kernels.onednn_linear_available()
        assert kernels.cpu_products() == (expected if available else "blas")
        monkeypatch.setattr(kernels, "onednn_linear_available", lambda: False)
        kernels.cpu_products.cache_clear()
        assert kernels.cpu_products() == "blas"
        monkeypatch.setenv(kernels.PRODUCTS_VARIABLE, "mkl")
        kernels.cpu_products.cache_clear()
        with pytest.raises(UsageError, match="HTSEP_CPU_PRODUCTS='mkl': expected onednn or blas"):
            kernels.cpu_products()
    finally:
        monkeypatch.undo()
        kernels.cpu_products.cache_clear()


@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
def test_linear_matches_torch(products, activation):
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


def test_linear_add_matches_torch_and_leaves_the_residual_alone(products):
    x, weight, bias, residual = _operands()
    before = residual.clone()
    with torch.inference_mode():
        ours = kernels.linear_add(x, residual, weight, bias)
        # A residual that would need broadcasting takes the plain path.
        broadcast = kernels.linear_add(x, residual[:1], weight, bias)
    torch.testing.assert_close(ours, residual + F.linear(x, weight, bias), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(broadcast, residual[:1] + F.linear(x, weight, bias))
    assert torch.equal(residual, before)


def test_transformer_inference_path_matches_autograd_path(products):
    """The fused inference path (in-place or fused activations and adds, folded layer scales)
    against the plain differentiable one, on the same weights."""
    torch.manual_seed(0)
    config = TransformerConfig(layers=3, heads=2, hidden_scale=2.0, layer_scale_init=0.5)
    transformer = CrossDomainTransformer(16, config).eval()
    x, xt = torch.randn(2, 16, 3, 5), torch.randn(2, 16, 9)
    plain = transformer(x, xt)
    with torch.inference_mode():
        fast = transformer(x, xt)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,queries,keys", [(1, 2, 7, 5), (2, 3, 1100, 37)])
def test_attention_matches_float64(products, monkeypatch, amx, dtype, batch, heads, queries, keys):
    """Every path (bfloat16 on oneDNN without AMX: blocks of queries, 1100 spans three; with
    AMX, torch's fused kernel) against the attention computed in float64 from the same inputs:
    float32 to its rounding, bfloat16 to its own (scores rounded before the softmax: about 1%
    of the output's scale)."""
    monkeypatch.setattr(kernels, "amx_bf16", lambda: amx)
    blocks = []
    real_softmax = torch.softmax
    monkeypatch.setattr(
        torch, "softmax", lambda *a, **kw: blocks.append(1) or real_softmax(*a, **kw)
    )
    gen = torch.Generator().manual_seed(1)
    q = (torch.randn(batch, heads, queries, 16, generator=gen) / 4).to(dtype)
    k = torch.randn(batch, heads, keys, 16, generator=gen).to(dtype)
    v = torch.randn(batch, heads, keys, 16, generator=gen).to(dtype)
    scores = q.double() @ k.double().transpose(2, 3)
    expected = (scores.softmax(-1) @ v.double()).transpose(1, 2)
    with torch.inference_mode():
        ours = kernels.attention(q, k, v)
    assert ours.shape == (batch, queries, heads, 16) and ours.dtype == dtype
    error = (ours.double() - expected).norm() / expected.norm()
    if dtype == torch.float32:
        assert error < 1e-6, error
    else:
        assert 1e-4 < error < 1e-2, error  # really rounded to bfloat16, no more than that
    # The blocks ran exactly where chosen: one softmax per head and block of 512 queries.
    chosen = dtype == torch.bfloat16 and products == "onednn" and not amx
    assert len(blocks) == (batch * heads * -(-queries // 512) if chosen else 0)
