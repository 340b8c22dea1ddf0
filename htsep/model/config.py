"""Model configuration: frozen dataclasses grouped by concern, the named configurations
(``NAMED_CONFIGS``), and the one converter that reads the reference implementation's
constructor keywords.

The dataclass defaults are the settings of the released ``htdemucs`` model, so
``HTDemucsConfig(sources=(...))`` describes that architecture.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import numbers
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from htsep.errors import CheckpointError, UnsupportedOptionError

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
        object.__setattr__(self, "sources", check_sources(self.sources))
        object.__setattr__(self, "segment", _segment_value(self.segment))
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


# --- named configurations ------------------------------------------------------------------------


def tiny_config(sources: Sequence[str], sample_rate: int, channels: int) -> HTDemucsConfig:
    """A 1.1M-parameter HT Demucs (both branches 12 channels wide, 4 levels, a 2-layer
    cross-domain transformer at 96 channels, 3-second segments) that trains on a CPU."""
    return HTDemucsConfig(
        sources=tuple(sources),
        audio_channels=channels,
        sample_rate=sample_rate,
        segment=Fraction(3),
        stft=STFTConfig(n_fft=2048),
        conv=ConvConfig(channels=12, dconv_compress=4.0),
        transformer=TransformerConfig(layers=2, heads=4, bottom_channels=0),
    )


def released_config(sources: Sequence[str], sample_rate: int, channels: int) -> HTDemucsConfig:
    """The released htdemucs architecture (41M parameters), for the dataset's sources."""
    return HTDemucsConfig(sources=tuple(sources), audio_channels=channels, sample_rate=sample_rate)


NAMED_CONFIGS: dict[str, Callable[[Sequence[str], int, int], HTDemucsConfig]] = {
    "tiny": tiny_config,
    "htdemucs": released_config,
}


# --- what a config may hold ----------------------------------------------------------------------
# A config usually comes from a checkpoint, that is from a file anyone can write: every value is
# checked before a module is built from it. The bounds are generous (the released models use a
# small part of each range) but keep the arithmetic and the allocations finite.

MAX_SOURCES = 64
MAX_NAME_LENGTH = 100
MAX_SEGMENT_SECONDS = 600
MAX_SEGMENT_SAMPLES = 1 << 25  # 12.7 minutes at 44.1 kHz
MAX_WIDTH = 16384  # channels of any layer, and the transformer's width
MAX_HIDDEN = 65536  # the transformer's feed-forward width

# Characters Windows refuses in file names; a stem named with one could not be written there.
_RESERVED_CHARACTERS = set('<>:"|?*')
_RESERVED_NAMES = {"con", "prn", "aux", "nul", "conin$", "conout$"} | {
    f"{p}{d}" for p in ("com", "lpt") for d in "0123456789\u00b9\u00b2\u00b3"
}


@dataclass(frozen=True)
class Limit:
    """What an option may hold: ``kind`` int, float (any finite real) or bool, within
    [low, high]; ``open_low`` excludes ``low`` itself (a divisor, a scale)."""

    kind: type
    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False

    def describe(self) -> str:
        if self.kind is bool:
            return "true or false"
        what = "an integer" if self.kind is int else "a finite number"
        if self.open_low and self.high == math.inf:
            return f"{what} above {self.low:g}"
        if self.open_low:
            return f"{what} above {self.low:g}, at most {self.high:g}"
        if self.high == math.inf:
            return f"{what} of at least {self.low:g}" if self.low > -math.inf else what
        return f"{what} from {self.low:g} to {self.high:g}"


_BOOL = Limit(bool)
_FINITE = Limit(float)

# Every field of the config, by its dotted name.
LIMITS: dict[str, Limit] = {
    "audio_channels": Limit(int, 1, 64),
    "sample_rate": Limit(int, 1000, 384_000),
    "use_train_segment": _BOOL,
    "stft.n_fft": Limit(int, 16, 65536),
    "conv.channels": Limit(int, 1, 4096),
    "conv.growth": Limit(float, 0, 16, open_low=True),
    "conv.depth": Limit(int, 1, 16),
    "conv.kernel_size": Limit(int, 1, 128),
    "conv.stride": Limit(int, 1, 128),
    "conv.context_encoder": Limit(int, 0, 16),
    "conv.context_decoder": Limit(int, 0, 16),
    "conv.rewrite": _BOOL,
    "conv.norm_starts": Limit(int, 0, 1024),
    "conv.norm_groups": Limit(int, 1, 1024),
    "conv.dconv_encoder": _BOOL,
    "conv.dconv_decoder": _BOOL,
    "conv.dconv_depth": Limit(int, 0, 16),
    "conv.dconv_compress": Limit(float, 0, 4096, open_low=True),
    "conv.dconv_dilate": _BOOL,
    "conv.dconv_init": _FINITE,
    "conv.freq_emb_weight": _FINITE,
    "conv.freq_emb_scale": Limit(float, 0, open_low=True),
    "conv.freq_emb_smooth": _BOOL,
    "conv.rescale": Limit(float, 0),
    "transformer.layers": Limit(int, 0, 64),
    "transformer.heads": Limit(int, 1, 1024),
    "transformer.hidden_scale": Limit(float, 0, 64, open_low=True),
    "transformer.dropout": Limit(float, 0, 0.999),
    "transformer.bottom_channels": Limit(int, 0, MAX_WIDTH),
    "transformer.norm_in": _BOOL,
    "transformer.norm_out": _BOOL,
    "transformer.layer_scale": _BOOL,
    "transformer.layer_scale_init": _FINITE,
    "transformer.gelu": _BOOL,
    "transformer.cross_first": _BOOL,
    "transformer.max_period": Limit(float, 0, open_low=True),
    "transformer.pos_embedding_weight": _FINITE,
}


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, on one line, for error messages."""
    try:
        text = repr(value)
    except Exception:  # a hostile object's repr: its type is enough
        text = f"<{type(value).__name__}>"
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show_number(value: float) -> str:
    """``value`` as ``:g`` writes it, or in full where that would round it (0.99999999 is
    not 1), for error messages."""
    text = f"{value:g}"
    return text if float(text) == value else repr(float(value))


def check_option(name: str, value: Any, limit: Limit) -> Any:
    """``value`` if it is what ``limit`` allows (an int as int, a real as float), else
    CheckpointError naming the option ``name``."""
    if limit.kind is bool:
        if isinstance(value, bool):
            return value
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except (OverflowError, ValueError, TypeError):
            number = math.inf
        whole = isinstance(value, numbers.Integral)
        if (whole or limit.kind is float) and math.isfinite(number):
            inside = number > limit.low if limit.open_low else number >= limit.low
            if inside and number <= limit.high:
                return int(number) if limit.kind is int else number  # exact: the bounds are small
    raise CheckpointError(f"option {name}={show(value)} must be {limit.describe()}")


def name_problem(name: Any, max_length: int = MAX_NAME_LENGTH) -> str | None:
    """Why ``name`` cannot name a file on its own (a stem, a model folder), or None when it
    can: it must be a non-empty string, not hidden, without path separators, control or
    invisible characters, or characters and names that some file systems reserve."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if len(name.encode("utf-8", "surrogatepass")) > max_length:
        # File systems count bytes: 100 four-byte characters were 400, past ext4's 255.
        return f"is longer than {max_length} bytes in UTF-8"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if name.startswith("."):
        return "starts with '.'"
    if any(
        unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") for char in name
    ):
        return "contains a control or invisible character"
    if _RESERVED_CHARACTERS & set(name):
        return 'contains one of <>:"|?*'
    if name != name.strip() or name.endswith("."):
        return "ends with '.' or starts or ends with white space"
    if name.split(".")[0].lower() in _RESERVED_NAMES:
        return "is a device name on Windows"
    return None


def check_sources(sources: Any) -> tuple[str, ...]:
    """The source names as a tuple: 1 to 64 plain names (see ``name_problem``), unique even
    where case or Unicode normalisation does not count (macOS, Windows). They become file
    names."""
    if isinstance(sources, (str, bytes)) or not isinstance(sources, (list, tuple)):
        raise CheckpointError(f"option sources={show(sources)} must be a list of names")
    if not 1 <= len(sources) <= MAX_SOURCES:
        raise CheckpointError(f"the model must have 1 to {MAX_SOURCES} sources, not {len(sources)}")
    seen: set[str] = set()
    for index, name in enumerate(sources):
        problem = name_problem(name)
        if problem is not None:
            raise CheckpointError(f"source name {show(name)} (sources[{index}]) {problem}")
        # "é" as one code point or as e + combining accent: one name where the file system
        # normalises (macOS), as are names differing in case.
        key = unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())
        if key in seen:
            raise CheckpointError(f"source name {show(name)} appears twice in the sources")
        seen.add(key)
    return tuple(sources)


def _segment_value(value: Any) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (numbers.Rational, float)):
        raise CheckpointError(f"option segment={show(value)} must be a number of seconds")
    if isinstance(value, float) and not math.isfinite(value):
        raise CheckpointError(f"option segment={show(value)} must be a finite number of seconds")
    segment = Fraction(value)
    if not 0 < segment <= MAX_SEGMENT_SECONDS:
        raise CheckpointError(
            f"option segment={show(value)} must be above 0 and at most "
            f"{MAX_SEGMENT_SECONDS} seconds"
        )
    return segment


def validate(config: HTDemucsConfig) -> None:
    """Reject values out of range and geometries this implementation cannot run, with the
    reason, before anything is built from ``config``."""
    for name, limit in LIMITS.items():
        group, _, key = name.rpartition(".")
        owner = getattr(config, group) if group else config
        check_option(name, getattr(owner, key), limit)
    _check_widths(config)
    _check_frequency_geometry(config)
    _check_transformer(config)
    length = config.segment_length
    if not config.stft.n_fft <= length <= MAX_SEGMENT_SAMPLES:
        raise UnsupportedOptionError(
            f"segment {show_number(float(config.segment))} s is {length} samples: it must "
            "hold at least one "
            f"window (nfft {config.stft.n_fft}) and at most {MAX_SEGMENT_SAMPLES} samples"
        )


def _check_widths(config: HTDemucsConfig) -> None:
    """Layer widths in range, GroupNorm groups that divide them, DConv branches not empty."""
    conv = config.conv
    widths = []
    for index in range(conv.depth):
        width = conv.layer_channels(index)
        if not 1 <= width <= MAX_WIDTH:
            raise UnsupportedOptionError(
                f"encoder {index} would be {width} channels wide (channels {conv.channels}, "
                f"growth {conv.growth:g}): it must be 1 to {MAX_WIDTH}"
            )
        widths.append(width)
    sources = len(config.sources)
    for index in range(conv.norm_starts, conv.depth):
        # The outermost decoder's norm sees every source of both branches' outer channels.
        outer = [config.audio_channels * sources, 2 * config.audio_channels * sources]
        for width in [widths[index], *(outer if index == 0 else [widths[index - 1]])]:
            if width % conv.norm_groups:
                raise UnsupportedOptionError(
                    f"norm_groups={conv.norm_groups} does not divide the {width} channels "
                    f"of layer {index}"
                )
    if (conv.dconv_encoder or conv.dconv_decoder) and conv.dconv_depth:
        for index, width in enumerate(widths):
            if int(width / conv.dconv_compress) < 1:
                raise UnsupportedOptionError(
                    f"dconv_compress={conv.dconv_compress:g} leaves no channel of the "
                    f"{width} of layer {index}"
                )


def _check_frequency_geometry(config: HTDemucsConfig) -> None:
    conv = config.conv
    if config.stft.n_fft % 4:
        raise UnsupportedOptionError(f"nfft={config.stft.n_fft} must be a multiple of 4")
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


def _check_transformer(config: HTDemucsConfig) -> None:
    tr = config.transformer
    if not tr.layers:
        return
    width = config.transformer_width
    if width % 4 or width < 4:
        raise UnsupportedOptionError(f"transformer width {width} must be a multiple of 4")
    if width % tr.heads:
        raise UnsupportedOptionError(
            f"transformer width {width} is not divisible by {tr.heads} heads"
        )
    hidden = int(width * tr.hidden_scale)
    if not 1 <= hidden <= MAX_HIDDEN:
        raise UnsupportedOptionError(
            f"transformer feed-forward width {hidden} (width {width} x hidden scale "
            f"{tr.hidden_scale:g}) must be 1 to {MAX_HIDDEN}"
        )


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


# The reference's keyword for each of our options.
_DEMUCS_NAMES = {
    "audio_channels": "audio_channels",
    "samplerate": "sample_rate",
    "use_train_segment": "use_train_segment",
    "nfft": "stft.n_fft",
    "channels": "conv.channels",
    "growth": "conv.growth",
    "depth": "conv.depth",
    "kernel_size": "conv.kernel_size",
    "stride": "conv.stride",
    "context_enc": "conv.context_encoder",
    "context": "conv.context_decoder",
    "rewrite": "conv.rewrite",
    "norm_starts": "conv.norm_starts",
    "norm_groups": "conv.norm_groups",
    "dconv_comp": "conv.dconv_compress",
    "dconv_init": "conv.dconv_init",
    "freq_emb": "conv.freq_emb_weight",
    "emb_scale": "conv.freq_emb_scale",
    "emb_smooth": "conv.freq_emb_smooth",
    "rescale": "conv.rescale",
    "t_layers": "transformer.layers",
    "t_heads": "transformer.heads",
    "t_hidden_scale": "transformer.hidden_scale",
    "t_dropout": "transformer.dropout",
    "bottom_channels": "transformer.bottom_channels",
    "t_norm_in": "transformer.norm_in",
    "t_norm_out": "transformer.norm_out",
    "t_layer_scale": "transformer.layer_scale",
    "t_gelu": "transformer.gelu",
    "t_cross_first": "transformer.cross_first",
    "t_max_period": "transformer.max_period",
    "t_weight_pos_embed": "transformer.pos_embedding_weight",
}
# Keywords whose None means "off" (0) in the reference.
_NONE_IS_ZERO = {"freq_emb", "rescale", "bottom_channels"}


def _plain(value: Any) -> bool:
    """None, a bool, number or string, or a list or tuple of those: what compares safely."""
    if value is None or type(value) in (bool, int, float, str):
        return True
    return type(value) in (list, tuple) and len(value) < 1000 and all(map(_plain, value))


def _same(value: Any, allowed: Any) -> bool:
    """``value == allowed`` for plain values, bool and int alike, list and tuple alike (an
    arbitrary object's __eq__, a tensor's say, is never called)."""
    if not _plain(value):
        return False
    families = [(bool, int), (list, tuple)]
    kin = any(type(value) in family and type(allowed) in family for family in families)
    if not kin and type(value) is not type(allowed):
        return False
    try:
        return bool(value == allowed)
    except Exception:  # nested values of other families
        return False


def _require(kw: Mapping[str, Any], key: str, allowed: Any, what: str) -> None:
    value = kw[key]
    choices = allowed if isinstance(allowed, tuple) else (allowed,)
    if not any(_same(value, choice) for choice in choices):
        raise UnsupportedOptionError(
            f"checkpoint option {key}={show(value)} ({what}) is not supported"
        )


def from_demucs_kwargs(sources: Any, kwargs: Mapping[str, Any]) -> HTDemucsConfig:
    """Build our config from the keywords of ``demucs.htdemucs.HTDemucs``.

    Unknown keywords (training-only extras of other versions) are ignored; options that change
    the computation in a way we do not implement raise UnsupportedOptionError naming them;
    values of the wrong type or out of range raise CheckpointError naming them.
    """
    if not all(isinstance(key, str) for key in kwargs):
        raise CheckpointError("the constructor keywords are not all names")
    unknown = sorted(set(kwargs) - set(REFERENCE_DEFAULTS) - {"sources"})
    if unknown:
        logger.info("ignoring unknown checkpoint options: %s", show(", ".join(unknown), 200))
    kw = {**REFERENCE_DEFAULTS, **{k: v for k, v in kwargs.items() if k in REFERENCE_DEFAULTS}}

    _require(kw, "cac", True, "spectrogram output as masks instead of complex as channels")
    _require(kw, "wiener_iters", 0, "Wiener filtering iterations")
    _require(kw, "end_iters", 0, "Wiener filtering iterations in training")
    _require(kw, "multi_freqs", (None, [], ()), "frequency bands split with MultiWrap")
    if not (_same(kw["channels_time"], None) or _same(kw["channels_time"], kw["channels"])):
        _require(kw, "channels_time", None, "a different width for the time branch")
    _require(kw, "t_emb", "sin", "positional embedding other than sinusoidal (CAPE, learned)")
    _require(kw, "t_sparse_self_attn", False, "sparse self-attention")
    _require(kw, "t_sparse_cross_attn", False, "sparse cross-attention")
    _require(kw, "t_group_norm", (False, 0), "GroupNorm instead of LayerNorm inside layers")
    _require(kw, "t_norm_first", True, "post-norm transformer layers")
    _require(kw, "t_sin_random_shift", 0, "random shift of positional embeddings")
    if _same(kw["t_norm_in"], False):
        _require(kw, "t_norm_in_group", (False, 0), "GroupNorm at the transformer input")
    dconv_mode = check_option("dconv_mode", kw["dconv_mode"], Limit(int, 0, 3))
    dconv_depth = check_option("dconv_depth", kw["dconv_depth"], Limit(int, -16, 16))
    ignored = sorted(
        k for k in _IGNORED if k in kwargs and not _same(kwargs[k], REFERENCE_DEFAULTS[k])
    )
    if ignored:
        logger.debug("training-only options ignored: %s", ", ".join(ignored))

    values: dict[str, Any] = {}
    for key, name in _DEMUCS_NAMES.items():
        value = kw[key]
        if key in _NONE_IS_ZERO and value is None:
            value = 0
        limit = LIMITS[name]
        # The reference takes any truthy value for its switches: 0 and 1 mean off and on.
        if limit.kind is bool and type(value) is int and value in (0, 1):
            value = bool(value)
        values[name] = check_option(key, value, limit)
    segment = kw["segment"]
    if not isinstance(segment, (numbers.Rational, float)) or isinstance(segment, bool):
        raise CheckpointError(f"option segment={show(segment)} must be a number of seconds")

    def group(prefix: str) -> dict[str, Any]:
        return {
            name.split(".", 1)[1]: value
            for name, value in values.items()
            if name.startswith(prefix + ".")
        }

    return HTDemucsConfig(
        sources=check_sources(sources),
        audio_channels=values["audio_channels"],
        sample_rate=values["sample_rate"],
        segment=_segment_value(segment),
        use_train_segment=values["use_train_segment"],
        stft=STFTConfig(**group("stft")),
        conv=ConvConfig(
            **group("conv"),
            dconv_encoder=bool(dconv_mode & 1),
            dconv_decoder=bool(dconv_mode & 2),
            dconv_depth=abs(dconv_depth),
            dconv_dilate=dconv_depth > 0,
        ),
        transformer=TransformerConfig(**group("transformer")),
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


def config_from_dict(data: Any) -> HTDemucsConfig:
    """The inverse of ``config_to_dict``; CheckpointError names what does not fit."""
    if not isinstance(data, Mapping):
        raise CheckpointError(f"the config is a {type(data).__name__}, not a mapping")
    data = dict(data)
    groups: dict[str, type] = {
        "stft": STFTConfig,
        "conv": ConvConfig,
        "transformer": TransformerConfig,
    }
    known = {item.name for item in dataclasses.fields(HTDemucsConfig)}
    _refuse_unknown(data, known, "")
    if "sources" not in data:
        raise CheckpointError("the config does not name its sources")
    segment = data.pop("segment", None)
    parts = {}
    for name, klass in groups.items():
        values = data.pop(name, {})
        if not isinstance(values, Mapping):
            raise CheckpointError(f"option {name} must be a mapping, not {show(values)}")
        _refuse_unknown(values, {item.name for item in dataclasses.fields(klass)}, name + ".")
        parts[name] = klass(**values)
    return HTDemucsConfig(segment=_fraction_from_dict(segment), **data, **parts)


def _refuse_unknown(values: Mapping[Any, Any], known: set[str], prefix: str) -> None:
    unknown = [key for key in values if key not in known]
    if unknown:
        names = [
            prefix + (key if isinstance(key, str) and key.isprintable() else show(key))[:40]
            for key in unknown[:4]
        ]
        more = f" (+{len(unknown) - 4} more)" if len(unknown) > 4 else ""
        plural = "s" if len(unknown) > 1 else ""
        raise CheckpointError(
            f"invalid option{plural} {', '.join(names)}{more}: not in htsep's config"
        )


def _fraction_from_dict(value: Any) -> Fraction:
    """{"numerator": n, "denominator": d}, both integers, d positive."""
    if isinstance(value, Mapping) and set(value) == {"numerator", "denominator"}:
        numerator, denominator = value["numerator"], value["denominator"]
        if all(type(part) is int for part in (numerator, denominator)) and denominator > 0:
            return Fraction(numerator, denominator)
    raise CheckpointError(
        f"option segment={show(value)} must be {{numerator, denominator}} with integers, "
        "the denominator positive"
    )
