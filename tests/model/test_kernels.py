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


# Shapes of the class oneDNN 3.12's AMX bfloat16 convolution got wrong (``kernels.convolution``):
# (input channels, output channels, taps, stride, padding, time, frequency rows or None for 1-D).
_LONG_KERNELS = [
    (12, 24, 8, 4, 2, 3000, None),  # htsep-tiny's second waveform encoder
    (8, 8, 8, 1, 0, 1000, None),
    (16, 24, 4, 4, 0, 5000, None),
    (24, 24, 16, 4, 0, 5000, None),
    (8, 12, 8, 4, 2, 130, 256),  # along frequency, many frames
    (12, 24, 8, 4, 2, 65, 512),  # htsep-tiny's second spectral encoder
    (4, 8, 16, 1, 0, 9000, None),
    (4, 8, 16, 1, 0, 562, 336),
    (48, 96, 8, 4, 2, 2000, None),  # the released model's, unaffected
]


def _long_kernel_operands(cin, cout, taps, time, rows):
    gen = torch.Generator().manual_seed(3)
    if rows is None:
        x = torch.randn(1, cin, time, generator=gen)
        weight = torch.randn(cout, cin, taps, generator=gen)
    else:
        x = torch.randn(1, cin, rows, time, generator=gen)
        x = x.contiguous(memory_format=torch.channels_last)  # the CPU's spectral layout
        weight = torch.randn(cout, cin, taps, 1, generator=gen)
    bias = torch.randn(cout, generator=gen)
    return x.bfloat16(), (weight / (cin * taps) ** 0.5).bfloat16(), bias.bfloat16()


@pytest.mark.parametrize("cin,cout,taps,stride,padding,time,rows", _LONG_KERNELS)
def test_bf16_convolution_matches_float64_on_this_cpu(cin, cout, taps, stride, padding, time, rows):
    """On whatever CPU runs the tests (with AMX: the float32 route), bfloat16 convolutions
    against float64 from the same bfloat16 operands: within bfloat16's rounding of the output
    (the wrong AMX results were off by about the output's own size)."""
    x, weight, bias = _long_kernel_operands(cin, cout, taps, time, rows)
    options = (
        {"stride": stride, "padding": padding}
        if rows is None
        else {"stride": (stride, 1), "padding": (padding, 0)}
    )
    run = F.conv1d if rows is None else F.conv2d
    expected = run(x.double(), weight.double(), bias.double(), **options)
    with torch.inference_mode():
        ours = kernels.convolution(x, weight, bias, **options)
    assert ours.dtype == torch.bfloat16 and ours.shape == expected.shape
    error = (ours.double() - expected).norm() / expected.norm()
    assert error < 1e-2, error


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("taps", [1, 3, 4, 8])
@pytest.mark.parametrize("cin", [12, 31, 32])
def test_bf16_convolution_route(monkeypatch, amx, taps, cin):
    """More than 3 taps on fewer than 32 input channels, bfloat16, a CPU with AMX: float32
    operands, the output rounded once; anything else: the bfloat16 convolution itself."""
    monkeypatch.setattr(kernels, "amx_bf16", lambda: amx)
    x, weight, bias = _long_kernel_operands(cin, 24, taps, 400, None)
    with torch.inference_mode():
        ours = kernels.convolution(x, weight, bias, stride=2, padding=1)
        wide = F.conv1d(x.float(), weight.float(), bias.float(), stride=2, padding=1)
        plain = F.conv1d(x, weight, bias, stride=2, padding=1)
        floats = kernels.convolution(x.float(), weight.float(), bias.float(), stride=2, padding=1)
    assert torch.equal(ours, wide.bfloat16() if amx and taps > 3 and cin < 32 else plain)
    assert torch.equal(floats, wide)  # float32 is never rerouted


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_pointwise_convolution_is_a_product(monkeypatch, bias):
    """A bfloat16 1-tap conv1d in inference on a CPU with AMX: one product per batch item (on
    a strided span of time too, as the rewrite convs take them), within bfloat16's rounding of
    float64; with autograd recording, or without AMX, torch's own convolution."""
    monkeypatch.setattr(kernels, "amx_bf16", lambda: True)
    gen = torch.Generator().manual_seed(4)
    whole = torch.randn(2, 48, 700, generator=gen).bfloat16()
    x = whole[..., 100:400]  # a span: rows strided by 700
    weight = (torch.randn(96, 48, 1, generator=gen) / 7).bfloat16()
    b = torch.randn(96, generator=gen).bfloat16() if bias else None
    expected = F.conv1d(x.double(), weight.double(), None if b is None else b.double())
    with torch.inference_mode():
        ours = kernels.convolution(x, weight, b, padding=0)
        products = torch.stack(
            [
                torch.mm(weight[:, :, 0], x[item])
                if b is None
                else torch.addmm(b[:, None], weight[:, :, 0], x[item])
                for item in range(2)
            ]
        )
    assert ours.shape == expected.shape and ours.dtype == torch.bfloat16
    assert ((ours.double() - expected).norm() / expected.norm()) < 1e-2
    assert torch.equal(ours, products)  # the products themselves, bit for bit
    leaf = x.detach().requires_grad_()
    recorded = kernels.convolution(leaf, weight, b)
    assert recorded.requires_grad
    assert torch.equal(recorded.detach(), F.conv1d(x, weight, b))
    monkeypatch.setattr(kernels, "amx_bf16", lambda: False)
    with torch.inference_mode():
        assert torch.equal(kernels.convolution(x, weight, b), F.conv1d(x, weight, b))


@pytest.mark.parametrize("inference", [True, False])
def test_no_long_bf16_convolution_escapes_the_route(monkeypatch, inference):
    """htsep-tiny's bfloat16 copy on a CPU taken for one with AMX, whole and in bands: every
    convolution of more than 3 taps on fewer than 32 input channels, wherever in the network
    it is called, gets float32 operands (a site calling torch's convolution directly would hand
    it bfloat16 ones, which oneDNN's AMX kernels got wrong)."""
    from htsep.model import layers
    from htsep.model.config import tiny_config
    from htsep.model.htdemucs import HTDemucs, bfloat16_copy

    monkeypatch.setattr(kernels, "amx_bf16", lambda: True)
    monkeypatch.setattr(layers, "_BAND_BYTES", 1 << 16)  # many bands at this size
    seen = []

    def recording(real):
        def conv(x, weight, *args, **kwargs):
            if max(weight.shape[2:]) > 3 and weight.shape[1] < 32:
                seen.append(x.dtype)
            return real(x, weight, *args, **kwargs)

        return conv

    monkeypatch.setattr(F, "conv1d", recording(F.conv1d))
    monkeypatch.setattr(F, "conv2d", recording(F.conv2d))
    torch.manual_seed(0)
    model = bfloat16_copy(HTDemucs(tiny_config(["a", "b"], 8000, 2)).eval())
    mix = torch.randn(1, 2, 8000)
    if inference:
        with torch.inference_mode():
            model(mix)
    else:  # autograd recording: the plain formulation of each layer
        model(mix)
    assert seen and set(seen) == {torch.float32}, seen


# (input channels, output channels, kernel, stride, steps, batch): the released waveform
# decoders' shape, htsep-tiny's, and kernels of one to three strides.
_TRANSPOSED = [
    (48, 8, 8, 4, 3000, 1),
    (24, 12, 8, 4, 517, 2),
    (6, 5, 12, 4, 77, 3),
    (4, 3, 4, 4, 10, 1),
    (3, 2, 6, 3, 5, 2),
]


def _transposed_operands(cin, cout, kernel, steps, batch, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, steps, generator=gen)
    weight = torch.randn(cin, cout, kernel, generator=gen) / (cin * kernel) ** 0.5
    return x, weight, torch.randn(cout, generator=gen)


@pytest.mark.parametrize("cin,cout,kernel,stride,steps,batch", _TRANSPOSED)
@pytest.mark.parametrize("bias", [True, False])
def test_transposed_convolution_matches_float64(
    monkeypatch, cin, cout, kernel, stride, steps, batch, bias
):
    """The phased form of a transposed convolution (kernel a multiple of the stride, CPU
    inference) against torch's in float64: float32 to its rounding, bfloat16 to its; torch's
    transposed kernel is not called for either."""
    x, weight, b = _transposed_operands(cin, cout, kernel, steps, batch)
    b = b if bias else None
    expected = F.conv_transpose1d(
        x.double(), weight.double(), None if b is None else b.double(), stride
    )
    calls = []
    plain = F.conv_transpose1d
    monkeypatch.setattr(F, "conv_transpose1d", lambda *a, **k: calls.append(1) or plain(*a, **k))
    monkeypatch.setattr(kernels, "amx_bf16", lambda: False)
    with torch.inference_mode():
        ours = kernels.transposed_convolution(x, weight, b, stride)
        half = kernels.transposed_convolution(
            x.bfloat16(), weight.bfloat16(), None if b is None else b.bfloat16(), stride
        )
    assert not calls
    assert ours.shape == expected.shape and ours.dtype == torch.float32 and ours.is_contiguous()
    assert (ours.double() - expected).abs().max() < 1e-5 * expected.abs().max()
    assert half.shape == expected.shape and half.dtype == torch.bfloat16
    assert (half.double() - expected).norm() < 1e-2 * expected.norm()


def test_transposed_convolution_falls_back_to_torch(monkeypatch):
    """torch's own transposed convolution, bit for bit: with autograd recording (gradients
    flow), a kernel that is not a multiple of the stride, and bfloat16 on a CPU with AMX."""
    x, weight, b = _transposed_operands(6, 4, 8, 50, 2)
    leaf = x.clone().requires_grad_()
    recorded = kernels.transposed_convolution(leaf, weight, b, 4)
    assert torch.equal(recorded.detach(), F.conv_transpose1d(x, weight, b, 4))
    recorded.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    odd = weight[:, :, :7]
    with torch.inference_mode():
        assert torch.equal(
            kernels.transposed_convolution(x, odd, b, 4), F.conv_transpose1d(x, odd, b, 4)
        )
        monkeypatch.setattr(kernels, "amx_bf16", lambda: True)
        x16, w16, b16 = x.bfloat16(), weight.bfloat16(), b.bfloat16()
        assert torch.equal(
            kernels.transposed_convolution(x16, w16, b16, 4), F.conv_transpose1d(x16, w16, b16, 4)
        )


def test_time_major_layout():
    """A (B, C, T) tensor is time-major when its C values per step are adjacent and its steps
    C apart (a transposed (B, T, C) tensor, or a span of time cut from one); ``time_major``
    makes one, cast if asked, with the same values, or gives x back where it already is."""
    plain = torch.randn(2, 5, 7)
    stored = kernels.time_major(plain)
    assert not kernels.is_time_major(plain) and kernels.is_time_major(stored)
    assert stored.stride() == (35, 1, 5) and torch.equal(stored, plain)
    assert kernels.time_major(stored) is stored
    assert kernels.is_time_major(stored[..., 2:5])  # a span: items 35 apart, steps 5
    assert not kernels.is_time_major(stored[:, :3])  # steps 5 apart for 3 channels
    half = kernels.time_major(plain, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and kernels.is_time_major(half)
    assert torch.equal(half, plain.bfloat16())
    for coincide in (torch.randn(2, 1, 7), torch.randn(2, 5, 1)):  # both layouts at once
        assert not kernels.is_time_major(coincide) and kernels.time_major(coincide) is coincide
    assert not kernels.is_time_major(torch.randn(2, 5, 7, 3))


# (input channels, output channels, taps, stride, padding, dilation, steps, batch): the
# released waveform encoders' and DConvs' shapes (shortened), htsep-tiny's, odd ones.
_TIME_MAJOR_CONVS = [
    (2, 48, 8, 4, 2, 1, 4001, 1),
    (48, 96, 1, 1, 0, 1, 900, 1),
    (48, 6, 3, 1, 2, 2, 900, 2),
    (12, 24, 8, 4, 2, 1, 203, 3),
    (24, 48, 3, 1, 1, 1, 57, 2),
    (5, 7, 4, 3, 0, 1, 31, 2),
]


@pytest.mark.parametrize("amx", [None, True])
@pytest.mark.parametrize("cin,cout,taps,stride,padding,dilation,steps,batch", _TIME_MAJOR_CONVS)
def test_time_major_convolution_matches_float64(
    monkeypatch, amx, cin, cout, taps, stride, padding, dilation, steps, batch
):
    """A conv1d on a time-major x in CPU inference runs as a channels-last conv2d (never as
    torch's conv1d) and returns a time-major result: against float64, float32 to its rounding
    and bfloat16 to its own; with AMX (this CPU's answer, then AMX assumed), bfloat16 kernels
    of more than 3 taps on fewer than 32 input channels still go through float32 (on a CPU
    with AMX, (12, 24, 8, 4) gave wrong values without that route)."""
    gen = torch.Generator().manual_seed(taps * 31 + cin)
    x = torch.randn(batch, cin, steps, generator=gen)
    weight = torch.randn(cout, cin, taps, generator=gen) / (cin * taps) ** 0.5
    bias = torch.randn(cout, generator=gen)
    expected = F.conv1d(x.double(), weight.double(), bias.double(), stride, padding, dilation)
    amx = kernels.amx_bf16() if amx is None else amx
    monkeypatch.setattr(kernels, "amx_bf16", lambda: amx)
    conv1d, conv2d = F.conv1d, F.conv2d
    seen = []
    monkeypatch.setattr(F, "conv1d", lambda *a, **k: seen.append("conv1d") or conv1d(*a, **k))
    monkeypatch.setattr(F, "conv2d", lambda x, *a, **k: seen.append(x.dtype) or conv2d(x, *a, **k))
    with torch.inference_mode():
        ours = kernels.convolution(kernels.time_major(x), weight, bias, stride, padding, dilation)
        half = kernels.convolution(
            kernels.time_major(x, torch.bfloat16),
            weight.bfloat16(),
            bias.bfloat16(),
            (stride,),
            (padding,),
            (dilation,),
        )
    routed = amx and taps > 3 and cin < 32
    assert seen == [torch.float32, torch.float32 if routed else torch.bfloat16]
    for result, dtype in ((ours, torch.float32), (half, torch.bfloat16)):
        assert result.shape == expected.shape and result.dtype == dtype
        assert kernels.is_time_major(result)
    assert (ours.double() - expected).abs().max() < 1e-5 * expected.abs().max()
    assert (half.double() - expected).norm() < 1e-2 * expected.norm()


@pytest.mark.parametrize("amx", [None, True])
@pytest.mark.parametrize(
    "cin,cout,kernel,stride,steps,batch",
    [*_TRANSPOSED, (96, 64, 8, 4, 300, 2), (80, 70, 6, 4, 9, 1), (16, 64, 8, 4, 40, 1)],
)
def test_time_major_transposed_convolution_matches_float64(
    monkeypatch, amx, cin, cout, kernel, stride, steps, batch
):
    """A transposed conv on a time-major x in CPU inference: the phased form below 64 output
    channels, torch's channels-last kernel from 64 on (and where the kernel is no multiple
    of the stride; with AMX in float32 for more than 3 taps on fewer than 32 input channels);
    never torch's conv_transpose1d; a time-major result, equal to float64's to the rounding of
    each dtype."""
    x, weight, b = _transposed_operands(cin, cout, kernel, steps, batch)
    expected = F.conv_transpose1d(x.double(), weight.double(), b.double(), stride)
    amx = kernels.amx_bf16() if amx is None else amx
    monkeypatch.setattr(kernels, "amx_bf16", lambda: amx)
    calls = []
    transposed1d, transposed2d = F.conv_transpose1d, F.conv_transpose2d
    monkeypatch.setattr(
        F, "conv_transpose1d", lambda *a, **k: calls.append("1d") or transposed1d(*a, **k)
    )
    monkeypatch.setattr(
        F, "conv_transpose2d", lambda x, *a, **k: calls.append(x.dtype) or transposed2d(x, *a, **k)
    )
    with torch.inference_mode():
        ours = kernels.transposed_convolution(kernels.time_major(x), weight, b, stride)
        half = kernels.transposed_convolution(
            kernels.time_major(x, torch.bfloat16), weight.bfloat16(), b.bfloat16(), stride
        )
    phased = cout < 64 and kernel % stride == 0
    routed = amx and kernel > 3 and cin < 32  # bfloat16 through float32 (``convolution``)
    assert calls == ([] if phased else [torch.float32, torch.float32 if routed else torch.bfloat16])
    for result, dtype in ((ours, torch.float32), (half, torch.bfloat16)):
        assert result.shape == expected.shape and result.dtype == dtype
        assert kernels.is_time_major(result)
    assert (ours.double() - expected).abs().max() < 1e-5 * expected.abs().max()
    assert (half.double() - expected).norm() < 1e-2 * expected.norm()
