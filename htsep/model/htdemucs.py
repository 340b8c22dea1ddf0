"""Hybrid Transformer Demucs: a spectral and a waveform U-Net joined by a cross-domain
transformer at the bottom, their outputs summed in the waveform domain.

Dimensions: B batch, S sources, C audio channels, F frequency bins, N frames, T samples.
"""

from __future__ import annotations

import copy
import weakref
from fractions import Fraction
from typing import Any, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from htsep.errors import InputError, InputLengthError
from htsep.model import kernels, stft
from htsep.model.config import HTDemucsConfig
from htsep.model.layers import DConv, DecoderLayer, EncoderLayer, FrequencyEmbedding
from htsep.model.transformer import CrossDomainTransformer


def _standardize(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Scalar mean and unbiased std per batch item over ``dims``; 1e-5 keeps silence finite."""
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    return (x - mean) / (1e-5 + std), mean, std


def _destandardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """x * std + mean for a decoder output, in place in inference."""
    if kernels.overwritable(x):
        return x.mul_(std).add_(mean)
    return x * std + mean


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook (the module's own or a global one) sees ``module``'s output."""
    hooks = torch.nn.modules.module._global_forward_hooks
    return bool(module._forward_hooks or hooks)


class HTDemucs(nn.Module):
    """The network. ``forward`` maps a mixture (B, C, T), T up to the segment length, to stems
    (B, S, C, T); shorter inputs are zero-padded to the segment internally, as in training."""

    def __init__(self, config: HTDemucsConfig) -> None:
        super().__init__()
        self.config = config
        conv = config.conv
        bins = config.freq_bins()

        self.freq_encoders, self.freq_decoders = self._branch(freq=True)
        self.time_encoders, self.time_decoders = self._branch(freq=False)

        self.freq_embedding: FrequencyEmbedding | None = None
        if conv.freq_emb_weight:
            self.freq_embedding = FrequencyEmbedding(
                bins[1], conv.layer_channels(0), conv.freq_emb_scale, conv.freq_emb_smooth
            )

        if conv.rescale:
            self._rescale_convs(conv.rescale)

        width, bottom = config.bottom_width, config.transformer.bottom_channels
        self.bottleneck: nn.ModuleDict | None = None
        if bottom:
            self.bottleneck = nn.ModuleDict(
                {
                    "freq_in": nn.Conv1d(width, bottom, 1),
                    "freq_out": nn.Conv1d(bottom, width, 1),
                    "time_in": nn.Conv1d(width, bottom, 1),
                    "time_out": nn.Conv1d(bottom, width, 1),
                }
            )
        self.transformer: CrossDomainTransformer | None = None
        if config.transformer.layers:
            self.transformer = CrossDomainTransformer(config.transformer_width, config.transformer)

    def _branch(self, freq: bool) -> tuple[nn.ModuleList, nn.ModuleList]:
        """Encoders of one U-Net, and its decoders deepest first (the order they run in)."""
        config, conv = self.config, self.config.conv
        # The spectral branch carries complex values as two real channels.
        outer = config.audio_channels * (2 if freq else 1)
        encoders, decoders = nn.ModuleList(), nn.ModuleList()
        for index in range(conv.depth):
            chin = conv.layer_channels(index - 1) if index else outer
            chout = conv.layer_channels(index)
            common: dict[str, Any] = dict(
                freq=freq,
                kernel_size=conv.kernel_size,
                stride=conv.stride,
                norm=index >= conv.norm_starts,
                norm_groups=conv.norm_groups,
                rewrite=conv.rewrite,
            )
            encoders.append(
                EncoderLayer(
                    chin,
                    chout,
                    dconv=self._dconv(chout) if conv.dconv_encoder else None,
                    context=conv.context_encoder,
                    **common,
                )
            )
            # The outermost decoder emits every source at once.
            dec_out = chin * len(config.sources) if index == 0 else chin
            decoders.insert(
                0,
                DecoderLayer(
                    chout,
                    dec_out,
                    last=index == 0,
                    dconv=self._dconv(chout) if conv.dconv_decoder else None,
                    context=conv.context_decoder,
                    **common,
                ),
            )
        return encoders, decoders

    def _dconv(self, channels: int) -> DConv:
        conv = self.config.conv
        return DConv(
            channels, conv.dconv_depth, conv.dconv_compress, conv.dconv_dilate, conv.dconv_init
        )

    def _rescale_convs(self, reference: float) -> None:
        """Initial weight rescaling of the U-Net convolutions (std -> sqrt(std * reference)),
        which the reference found to help training from scratch."""
        kinds = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)
        with torch.no_grad():
            for module in self.modules():
                # Without storage (built on the meta device to check a checkpoint's size) there
                # are no values to rescale.
                if isinstance(module, kinds) and module.weight.device.type != "meta":
                    factor = (module.weight.std() / reference) ** 0.5
                    module.weight /= factor
                    if module.bias is not None:
                        module.bias /= factor

    # --- the contract shared with demucs models --------------------------------------------

    @property
    def sources(self) -> list[str]:
        return list(self.config.sources)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def audio_channels(self) -> int:
        return self.config.audio_channels

    @property
    def segment(self) -> Fraction:
        """Training segment in seconds, exact."""
        return self.config.segment

    @property
    def segment_length(self) -> int:
        return self.config.segment_length

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the activations between the STFT and its inverse: that of the
        convolution weights (bfloat16 in a ``bfloat16_copy``, else float32)."""
        encoder = cast(EncoderLayer, self.time_encoders[0])
        return cast(torch.Tensor, cast(nn.Conv1d, encoder.conv).weight).dtype

    # --- forward -----------------------------------------------------------------------------

    def _bottleneck(self, x: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, F, N), xt: (B, C, T') through the transformer, at its width."""
        if self.transformer is None:
            return x, xt
        if self.bottleneck is None:
            return self.transformer(x, xt)
        rows = x.shape[2]
        flat = rearrange(x, "b c f n -> b c (f n)")
        x = rearrange(
            kernels.conv(self.bottleneck["freq_in"], flat), "b c (f n) -> b c f n", f=rows
        )
        x, xt = self.transformer(x, kernels.conv(self.bottleneck["time_in"], xt))
        flat = rearrange(x, "b c f n -> b c (f n)")
        x = rearrange(
            kernels.conv(self.bottleneck["freq_out"], flat), "b c (f n) -> b c f n", f=rows
        )
        return x, kernels.conv(self.bottleneck["time_out"], xt)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """mix: (B, C, T) -> stems (B, S, C, T). InputError (a ValueError) for a mixture of
        another shape, a dtype that is not floating point or another device than the model's."""
        if not isinstance(mix, torch.Tensor):
            raise InputError(f"expected a (batch, {self.audio_channels}, time) tensor, not "
                             f"{type(mix).__name__}")  # fmt: skip
        if mix.dim() != 3 or mix.shape[1] != self.audio_channels or 0 in mix.shape:
            raise InputError(
                f"expected a (batch, {self.audio_channels}, time) mixture, "
                f"got shape {tuple(mix.shape)}"
            )
        if not mix.is_floating_point():
            raise InputError(f"expected floating-point samples, not {mix.dtype}")
        device = next(self.parameters()).device
        if mix.device != device:
            raise InputError(f"the mixture is on {mix.device} and the model on {device}: move one")
        length = mix.shape[-1]
        padded_length = length
        if self.config.use_train_segment and not self.training:
            padded_length = self.segment_length
            if length > padded_length:
                raise InputLengthError(
                    f"input of {length} samples is longer than the model's segment "
                    f"({padded_length} samples); split it into chunks first"
                )
            mix = F.pad(mix, (0, padded_length - length))

        z = stft.analysis(mix, self.config.stft.n_fft)  # (B, C, F, N) complex
        x = rearrange(torch.view_as_real(z), "b c f n ri -> b (c ri) f n").to(mix.dtype)
        x, mean, std = _standardize(x, (1, 2, 3))
        xt, mean_t, std_t = _standardize(mix, (1, 2))
        dtype = self.compute_dtype
        x = x.to(dtype)
        # In CPU inference the waveform branch runs time-major (``kernels.is_time_major``).
        xt = kernels.time_major(xt, dtype) if kernels.fast_path(xt) is not None else xt.to(dtype)

        skips, skips_t, lengths_t = [], [], []
        for index, (encode, encode_t) in enumerate(
            zip(self.freq_encoders, self.time_encoders, strict=True)
        ):
            lengths_t.append(xt.shape[-1])
            xt = encode_t(xt)
            x = encode(x)
            if index == 0 and self.freq_embedding is not None:
                embedding = self.config.conv.freq_emb_weight * self.freq_embedding()
                # The encoder's output is ours to overwrite in inference.
                x = x.add_(embedding) if kernels.overwritable(x) else x + embedding
            skips.append(x)
            skips_t.append(xt)

        x, xt = self._bottleneck(x, xt)

        last = len(self.freq_decoders) - 1
        for index, (decode, decode_t) in enumerate(
            zip(self.freq_decoders, self.time_decoders, strict=True)
        ):
            # The last spectral output only feeds the inverse STFT below, so it may be a buffer
            # this thread keeps for the next call (the largest block of the pass); not where a
            # forward hook sees it, which may keep it.
            reuse = index == last and not _hooked(decode)
            x = decode(x, skips.pop(), 0, reuse=reuse)
            xt = decode_t(xt, skips_t.pop(), lengths_t.pop())

        sources = len(self.config.sources)
        wide = torch.promote_types(dtype, torch.float32)
        if kernels.is_time_major(xt):  # CPU inference: one copy back to (B, S C, T) order
            xt = torch.empty(xt.shape, dtype=wide, device=xt.device).copy_(xt)
        xt = _destandardize(xt.to(wide), mean_t, std_t)
        out = rearrange(xt, "b (s c) t -> b s c t", s=sources)[..., :length]
        out = out if kernels.overwritable(out) else out.clone()
        if x.dtype == wide:
            # At once: a source's channels are strided in channels-last (5x slower per element).
            x = _destandardize(x, mean, std)
        x = rearrange(x, "b (s c) f n -> b s c f n", s=sources)
        # One source at a time: the inverse STFT's frame buffers are the largest tensors of the
        # whole forward pass, and this keeps a quarter of them alive instead of all. A bfloat16
        # source goes into float32 (a dense copy in the same layout) here, a quarter at a time,
        # rather than the whole output at once (42 MiB, mapped fresh by glibc on every call).
        for index in range(sources):
            part = x[:, index]
            if part.dtype != wide:
                part = _destandardize(part.to(wide), mean, std)
            part = rearrange(part, "b (c ri) f n -> b c f n ri", ri=2)
            # In channels-last (the CPU's spectral layout) the real and imaginary parts are
            # already neighbours: the complex view needs no copy (the STFT's padding makes one).
            if part.stride(-1) != 1 or any(stride % 2 for stride in part.stride()[:-1]):
                part = part.contiguous()
            z_out = torch.view_as_complex(part)  # (B, C, F, N)
            wave = stft.synthesis(z_out, padded_length)[..., :length]  # (B, C, T)
            out[:, index] += wave.to(out.dtype)
        return out


# Each network's bfloat16 copy, with the fingerprint of the weights it was made from.
_BF16_COPIES: weakref.WeakKeyDictionary[HTDemucs, tuple[tuple[Any, ...], HTDemucs]] = (
    weakref.WeakKeyDictionary()
)


def _version(tensor: torch.Tensor) -> int | None:
    """How many times the tensor was modified in place; None for tensors made in inference
    mode, which keep no count (and cannot be modified outside it)."""
    if tensor.is_inference():
        return None
    return tensor._version


def bfloat16_copy(model: HTDemucs) -> HTDemucs:
    """``model`` for bfloat16 inference on the CPU: its convolution, product and embedding
    weights in bfloat16, so that the activations between the STFT and its inverse are
    bfloat16 too (half the memory traffic of float32, and the CPU's bfloat16 products with
    float32 sums); its norms' parameters stay float32 (torch's CPU norms take bfloat16 input
    with float32 parameters and compute their statistics in float32). The STFT, the
    standardisation of the input and the output stay float32 (``HTDemucs.forward``).

    Made once per network and kept while the network lives; a change to its weights (a
    training step, ``load_state_dict``) makes a new copy."""
    tensors = [*model.parameters(), *model.buffers()]
    fingerprint = tuple((t.data_ptr(), _version(t), t.dtype, t.device) for t in tensors)
    cached = _BF16_COPIES.get(model)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    reduced = copy.deepcopy(model).to(torch.bfloat16).eval()
    for source, module in zip(model.modules(), reduced.modules(), strict=True):
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            # The original float32 values, not their bfloat16 rounding.
            module.float().load_state_dict(source.state_dict())
    reduced.requires_grad_(False)
    _BF16_COPIES[model] = (fingerprint, reduced)
    return reduced
