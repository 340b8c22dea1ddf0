"""Convolutional building blocks of both U-Nets.

Dimensions: B batch, C channels, F frequency bins, T time steps (frames or samples).
Spectral layers work on (B, C, F, T) and convolve along F only; waveform layers on (B, C, T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def normalize_rows(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """One-group GroupNorm applied to every frequency row separately.

    x: (B, C, F, T) normalized over (C, T) for each (B, F); or (B, C, T) over (C, T).
    weight, bias: (C,)
    """
    dims = (1, -1)
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    shape = (-1,) + (1,) * (x.dim() - 2)
    return (x - mean) * torch.rsqrt(var + eps) * weight.view(shape) + bias.view(shape)


class RowNorm(nn.Module):
    """Learned affine one-group GroupNorm over (C, T), per frequency row."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_rows(x, self.weight, self.bias, self.eps)


def _row_conv(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """Apply a Conv1d along T of a (B, C, F, T) tensor, each row independently, with no
    layout copy: a (1, k) Conv2d with the same weights."""
    padding = int(conv.padding[0])  # type: ignore[arg-type]  # always an int here
    return F.conv2d(
        x, conv.weight.unsqueeze(2), conv.bias, padding=(0, padding), dilation=(1, conv.dilation[0])
    )


class DConvBranch(nn.Module):
    """One residual branch: dilated conv to a narrow width, 1x1 conv back to 2C, GLU, scale."""

    def __init__(self, channels: int, hidden: int, dilation: int, init: float) -> None:
        super().__init__()
        self.conv_in = nn.Conv1d(channels, hidden, 3, dilation=dilation, padding=dilation)
        self.norm_in = RowNorm(hidden)
        self.conv_out = nn.Conv1d(hidden, 2 * channels, 1)
        self.norm_out = RowNorm(2 * channels)
        self.scale = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, F, T) -> (B, C, F, T), the residual to add."""
        y = F.gelu(self.norm_in(_row_conv(self.conv_in, x)))
        y = F.glu(self.norm_out(_row_conv(self.conv_out, y)), dim=1)
        return self.scale.view(-1, 1, 1) * y


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, F, T) or (B, C, T) -> same shape."""
        rows = x if x.dim() == 4 else x.unsqueeze(2)
        for branch in self.branches:
            rows = rows + branch(rows)
        return rows if x.dim() == 4 else rows.squeeze(2)


def _group_norm(groups: int, channels: int, enabled: bool) -> nn.Module | None:
    return nn.GroupNorm(groups, channels) if enabled else None


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
        if not self.freq and x.shape[-1] % self.stride:
            x = F.pad(x, (0, self.stride - x.shape[-1] % self.stride))
        y = F.gelu(_apply(self.norm, self.conv(x)))
        if self.dconv is not None:
            y = self.dconv(y)
        if self.rewrite is not None:
            y = F.glu(_apply(self.rewrite_norm, self.rewrite(y)), dim=1)
        return y


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

    def forward(self, x: torch.Tensor, skip: torch.Tensor, length: int) -> torch.Tensor:
        """x, skip: (B, Cin, F, T) -> (B, Cout, F * stride, T);
        (B, Cin, T) -> (B, Cout, length)."""
        y = x + skip
        if self.rewrite is not None:
            y = F.glu(_apply(self.rewrite_norm, self.rewrite(y)), dim=1)
        if self.dconv is not None:
            y = self.dconv(y)
        z = _apply(self.norm, self.conv_transpose(y))
        if self.freq:
            z = z[..., self.pad : z.shape[-2] - self.pad, :]
        else:
            z = z[..., self.pad : self.pad + length]
        return z if self.last else F.gelu(z)


class FrequencyEmbedding(nn.Module):
    """A learned vector per frequency row, added after the first spectral encoder so that the
    convolutions along frequency need not be equivariant. Stored divided by ``scale`` (which
    multiplies its learning rate), as in the reference."""

    def __init__(self, bins: int, channels: int, scale: float, smooth: bool) -> None:
        super().__init__()
        weight = torch.randn(bins, channels)
        if smooth:
            # A running sum of Gaussians grows like sqrt(n): normalize it back.
            weight = weight.cumsum(0) / torch.arange(1, bins + 1).sqrt()[:, None]
        self.weight = nn.Parameter(weight / scale)
        self.scale = scale

    def forward(self) -> torch.Tensor:
        """-> (C, F, 1), ready to add to (B, C, F, T)."""
        return (self.weight * self.scale).t().unsqueeze(-1)
