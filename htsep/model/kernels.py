"""Inference fast paths: when intermediate tensors may be overwritten, and the transformer's
matrix products on the CPU, through whichever library multiplies fastest there, with the plain
torch formulation as fallback.

Dimensions: I input features, O output features; B batch, H heads, N queries, M keys, D head
width.

torch's float32 ``F.linear`` multiplies with the BLAS library torch was built with (MKL on
x86). MKL takes its AVX2 code on AMD CPUs, so on an AVX-512 CPU such as Zen 4 it runs at about
half the speed of oneDNN, the library behind torch's CPU convolutions; on an AVX2-only CPU
MKL is the faster one (an AVX2 EPYC: 1.2-1.8x oneDNN on the transformer's products, the
widest gap where oneDNN fuses the GELU). ``cpu_products`` picks one from the kernels torch
runs on this CPU. oneDNN is reached through torch's internal ``mkldnn::_linear_pointwise``
ops (those its graph compiler uses for fused linear layers), which fuse the activation or the
residual add into the product; on the BLAS path they are applied in place. Neither has an
autograd formula here: both are used only when no gradient is being recorded, on float32 (or,
for ``--precision bf16``, bfloat16) CPU tensors outside autocast. Results agree with the
fallback to the rounding of their dtype (float32: about 1e-6 relative).
"""

from __future__ import annotations

import functools
import os
from typing import cast

import torch
import torch.nn.functional as F

from htsep.devices import amx_bf16
from htsep.errors import UsageError

# Overrides the choice of ``cpu_products`` ("onednn" or "blas"), for benchmarks and tests.
PRODUCTS_VARIABLE = "HTSEP_CPU_PRODUCTS"


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build has working oneDNN linear ops (probed once)."""
    try:
        ops = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available():
            return False
        x, weight = torch.ones(2, 3), torch.ones(4, 3)
        plain = ops._linear_pointwise(x, weight, None, "none", [], "")
        added = ops._linear_pointwise.binary(x, plain, weight, None, "add")
        return bool(torch.equal(added, 2 * plain))
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def cpu_products() -> str:
    """The library for float32 matrix products in CPU inference: "onednn" where torch runs
    AVX-512 kernels (``torch.backends.cpu.get_cpu_capability``) and oneDNN's linear ops work,
    "blas" elsewhere; HTSEP_CPU_PRODUCTS=onednn|blas overrides it (onednn only if it works;
    empty: the automatic choice; anything else: UsageError)."""
    wanted = os.environ.get(PRODUCTS_VARIABLE, "").strip().lower()
    if wanted not in ("", "onednn", "blas"):
        raise UsageError(f"{PRODUCTS_VARIABLE}={wanted!r}: expected onednn or blas")
    if not wanted:
        wanted = (
            "onednn" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "blas"
        )
    return "onednn" if wanted == "onednn" and onednn_linear_available() else "blas"


# Our activation names -> oneDNN post-op and algorithm ("none": erf GELU, not the tanh one).
_ONEDNN_ACTIVATIONS = {None: ("none", ""), "gelu": ("gelu", "none"), "relu": ("relu", "")}


def overwritable(x: torch.Tensor) -> bool:
    """Whether intermediate tensors like ``x`` may be overwritten in place: no gradient is being
    recorded, and no autocast is on (whose dtype promotions the in-place forms would change)."""
    return not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)


def fast_path(x: torch.Tensor) -> str | None:
    """The library of the CPU inference path ``x`` may take ("onednn" or "blas"; see
    ``cpu_products``), or None for the plain torch formulation."""
    if (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and overwritable(x)
        and not torch.compiler.is_compiling()  # inductor lowers these ops for frozen weights only
    ):
        return cpu_products()
    return None


def _matrix(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b through BLAS as one 2-D product: (..., I) -> (..., O), a new tensor."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.mm(rows, weight.t()) if bias is None else torch.addmm(bias, rows, weight.t())
    return out.view(*x.shape[:-1], weight.shape[0])


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None = None,
) -> torch.Tensor:
    """``F.linear``, then the exact (erf) ``"gelu"`` or ``"relu"`` if asked.

    x: (..., I), weight: (O, I) -> (..., O)
    """
    path = fast_path(x)
    if path == "onednn":
        attr, algorithm = _ONEDNN_ACTIVATIONS[activation]
        # A strided weight sends oneDNN to a reference kernel, hundreds of times slower.
        weight = weight.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
    y = _matrix(x, weight, bias) if path == "blas" else F.linear(x, weight, bias)
    if activation is None:
        return y
    if path == "blas":  # y is ours: overwrite it
        return torch.ops.aten.gelu_(y) if activation == "gelu" else y.relu_()
    return F.gelu(y) if activation == "gelu" else F.relu(y)


def linear_add(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``residual + F.linear(x, weight, bias)``, a new tensor.

    x: (..., I), residual: (..., O), weight: (O, I) -> (..., O)
    """
    shape = (*x.shape[:-1], weight.shape[0])
    dense = residual.shape == shape and residual.dtype == x.dtype and residual.is_contiguous()
    path = fast_path(x) if dense else None
    if path == "onednn":
        weight = weight.contiguous()
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    if path == "blas":
        return _matrix(x, weight, bias).add_(residual)
    return residual + F.linear(x, weight, bias)


# In bfloat16 on AMX CPUs, convolutions with kernels longer than this along an axis, on fewer
# input channels than that, run through float32 (``convolution``).
_AMX_SAFE_TAPS = 3
_AMX_SAFE_CHANNELS = 32


def convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
) -> torch.Tensor:
    """``F.conv1d`` or ``F.conv2d`` (by the weight's dimensions). A conv1d on a time-major x
    (``is_time_major``) in CPU inference runs as a channels-last conv2d on x seen as (B, I, 1,
    T), and its result is time-major too (the waveform branch's layout in CPU inference). On a
    CPU with AMX tiles, a
    bfloat16 1-tap ``conv1d`` in inference is a matrix product (``_pointwise``; with oneDNN
    held below AMX the product was no faster, so other CPUs keep the convolution). In bfloat16
    on a CPU with AMX tiles a kernel of more than 3 taps along an axis on fewer than 32 input
    channels runs in float32, its output rounded to bfloat16. oneDNN 3.12's AMX bfloat16
    convolution (torch 2.14, an Emerald Rapids Xeon) returned wrong values, errors as large as
    the output itself, for some such shapes: 8-tap kernels on 8 to 24 input channels
    (htsep-tiny's encoders: 12 and 24), along time and along frequency alike, 4- and 16-tap
    ones on 16 and 24 channels, 16-tap ones on 4 and 6 (10% of 640 shapes each). None did
    without AMX (ONEDNN_MAX_CPU_ISA below it), in thousands of shapes with 1 to 3 taps per
    axis, or in 2,520 shapes of 4 to 16 taps on 28 to 192 input channels (the released models'
    encoders have 48 and more, past their first, which this routes too).

    x: (B, I, T) or (B, I, F, T) -> (B, O, ...)
    """
    run = F.conv2d if weight.dim() == 4 else F.conv1d
    amx = x.dtype == torch.bfloat16 and x.device.type == "cpu" and amx_bf16()
    if (
        weight.dim() == 3
        and not isinstance(padding, str)
        and is_time_major(x)
        and fast_path(x) is not None
    ):
        # As a (B, I, 1, T) channels-last conv2d: its output comes out time-major too.
        flat = convolution(
            x.unsqueeze(2),
            weight.unsqueeze(2),
            bias,
            (1, _single(stride)),
            (0, _single(padding)),
            (1, _single(dilation)),
        )
        return flat.squeeze(2)
    if (
        amx
        and weight.dim() == 3
        and weight.shape[2] == 1
        and stride in (1, (1,))
        and padding in (0, (0,))
        and overwritable(x)
    ):
        return _pointwise(x, weight, bias)
    if amx and _amx_unsafe(weight.shape[2:], weight.shape[1]):
        wide = None if bias is None else bias.float()
        out = run(x.float(), weight.float(), wide, stride, padding, dilation)
        return out.to(torch.bfloat16)
    return run(x, weight, bias, stride, padding, dilation)


def _amx_unsafe(taps: tuple[int, ...], channels_in: int) -> bool:
    """Whether a bfloat16 convolution of this kernel on this many input channels runs in
    float32 on this CPU (see ``convolution``)."""
    return amx_bf16() and max(taps) > _AMX_SAFE_TAPS and channels_in < _AMX_SAFE_CHANNELS


# Time-major transposed convolutions with fewer output channels than this run in the phased
# form (``_phased_time_major``), the others through torch's channels-last kernel. On the
# released waveform decoders (48 -> 8 channels on 85,995 steps, 96 -> 48, 192 -> 96, 384 ->
# 192) the phased form took 0.8, 1.0, 1.3, 2.4 ms in bfloat16 against 3.6, 1.3, 1.0, 1.5 ms
# (an Intel Xeon with AMX), 2.1, 4.9, 5.3, 7.1 against 6.1, 5.9, 4.8, 5.4 ms in float32; with
# oneDNN held to AVX2 (float32) or to AVX512-BF16 without AMX (bfloat16) the order was the
# same, except 96 -> 48 in float32 (7.9 against 7.4 ms).
_PHASED_CHANNELS = 64


def is_time_major(x: torch.Tensor) -> bool:
    """Whether a (B, C, T) tensor is stored time-major: each time step's C values adjacent, as
    a transposed (B, T, C) tensor (the waveform branch's layout in CPU inference, where
    oneDNN's convolutions run as channels-last (B, C, 1, T) ones: 1.2-4x faster in float32 and
    bfloat16 than on (B, C, T) tensors, which they reorder in bfloat16). False where the two
    layouts coincide (one channel or one step) or for other shapes. A span of time cut from
    such a tensor is one too (its batch items then lie further apart)."""
    return (
        x.dim() == 3
        and x.shape[1] > 1
        and x.shape[2] > 1
        and x.stride(1) == 1
        and x.stride(2) == x.shape[1]
    )


def time_major(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (B, C, T) stored time-major (``is_time_major``), cast to ``dtype`` if given: x itself
    where it already is, else one copy."""
    dtype = x.dtype if dtype is None else dtype
    if (is_time_major(x) or x.dim() != 3 or min(x.shape[1:]) == 1) and x.dtype == dtype:
        return x
    out = torch.empty(x.shape[0], x.shape[2], x.shape[1], dtype=dtype, device=x.device)
    return out.transpose(1, 2).copy_(x)


def _single(value: int | tuple[int, ...]) -> int:
    """A conv1d's stride, padding or dilation, given as an int or a 1-tuple."""
    return value if isinstance(value, int) else value[0]


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1-tap ``F.conv1d`` as one matrix product per batch item, (O, I) x (I, T), in CPU
    inference with AMX: in bfloat16 on (B, I, T) tensors, torch's convolution reordered them
    to and from channels-last around oneDNN's kernel and took 9-20 ms on the released model's
    waveform rewrite convs (48-96 channels in, 21,499-85,995 steps) where the product took
    1.2-2.2 ms (an Intel Xeon with AMX, torch 2.14).

    x: (B, I, T), weight: (O, I, 1) -> (B, O, T)
    """
    matrix = weight[:, :, 0]
    out = x.new_empty(x.shape[0], weight.shape[0], x.shape[2])
    for item in range(x.shape[0]):
        if bias is None:
            torch.mm(matrix, x[item], out=out[item])
        else:
            torch.addmm(bias[:, None], matrix, x[item], out=out[item])
    return out


def transposed_convolution(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int
) -> torch.Tensor:
    """``F.conv_transpose1d(x, weight, bias, stride)`` (no padding, one group). In CPU
    inference (``fast_path``), with the kernel a multiple m of the stride s and torch's float32
    kernels or bfloat16 ones without AMX tiles, it runs as one ordinary convolution of m taps
    into s "phases" per output channel, which are then interleaved: output sample s j + r is
    sum_q w[:, :, q s + r] . x[j - q]. oneDNN's transposed kernels are slow where the output
    channels are few: on the released model's waveform decoders (48 -> 8 channels on 85,995
    steps, 96 -> 48 on 21,499) they took 26 and 19 ms in float32 against 10.5 and 12.5 ms this
    way, 9.3 and 9.1 ms in bfloat16 against 5.5 and 7.0 ms (a Zen 4 EPYC, torch 2.14); on
    wider layers the two were even. Within a forward pass the four waveform decoders' took
    62 ms against 39 (float32), 31 against 26 (bfloat16), and 60 against 44 with torch and
    oneDNN held to AVX2. With AMX tiles bfloat16 keeps torch's kernel. A time-major x
    (``is_time_major``, the waveform branch's layout in CPU inference) gives a time-major
    result: below ``_PHASED_CHANNELS`` output channels through ``_phased_time_major``, else
    through torch's channels-last kernel (float32 and bfloat16, AMX or not).

    x: (B, I, T), weight: (I, O, K) -> (B, O, (T - 1) s + K)
    """
    channels_in, channels, kernel = weight.shape
    taps = kernel // stride
    if fast_path(x) is not None and is_time_major(x):
        if channels < _PHASED_CHANNELS and not kernel % stride:
            return _phased_time_major(x, weight, bias, stride)
        if x.dtype == torch.bfloat16 and _amx_unsafe(weight.shape[2:], channels_in):
            wide = None if bias is None else bias.float()
            out = F.conv_transpose2d(
                x.float().unsqueeze(2), weight.float().unsqueeze(2), wide, (1, stride)
            )
            return out.squeeze(2).to(torch.bfloat16)
        return F.conv_transpose2d(x.unsqueeze(2), weight.unsqueeze(2), bias, (1, stride)).squeeze(2)
    if fast_path(x) is None or kernel % stride or (x.dtype == torch.bfloat16 and amx_bf16()):
        return F.conv_transpose1d(x, weight, bias, stride)
    # (O * s, I, m): phase r of channel o is row o s + r, its tap t meets x[j - (m - 1 - t)].
    phases = weight.reshape(channels_in, channels, taps, stride).flip(2).permute(1, 3, 0, 2)
    phased_bias = None if bias is None else bias.repeat_interleave(stride)
    y = F.conv1d(x, phases.reshape(channels * stride, channels_in, taps), phased_bias, 1, taps - 1)
    steps = y.shape[-1]  # T + m - 1 blocks of s samples
    out = x.new_empty(x.shape[0], channels, steps, stride)
    out.copy_(y.view(x.shape[0], channels, stride, steps).transpose(2, 3))
    return out.view(x.shape[0], channels, steps * stride)


def _phased_time_major(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int
) -> torch.Tensor:
    """``transposed_convolution`` of a time-major x (``is_time_major``) as one channels-last
    convolution whose output rows are ordered phase first (row r O + o): stored time-major,
    its step j then holds output samples s j ... s j + s - 1 of every channel in order, so the
    result is that same memory seen as (B, O, (T + m - 1) s), time-major, without a copy."""
    channels_in, channels, kernel = weight.shape
    taps = kernel // stride
    # (s * O, I, m): phase r of channel o is row r O + o; its tap t meets x[j - (m - 1 - t)].
    phases = weight.reshape(channels_in, channels, taps, stride).flip(2).permute(3, 1, 0, 2)
    phased_bias = None if bias is None else bias.repeat(stride)
    y = convolution(
        x, phases.reshape(stride * channels, channels_in, taps), phased_bias, 1, taps - 1
    )  # (B, s O, T + m - 1), time-major
    batch, steps = x.shape[0], y.shape[-1]
    return y.transpose(1, 2).reshape(batch, steps * stride, channels).transpose(1, 2)


def conv(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for an ``nn.Conv1d`` or ``nn.Conv2d`` (zero padding, one group), through
    ``convolution``."""
    layer = cast(torch.nn.Conv1d, module)
    padding = cast(tuple[int, ...], layer.padding)
    return convolution(x, layer.weight, layer.bias, layer.stride, padding, layer.dilation)


# Queries per block in ``attention``: a block's scores (rows x keys floats) stay in cache.
_ATTENTION_BLOCK = 512


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T) v for every head, with the 1/sqrt(D) scale already applied to q; dropout
    on the attention weights (training only).

    q: (B, H, N, D), k, v: (B, H, M, D) -> (B, N, H, D).

    bfloat16 on the oneDNN path, on a CPU without AMX, runs both products per head and per
    block of queries through oneDNN's bfloat16 kernels (1.2-1.5x torch's fused CPU kernel on a
    Zen 4 EPYC, which keeps the scores in float32 where these are rounded to bfloat16 before
    the softmax, whose sums are float32). Elsewhere torch's fused attention runs: in float32 it
    was 10-15% faster than the blocks on that CPU (torch 2.14) and 8% faster than blocks
    through MKL on an AVX2 EPYC; in bfloat16 on a CPU with AMX tiles it multiplies with them,
    and inside the released network's forward pass it took 0.17-0.24 s against the blocks'
    0.37-0.43 s (an Intel Xeon with AMX-BF16, torch 2.14).
    """
    if dropout or q.dtype != torch.bfloat16 or fast_path(q) != "onednn" or amx_bf16():
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=1.0)
        return out.transpose(1, 2)
    batch, heads, queries, dim = q.shape
    out = q.new_empty(batch, queries, heads, dim)
    product = torch.ops.mkldnn._linear_pointwise
    # Dense operands (oneDNN falls back to a reference kernel for strided weights), the values
    # transposed to (D, M) to serve as the weight of the second product.
    q, k, v = q.contiguous(), k.contiguous(), v.transpose(2, 3).contiguous()
    for b in range(batch):
        for h in range(heads):
            for start in range(0, queries, _ATTENTION_BLOCK):
                end = start + _ATTENTION_BLOCK
                scores = product(q[b, h, start:end], k[b, h], None, "none", [], "")
                probs = torch.softmax(scores, dim=-1)
                out[b, start:end, h] = product(probs, v[b, h], None, "none", [], "")
    return out


# --- CUDA: norms over few long rows -----------------------------------------------------------

# Below this many rows (batch items x groups) a norm on a CUDA device takes its statistics from
# ``torch.var_mean``: torch's group and layer norm kernels give each row one thread block, so a
# batch of 16 chunks normalised over one group kept 16 of an H200's 132 multiprocessors busy
# (1.4 ms per call; 64 such calls took 86 ms of a 192-ms bf16 call on 16 chunks there).
_FEW_ROWS = 1024


def cuda_formulation(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the formulations written for CUDA devices (the norms over few rows,
    ``stft.overlap_add_istft``): on a CUDA device; tests force them on the CPU to check them
    against the reference."""
    return x.is_cuda


def few_rows(x: torch.Tensor, rows: int) -> bool:
    """Whether a norm of ``rows`` rows over ``x`` takes the ``var_mean`` path."""
    return cuda_formulation(x) and rows < _FEW_ROWS


def normalize_rows(
    x: torch.Tensor,
    rows: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    channel_dim: int,
    eps: float,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias, with mean and (biased) variance over each
    of the ``rows`` equal slices of x's flattened batch items, and weight, bias along
    ``channel_dim`` (dimension 1 for group norm, the last for the sequence norm). Applied as
    one multiply-add, x * a + b with a = rstd * weight and b = bias - mean * a, the fused form
    of torch's own CUDA group norm. Statistics in float32 (or float64 for float64 x); bfloat16
    and float16 inputs give float32 under autocast, as its group norm does, else their dtype."""
    reduced = x.dtype in (torch.float16, torch.bfloat16)
    wide = x.float() if reduced else x
    batch = x.shape[0]
    groups = rows // batch
    var, mean = torch.var_mean(wide.reshape(batch, groups, -1), dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)  # (B, G)
    channels = x.shape[channel_dim]
    shape = [1] * x.dim()
    shape[0], shape[channel_dim] = batch, channels
    # Per batch item and channel: a channel belongs to group c // (channels / groups).
    scale = rstd.repeat_interleave(channels // groups, dim=1)  # (B, channels)
    shift = -mean.repeat_interleave(channels // groups, dim=1) * scale
    if weight is not None:
        scale = scale * weight
        shift = shift * weight
    if bias is not None:
        shift = shift + bias
    out = torch.addcmul(shift.view(shape), wide, scale.view(shape))
    if reduced and not torch.is_autocast_enabled(x.device.type):
        out = out.to(x.dtype)
    return out


def group_norm(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``F.group_norm``, through ``normalize_rows`` on a CUDA device when the rows are few."""
    if few_rows(x, x.shape[0] * groups) and x.shape[1] % groups == 0:
        return normalize_rows(x, x.shape[0] * groups, weight, bias, 1, eps)
    return F.group_norm(x, groups, weight, bias, eps)
