"""Convolutional building blocks of both U-Nets.

Dimensions: B batch, C channels, F frequency bins, T time steps (frames or samples).
Spectral layers work on (B, C, F, T) and convolve along F only; waveform layers on (B, C, T).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from htsep.model import kernels


def _gelu_fresh(x: torch.Tensor) -> torch.Tensor:
    """GELU of a tensor nothing else refers to: in place when ``kernels.overwritable``."""
    return torch.ops.aten.gelu_(x) if kernels.overwritable(x) else F.gelu(x)


def _glu_fresh(x: torch.Tensor) -> torch.Tensor:
    """GLU over channels (dim 1) of a tensor nothing else refers to. In inference the result is
    written over the first half of x (a view), sparing a new tensor."""
    if not kernels.overwritable(x):
        return F.glu(x, dim=1)
    value, gate = x.chunk(2, dim=1)
    return value.mul_(gate.sigmoid_())


def _glu_compact(x: torch.Tensor) -> torch.Tensor:
    """GLU over channels (dim 1) into a new tensor of half the size: for results that are kept
    (the encoders' outputs live on as skip connections), a view into x would keep all of x
    alive. The gate half of x is overwritten in inference."""
    if not kernels.overwritable(x):
        return F.glu(x, dim=1)
    value, gate = x.chunk(2, dim=1)
    return torch.mul(value, gate.sigmoid_())


def _scale_first_half(vector: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(2C,) vector with its first C entries multiplied by scale (C,)."""
    half = scale.shape[0]
    return torch.cat([vector[:half] * scale, vector[half:]])


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state), computed by ``kernels.group_norm``: on a
    CUDA device, statistics that use the whole GPU when the groups are few."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class DConvBranch(nn.Module):
    """One residual branch along time: dilated conv to a narrow width, GroupNorm, GELU, 1x1 conv
    back to 2C, GroupNorm, GLU, per-channel scale. Works on (N, C, T)."""

    def __init__(self, channels: int, hidden: int, dilation: int, init: float) -> None:
        super().__init__()
        self.conv_in = nn.Conv1d(channels, hidden, 3, dilation=dilation, padding=dilation)
        self.norm_in = GroupNorm(1, hidden)
        self.conv_out = nn.Conv1d(hidden, 2 * channels, 1)
        self.norm_out = GroupNorm(1, 2 * channels)
        self.scale = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, T) -> (N, C, T), the residual to add."""
        y = F.gelu(self.norm_in(self.conv_in(x)))
        y = F.glu(self.norm_out(self.conv_out(y)), dim=1)
        return self.scale[:, None] * y

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = x + forward(x) in inference (``kernels.overwritable``); ``out`` may be x.

        glu(a, b) * s == (s * a) * sigmoid(b): the scale is folded into the affine of the
        GroupNorm's first half, and the sum fuses into one multiply-add.
        """
        hidden = _gelu_fresh(self.norm_in(self.conv_in(x)))  # (N, H, T), H = C / compress
        norm_weight = _scale_first_half(self.norm_out.weight, self.scale)
        norm_bias = _scale_first_half(self.norm_out.bias, self.scale)
        if kernels.fast_path(x) is not None:
            y = self._normalised_product(hidden, norm_weight, norm_bias)
        else:
            # As a batched product: oneDNN's 1x1 convolution is slow for so few input channels.
            weight = self.conv_out.weight[:, :, 0]  # (2C, H)
            bias = cast(torch.Tensor, self.conv_out.bias)
            y = torch.baddbmm(bias[:, None], weight.expand(x.shape[0], *weight.shape), hidden)
            y = kernels.group_norm(y, 1, norm_weight, norm_bias, self.norm_out.eps)
        value, gate = y.chunk(2, dim=1)
        return torch.addcmul(x, value, gate.sigmoid_(), out=out)

    def add_to_time_major(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``add_to`` for rows stored time-major, x: (N, T, C) with C contiguous (the rows of a
        channels-last spectral layer, taken without a copy); out likewise, and may be x. CPU
        inference only (``kernels.fast_path``): every step stays in that layout, the dilated
        conv and the GroupNorm as channels-last (N, C, 1, T) tensors."""
        conv, norm = self.conv_in, self.norm_in
        dilation, padding = conv.dilation[0], cast(tuple[int, ...], conv.padding)[0]
        hidden = F.conv2d(
            x.transpose(1, 2).unsqueeze(2),  # (N, C, 1, T), channels-last
            conv.weight.unsqueeze(2),
            conv.bias,
            padding=(0, padding),
            dilation=(1, dilation),
        )
        hidden = _gelu_fresh(_norm_time_major(hidden, norm))
        hidden = hidden.permute(0, 2, 3, 1).flatten(1, 2)  # (N, T, H), a view in channels-last
        norm_weight = _scale_first_half(self.norm_out.weight, self.scale)
        norm_bias = _scale_first_half(self.norm_out.bias, self.scale)
        weights, augmented = self._normalised_weights(hidden, norm_weight, norm_bias, True)
        # Two products, so that each half comes out dense: the elementwise kernels then run
        # whole vectors (sliced from (N, T, 2C), a row of C = 48 bfloat16 values is one
        # 32-wide vector and a scalar tail, which made the sigmoid 2x slower than float32's).
        channels = x.shape[-1]
        value = torch.bmm(augmented, weights[:, :channels].transpose(1, 2))  # (N, T, C)
        gate = torch.bmm(augmented, weights[:, channels:].transpose(1, 2))
        return torch.addcmul(x, value, gate.sigmoid_(), out=out)

    def _normalised_product(
        self, hidden: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor
    ) -> torch.Tensor:
        """norm_out(conv_out(hidden)) with the given affine, as one batched product:
        (N, H, T) -> (N, 2C, T) (see ``_normalised_weights``)."""
        weights, augmented = self._normalised_weights(hidden, norm_weight, norm_bias, False)
        return torch.bmm(weights, augmented)

    def _normalised_weights(
        self,
        hidden: torch.Tensor,
        norm_weight: torch.Tensor,
        norm_bias: torch.Tensor,
        time_major: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights that make norm_out(conv_out(hidden)), with the given affine, one
        batched product: (N, 2C, H+1) in hidden's dtype, and hidden with a row of ones
        appended, (N, H+1, T) (from (N, H, T)), or with ``time_major`` (N, T, H+1) (from
        (N, T, H)).

        Each row's y = W h + b is an affine map of the H << 2C hidden channels, so its mean and
        variance over (2C, T) follow from the (H+1) x (H+1) moments of h with a row of ones
        appended (taken in float64, where E[y^2] - E[y]^2 loses nothing that matters). The
        row's normalisation then folds into its own copy of [W | b], and the product gives
        the normalised y: no pass over y for the bias, the statistics or the normalisation.
        """
        if time_major:
            rows, frames, width = hidden.shape
            augmented = hidden.new_empty(rows, frames, width + 1)
            augmented[:, :, :width] = hidden
            augmented[:, :, width] = 1
            wide = augmented.double().transpose(1, 2)  # (N, H+1, T)
        else:
            rows, width, frames = hidden.shape
            augmented = hidden.new_empty(rows, width + 1, frames)
            augmented[:, :width] = hidden
            augmented[:, width] = 1
            wide = augmented.double()
        moments = torch.bmm(wide, wide.transpose(1, 2)).div_(frames)  # (N, H+1, H+1)
        affine = torch.cat(
            [self.conv_out.weight[:, :, 0], cast(torch.Tensor, self.conv_out.bias)[:, None]], 1
        ).double()  # (2C, H+1): [W | b]
        # E[y] = mean_c(a_c) . E[h~]; E[y^2] = mean_c a_c M a_c^T = <M, A^T A / 2C>.
        mean = moments[:, :, width] @ affine.mean(0)  # (N,)
        second = (moments * (affine.T @ affine).div_(affine.shape[0])).sum((1, 2))
        gain = (second - mean.square()).clamp_(min=0).add_(self.norm_out.eps).rsqrt_()
        scale = gain[:, None] * norm_weight.double()  # (N, 2C)
        weights = scale[:, :, None] * affine  # (N, 2C, H+1)
        weights[:, :, width] += norm_bias.double() - scale * mean[:, None]
        return weights.to(hidden.dtype), augmented


def _norm_time_major(hidden: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm`` (one group) of a fresh channels-last (N, H, 1, T) tensor, in that layout.

    torch's channels-last GroupNorm is slow on few channels: 7.3 ms in bfloat16 and 3.2 ms in
    float32 on (1, 6, 1, 86000), the released waveform branch's first DConvs, and 0.7 ms in
    bfloat16 on (130, 6, 1, 336) (an Intel Xeon with AMX). Here each row's values are one flat
    block (0.6, 0.6 and 0.3 ms): in float32, torch's GroupNorm of that block, then the affine as
    one multiply-add; in bfloat16, where a rounding in between cost 0.3 dB of SNR against
    float32, the statistics come from float32 sums and the normalisation with the affine,
    x * (w / std) + (b - mean w / std), is one multiply-add computed in float32 and rounded
    once, written over ``hidden``. Where float32 has 8 rows or more torch's kernel was as fast
    and stays."""
    rows, channels, _, frames = hidden.shape
    if (
        norm.num_groups != 1
        or (hidden.dtype == torch.float32 and rows >= 8)
        or not hidden.is_contiguous(memory_format=torch.channels_last)
    ):
        return F.group_norm(hidden, norm.num_groups, norm.weight, norm.bias, norm.eps)
    steps = hidden.permute(0, 2, 3, 1).view(rows, frames, channels)  # (N, T, H)
    flat = steps.view(rows, 1, frames * channels)
    if hidden.dtype == torch.float32:
        out = F.group_norm(flat, 1, eps=norm.eps).view(rows, frames, channels)
        if norm.weight is not None:
            torch.addcmul(norm.bias, out, norm.weight, out=out)
        return out.unsqueeze(1).permute(0, 3, 1, 2)
    # Sums in float32 (float64 ones cast x first: 10x slower). Where the variance is under a
    # thousandth of the mean square (a row far from zero mean, or nearly constant), E[x^2] -
    # E[x]^2 would lose float32's digits: those rows are summed again, centred, in float64.
    mean = flat.sum(2, dtype=torch.float32)[:, 0].double() / flat.shape[2]
    norm2 = torch.linalg.vector_norm(flat, dim=2, dtype=torch.float32)[:, 0].double()
    square = norm2.square() / flat.shape[2]
    variance = square - mean.square()
    shaky = variance < 1e-3 * square
    if bool(shaky.any()):
        variance[shaky] = flat[shaky, 0].double().var(1, correction=0)
    gain = variance.clamp_(min=0).add_(norm.eps).rsqrt_()  # (N,)
    weight = gain[:, None] if norm.weight is None else gain[:, None] * norm.weight.double()
    shift = -mean[:, None] * weight
    if norm.bias is not None:
        shift += norm.bias.double()
    # (N, 1, H) float32 operands: the product and sum in float32.
    torch.addcmul(shift.float()[:, None], steps, weight.float()[:, None], out=steps)
    return hidden


# Rows of a DConv run together in inference: their widest intermediate (2C x T floats per row)
# stays near 16 MB, in cache and under the 32 MiB ceiling of glibc's mmap threshold, so freed
# blocks get reused. Larger blocks are mapped fresh from the kernel on every call, and their page
# faults cost more than the arithmetic.
_DCONV_CHUNK_ELEMENTS = 1 << 22


def _time_major_rows(x: torch.Tensor) -> torch.Tensor | None:
    """The rows of a (B, C, F, T) tensor whose channels are adjacent in memory (channels-last,
    or the first half of a channels-last tensor's channels) as a (B*F, T, C) view, or None."""
    if x.stride(1) != 1:
        return None
    try:
        return x.permute(0, 2, 3, 1).view(-1, x.shape[3], x.shape[1])
    except RuntimeError:  # the rows are not evenly spaced: no such view
        return None


class DConv(nn.Module):
    """Stack of residual branches with growing dilation, acting along time on every row."""

    def __init__(
        self, channels: int, depth: int, compress: float, dilate: bool, init: float
    ) -> None:
        super().__init__()
        hidden = int(channels / compress)
        self.branches = nn.ModuleList(
            DConvBranch(channels, hidden, 2**d if dilate else 1, init) for d in range(depth)
        )

    def forward(self, x: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        """x: (B, C, F, T) or (B, C, T) -> same shape: a new tensor, or in inference with
        ``overwrite`` (x is the caller's to lose) possibly x itself, written over."""
        if x.dim() == 3:
            return self._rows(x, inplace=overwrite)
        batch, channels, bins, frames = x.shape
        if kernels.fast_path(x) is not None and _time_major_rows(x) is not None:
            return self._rows_time_major(x, overwrite)
        rows = x.transpose(1, 2).reshape(batch * bins, channels, frames)  # (B*F, C, T)
        # The fold is a copy, which may be overwritten, unless C or F is 1.
        out = self._rows(rows, inplace=overwrite or rows.data_ptr() != x.data_ptr())
        return out.view(batch, bins, channels, frames).transpose(1, 2)  # (B, C, F, T), a view

    def _rows_time_major(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        """A channels-last (B, C, F, T) x in CPU inference: its rows are (B*F, T, C) views,
        run without leaving that layout (the (B*F, C, T) fold and the next conv's
        channels-last input would each be a transposing copy). -> (B, C, F, T) channels-last,
        written over x if ``inplace``."""
        out = x if inplace else torch.empty_like(x, memory_format=torch.channels_last)
        rows, rows_out = _time_major_rows(x), _time_major_rows(out)
        assert rows is not None and rows_out is not None
        self._chunks(rows, rows_out, DConvBranch.add_to_time_major)
        return out

    def _chunks(
        self,
        rows: torch.Tensor,
        out: torch.Tensor,
        add: Callable[[DConvBranch, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        """Every branch's ``add`` over the rows (dim 0), a chunk of rows at a time, into out
        (which may be rows)."""
        step = max(1, _DCONV_CHUNK_ELEMENTS // (2 * rows[0].numel()))
        for start in range(0, rows.shape[0], step):
            part, part_out = rows[start : start + step], out[start : start + step]
            for branch in cast(Iterable[DConvBranch], self.branches):
                part = add(branch, part, part_out)

    def _rows(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        """x: (N, C, T) -> (N, C, T); in inference, written over x if ``inplace``."""
        if not kernels.overwritable(x):
            for branch in self.branches:
                x = x + branch(x)
            return x
        if kernels.fast_path(x) is not None and kernels.is_time_major(x):
            # Time-major rows are (N, T, C) views, as a channels-last spectral layer's are.
            out = x if inplace else _empty_like_layout(x, x.shape[1])
            self._chunks(x.transpose(1, 2), out.transpose(1, 2), DConvBranch.add_to_time_major)
            return out
        out = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
        self._chunks(x, out, DConvBranch.add_to)
        return out


def _conv_input(x: torch.Tensor, freq: bool) -> torch.Tensor:
    """A spectral conv's input in channels-last on the CPU: oneDNN's kernels for the (k, 1)
    kernels and transposed convs here run up to twice as fast in that layout."""
    if freq and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _spectral_empty(x: torch.Tensor, channels: int, rows: int, reuse: bool = False) -> torch.Tensor:
    """An uninitialised (B, channels, rows, T) output for a spectral layer run over bands, in
    the layout of its convolutions' outputs (``_conv_input``): elementwise ops that write
    from one layout into the other run several times slower than within one. With ``reuse``,
    this thread's reused buffer (``_reused_buffer``)."""
    shape = (x.shape[0], channels, rows, x.shape[-1])
    layout = torch.channels_last if x.device.type == "cpu" else torch.contiguous_format
    if reuse:
        return _reused_buffer(shape, x.dtype, x.device, layout)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout)


# One buffer per thread, kept between network calls, for the spectral branch's last decoder
# output (S x C x 2 channels at full frequency resolution: 42 MiB in float32 for the released
# models). That is past the 32 MiB above which glibc maps every block fresh from the kernel and
# hands it back when freed: 10,752 page faults on every chunk. It lives only until the inverse
# STFT has read it, so the networks of a bag, run one after another, share it; two threads
# running networks at once each have their own.
_held = threading.local()


def _reused_buffer(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    layout: torch.memory_format,
) -> torch.Tensor:
    """An uninitialised tensor that this thread gets again on its next call with the same
    shape, dtype, device and layout: the caller must be done with it by then. Made outside
    inference mode, so that it can be written under ``torch.no_grad`` as well."""
    buffer: torch.Tensor | None = getattr(_held, "buffer", None)
    if (
        buffer is None
        or buffer.shape != shape
        or buffer.dtype != dtype
        or buffer.device != device
        or not buffer.is_contiguous(memory_format=layout)
    ):
        _held.buffer = buffer = None  # the old one goes before the new one is made
        with torch.inference_mode(False):
            buffer = torch.empty(shape, dtype=dtype, device=device, memory_format=layout)
        _held.buffer = buffer
    return buffer


# A spectral layer without GroupNorm acts on each frequency row separately, apart from its
# convolutions along F, whose reach is a few rows. In CPU inference such a layer runs over
# bands of rows whose widest intermediate (2C x T floats per row, the rewrite conv's output)
# stays near 8 MB: in cache, and far under the 32 MiB above which glibc maps every block fresh
# from the kernel (and hands it back when freed), so the next chunk pays no page faults for it.
_BAND_BYTES = 8 << 20


def _band_rows(x: torch.Tensor, channels: int, rows: int) -> int | None:
    """Rows per band for a spectral layer whose widest intermediate has ``channels`` channels,
    or None where the layer runs whole: outside CPU inference, or if one band holds all rows."""
    if x.device.type != "cpu" or not kernels.overwritable(x):
        return None
    band = max(1, _BAND_BYTES // (channels * x.shape[0] * x.shape[-1] * x.element_size()))
    return band if band < rows else None


def _padding(conv: nn.Module) -> int:
    """A convolution's zero padding along its first axis (F for spectral layers)."""
    return cast(tuple[int, ...], cast(nn.Conv1d, conv).padding)[0]


def _row_range(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """x[:, :, start:end] for (B, C, F, T), with zero rows where the range leaves [0, F)."""
    bins = x.shape[2]
    piece = x[:, :, max(start, 0) : min(end, bins)]
    if start < 0 or end > bins:
        piece = F.pad(piece, (0, 0, max(0, -start), max(0, end - bins)))
    return piece


def _conv_glu(
    conv: nn.Module, x: torch.Tensor, out: torch.Tensor | None = None, **padding: Any
) -> torch.Tensor:
    """GLU over the channels of ``conv``'s output on x, for inference (x is the conv's input
    as it stands; ``padding`` overrides the conv's own): a new (B, C, ...) tensor, or ``out``
    filled.

    In channels-last, each half of a (B, 2C, ...) output holds C adjacent values per position.
    Where C values are not a whole number of 64-byte vectors (48 bfloat16 channels: one
    32-wide vector and a scalar tail), the sigmoid and the product over the halves ran 2.7x
    slower than over dense tensors; there the value and the gate come from two convs, one on
    each half of the weights. Elsewhere one conv was as fast or faster (a Zen 4 EPYC, torch
    2.14)."""
    conv = cast(nn.Conv1d, conv)
    run = kernels.convolution
    half = conv.out_channels // 2
    bias = conv.bias
    options = {"padding": padding.get("padding", conv.padding)}
    if (half * x.element_size()) % 64 == 0:
        value, gate = run(x, conv.weight, bias, **options).chunk(2, dim=1)
    else:
        value = run(x, conv.weight[:half], None if bias is None else bias[:half], **options)
        gate = run(x, conv.weight[half:], None if bias is None else bias[half:], **options)
    # A new compact tensor (never a view that would keep the whole conv output alive) or out.
    return torch.mul(value, gate.sigmoid_(), out=out)


def _rewrite_band_glu(
    conv: nn.Module, x: torch.Tensor, context: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """GLU of a spectral rewrite conv on a band given with ``context`` extra rows on each side:
    (B, C, R + 2 context, T) -> (B, C, R, T), new or ``out``, in CPU inference."""
    return _conv_glu(conv, _conv_input(x, True), out, padding=(0, context))


def _rewrite_glu_spans(conv: nn.Module, y: torch.Tensor) -> torch.Tensor | None:
    """GLU(conv(y)) for a waveform rewrite conv (no GroupNorm between them) in CPU inference,
    made a span of time at a time so that the (B, 2C, T) conv output is never whole (see
    ``_BAND_BYTES``): (B, C, T) -> (B, C, T), a new tensor; None where it runs whole."""
    conv = cast(nn.Conv1d, conv)
    if y.device.type != "cpu" or not kernels.overwritable(y):
        return None
    batch, _, frames = y.shape
    step = max(1, _BAND_BYTES // (conv.out_channels * batch * y.element_size()))
    if step >= frames:
        return None
    context = _padding(conv)
    out = _empty_like_layout(y, conv.out_channels // 2)
    for start in range(0, frames, step):
        end = min(frames, start + step)
        piece = y[..., max(0, start - context) : end + context]
        if start < context or end + context > frames:
            piece = _pad_time(piece, max(0, context - start), max(0, end + context - frames))
        _conv_glu(conv, piece, out[..., start:end], padding=0)
    return out


def _pad_time(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """x (B, C, T) with zeros added before and after along T, in x's layout (``F.pad`` makes
    a (B, C, T) tensor time-major from a time-major one only in its (B, C, 1, T) form)."""
    if kernels.is_time_major(x):
        return F.pad(x.unsqueeze(2), (left, right)).squeeze(2)
    return F.pad(x, (left, right))


def _empty_like_layout(x: torch.Tensor, channels: int) -> torch.Tensor:
    """An uninitialised (B, channels, T) tensor for x (B, C, T), time-major if x is."""
    batch, _, frames = x.shape
    if kernels.is_time_major(x):
        return x.new_empty(batch, frames, channels).transpose(1, 2)
    return x.new_empty(batch, channels, frames)


def _group_norm(groups: int, channels: int, enabled: bool) -> nn.Module | None:
    return GroupNorm(groups, channels) if enabled else None


def _apply(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


class EncoderLayer(nn.Module):
    """Strided conv (along F for the spectral branch, along T for the waveform branch), GELU,
    optional DConv residual, then a "rewrite" conv to 2C and GLU."""

    def __init__(
        self,
        chin: int,
        chout: int,
        *,
        freq: bool,
        kernel_size: int,
        stride: int,
        norm: bool,
        norm_groups: int,
        dconv: DConv | None,
        rewrite: bool,
        context: int,
    ) -> None:
        super().__init__()
        self.freq = freq
        self.stride = stride
        pad = kernel_size // 4
        if freq:
            self.conv: nn.Module = nn.Conv2d(chin, chout, (kernel_size, 1), (stride, 1), (pad, 0))
        else:
            self.conv = nn.Conv1d(chin, chout, kernel_size, stride, pad)
        self.norm = _group_norm(norm_groups, chout, norm)
        self.dconv = dconv
        self.rewrite: nn.Module | None = None
        if rewrite:
            klass = nn.Conv2d if freq else nn.Conv1d
            self.rewrite = klass(chout, 2 * chout, 1 + 2 * context, 1, context)
        self.rewrite_norm = _group_norm(norm_groups, 2 * chout, norm and rewrite)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Cin, F, T) -> (B, Cout, F / stride, T);
        (B, Cin, T) -> (B, Cout, ceil(T / stride))."""
        if self.freq and self.norm is None and self.rewrite_norm is None:
            conv = cast(nn.Conv2d, self.conv)
            rows = (x.shape[2] + 2 * _padding(conv) - conv.kernel_size[0]) // self.stride + 1
            band = _band_rows(x, 2 * conv.out_channels, rows)
            if band is not None:
                return self._bands(x, rows, band)
        if not self.freq and x.shape[-1] % self.stride:
            x = _pad_time(x, 0, self.stride - x.shape[-1] % self.stride)
        y = _gelu_fresh(_apply(self.norm, kernels.conv(self.conv, _conv_input(x, self.freq))))
        if self.dconv is not None:
            y = self.dconv(y, overwrite=True)
        if self.rewrite is not None:
            whole = self.freq or self.rewrite_norm is not None
            spans = None if whole else _rewrite_glu_spans(self.rewrite, y)
            if spans is not None:
                return spans
            if self.rewrite_norm is None and kernels.fast_path(y) is not None:
                return _conv_glu(self.rewrite, _conv_input(y, self.freq))
            y = kernels.conv(self.rewrite, _conv_input(y, self.freq))
            y = _glu_compact(_apply(self.rewrite_norm, y))
        return y

    def _bands(self, x: torch.Tensor, rows: int, band: int) -> torch.Tensor:
        """``forward`` of a spectral layer without GroupNorm, ``band`` output rows at a time
        (see ``_BAND_BYTES``); each band's input rows are those its convolutions reach."""
        conv = cast(nn.Conv2d, self.conv)
        kernel, pad = conv.kernel_size[0], _padding(conv)
        context = _padding(self.rewrite) if self.rewrite is not None else 0
        out = _spectral_empty(x, conv.out_channels, rows)
        x = _conv_input(x, True)
        for start in range(0, rows, band):
            end = min(rows, start + band)
            # The rewrite conv reaches ``context`` rows of this layer's activation beyond the
            # band; rows outside [0, rows) are the zeros it pads with.
            first, last = max(0, start - context), min(rows, end + context)
            piece = _row_range(
                x, first * self.stride - pad, (last - 1) * self.stride - pad + kernel
            )
            y = kernels.convolution(
                _conv_input(piece, True), conv.weight, conv.bias, stride=(self.stride, 1)
            )
            y = _gelu_fresh(y)
            if self.dconv is not None:
                y = self.dconv(y, overwrite=True)
            if self.rewrite is None:
                out[:, :, start:end] = y
                continue
            rows_in = _row_range(y, start - context - first, end + context - first)
            _rewrite_band_glu(self.rewrite, rows_in, context, out[:, :, start:end])
        return out


class DecoderLayer(nn.Module):
    """Mirror of EncoderLayer: add the skip, rewrite + GLU, DConv, transposed conv, crop."""

    def __init__(
        self,
        chin: int,
        chout: int,
        *,
        freq: bool,
        last: bool,
        kernel_size: int,
        stride: int,
        norm: bool,
        norm_groups: int,
        dconv: DConv | None,
        rewrite: bool,
        context: int,
    ) -> None:
        super().__init__()
        self.freq = freq
        self.last = last
        self.pad = kernel_size // 4
        self.rewrite: nn.Module | None = None
        if rewrite:
            klass = nn.Conv2d if freq else nn.Conv1d
            self.rewrite = klass(chin, 2 * chin, 1 + 2 * context, 1, context)
        self.rewrite_norm = _group_norm(norm_groups, 2 * chin, norm and rewrite)
        self.dconv = dconv
        if freq:
            self.conv_transpose: nn.Module = nn.ConvTranspose2d(
                chin, chout, (kernel_size, 1), (stride, 1)
            )
        else:
            self.conv_transpose = nn.ConvTranspose1d(chin, chout, kernel_size, stride)
        self.norm = _group_norm(norm_groups, chout, norm)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor, length: int, reuse: bool = False
    ) -> torch.Tensor:
        """x, skip: (B, Cin, F, T) -> (B, Cout, F * stride, T);
        (B, Cin, T) -> (B, Cout, length). With ``reuse``, the output may be a buffer that this
        thread hands out again (``_reused_buffer``; CPU inference over bands only): the caller
        must be done with it before the next network call in this thread."""
        conv = cast(nn.ConvTranspose2d, self.conv_transpose)
        # Bands are summed where their outputs overlap, so they must not leave gaps between them.
        if (
            self.freq
            and self.norm is None
            and self.rewrite_norm is None
            and conv.kernel_size[0] >= conv.stride[0]
        ):
            width = 2 * x.shape[1] if self.rewrite is not None else x.shape[1]
            band = _band_rows(x, width, x.shape[2])
            if band is not None:
                return self._bands(x, skip, band, reuse)
        y = x + skip
        if self.rewrite is not None:
            whole = self.freq or self.rewrite_norm is not None
            spans = None if whole else _rewrite_glu_spans(self.rewrite, y)
            if spans is not None:
                y = spans
            elif self.rewrite_norm is None and kernels.fast_path(y) is not None:
                y = _conv_glu(self.rewrite, _conv_input(y, self.freq))
            else:
                y = kernels.conv(self.rewrite, _conv_input(y, self.freq))
                y = _glu_fresh(_apply(self.rewrite_norm, y))
        if self.dconv is not None:
            y = self.dconv(y, overwrite=True)
        if self.freq:
            z = self.conv_transpose(_conv_input(y, True))
        else:
            conv1d = cast(nn.ConvTranspose1d, self.conv_transpose)
            z = kernels.transposed_convolution(y, conv1d.weight, conv1d.bias, conv1d.stride[0])
        z = _apply(self.norm, z)
        if self.freq:
            z = z[..., self.pad : z.shape[-2] - self.pad, :]
        else:
            z = z[..., self.pad : self.pad + length]
        return z if self.last else _gelu_fresh(z)

    def _bands(
        self, x: torch.Tensor, skip: torch.Tensor, band: int, reuse: bool = False
    ) -> torch.Tensor:
        """``forward`` of a spectral layer without GroupNorm, ``band`` input rows at a time (see
        ``_BAND_BYTES``). The transposed conv's outputs of neighbouring bands overlap by
        kernel - stride rows, which are summed; its bias counts once per row."""
        conv = cast(nn.ConvTranspose2d, self.conv_transpose)
        kernel, stride = conv.kernel_size[0], conv.stride[0]
        context = _padding(self.rewrite) if self.rewrite is not None else 0
        rows = x.shape[2]
        height = (rows - 1) * stride + kernel - 2 * self.pad  # after the crop
        out = _spectral_empty(x, conv.out_channels, height, reuse)
        written = 0  # rows of ``out`` holding a finished first contribution
        for start in range(0, rows, band):
            end = min(rows, start + band)
            y = _row_range(x, start - context, end + context) + _row_range(
                skip, start - context, end + context
            )
            if self.rewrite is not None:
                y = _rewrite_band_glu(self.rewrite, y, context)
            if self.dconv is not None:
                y = self.dconv(y, overwrite=True)
            # The bias is added inside the conv; rows that the previous band's output reached
            # already hold it, so it comes off the part of z summed into them.
            z = F.conv_transpose2d(_conv_input(y, True), conv.weight, conv.bias, stride=(stride, 1))
            # z's rows are rows start * stride - pad onwards of ``out``; crop to ``out``.
            top = start * stride - self.pad
            z = z[:, :, max(0, -top) : min(z.shape[2], height - top)]
            top = max(0, top)
            overlap = written - top
            if overlap > 0:
                summed = z[:, :, :overlap]  # z is ours
                if conv.bias is not None:
                    summed = summed.sub_(conv.bias[:, None, None])
                out[:, :, top:written] += summed
            fresh = z[:, :, max(overlap, 0) :]
            out[:, :, written : written + fresh.shape[2]] = fresh
            written += fresh.shape[2]
        return out if self.last else _gelu_fresh(out)


class FrequencyEmbedding(nn.Module):
    """A learned vector per frequency row, added after the first spectral encoder so that the
    convolutions along frequency need not be equivariant. Stored divided by ``scale`` (which
    multiplies its learning rate), as in the reference."""

    def __init__(self, bins: int, channels: int, scale: float, smooth: bool) -> None:
        super().__init__()
        weight = torch.empty(bins, channels)
        # Without storage (a checkpoint's model built on the meta device before its weights
        # are loaded) the initial values do not matter, and random numbers or arithmetic there
        # would import torch's compiler stack (seconds and ~150 MB).
        if weight.device.type != "meta":
            weight.normal_()  # the numbers of torch.randn
            if smooth:
                # A running sum of Gaussians grows like sqrt(n): normalize it back.
                weight = weight.cumsum(0) / torch.arange(1, bins + 1).sqrt()[:, None]
            weight = weight / scale
        self.weight = nn.Parameter(weight)
        self.scale = scale

    def forward(self) -> torch.Tensor:
        """-> (C, F, 1), ready to add to (B, C, F, T)."""
        return (self.weight * self.scale).t().unsqueeze(-1)
