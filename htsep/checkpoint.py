"""Checkpoint formats: reading demucs's files safely, and reading and writing our own.

Formats understood by ``load_model``:

- demucs ``.th`` files (``torch.save`` of a dict with a pickled class reference, constructor
  keywords and a float16 state). Read with ``torch.load(weights_only=True)``: the demucs class
  names resolve to inert markers of ours, so a checkpoint can never run code.
- demucs's Hugging Face ``.safetensors`` files: tensors plus JSON ``klass``/``args``/``kwargs``
  metadata.
- htsep's own ``.safetensors`` files: tensors under our parameter names plus our config as
  JSON metadata (``format: htsep``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from htsep.errors import CheckpointError, UnsupportedOptionError
from htsep.files import atomic_output
from htsep.model.config import (
    HTDemucsConfig,
    config_from_dict,
    config_to_dict,
    from_demucs_kwargs,
)
from htsep.model.htdemucs import HTDemucs

FORMAT_NAME = "htsep"
FORMAT_VERSION = "1"
DEMUCS_CLASS = "demucs.htdemucs.HTDemucs"


class DemucsClassRef:
    """Stands in for a demucs model class named in a pickle; never instantiated or called."""

    name: str = ""


def _class_ref(name: str) -> type[DemucsClassRef]:
    return type(name.rsplit(".", 1)[1] + "Ref", (DemucsClassRef,), {"name": name})


# Model classes demucs has pickled into its checkpoints; only the first is supported, the others
# are recognised so that the error can name them.
_DEMUCS_CLASSES = {
    name: _class_ref(name)
    for name in (
        DEMUCS_CLASS,
        "demucs.hdemucs.HDemucs",
        "demucs.demucs.Demucs",
        "demucs.wdemucs.WDemucs",
    )
}


def _numpy_scalar_globals() -> list[Any]:
    """What numpy scalars in a ``metrics`` entry pickle as: reconstructing them runs no code."""
    core = getattr(np, "_core", None) or np.core
    names: list[Any] = [core.multiarray.scalar, np.dtype]
    names += [type(np.dtype(kind)) for kind in ("f2", "f4", "f8", "i4", "i8", "u1", "?")]
    return names


def _allowed_globals() -> list[Any]:
    return [
        *((ref, name) for name, ref in _DEMUCS_CLASSES.items()),
        Fraction,
        *_numpy_scalar_globals(),
    ]


# --- reading -----------------------------------------------------------------------------------


def load_model(source: str | os.PathLike[str]) -> HTDemucs:
    """Load an HT Demucs checkpoint of any supported format, in eval mode on the CPU."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if _is_safetensors(head):
        config, state, translate = _read_safetensors(path)
    elif head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        config, state, translate = _read_torch_package(path)
    else:
        raise CheckpointError(f"{path}: not a checkpoint (neither a torch file nor safetensors)")
    model = HTDemucs(config)
    _load_state(model, state, translate, path)
    return model.eval()


def _is_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{"


def _read_torch_package(path: Path) -> tuple[HTDemucsConfig, dict[str, torch.Tensor], Callable]:
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            package = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = (
            f"asks to run {match.group(1)}, which is not a model class htsep knows"
            if match
            else "holds objects other than plain data and tensors"
        )
        raise CheckpointError(
            f"{path}: refusing to load: the file {what} (loading never "
            "executes code from a checkpoint)"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path}: unreadable or truncated checkpoint ({_first_line(exc)})"
        ) from exc

    if not isinstance(package, dict) or not {"klass", "kwargs", "state"} <= set(package):
        raise CheckpointError(f"{path}: not a demucs model package (no klass/kwargs/state)")
    klass = package["klass"]
    if not (isinstance(klass, type) and issubclass(klass, DemucsClassRef)):
        raise CheckpointError(f"{path}: the model class is not a demucs class: {klass!r}")
    if klass.name != DEMUCS_CLASS:
        raise UnsupportedOptionError(
            f"{path}: model class {klass.name} is not supported (only {DEMUCS_CLASS})"
        )
    state = package["state"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the model state is not a dict of tensors")
    config = _demucs_config(package.get("args") or (), package["kwargs"], path)
    return config, state, _demucs_translator(config)


def _read_safetensors(path: Path) -> tuple[HTDemucsConfig, dict[str, torch.Tensor], Callable]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: unreadable or truncated safetensors file ({_first_line(exc)})"
        ) from exc

    if metadata.get("format") == FORMAT_NAME:
        version = metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: htsep format version {version!r} is not supported "
                f"by this htsep (expects {FORMAT_VERSION})"
            )
        try:
            config = config_from_dict(json.loads(metadata["config"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed htsep config metadata ({exc})") from exc
        return config, state, lambda key: key

    if "klass" not in metadata:
        raise CheckpointError(
            f"{path}: safetensors file without model metadata "
            "(neither htsep's 'config' nor demucs's 'klass')"
        )
    if metadata["klass"] != DEMUCS_CLASS:
        raise UnsupportedOptionError(
            f"{path}: model class {metadata['klass']} is not supported (only {DEMUCS_CLASS})"
        )
    if "structure" in metadata:
        raise UnsupportedOptionError(f"{path}: quantized (packed) demucs states are not supported")
    try:
        args = _decode_demucs_json(json.loads(metadata.get("args", "[]")))
        kwargs = _decode_demucs_json(json.loads(metadata["kwargs"]))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed demucs metadata ({exc})") from exc
    config = _demucs_config(args, kwargs, path)
    return config, state, _demucs_translator(config)


def _decode_demucs_json(value: Any) -> Any:
    """demucs writes fractions as {"_type": "fraction", "numerator": n, "denominator": d}."""
    if isinstance(value, dict):
        if value.get("_type") == "fraction":
            return Fraction(value["numerator"], value["denominator"])
        return {key: _decode_demucs_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode_demucs_json(item) for item in value]
    return value


def _demucs_config(args: Any, kwargs: Any, path: Path) -> HTDemucsConfig:
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{path}: constructor keywords are not a mapping")
    kwargs = dict(kwargs)
    sources = kwargs.pop("sources", None)
    if sources is None and args:
        sources = args[0]
    if not sources:
        raise CheckpointError(f"{path}: the checkpoint does not name its sources")
    try:
        return from_demucs_kwargs(sources, kwargs)
    except UnsupportedOptionError as exc:
        raise UnsupportedOptionError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model settings ({exc})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- demucs parameter names -> ours ------------------------------------------------------------

_UNET_RULES = [
    (r"^encoder\.", "freq_encoders."),
    (r"^tencoder\.", "time_encoders."),
    (r"^decoder\.", "freq_decoders."),
    (r"^tdecoder\.", "time_decoders."),
    (r"\.dconv\.layers\.(\d+)\.0\.", r".dconv.branches.\1.conv_in."),
    (r"\.dconv\.layers\.(\d+)\.1\.", r".dconv.branches.\1.norm_in."),
    (r"\.dconv\.layers\.(\d+)\.3\.", r".dconv.branches.\1.conv_out."),
    (r"\.dconv\.layers\.(\d+)\.4\.", r".dconv.branches.\1.norm_out."),
    (r"\.dconv\.layers\.(\d+)\.6\.scale$", r".dconv.branches.\1.scale"),
    (r"\.conv_tr\.", ".conv_transpose."),
    (r"^freq_emb\.embedding\.", "freq_embedding."),
    (r"^channel_upsampler\.", "bottleneck.freq_in."),
    (r"^channel_downsampler\.", "bottleneck.freq_out."),
    (r"^channel_upsampler_t\.", "bottleneck.time_in."),
    (r"^channel_downsampler_t\.", "bottleneck.time_out."),
    (r"^crosstransformer\.norm_in\.", "transformer.freq_norm_in."),
    (r"^crosstransformer\.norm_in_t\.", "transformer.time_norm_in."),
    (r"^crosstransformer\.layers\.", "transformer.freq_layers."),
    (r"^crosstransformer\.layers_t\.", "transformer.time_layers."),
    (r"\.(self|cross)_attn\.in_proj_(weight|bias)$", r".attention.in_proj.\2"),
    (r"\.(self|cross)_attn\.out_proj\.", ".attention.out_proj."),
    (r"\.linear1\.", ".feedforward_in."),
    (r"\.linear2\.", ".feedforward_out."),
    (r"\.gamma_1\.scale$", ".attention_scale"),
    (r"\.gamma_2\.scale$", ".feedforward_scale"),
    (r"^(transformer\.\w+_layers\.\d+)\.norm_out\.", r"\1.output_norm."),
]

# The reference numbers its norms by position: which one is which depends on the layer.
_NORM_NAMES = {
    "encoders": {"norm1": "norm", "norm2": "rewrite_norm"},
    "decoders": {"norm1": "rewrite_norm", "norm2": "norm"},
    "self": {"norm1": "attention_norm", "norm2": "feedforward_norm"},
    "cross": {"norm1": "attention_norm", "norm2": "context_norm", "norm3": "feedforward_norm"},
}


def _demucs_translator(config: HTDemucsConfig) -> Callable[[str], str]:
    first_cross = 0 if config.transformer.cross_first else 1

    def translate(key: str) -> str:
        new = key
        for pattern, replacement in _UNET_RULES:
            new = re.sub(pattern, replacement, new)
        match = re.match(r"^(freq|time)_(encoders|decoders)\.\d+\.(norm[12])\.", new)
        if match:
            kind, norm = match.group(2), match.group(3)
            return new.replace(f".{norm}.", f".{_NORM_NAMES[kind][norm]}.", 1)
        match = re.match(r"^transformer\.(freq|time)_layers\.(\d+)\.(norm[123])\.", new)
        if match:
            kind = "cross" if int(match.group(2)) % 2 == first_cross else "self"
            norm = match.group(3)
            if norm in _NORM_NAMES[kind]:
                return new.replace(f".{norm}.", f".{_NORM_NAMES[kind][norm]}.", 1)
        return new

    return translate


def _describe(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _load_state(
    model: HTDemucs, state: Mapping[str, Any], translate: Callable[[str], str], path: Path
) -> None:
    """Copy ``state`` into ``model``; every tensor must be there, known, and the right shape."""
    if state.get("__quantized"):
        raise UnsupportedOptionError(f"{path}: quantized (diffq) demucs states are not supported")
    ours = model.state_dict()
    renamed: dict[str, Any] = {}
    for key, value in state.items():
        renamed[translate(key)] = (key, value)
    missing = sorted(set(ours) - set(renamed))
    unexpected = sorted(original for new, (original, _) in renamed.items() if new not in ours)
    wrong = []
    for new, (original, value) in renamed.items():
        if new in ours and (not isinstance(value, torch.Tensor) or value.shape != ours[new].shape):
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            wrong.append(f"{original} (file {got}, model {list(ours[new].shape)})")
    problems = []
    if missing:
        problems.append(f"missing tensors: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_describe(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_describe(sorted(wrong))}")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not fit its model: " + "; ".join(problems))
    with torch.no_grad():
        for new, (_, value) in renamed.items():
            ours[new].copy_(value.to(ours[new].dtype))


# --- writing -----------------------------------------------------------------------------------


def save_model(
    model: HTDemucs, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``model`` in htsep's safetensors format, atomically (temporary file, then rename)."""
    path = Path(path)
    tensors = {
        key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()
    }
    info = {
        **(metadata or {}),
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config_to_dict(model.config)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temporary:
        save_file(tensors, temporary, metadata=info)
    return path
