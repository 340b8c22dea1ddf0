"""Model configuration: frozen dataclasses grouped by concern, and the one converter that reads
the reference implementation's constructor keywords.

The dataclass defaults are the settings of the released ``htdemucs`` model, so
``HTDemucsConfig(sources=(...))`` describes that architecture.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from htsep.errors import UnsupportedOptionError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class STFTConfig:
    """Short-time Fourier transform of the spectral branch (hop is always a quarter window)."""

    n_fft: int = 4096

    @property
    def hop_length(self) -> int:
        return self.n_fft // 4

    @property
    def bins(self) -> int:
        """Frequency bins the network sees: the Nyquist bin is dropped."""
        return self.n_fft // 2


@dataclass(frozen=True)
class ConvConfig:
    """The convolutional U-Nets of both branches (encoders, decoders, DConv residual blocks)."""

    channels: int = 48
    growth: float = 2.0
    depth: int = 4
    kernel_size: int = 8
    stride: int = 4
    context_encoder: int = 0  # 1x1 "rewrite" conv widened to 1 + 2 * context
    context_decoder: int = 1
    rewrite: bool = True
    norm_starts: int = 4  # layers with index >= norm_starts use GroupNorm
    norm_groups: int = 4
    dconv_encoder: bool = True
    dconv_decoder: bool = True
    dconv_depth: int = 2
    dconv_compress: float = 8.0
    dconv_dilate: bool = True
    dconv_init: float = 1e-3
    freq_emb_weight: float = 0.2  # 0 disables the frequency embedding
    freq_emb_scale: float = 10.0
    freq_emb_smooth: bool = True
    rescale: float = 0.1  # initial weight rescaling, used only when training from scratch

    def layer_channels(self, index: int) -> int:
        """Output channels of encoder ``index`` (0-based)."""
        chans = self.channels
        for _ in range(index):
            chans = int(self.growth * chans)
        return chans


@dataclass(frozen=True)
class TransformerConfig:
    """The cross-domain transformer at the bottom of both U-Nets."""

    layers: int = 5
    heads: int = 8
    hidden_scale: float = 4.0
    dropout: float = 0.0
    bottom_channels: int = 512  # 0: the transformer works at the deepest encoder's width
    norm_in: bool = True
    norm_out: bool = True
    layer_scale: bool = True
    layer_scale_init: float = 1e-4
    gelu: bool = True
    cross_first: bool = False
    max_period: float = 10000.0
    pos_embedding_weight: float = 1.0


@dataclass(frozen=True)
class HTDemucsConfig:
    sources: tuple[str, ...]
    audio_channels: int = 2
    sample_rate: int = 44100
    segment: Fraction = Fraction(39, 5)  # seconds; inputs are padded to this length
    use_train_segment: bool = True
    stft: STFTConfig = field(default_factory=STFTConfig)
    conv: ConvConfig = field(default_factory=ConvConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "segment", Fraction(self.segment))
        validate(self)

    @property
    def segment_length(self) -> int:
        """The segment in samples (demucs truncates: 39/5 s at 44.1 kHz is 343,980)."""
        return int(self.segment * self.sample_rate)

    @property
    def bottom_width(self) -> int:
        """Channels of the deepest encoder, where the transformer sits."""
        return self.conv.layer_channels(self.conv.depth - 1)

    @property
    def transformer_width(self) -> int:
        return self.transformer.bottom_channels or self.bottom_width

    def freq_bins(self) -> list[int]:
        """Frequency bins entering each encoder, then leaving the last one."""
        bins = [self.stft.bins]
        pad = self.conv.kernel_size // 4
        for _ in range(self.conv.depth):
            bins.append((bins[-1] + 2 * pad - self.conv.kernel_size) // self.conv.stride + 1)
        return bins


def validate(config: HTDemucsConfig) -> None:
    """Reject geometries this implementation cannot run, with the reason."""
    conv, tr = config.conv, config.transformer
    if not config.sources:
        raise UnsupportedOptionError("the model must have at least one source")
    if config.stft.n_fft % 4 or config.stft.n_fft < 16:
        raise UnsupportedOptionError(f"nfft={config.stft.n_fft} must be a multiple of 4, >= 16")
    pad = conv.kernel_size // 4
    bins = config.freq_bins()
    for index, (before, after) in enumerate(itertools.pairwise(bins)):
        if before <= conv.kernel_size:
            raise UnsupportedOptionError(
                f"frequency branch reaches {before} bins at layer {index} (kernel "
                f"{conv.kernel_size}): merging the branches inside the U-Net is not supported"
            )
        if (after - 1) * conv.stride + conv.kernel_size - 2 * pad != before:
            raise UnsupportedOptionError(
                f"{before} frequency bins at layer {index} do not round-trip through kernel "
                f"{conv.kernel_size} / stride {conv.stride}"
            )
    if tr.layers:
        width = config.transformer_width
        if width % 4:
            raise UnsupportedOptionError(f"transformer width {width} must be a multiple of 4")
        if width % tr.heads:
            raise UnsupportedOptionError(
                f"transformer width {width} is not divisible by {tr.heads} heads"
            )
    if config.segment_length <= 0:
        raise UnsupportedOptionError(f"segment {config.segment} s is empty")


# --- the reference's constructor keywords ------------------------------------------------------

# Default values of demucs.htdemucs.HTDemucs.__init__ (demucs 4.1.0). Checkpoints store only the
# keywords that were passed, so a missing keyword means this value.
REFERENCE_DEFAULTS: dict[str, Any] = {
    "audio_channels": 2,
    "channels": 48,
    "channels_time": None,
    "growth": 2,
    "nfft": 4096,
    "wiener_iters": 0,
    "end_iters": 0,
    "wiener_residual": False,
    "cac": True,
    "depth": 4,
    "rewrite": True,
    "multi_freqs": None,
    "multi_freqs_depth": 3,
    "freq_emb": 0.2,
    "emb_scale": 10,
    "emb_smooth": True,
    "kernel_size": 8,
    "time_stride": 2,
    "stride": 4,
    "context": 1,
    "context_enc": 0,
    "norm_starts": 4,
    "norm_groups": 4,
    "dconv_mode": 1,
    "dconv_depth": 2,
    "dconv_comp": 8,
    "dconv_init": 1e-3,
    "bottom_channels": 0,
    "t_layers": 5,
    "t_emb": "sin",
    "t_hidden_scale": 4.0,
    "t_heads": 8,
    "t_dropout": 0.0,
    "t_max_positions": 10000,
    "t_norm_in": True,
    "t_norm_in_group": False,
    "t_group_norm": False,
    "t_norm_first": True,
    "t_norm_out": True,
    "t_max_period": 10000.0,
    "t_weight_decay": 0.0,
    "t_lr": None,
    "t_layer_scale": True,
    "t_gelu": True,
    "t_weight_pos_embed": 1.0,
    "t_sin_random_shift": 0,
    "t_cape_mean_normalize": True,
    "t_cape_augment": True,
    "t_cape_glob_loc_scale": [5000.0, 1.0, 1.4],
    "t_sparse_self_attn": False,
    "t_sparse_cross_attn": False,
    "t_mask_type": "diag",
    "t_mask_random_seed": 42,
    "t_sparse_attn_window": 500,
    "t_global_window": 100,
    "t_sparsity": 0.95,
    "t_auto_sparsity": False,
    "t_cross_first": False,
    "rescale": 0.1,
    "samplerate": 44100,
    "segment": 10,
    "use_train_segment": True,
}

# Keywords that only shape training (optimizer groups) or only matter with an option we reject.
_IGNORED = {
    "t_weight_decay",
    "t_lr",
    "multi_freqs_depth",
    "time_stride",
    "t_max_positions",
    "t_cape_mean_normalize",
    "t_cape_augment",
    "t_cape_glob_loc_scale",
    "t_mask_type",
    "t_mask_random_seed",
    "t_sparse_attn_window",
    "t_global_window",
    "t_sparsity",
    "t_auto_sparsity",
    "wiener_residual",
}


def _require(kw: Mapping[str, Any], key: str, allowed: Any, what: str) -> None:
    value = kw[key]
    ok = value in allowed if isinstance(allowed, tuple) else value == allowed
    if not ok:
        raise UnsupportedOptionError(f"checkpoint option {key}={value!r} ({what}) is not supported")


def from_demucs_kwargs(sources: Any, kwargs: Mapping[str, Any]) -> HTDemucsConfig:
    """Build our config from the keywords of ``demucs.htdemucs.HTDemucs``.

    Unknown keywords (training-only extras of other versions) are ignored; options that change
    the computation in a way we do not implement raise UnsupportedOptionError naming them.
    """
    unknown = sorted(set(kwargs) - set(REFERENCE_DEFAULTS) - {"sources"})
    if unknown:
        logger.info("ignoring unknown checkpoint options: %s", ", ".join(unknown))
    kw = {**REFERENCE_DEFAULTS, **{k: v for k, v in kwargs.items() if k in REFERENCE_DEFAULTS}}

    _require(kw, "cac", True, "spectrogram output as masks instead of complex as channels")
    _require(kw, "wiener_iters", 0, "Wiener filtering iterations")
    _require(kw, "end_iters", 0, "Wiener filtering iterations in training")
    _require(kw, "multi_freqs", (None, [], ()), "frequency bands split with MultiWrap")
    if kw["channels_time"] not in (None, kw["channels"]):
        _require(kw, "channels_time", None, "a different width for the time branch")
    _require(kw, "t_emb", "sin", "positional embedding other than sinusoidal (CAPE, learned)")
    _require(kw, "t_sparse_self_attn", False, "sparse self-attention")
    _require(kw, "t_sparse_cross_attn", False, "sparse cross-attention")
    _require(kw, "t_group_norm", (False, 0), "GroupNorm instead of LayerNorm inside layers")
    _require(kw, "t_norm_first", True, "post-norm transformer layers")
    _require(kw, "t_sin_random_shift", 0, "random shift of positional embeddings")
    if not kw["t_norm_in"]:
        _require(kw, "t_norm_in_group", (False, 0), "GroupNorm at the transformer input")
    _require(kw, "dconv_mode", (0, 1, 2, 3), "DConv placement")
    ignored = sorted(k for k in _IGNORED if k in kwargs and kwargs[k] != REFERENCE_DEFAULTS[k])
    if ignored:
        logger.debug("training-only options ignored: %s", ", ".join(ignored))

    return HTDemucsConfig(
        sources=tuple(sources),
        audio_channels=int(kw["audio_channels"]),
        sample_rate=int(kw["samplerate"]),
        segment=Fraction(kw["segment"]),
        use_train_segment=bool(kw["use_train_segment"]),
        stft=STFTConfig(n_fft=int(kw["nfft"])),
        conv=ConvConfig(
            channels=int(kw["channels"]),
            growth=float(kw["growth"]),
            depth=int(kw["depth"]),
            kernel_size=int(kw["kernel_size"]),
            stride=int(kw["stride"]),
            context_encoder=int(kw["context_enc"]),
            context_decoder=int(kw["context"]),
            rewrite=bool(kw["rewrite"]),
            norm_starts=int(kw["norm_starts"]),
            norm_groups=int(kw["norm_groups"]),
            dconv_encoder=bool(kw["dconv_mode"] & 1),
            dconv_decoder=bool(kw["dconv_mode"] & 2),
            dconv_depth=abs(int(kw["dconv_depth"])),
            dconv_compress=float(kw["dconv_comp"]),
            dconv_dilate=int(kw["dconv_depth"]) > 0,
            dconv_init=float(kw["dconv_init"]),
            freq_emb_weight=float(kw["freq_emb"] or 0.0),
            freq_emb_scale=float(kw["emb_scale"]),
            freq_emb_smooth=bool(kw["emb_smooth"]),
            rescale=float(kw["rescale"] or 0.0),
        ),
        transformer=TransformerConfig(
            layers=int(kw["t_layers"]),
            heads=int(kw["t_heads"]),
            hidden_scale=float(kw["t_hidden_scale"]),
            dropout=float(kw["t_dropout"]),
            bottom_channels=int(kw["bottom_channels"] or 0),
            norm_in=bool(kw["t_norm_in"]),
            norm_out=bool(kw["t_norm_out"]),
            layer_scale=bool(kw["t_layer_scale"]),
            gelu=bool(kw["t_gelu"]),
            cross_first=bool(kw["t_cross_first"]),
            max_period=float(kw["t_max_period"]),
            pos_embedding_weight=float(kw["t_weight_pos_embed"]),
        ),
    )


# --- our own serialization ---------------------------------------------------------------------


def config_to_dict(config: HTDemucsConfig) -> dict[str, Any]:
    """A JSON-ready dict; ``config_from_dict`` is its inverse."""
    data = dataclasses.asdict(config)
    data["sources"] = list(config.sources)
    data["segment"] = {
        "numerator": config.segment.numerator,
        "denominator": config.segment.denominator,
    }
    return data


def config_from_dict(data: Mapping[str, Any]) -> HTDemucsConfig:
    data = dict(data)
    segment = data.pop("segment")
    groups = {"stft": STFTConfig, "conv": ConvConfig, "transformer": TransformerConfig}
    parts = {name: klass(**data.pop(name, {})) for name, klass in groups.items()}
    return HTDemucsConfig(
        segment=Fraction(segment["numerator"], segment["denominator"]), **data, **parts
    )
