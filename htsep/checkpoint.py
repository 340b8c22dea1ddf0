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
import stat
import struct
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save, save_file

from htsep.errors import CheckpointError, HtsepError, UnsupportedOptionError, UsageError
from htsep.files import atomic_output, kind_of, make_folder
from htsep.model.config import (
    HTDemucsConfig,
    config_from_dict,
    config_to_dict,
    from_demucs_kwargs,
    show,
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
    """What numpy scalars in a ``metrics`` entry pickle as: ``numpy.dtype(code, ...)``, its
    state, then ``scalar(dtype, bytes)``. Both are taken through guards: numpy would build any
    dtype (a ('f8', (10000, 10000)) subarray, a 2-GB void) and ``scalar`` allocate it whole, so
    a 1-kB file could ask for gigabytes before any check of its contents."""
    guarded: list[Any] = [(_pickled_dtype, "numpy.dtype")]
    guarded += [(_pickled_scalar, f"{module}.multiarray.scalar") for module in _NUMPY_CORES]
    return guarded + [type(np.dtype(kind)) for kind in ("f2", "f4", "f8", "i4", "i8", "u1", "?")]


_NUMPY_CORES = ("numpy._core", "numpy.core")  # numpy 2 and numpy 1 name the module so
# A numeric dtype's code: "f8", "<i4", "?", "b1", "u1", "c16", ...
_NUMPY_CODE = re.compile(r"[<>|=]?(\?|[biufc]\d{1,2})")


def _pickled_dtype(code: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """``numpy.dtype(code, align, copy)`` for a plain numeric type code only."""
    if type(code) is not str or not _NUMPY_CODE.fullmatch(code):
        raise _UnsafeValue(f"a numpy dtype of {show(code)} (only plain numeric types are accepted)")
    return np.dtype(code, bool(align), bool(copy))


def _pickled_scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's scalar reconstruction, for a numeric dtype of at most 16 bytes given its bytes."""
    core = getattr(np, "_core", None) or np.core
    numeric = isinstance(dtype, np.dtype) and dtype.kind in "biufc" and dtype.subdtype is None
    if not (numeric and dtype.fields is None and dtype.itemsize <= 16):
        raise _UnsafeValue(f"a numpy scalar of {show(dtype)} (only plain numbers are accepted)")
    if type(data) is not bytes or len(data) != dtype.itemsize:
        raise _UnsafeValue(f"a numpy scalar of {dtype} without its {dtype.itemsize} bytes")
    return core.multiarray.scalar(dtype, data)


class _UnsafeValue(Exception):
    """Raised while unpickling: a value that is allowed in kind but not in size."""


# Digits an integer of a pickled fraction may have: a segment needs a handful.
_FRACTION_DIGITS = 30


def _pickled_fraction(*args: Any) -> Fraction:
    """What a pickle's ``fractions.Fraction(...)`` calls: only small integers, since Fraction
    of a string such as '1e999999999' would compute a billion-digit number."""
    small = all(type(arg) is int and abs(arg) < 10**_FRACTION_DIGITS for arg in args)
    if small and 1 <= len(args) <= 2 and args[1:] != (0,):
        return Fraction(*args)
    raise _UnsafeValue(f"a fraction of {show(args)} (only small integers are accepted)")


def _allowed_globals() -> list[Any]:
    return [
        *((ref, name) for name, ref in _DEMUCS_CLASSES.items()),
        (_pickled_fraction, "fractions.Fraction"),
        *_numpy_scalar_globals(),
    ]


# --- reading -----------------------------------------------------------------------------------

# The most parameters a checkpoint may ask for (8 GB in float32; the released models have 42M).
MAX_PARAMETERS = 2_000_000_000
# Nesting of demucs's JSON metadata: a few levels are needed.
_MAX_JSON_DEPTH = 32
# What a hostile file can raise deep inside the parsers; all of it means "malformed".
_MALFORMED = (
    KeyError,
    TypeError,
    ValueError,
    AttributeError,
    IndexError,
    LookupError,
    OverflowError,
    ZeroDivisionError,
    RecursionError,
    MemoryError,
    RuntimeError,
    EOFError,
    struct.error,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    UnicodeError,
    SafetensorError,
)


def load_model(source: str | os.PathLike[str]) -> HTDemucs:
    """Load an HT Demucs checkpoint of any supported format, in eval mode on the CPU.

    ``source`` is a file, or the name of a single-network model of the registry
    (``htsep-tiny``, ``htdemucs``, a member's signature), fetched like ``htsep separate -n``.

    The file is untrusted data: anything wrong with it (unsafe pickles, malformed metadata,
    settings out of range, source names that are not plain file names, tensors that do not
    fit or hold NaN) raises CheckpointError naming the file, never another exception.
    """
    from htsep import zoo
    from htsep.audio import file_name

    given = source
    source = file_name(source, "checkpoint")
    if not isinstance(source, str) or isinstance(given, os.PathLike):
        # A Path is a file whatever its name: Path("./mymodel") is Path("mymodel").
        path = Path(source)
    elif zoo.names_a_file(source):
        path = zoo.expand_user(source)
    else:  # a model's name, as `htsep separate -n` takes it, whatever files are here
        path = _named_model_file(source)
    head = _read_head(path)
    try:
        if _is_safetensors(head):
            config, state, translate = _read_safetensors(path)
        elif head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            config, state, translate = _read_torch_package(path)
        else:
            raise CheckpointError(
                f"{path}: not a checkpoint (neither a torch file nor safetensors)"
            )
        return _build(config, state, translate, path)
    except HtsepError:
        raise
    except _MALFORMED as exc:
        raise CheckpointError(
            f"{path}: malformed checkpoint ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc


def _read_head(path: Path) -> bytes:
    """The first bytes of ``path``, which must be a regular file (or a link to one): a FIFO
    or a device is refused from its status, without opening it for reading."""
    try:
        status = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read ({_reason(exc)})") from exc
    if stat.S_ISDIR(status.st_mode):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not stat.S_ISREG(status.st_mode):
        raise CheckpointError(f"{path}: is {kind_of(status.st_mode)}, not a checkpoint file")
    try:
        # Non-blocking, and checked again once open: the name may have changed hands meanwhile.
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({_reason(exc)})") from exc
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise CheckpointError(f"{path}: is not a regular file, not a checkpoint file")
        return os.read(handle, 16)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({_reason(exc)})") from exc
    finally:
        os.close(handle)


def _reason(exc: BaseException) -> str:
    return (isinstance(exc, OSError) and exc.strerror) or _first_line(exc)


def _named_model_file(name: str) -> Path:
    """The checkpoint file of a registry model with one network (downloaded if need be)."""
    from htsep import zoo

    spec = zoo.find_model(name)
    if len(spec.members) != 1:
        raise CheckpointError(
            f"{name}: a bag of {len(spec.members)} networks, not one checkpoint "
            "(use htsep.Separator for bags)"
        )
    return zoo.fetch(spec.members[0], progress=False)


def _is_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{"


def _inflated_size(path: Path) -> int | None:
    """The bytes a torch zip checkpoint's records take once read, where they are more than
    twice the file's own size (torch.save stores records uncompressed; a compressed one is
    inflated whole whatever its size, so a 1-MB file of zeros could take gigabytes), else None."""
    try:
        size = path.stat().st_size
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
        return None  # torch.load will name the damage
    return declared if declared > 2 * size + (1 << 20) else None


# torch.load takes its allow-list from a process-wide registry only, and the warnings filters
# are process-wide too: loads in several threads take turns through this lock, or one thread's
# exit would drop the other's allowed globals and leave the host's warnings silenced.
_UNPICKLING = threading.Lock()


@contextmanager
def _unpickling_allowed(allowed: list[Any]) -> Iterator[None]:
    """``allowed`` registered with torch's weights-only unpickler, and warnings off, for one
    load at a time. Entries the host registered itself stay registered afterwards. Warnings
    torch gives about a file's contents (a sparse tensor's invariants, ...) would reach the
    terminal before htsep's one line about it."""
    with _UNPICKLING:
        registered = torch.serialization.get_safe_globals()
        added = [entry for entry in allowed if entry not in registered]
        with torch.serialization.safe_globals(added), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield


def _read_torch_package(path: Path) -> tuple[HTDemucsConfig, dict[str, torch.Tensor], Callable]:
    inflated = _inflated_size(path)
    if inflated is not None:
        raise CheckpointError(
            f"{path}: refusing to load: its compressed records would take {inflated} bytes "
            f"from a file of {path.stat().st_size} (torch.save writes them uncompressed)"
        )
    try:
        with _unpickling_allowed(_allowed_globals()):
            package = torch.load(path, map_location="cpu", weights_only=True)
    except _UnsafeValue as exc:
        raise CheckpointError(f"{path}: refusing to load: the file holds {exc}") from None
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
    except _MALFORMED + (OSError,) as exc:
        raise CheckpointError(
            f"{path}: unreadable or truncated checkpoint ({_first_line(exc)})"
        ) from exc

    if not isinstance(package, dict) or not {"klass", "kwargs", "state"} <= set(package):
        raise CheckpointError(f"{path}: not a demucs model package (no klass/kwargs/state)")
    klass = package["klass"]
    if not (isinstance(klass, type) and issubclass(klass, DemucsClassRef)):
        raise CheckpointError(f"{path}: the model class is not a demucs class: {show(klass)}")
    if klass.name != DEMUCS_CLASS:
        raise UnsupportedOptionError(
            f"{path}: model class {klass.name} is not supported (only {DEMUCS_CLASS})"
        )
    state = package["state"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the model state is not a dict of tensors")
    config = _demucs_config(package.get("args") or (), package["kwargs"], path)
    return config, state, _demucs_translator(config)


def _is_utf8(path: str | os.PathLike[str]) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@contextmanager
def _utf8_name(path: str | os.PathLike[str], flags: int) -> Iterator[str]:
    """A name of ``path`` that safetensors, which takes UTF-8 names only, can open: the path
    itself, or for a path that is not UTF-8 (file names are bytes) /dev/fd/N of a descriptor
    opened here with ``flags``."""
    if _is_utf8(path):
        yield os.fsdecode(path)
        return
    handle = os.open(path, flags)
    try:
        yield f"/dev/fd/{handle}"
    finally:
        os.close(handle)


def _read_safetensors(path: Path) -> tuple[HTDemucsConfig, dict[str, torch.Tensor], Callable]:
    try:
        with _utf8_name(path, os.O_RDONLY) as name:
            with safe_open(name, framework="pt") as handle:
                metadata = handle.metadata() or {}
            state = load_file(name)
    except _MALFORMED + (OSError,) as exc:
        raise CheckpointError(
            f"{path}: unreadable or truncated safetensors file ({_first_line(exc)})"
        ) from exc

    if metadata.get("format") == FORMAT_NAME:
        version = metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: htsep format version {show(version)} is not supported "
                f"by this htsep (expects {FORMAT_VERSION})"
            )
        if "config" not in metadata:
            raise CheckpointError(f"{path}: htsep file without its 'config' metadata")
        data = _json(metadata["config"], "config", path)
        try:
            config = config_from_dict(data)
        except CheckpointError as exc:
            raise type(exc)(f"{path}: {exc}") from None
        return config, state, lambda key: key

    if "klass" not in metadata:
        raise CheckpointError(
            f"{path}: safetensors file without model metadata "
            "(neither htsep's 'config' nor demucs's 'klass')"
        )
    if metadata["klass"] != DEMUCS_CLASS:
        raise UnsupportedOptionError(
            f"{path}: model class {show(metadata['klass'])} is not supported (only {DEMUCS_CLASS})"
        )
    if "structure" in metadata:
        raise UnsupportedOptionError(f"{path}: quantized (packed) demucs states are not supported")
    if "kwargs" not in metadata:
        raise CheckpointError(f"{path}: demucs metadata without 'kwargs'")
    args = _decode_demucs_json(_json(metadata.get("args", "[]"), "args", path), path)
    kwargs = _decode_demucs_json(_json(metadata["kwargs"], "kwargs", path), path)
    config = _demucs_config(args, kwargs, path)
    return config, state, _demucs_translator(config)


class _RepeatedKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (json.loads keeps a repeated key's last
    value without a word, so one file could read two ways)."""
    found: dict[str, Any] = {}
    for name, value in pairs:
        if name in found:
            raise _RepeatedKey(f"the key {show(name)} is given twice")
        found[name] = value
    return found


def _json(text: str, key: str, path: Path) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except _RepeatedKey as exc:
        raise CheckpointError(f"{path}: metadata '{key}': {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{path}: metadata '{key}' is not valid JSON ({_first_line(exc)})"
        ) from None


def _decode_demucs_json(value: Any, path: Path, depth: int = 0) -> Any:
    """demucs writes fractions as {"_type": "fraction", "numerator": n, "denominator": d}."""
    if depth > _MAX_JSON_DEPTH:
        raise CheckpointError(f"{path}: demucs metadata nested too deeply")
    if isinstance(value, dict):
        if value.get("_type") == "fraction":
            try:
                return _pickled_fraction(value.get("numerator"), value.get("denominator"))
            except _UnsafeValue as exc:
                raise CheckpointError(f"{path}: demucs metadata holds {exc}") from None
        return {key: _decode_demucs_json(item, path, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode_demucs_json(item, path, depth + 1) for item in value]
    return value


def _demucs_config(args: Any, kwargs: Any, path: Path) -> HTDemucsConfig:
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{path}: constructor keywords are not a mapping")
    if not isinstance(args, (list, tuple)):
        raise CheckpointError(f"{path}: constructor arguments are not a list")
    kwargs = dict(kwargs)
    sources = kwargs.pop("sources", None)
    if sources is None and args:
        sources = args[0]
    if sources is None:
        raise CheckpointError(f"{path}: the checkpoint does not name its sources")
    try:
        return from_demucs_kwargs(sources, kwargs)
    except CheckpointError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    return text[0] if len(text[0]) <= 200 else text[0][:197] + "..."


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


def _build(
    config: HTDemucsConfig,
    state: Mapping[Any, Any],
    translate: Callable[[str], str],
    path: Path,
) -> HTDemucs:
    """The model of ``config`` holding ``state``. It is first built without memory (on the meta
    device): only once the file's tensors are known to fit it is memory allocated, so a small
    file describing a huge model costs nothing."""
    with torch.device("meta"):
        model = HTDemucs(config)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    if parameters > MAX_PARAMETERS:
        raise UnsupportedOptionError(
            f"{path}: the model would have {parameters:,} parameters, more than htsep "
            f"loads ({MAX_PARAMETERS:,})"
        )
    renamed = _fit_state(model, state, translate, path)
    _allocate(model)
    ours = model.state_dict()
    with torch.no_grad():
        for new, value in renamed.items():
            ours[new].copy_(value.to(ours[new].dtype))
    return model.eval()


def _allocate(model: torch.nn.Module) -> None:
    """Give every parameter and buffer of a model built on the meta device uninitialized memory
    on the CPU, in place. (``Module.to_empty`` does the same, but its first call imports sympy,
    0.4 s of every start.)"""
    for module in model.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None:
                empty = torch.empty(parameter.shape, dtype=parameter.dtype)
                module._parameters[name] = torch.nn.Parameter(empty, parameter.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)


def _fit_state(
    model: HTDemucs, state: Mapping[Any, Any], translate: Callable[[str], str], path: Path
) -> dict[str, torch.Tensor]:
    """``state`` under our names; every tensor must be there, known, the right shape, of a
    floating-point type, and finite. -> our name: tensor"""
    if "__quantized" in state:
        raise UnsupportedOptionError(f"{path}: quantized (diffq) demucs states are not supported")
    names = [key for key in state if not isinstance(key, str)]
    if names:
        raise CheckpointError(f"{path}: tensor names must be strings, not {show(names[0])}")
    ours = model.state_dict()
    renamed: dict[str, tuple[str, Any]] = {}
    for key, value in state.items():
        new = translate(key)
        if new in renamed:  # demucs's name and ours for one tensor: which one is meant?
            first = renamed[new][0]
            raise CheckpointError(
                f"{path}: tensors {_label(first)} and {_label(key)} are both {_label(new)}"
            )
        renamed[new] = (key, value)
    missing = sorted(set(ours) - set(renamed))
    unexpected = sorted(original for new, (original, _) in renamed.items() if new not in ours)
    wrong = []
    for new, (original, value) in renamed.items():
        if new in ours and (not _dense(value) or value.shape != ours[new].shape):
            got = list(value.shape) if _dense(value) else type(value).__name__
            wrong.append(f"{_label(original)} (file {got}, model {list(ours[new].shape)})")
    problems = []
    if missing:
        problems.append(f"missing tensors: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_describe([_label(n) for n in unexpected])}")
    if wrong:
        problems.append(f"wrong shapes: {_describe(sorted(wrong))}")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not fit its model: " + "; ".join(problems))
    for new, (original, value) in renamed.items():
        if not value.is_floating_point():
            dtype = str(value.dtype).removeprefix("torch.")
            raise CheckpointError(
                f"{path}: tensor {_label(original)} holds {dtype}, not floating-point numbers"
            )
        # Checked as the model will hold it: float64 values past float32's range become
        # infinite there.
        if not bool(torch.isfinite(value.to(ours[new].dtype)).all()):
            raise CheckpointError(
                f"{path}: tensor {_label(original)} holds NaN or infinite values"
                + ("" if value.dtype == ours[new].dtype else f" as {ours[new].dtype}")
            )
    return {new: value for new, (_, value) in renamed.items()}


def _label(name: str) -> str:
    """A tensor name for a message: as it is, or quoted and cut when it would not print
    plainly on one line."""
    return name if name.isprintable() and len(name) <= 80 else show(name, 80)


def _dense(value: Any) -> bool:
    """A plain tensor: strided (not sparse), not quantized, not a tensor on another device."""
    return (
        isinstance(value, torch.Tensor)
        and value.layout == torch.strided
        and not value.is_quantized
        and value.device.type == "cpu"
    )


# --- writing -----------------------------------------------------------------------------------


def save_model(
    model: HTDemucs, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``model`` in htsep's safetensors format, atomically (temporary file, then rename).
    Wrong arguments raise UsageError; a path that cannot be written, CheckpointError."""
    from htsep.audio import file_name

    path = Path(file_name(path, "output checkpoint"))
    if not isinstance(model, HTDemucs):
        raise UsageError(f"model must be an htsep HTDemucs, not {type(model).__name__}")
    if metadata is not None and not (
        isinstance(metadata, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise UsageError("metadata must map strings to strings")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a file to write")
    state = model.state_dict()
    on_meta = next((key for key, value in state.items() if value.is_meta), None)
    if on_meta is not None:  # no values to write
        raise UsageError(f"the model's {on_meta} is on the meta device: it has no values")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    # load_model refuses such weights: a file it cannot load is not written.
    spoiled = next(
        (key for key, value in tensors.items()
         if value.is_floating_point() and not bool(torch.isfinite(value).all())),
        None,
    )  # fmt: skip
    if spoiled is not None:
        raise CheckpointError(f"{path}: the model's {spoiled} holds NaN or infinite values")
    info = {
        **(metadata or {}),
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config_to_dict(model.config)),
    }
    try:
        make_folder(path.parent)
        with atomic_output(path) as temporary:
            if _is_utf8(temporary):
                save_file(tensors, temporary, metadata=info)
            else:  # safetensors takes UTF-8 names only: the bytes, written by us
                temporary.write_bytes(save(tensors, metadata=info))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write it: {exc.strerror or exc}") from None
    return path
