"""The cross-domain transformer encoder at the bottom of HT Demucs.

Dimensions: B batch, C channels (model width), F frequency rows, T time steps, N tokens, H heads,
D head width. Tokens are batch-first: (B, N, C). Spectral tokens come in time-major order
(all frequency rows of frame 0, then frame 1, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from htsep.model import kernels
from htsep.model.config import TransformerConfig


def sin_embedding_1d(
    length: int, dim: int, max_period: float, device: torch.device | None = None
) -> torch.Tensor:
    """Sinusoidal positions: cos in the first half of the channels, sin in the second, with
    periods from 2*pi up to 2*pi*max_period.

    -> (length, dim) float32
    """
    half = dim // 2
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    exponent = torch.arange(half, device=device, dtype=torch.float32) / (half - 1)
    phase = position / (max_period**exponent)
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


def sin_embedding_2d(
    dim: int, rows: int, frames: int, max_period: float, device: torch.device | None = None
) -> torch.Tensor:
    """2-D sinusoidal positions for a (rows x frames) grid of tokens, in time-major order.

    Channels [0, dim/2) encode the frame index, [dim/2, dim) the row index; within each half,
    even channels hold sin and odd channels cos of position * max_period^(-2j / (dim/2)).

    -> (frames * rows, dim) float32
    """
    half = dim // 2
    # exp(-k * log(p) / half) rather than p ** (-k / half): the reference's float32 rounding.
    steps = torch.arange(0.0, half, 2, device=device, dtype=torch.float32)
    freqs = torch.exp(steps * -(math.log(max_period) / half))
    time_phase = torch.arange(frames, device=device, dtype=torch.float32)[:, None] * freqs
    row_phase = torch.arange(rows, device=device, dtype=torch.float32)[:, None] * freqs

    def interleave(phase: torch.Tensor) -> torch.Tensor:  # (P, half/2) -> (P, half)
        return torch.stack([torch.sin(phase), torch.cos(phase)], dim=-1).flatten(1)

    time_part = interleave(time_phase)[:, None, :].expand(frames, rows, half)
    row_part = interleave(row_phase)[None, :, :].expand(frames, rows, half)
    return torch.cat([time_part, row_part], dim=-1).reshape(frames * rows, dim)


def sequence_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """GroupNorm with one group over the whole sequence: x (B, N, C) is normalized over (N, C)
    for each batch item, then scaled and shifted per channel."""
    if kernels.few_rows(x, x.shape[0]):
        # On CUDA torch's layer norm gives each batch item one thread block.
        return kernels.normalize_rows(x, x.shape[0], weight, bias, -1, eps).to(x.dtype)
    # A layer norm over (N, C) without affine computes exactly that normalization, and much
    # faster than torch.var_mean on the CPU.
    normalized = F.layer_norm(x, x.shape[1:], eps=eps)
    if kernels.overwritable(x):
        return normalized.mul_(weight).add_(bias)
    # (float32 parameters on bfloat16 tokens: back to the tokens' dtype, as in place.)
    return (normalized * weight + bias).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with a packed (q, k, v) input projection, through
    ``kernels.attention`` (oneDNN products in CPU inference, torch's fused attention otherwise)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C) queries; context: (B, M, C) keys and values (x itself when None)."""
        return self.out_proj(self.heads_output(x, context))

    def heads_output(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The attention before the output projection, heads concatenated: (B, N, C)."""
        dim = x.shape[-1]
        # softmax(q k^T / sqrt(D)): the scale is folded into the query projection.
        scale = (dim // self.heads) ** -0.5
        weight = torch.cat([self.in_proj.weight[:dim] * scale, self.in_proj.weight[dim:]])
        bias = torch.cat([self.in_proj.bias[:dim] * scale, self.in_proj.bias[dim:]])
        if context is None:
            qkv = kernels.linear(x, weight, bias)
            q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        else:
            q = rearrange(
                kernels.linear(x, weight[:dim], bias[:dim]), "b n (h d) -> b h n d", h=self.heads
            )
            kv = kernels.linear(context, weight[dim:], bias[dim:])
            k, v = rearrange(kv, "b m (two h d) -> two b h m d", two=2, h=self.heads)
        dropout = self.dropout if self.training else 0.0
        return rearrange(kernels.attention(q, k, v, dropout), "b n h d -> b n (h d)")


class TransformerLayer(nn.Module):
    """Pre-norm layer: attention (self, or cross to the other stream), then feed-forward, each
    residual scaled per channel; optionally a one-group GroupNorm over the sequence at the end."""

    def __init__(self, dim: int, config: TransformerConfig, cross: bool) -> None:
        super().__init__()
        self.cross = cross
        self.dropout = config.dropout
        self.activation = "gelu" if config.gelu else "relu"
        self.attention_norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim) if cross else None
        self.attention = Attention(dim, config.heads, config.dropout)
        self.feedforward_norm = nn.LayerNorm(dim)
        hidden = int(dim * config.hidden_scale)
        self.feedforward_in = nn.Linear(dim, hidden)
        self.feedforward_out = nn.Linear(hidden, dim)
        self.attention_scale: nn.Parameter | None = None
        self.feedforward_scale: nn.Parameter | None = None
        if config.layer_scale:
            self.attention_scale = nn.Parameter(torch.full((dim,), config.layer_scale_init))
            self.feedforward_scale = nn.Parameter(torch.full((dim,), config.layer_scale_init))
        self.output_norm: nn.GroupNorm | None = nn.GroupNorm(1, dim) if config.norm_out else None

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training)

    def _residual(
        self, x: torch.Tensor, y: torch.Tensor, projection: nn.Linear, scale: torch.Tensor | None
    ) -> torch.Tensor:
        """x + scale * dropout(projection(y)): x (B, N, C), y (B, N, I)."""
        if self.training and self.dropout:
            out = self._drop(projection(y))
            return x + (out if scale is None else scale * out)
        weight: torch.Tensor = projection.weight
        bias: torch.Tensor = projection.bias
        if scale is not None:
            # The layer scale folded into the projection; the add fuses into the product.
            weight, bias = scale[:, None] * weight, scale * bias
        return kernels.linear_add(y, x, weight, bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C); context: (B, M, C) for a cross layer -> (B, N, C)."""
        if self.context_norm is not None:
            if context is None:
                raise ValueError("a cross-attention layer needs the other stream")
            context = self.context_norm(context)
        attended = self.attention.heads_output(self.attention_norm(x), context)
        x = self._residual(x, attended, self.attention.out_proj, self.attention_scale)
        hidden = kernels.linear(
            self.feedforward_norm(x),
            self.feedforward_in.weight,
            self.feedforward_in.bias,
            self.activation,
        )
        x = self._residual(x, self._drop(hidden), self.feedforward_out, self.feedforward_scale)
        if self.output_norm is not None:
            x = sequence_norm(
                x, self.output_norm.weight, self.output_norm.bias, self.output_norm.eps
            )
        return x


class CrossDomainTransformer(nn.Module):
    """Two token streams, spectral and waveform, each with its own layers. Self-attention
    layers act within a stream; cross-attention layers let each stream query the other, both
    reading the other's values from before that layer."""

    def __init__(self, dim: int, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.freq_norm_in = nn.LayerNorm(dim) if config.norm_in else None
        self.time_norm_in = nn.LayerNorm(dim) if config.norm_in else None
        first_cross = 0 if config.cross_first else 1
        crosses = [index % 2 == first_cross for index in range(config.layers)]
        self.freq_layers = nn.ModuleList(TransformerLayer(dim, config, cross) for cross in crosses)
        self.time_layers = nn.ModuleList(TransformerLayer(dim, config, cross) for cross in crosses)

    def forward(self, x: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, F, T) spectral, xt: (B, C, T') waveform -> the same shapes."""
        _, dim, rows, frames = x.shape
        weight = self.config.pos_embedding_weight
        max_period = self.config.max_period
        freq_tokens = rearrange(x, "b c f t -> b (t f) c")
        if self.freq_norm_in is not None:
            freq_tokens = self.freq_norm_in(freq_tokens)
        freq_pos = sin_embedding_2d(dim, rows, frames, max_period, x.device)
        freq_tokens = freq_tokens + weight * freq_pos.to(freq_tokens.dtype)

        time_tokens = rearrange(xt, "b c t -> b t c")
        if self.time_norm_in is not None:
            time_tokens = self.time_norm_in(time_tokens)
        time_pos = sin_embedding_1d(time_tokens.shape[1], dim, max_period, xt.device)
        time_tokens = time_tokens + weight * time_pos.to(time_tokens.dtype)

        for freq_layer, time_layer in zip(self.freq_layers, self.time_layers, strict=True):
            if freq_layer.cross:
                freq_tokens, time_tokens = (
                    freq_layer(freq_tokens, time_tokens),
                    time_layer(time_tokens, freq_tokens),
                )
            else:
                freq_tokens, time_tokens = freq_layer(freq_tokens), time_layer(time_tokens)

        x = rearrange(freq_tokens, "b (t f) c -> b c f t", f=rows)
        xt = rearrange(time_tokens, "b t c -> b c t")
        return x, xt
