import pytest
import torch
import torch.nn.functional as F
from demucs.demucs import DConv as ReferenceDConv

from htsep.model import kernels, layers
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


@pytest.mark.parametrize("layout", ["contiguous", "channels-last", "half of channels-last"])
@pytest.mark.parametrize("grad,chunk", [(True, None), (False, None), (False, 1)])
def test_dconv_matches_reference_on_every_row(grad, chunk, layout, monkeypatch):
    """The spectral DConv convolves along time for each frequency row independently, exactly
    as demucs's DConv applied to the rows folded into the batch; with and without autograd
    (the inference path fuses the layer scale, adds in place, and runs rows in chunks: here
    all at once, or one by one), on (B, C, F, T) tensors in either layout (channels-last
    ones, and the GLU's half of a channels-last tensor, run time-major in inference, with
    no copy to (B*F, C, T) rows)."""
    if chunk is not None:
        monkeypatch.setattr(layers, "_DCONV_CHUNK_ELEMENTS", chunk)
    calls = []
    time_major = layers.DConvBranch.add_to_time_major
    monkeypatch.setattr(
        layers.DConvBranch,
        "add_to_time_major",
        lambda self, x, out: calls.append(x.shape) or time_major(self, x, out),
    )
    ours, reference = _dconv_pair()
    x = torch.randn(2, 8, 3, 20)  # (B, C, F, T)
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "half of channels-last":
        whole = torch.cat([x, torch.randn_like(x)], 1).contiguous(memory_format=torch.channels_last)
        x = whole[:, :8]
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
    assert bool(calls) == (layout != "contiguous" and not grad)
    if calls:
        assert rows_out.is_contiguous(memory_format=torch.channels_last)
        # Every row, once per branch; a (B, C, T) slice of a channels-last tensor is
        # time-major (``kernels.is_time_major``) and runs so too: its 2 rows, once per branch
        # (not in the half, whose time steps lie 2C apart).
        sliced = 2 * 2 if layout == "channels-last" else 0
        assert sum(shape[0] for shape in calls) == 2 * 6 + sliced


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 8, 1, 20), (1, 8, 20), (3, 8, 5, 7), (1, 8, 1, 1)])
def test_dconv_inference_never_writes_its_input(shape, channels_last):
    """Single rows and single items make the (B*F, C, T) fold a view, and channels-last rows
    are views: still no write-back."""
    ours, _ = _dconv_pair()
    x = torch.randn(shape)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.inference_mode():
        ours(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("time_major", [False, True])
@pytest.mark.parametrize(
    "case", ["random", "offset", "flat", "silence", "constant rows", "one frame"]
)
def test_dconv_normalisation_fold_equals_the_plain_branch(case, time_major):
    """In CPU float32 inference the branch's second GroupNorm is folded into its 1x1 product,
    with statistics from the hidden channels' moments. Against the plain branch in float64:
    random rows; a large bias next to a small spread (E[y^2] - E[y]^2 cancels); a product that
    is constant (zero variance); silent input; rows constant in time; a single frame; rows
    stored channel-major (N, C, T) or time-major (N, T, C)."""
    torch.manual_seed(1)
    branch = layers.DConvBranch(8, 3, dilation=2, init=0.7)
    with torch.no_grad():
        for parameter in branch.parameters():
            parameter.normal_()
        if case == "offset":
            branch.conv_out.weight.mul_(1e-3)
            branch.conv_out.bias.add_(50)
        if case == "flat":
            branch.conv_out.weight.zero_()
            branch.conv_out.bias.fill_(3)
    frames = 1 if case == "one frame" else 40
    x = torch.randn(5, 8, frames)
    if case == "silence":
        x.zero_()
    elif case == "constant rows":
        x[:, :, :] = x[:, :, :1]
        x[2].zero_()
    expected = x.double() + branch.double()(x.double())
    branch.float()
    with torch.inference_mode():
        assert layers.kernels.fast_path(x) is not None
        if time_major:  # rows stored (N, T, C)
            rows = x.transpose(1, 2).contiguous()
            out = branch.add_to_time_major(rows, out=torch.empty_like(rows)).transpose(1, 2)
        else:
            out = branch.add_to(x, out=torch.empty_like(x))
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6 * max(scale, 1.0))


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


def _spectral_pair(
    context: int, rewrite: bool, dconv: bool, kernel: int, stride: int
) -> tuple[layers.EncoderLayer, layers.DecoderLayer]:
    torch.manual_seed(0)
    common = dict(freq=True, kernel_size=kernel, stride=stride, norm=False, norm_groups=1)
    encoder = layers.EncoderLayer(
        4, 8, dconv=DConv(8, depth=2, compress=4, dilate=True, init=0.5) if dconv else None,
        rewrite=rewrite, context=context, **common,
    )  # fmt: skip
    decoder = layers.DecoderLayer(
        8, 4, last=False, dconv=DConv(8, depth=2, compress=4, dilate=True, init=0.5)
        if dconv else None, rewrite=rewrite, context=context, **common,
    )  # fmt: skip
    return encoder, decoder


def _count_calls(monkeypatch, owner, name: str) -> list[int]:
    """Patch owner.name to record each call that returns something other than None."""
    calls: list[int] = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        result = original(*args, **kwargs)
        if result is not None:
            calls.append(1)
        return result

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("band_bytes", [1, 3 * 4 * 2 * 16 * 9])
@pytest.mark.parametrize(
    "context,rewrite,dconv,kernel,stride,batch",
    [
        (0, True, True, 8, 4, 1),
        (1, True, True, 8, 4, 2),
        (2, True, False, 8, 4, 1),
        (0, False, True, 8, 4, 1),
        (1, True, True, 4, 2, 1),
        (3, True, True, 12, 4, 2),
    ],
)
def test_spectral_layers_in_bands_equal_the_whole_layer(
    band_bytes, context, rewrite, dconv, kernel, stride, batch, monkeypatch
):
    """In CPU inference, spectral layers without GroupNorm run over bands of frequency rows
    (one row per band, or several with an uneven last band). Their convolutions reach across
    band edges, zero-padded only at the true edges, and the transposed conv's outputs overlap
    between bands: the result equals the whole layer computed by autograd, which never bands."""
    monkeypatch.setattr(layers, "_BAND_BYTES", band_bytes)
    encoder, decoder = _spectral_pair(context, rewrite, dconv, kernel, stride)
    encoder_bands = _count_calls(monkeypatch, layers.EncoderLayer, "_bands")
    decoder_bands = _count_calls(monkeypatch, layers.DecoderLayer, "_bands")
    x = torch.randn(batch, 4, 64, 9)
    expected = encoder(x).detach()
    with torch.inference_mode():
        encoded = encoder(x)
    assert len(encoder_bands) == 1
    torch.testing.assert_close(encoded, expected, rtol=1e-5, atol=1e-6)
    skip = torch.randn_like(expected)
    expected = decoder(expected, skip, 0).detach()
    with torch.inference_mode():
        decoded = decoder(encoded, skip, 0)
    assert len(decoder_bands) == 1
    torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-6)


def test_spectral_bands_are_skipped_where_the_layer_needs_whole_rows(monkeypatch):
    """GroupNorm normalizes over all rows, and a transposed conv with a stride above its kernel
    leaves rows to which no band writes: such layers run whole even when bands are due."""
    monkeypatch.setattr(layers, "_BAND_BYTES", 1)
    calls = _count_calls(monkeypatch, layers.EncoderLayer, "_bands")
    calls += _count_calls(monkeypatch, layers.DecoderLayer, "_bands")
    torch.manual_seed(0)
    normed = layers.EncoderLayer(
        4, 8, freq=True, kernel_size=8, stride=4, norm=True, norm_groups=1, dconv=None,
        rewrite=True, context=0,
    )  # fmt: skip
    gapped = layers.DecoderLayer(
        8, 4, freq=True, last=True, kernel_size=2, stride=4, norm=False, norm_groups=1,
        dconv=None, rewrite=True, context=1,
    )  # fmt: skip
    x, y = torch.randn(1, 4, 64, 5), torch.randn(1, 8, 16, 5)
    expected = normed(x).detach(), gapped(y, y, 0).detach()
    with torch.inference_mode():
        got = normed(x), gapped(y, y, 0)
    assert not calls
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("time_major", [False, True])
@pytest.mark.parametrize("context", [0, 1, 3])
def test_waveform_rewrite_in_spans_equals_the_whole_conv(context, time_major, monkeypatch):
    """Waveform layers make their rewrite conv and GLU a span of time at a time in CPU
    inference, each span reading ``context`` samples past its edges: equal to the whole conv.
    On time-major input (the network's CPU layout) every step stays time-major, the padding
    of odd lengths and the DConv included."""
    monkeypatch.setattr(layers, "_BAND_BYTES", 2 * 8 * 4 * 7)  # 7 samples per span
    spans = _count_calls(monkeypatch, layers, "_rewrite_glu_spans")
    torch.manual_seed(0)
    dconv = DConv(8, depth=2, compress=4, dilate=True, init=0.5)
    common = dict(freq=False, kernel_size=8, stride=4, norm=False, norm_groups=1, dconv=dconv)
    encoder = layers.EncoderLayer(4, 8, rewrite=True, context=context, **common)
    decoder = layers.DecoderLayer(8, 4, last=False, rewrite=True, context=context, **common)
    x = torch.randn(2, 4, 158)  # padded to 160 by the encoder
    expected = encoder(x).detach()
    skip = torch.randn_like(expected)
    expected_out = decoder(expected, skip, 157).detach()
    if time_major:
        x, skip = kernels.time_major(x), kernels.time_major(skip)
    with torch.inference_mode():
        encoded = encoder(x)
        decoded = decoder(encoded, skip, 157)
    assert len(spans) == 2
    assert kernels.is_time_major(encoded) == kernels.is_time_major(decoded) == time_major
    torch.testing.assert_close(encoded, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decoded, expected_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "dtype,channels",
    [(torch.float32, 8), (torch.float32, 16), (torch.bfloat16, 48), (torch.bfloat16, 32)],
)
@pytest.mark.parametrize("freq", [True, False])
def test_conv_glu_equals_glu_of_the_conv(dtype, channels, freq):
    """GLU(conv(x)) from one conv or from two (where a half's channels are not whole 64-byte
    vectors: 8 float32, 48 bfloat16), into a new tensor or into ``out``."""
    torch.manual_seed(3)
    klass = torch.nn.Conv2d if freq else torch.nn.Conv1d
    conv = klass(6, 2 * channels, 3, 1, 1).to(dtype)
    x = torch.randn(2, 6, 5, 11) if freq else torch.randn(2, 6, 11)
    x = x.to(dtype)
    if freq:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = F.glu(conv(x).float(), dim=1)
        new = layers._conv_glu(conv, x)
        out = torch.empty(expected.shape, dtype=dtype)
        filled = layers._conv_glu(conv, x, out)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert filled is out
    for result in (new, filled):
        assert result.dtype == dtype and result.shape == expected.shape
        torch.testing.assert_close(result.float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rows,channels,frames,offset",
    [(1, 6, 5000, 20), (3, 12, 40, 20), (9, 6, 33, 20), (2, 6, 3000, 600)],
)
@pytest.mark.parametrize("affine", [True, False])
def test_time_major_norm_equals_group_norm(dtype, rows, channels, frames, offset, affine):
    """The DConv's one-group norm of a channels-last (N, H, 1, T) tensor, over each row's
    values as one block, against torch's GroupNorm in float64: float32 to its rounding,
    bfloat16 within one rounding (written over the tensor), with offsets of up to 10 and 300
    times the spread (where E[x^2] - E[x]^2 in float32 would lose the variance)."""
    torch.manual_seed(rows)
    norm = torch.nn.GroupNorm(1, channels, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.3, 1.5)
            norm.bias.normal_()
    x = torch.randn(rows, channels, 1, frames) * 2 + offset * torch.rand(rows, 1, 1, 1)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    expected = norm.double()(x.double())
    norm.float()
    fresh = x.clone()
    with torch.inference_mode():
        out = layers._norm_time_major(fresh, norm)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.bfloat16:
        assert out is fresh  # written over the fresh tensor
    error = (out.double() - expected).abs().max() / expected.abs().max()
    assert error < (1e-5 if dtype == torch.float32 else 2**-7)
    plain = torch.randn(rows, channels, 1, frames).to(dtype)  # not channels-last: torch's
    with torch.inference_mode():
        torch.testing.assert_close(layers._norm_time_major(plain.clone(), norm), norm(plain))
