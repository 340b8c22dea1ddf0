import copy
import json
import math
import os
import shutil
import threading
import time
import warnings
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from demucs.hdemucs import HDemucs as ReferenceHDemucs
from demucs.hf import load_safetensors_model
from demucs.states import serialize_model
from helpers import htsep as htsep_separate
from helpers import write_clip
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import htsep
import reference
from htsep.checkpoint import save_model
from htsep.errors import CheckpointError, UnsupportedOptionError


@pytest.fixture(scope="module")
def package():
    model = reference.build(reference.SOURCES_4, reference.SMALL, seed=3)
    return serialize_model(model, OmegaConf.create({}), half=True)


def _write(package, path: Path, **save_kwargs) -> Path:
    torch.save(package, path, **save_kwargs)
    return path


def _outputs(model, length=5000):
    mix = torch.randn(1, 2, length, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(mix)


def test_th_package_with_numpy_metrics_loads(small_checkpoint):
    th_path, _, oracle = small_checkpoint
    raw = torch.load(th_path, weights_only=False)
    assert "metrics" in raw  # numpy scalars inside: must not need weights_only=False
    model = htsep.load_model(th_path)
    assert not model.training
    assert model.sources == ["drums", "bass", "other", "vocals"]
    assert model.sample_rate == 8000 and model.audio_channels == 2
    assert model.segment == reference.SMALL["segment"]


def test_our_safetensors_writer_is_demucs_layout(small_checkpoint):
    """The test writer produces what demucs 4.1.0's own Hugging Face loader reads."""
    _, st_path, oracle = small_checkpoint
    loaded = load_safetensors_model(st_path)
    for (key, a), b in zip(loaded.state_dict().items(), oracle.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


@pytest.mark.parametrize(
    "option,value,named",
    [
        ({"wiener_iters": 1, "end_iters": 1}, None, "wiener_iters"),
        ({"cac": False}, None, "cac"),
        ({"t_emb": "cape"}, None, "t_emb"),
        ({"t_emb": "scaled"}, None, "t_emb"),
        ({"t_sparse_self_attn": True}, None, "t_sparse_self_attn"),
        ({"t_sparse_cross_attn": True}, None, "t_sparse_cross_attn"),
        ({"multi_freqs": [0.3, 0.6]}, None, "multi_freqs"),
        ({"t_norm_first": False}, None, "t_norm_first"),
        ({"t_group_norm": 1}, None, "t_group_norm"),
        ({"channels_time": 16}, None, "channels_time"),
        ({"depth": 4}, None, "merging the branches"),
    ],
)
def test_unsupported_option_names_itself(tmp_path, package, option, value, named):
    bad = copy.copy(package)
    bad["kwargs"] = {**package["kwargs"], **option}
    path = _write(bad, tmp_path / "bad.th")
    with pytest.raises(UnsupportedOptionError) as info:
        htsep.load_model(path)
    message = str(info.value)
    assert named in message and str(path) in message and "\n" not in message


def test_training_only_and_unknown_options_are_ignored(tmp_path, package, small_checkpoint):
    extra = copy.copy(package)
    extra["kwargs"] = {
        **package["kwargs"],
        "t_lr": 3e-4,
        "t_weight_decay": 0.05,
        "rescale": 0.2,
        "option_from_the_future": [1, 2],
    }
    model = htsep.load_model(_write(extra, tmp_path / "extra.th"))
    plain = htsep.load_model(_write(package, tmp_path / "plain.th"))
    torch.testing.assert_close(_outputs(model), _outputs(plain), rtol=0, atol=0)


def test_other_demucs_model_classes_are_refused_by_name(tmp_path, package):
    other = copy.copy(package)
    other["klass"] = ReferenceHDemucs
    with pytest.raises(UnsupportedOptionError, match=r"demucs\.hdemucs\.HDemucs is not supported"):
        htsep.load_model(_write(other, tmp_path / "hdemucs.th"))


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_crafted_pickle_is_refused_and_never_runs(tmp_path, package, zipped):
    marker = tmp_path / "pwned"
    # The legacy (non-zip) writer cannot hold a pickled model class: use a bare dict there.
    evil = copy.copy(package) if zipped else {"state": {}}
    evil["training_args"] = _RunsACommand(marker)
    path = _write(evil, tmp_path / "evil.th", _use_new_zipfile_serialization=zipped)
    # Sanity: the file really runs the command when loaded the unsafe way.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match=r"refusing to load: .*system") as info:
        htsep.load_model(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_foreign_classes_are_refused(tmp_path, package):
    import argparse

    foreign = copy.copy(package)
    foreign["training_args"] = argparse.Namespace(lr=1)
    with pytest.raises(CheckpointError, match=r"refusing to load: .*argparse\.Namespace"):
        htsep.load_model(_write(foreign, tmp_path / "foreign.th"))


@pytest.mark.parametrize("which", ["th", "safetensors"])
def test_truncated_files(tmp_path, small_checkpoint, which):
    th_path, st_path, _ = small_checkpoint
    source = th_path if which == "th" else st_path
    data = source.read_bytes()
    path = tmp_path / source.name
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated") as info:
        htsep.load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_unexpected_and_misshapen_tensors(tmp_path, package):
    state = dict(package["state"])
    del state["crosstransformer.layers.1.norm2.weight"]
    state["decoder.0.mystery"] = torch.zeros(3)
    state["encoder.1.conv.weight"] = torch.zeros(2, 2)
    broken = {**package, "state": state}
    with pytest.raises(CheckpointError) as info:
        htsep.load_model(_write(broken, tmp_path / "broken.th"))
    message = str(info.value)
    # Layer 1 is a cross layer: its norm2 is the context norm.
    assert "missing tensors: transformer.freq_layers.1.context_norm.weight" in message
    assert "unexpected tensors: decoder.0.mystery" in message
    assert "wrong shapes: encoder.1.conv.weight (file [2, 2], model [16, 8, 8, 1])" in message


def test_missing_file_folder_and_non_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        htsep.load_model(tmp_path / "absent.th")
    with pytest.raises(CheckpointError, match="is a folder"):
        htsep.load_model(tmp_path)
    text = tmp_path / "notes.th"
    text.write_text("hello, this is not a model\n")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        htsep.load_model(text)
    empty = tmp_path / "empty.th"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        htsep.load_model(empty)


def test_own_format_round_trip(tmp_path, small_checkpoint):
    th_path, _, _ = small_checkpoint
    model = htsep.load_model(th_path)
    path = save_model(model, tmp_path / "models" / "mine.safetensors", {"note": "test"})
    assert [p.name for p in path.parent.iterdir()] == ["mine.safetensors"]  # no temp file left
    again = htsep.load_model(path)
    assert again.config == model.config
    for (key, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    torch.testing.assert_close(_outputs(again), _outputs(model), rtol=0, atol=0)


def test_own_format_version_and_metadata_checks(tmp_path, small_checkpoint):
    th_path, _, _ = small_checkpoint
    good = save_model(htsep.load_model(th_path), tmp_path / "good.safetensors")
    tensors = load_file(str(good))
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as handle:
        metadata = handle.metadata()
    future = tmp_path / "future.safetensors"
    save_file(tensors, str(future), {**metadata, "format_version": "99"})
    with pytest.raises(CheckpointError, match="format version '99'"):
        htsep.load_model(future)
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))
    with pytest.raises(CheckpointError, match="without model metadata"):
        htsep.load_model(bare)


def test_loading_does_not_need_demucs_importable(tmp_path, small_checkpoint):
    """Run the loader in a fresh interpreter where importing demucs fails."""
    import subprocess
    import sys

    th_path, _, _ = small_checkpoint
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "demucs.py").write_text("raise ImportError('demucs must not be imported')\n")
    shutil.copy(th_path, tmp_path / "model.th")
    # Nor sympy, which torch's Module.to_empty imports (0.4 s of every start).
    code = (
        "import htsep; m = htsep.load_model('model.th'); import sys; "
        "assert 'demucs' not in sys.modules and 'sympy' not in sys.modules; print(m.sources)"
    )
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{reference.SOURCES_4}\n"


# --- hostile checkpoints: contents are untrusted data --------------------------------------------

FORMATS = ["demucs-th", "demucs-safetensors", "htsep"]


def _metadata(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    return load_file(str(path)), metadata


@pytest.fixture(scope="module")
def own_file(tmp_path_factory, small_checkpoint):
    """The small model in htsep's own format."""
    path = tmp_path_factory.mktemp("own") / "own.safetensors"
    return save_model(htsep.load_model(small_checkpoint[0]), path)


def _crafted(fmt: str, folder: Path, package, st_path: Path, own: Path, **changes) -> Path:
    """A copy of the small checkpoint in format ``fmt`` with constructor keywords (demucs) or
    config entries (htsep, dotted names for groups) replaced by ``changes``."""
    if fmt == "demucs-th":
        bad = copy.copy(package)
        bad["kwargs"] = {**package["kwargs"], **changes}
        return _write(bad, folder / "crafted.th")
    tensors, metadata = _metadata(st_path if fmt == "demucs-safetensors" else own)
    key = "kwargs" if fmt == "demucs-safetensors" else "config"
    data = json.loads(metadata[key])
    for name, value in changes.items():
        if isinstance(value, Fraction):
            value = {"_type": "fraction", "numerator": value.numerator,
                     "denominator": value.denominator}  # fmt: skip
        group, _, option = name.rpartition(".")
        (data[group] if group else data)[option] = value
    metadata[key] = json.dumps(data)
    path = folder / "crafted.safetensors"
    save_file(tensors, str(path), metadata)
    return path


def _refused(path: Path, *phrases: str) -> str:
    with pytest.raises(CheckpointError) as info:
        htsep.load_model(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


BAD_NAMES = [
    ("../../escape", "path separator"),
    ("/tmp/x/victim", "path separator"),
    ("sub\\dir", "path separator"),
    (".", "starts with '.'"),
    ("..", "starts with '.'"),
    (".hidden", "starts with '.'"),
    ("", "is empty"),
    ("nul\x00byte", "control"),
    ("tab\there", "control"),
    ("line\nbreak", "control"),
    ("del\x7f", "control"),
    ("\u202eevil", "control or invisible"),
    ("x" * 101, "longer than 100"),
    ("\U0001d11e" * 26, "longer than 100 bytes"),  # 26 characters, 104 bytes
    ("Drums", "appears twice"),
    (5, "is a int, not a string"),
    (None, "is a NoneType, not a string"),
    (["nested"], "not a string"),
    ("drums", "appears twice"),
    ("DRUMS", "appears twice"),
    ("con", "device name"),
    ("COM0", "device name"),
    ("lpt9.x", "device name"),
    ("COM\u00b9", "device name"),
    ("CONIN$", "device name"),
    ("a:b", "<>:"),
    ("trailing ", "white space"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("name", "problem"), BAD_NAMES, ids=[repr(n)[:20] for n, _ in BAD_NAMES])
def test_source_names_must_be_plain_file_names(
    tmp_path, package, small_checkpoint, own_file, fmt, name, problem
):
    sources = ["drums", name, "other", "vocals"]
    path = _crafted(fmt, tmp_path, package, small_checkpoint[1], own_file, sources=sources)
    _refused(path, "source name", problem)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sources", ["vocals", {"drums": 1}, [], 4, [f"s{i}" for i in range(65)]])
def test_sources_must_be_a_list_of_names(
    tmp_path, package, small_checkpoint, own_file, fmt, sources
):
    path = _crafted(fmt, tmp_path, package, small_checkpoint[1], own_file, sources=sources)
    _refused(path, "sources")


INT_OPTIONS = [
    *("channels", "depth", "kernel_size", "stride", "nfft", "samplerate", "t_heads"),
    *("norm_groups", "audio_channels", "t_layers", "context", "bottom_channels"),
]
REAL_OPTIONS = ["growth", "dconv_comp", "t_hidden_scale", "emb_scale", "t_max_period", "segment"]
# Values valid for some options (t_layers=0, context=0, bottom_channels=0) are left out there.
ZERO_OK = {"t_layers", "context", "bottom_channels"}
BAD_VALUES = [0, -1, 2.5, 2**20, math.nan, math.inf, "4", True, None, [4], {"x": 1}]
REAL_BAD_VALUES = [0, -1, 1e30, math.nan, math.inf, -math.inf, "2", True, None, [2.0]]
UNBOUNDED_ABOVE = {"emb_scale", "t_max_period"}


def _number_cases():
    for option in INT_OPTIONS:
        for value in BAD_VALUES:
            if not (value == 0 and option in ZERO_OK) and not (
                value is None and option == "bottom_channels"
            ):
                yield option, value
    for option in REAL_OPTIONS:
        for value in REAL_BAD_VALUES:
            if not (value == 1e30 and option in UNBOUNDED_ABOVE):
                yield option, value


@pytest.mark.parametrize(("option", "value"), list(_number_cases()))
def test_demucs_numbers_are_range_checked_before_building(tmp_path, package, option, value):
    path = _write({**package, "kwargs": {**package["kwargs"], option: value}}, tmp_path / "n.th")
    started = time.monotonic()
    message = _refused(path)
    assert time.monotonic() - started < 10
    # The option is named; a huge width is named by the layer it would make too wide.
    assert option in message or "channels wide" in message, message


@pytest.mark.parametrize("fmt", ["demucs-safetensors", "htsep"])
@pytest.mark.parametrize(
    ("option", "value"),
    [("stride", 0), ("channels", 2**20), ("heads", 0), ("depth", 0), ("sample_rate", 44100.5),
     ("sample_rate", "44100"), ("growth", math.nan), ("audio_channels", True),
     ("n_fft", None), ("layers", -1), ("dropout", 1.5), ("segment", math.inf)],
)  # fmt: skip
def test_safetensors_numbers_are_range_checked(
    tmp_path, package, small_checkpoint, own_file, fmt, option, value
):
    demucs = {"sample_rate": "samplerate", "heads": "t_heads", "n_fft": "nfft",
              "layers": "t_layers", "dropout": "t_dropout"}  # fmt: skip
    ours = {"stride": "conv.stride", "channels": "conv.channels", "heads": "transformer.heads",
            "depth": "conv.depth", "growth": "conv.growth", "n_fft": "stft.n_fft",
            "layers": "transformer.layers", "dropout": "transformer.dropout"}  # fmt: skip
    if fmt == "htsep" and option == "segment":
        change = {"segment": {"numerator": 1, "denominator": 0}}
        option = "segment"
    elif fmt == "htsep":
        change = {ours.get(option, option): value}
        option = ours.get(option, option)
    else:
        option = demucs.get(option, option)
        change = {option: value}
    path = _crafted(fmt, tmp_path, package, small_checkpoint[1], own_file, **change)
    message = _refused(path)
    assert option in message or "channels wide" in message, message


def test_a_small_file_describing_a_huge_model_allocates_nothing(tmp_path, package):
    """Every width in range, but 16 layers of 4096 channels: refused by counting the
    parameters of a model built without memory."""
    huge = dict(nfft=4096, kernel_size=1, stride=1, depth=16, channels=4096, growth=1,
                context=16, norm_starts=100, t_layers=0, dconv_mode=0, freq_emb=0)  # fmt: skip
    path = _write({**package, "kwargs": {**package["kwargs"], **huge}}, tmp_path / "huge.th")
    started = time.monotonic()
    with pytest.raises(UnsupportedOptionError, match=r"parameters, more than htsep loads"):
        htsep.load_model(path)
    assert time.monotonic() - started < 20


class _HugeFraction:
    def __reduce__(self):
        return (Fraction, ("1e999999999",))


def test_pickled_fraction_of_a_huge_text_is_refused_at_once(tmp_path, package):
    evil = {**package, "kwargs": {**package["kwargs"], "segment": _HugeFraction()}}
    path = _write(evil, tmp_path / "fraction.th")
    started = time.monotonic()
    _refused(path, "refusing to load", "fraction")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    "segment",
    [
        {"_type": "fraction", "numerator": 1, "denominator": 0},
        {"_type": "fraction", "numerator": "1e999999999", "denominator": 1},
        {"_type": "fraction", "numerator": 10**40, "denominator": 1},
        {"_type": "fraction"},
    ],
)
def test_demucs_json_fractions_are_checked(tmp_path, small_checkpoint, segment):
    tensors, metadata = _metadata(small_checkpoint[1])
    kwargs = json.loads(metadata["kwargs"])
    kwargs["segment"] = segment
    path = tmp_path / "fraction.safetensors"
    save_file(tensors, str(path), {**metadata, "kwargs": json.dumps(kwargs)})
    _refused(path, "fraction")


def test_a_segment_too_short_for_a_window_is_refused_in_a_short_line():
    """htsep's own config layout (its safetensors files, train --config): the fraction was
    printed whole, and 1/10**300 made a line of over 300 characters."""
    from htsep.model.config import config_from_dict, config_to_dict, tiny_config

    data = config_to_dict(tiny_config(("drums", "bass"), 44100, 2))
    data["segment"] = {"numerator": 1, "denominator": 10**300}
    with pytest.raises(CheckpointError) as info:
        config_from_dict(data)
    message = str(info.value)
    assert "segment 1e-300 s is 0 samples" in message and len(message) < 150, message


@pytest.mark.parametrize(
    ("key", "text", "phrase"),
    [
        ("kwargs", "[" * 100_000 + "]" * 100_000, "not valid JSON"),
        ("kwargs", '{"a": ' * 100 + "1" + "}" * 100, "nested too deeply"),
        ("kwargs", "[1, 2]", "not a mapping"),
        ("args", '{"x": 1}', "not a list"),
        ("kwargs", "{", "not valid JSON"),
    ],
)
def test_malformed_demucs_metadata(tmp_path, small_checkpoint, key, text, phrase):
    tensors, metadata = _metadata(small_checkpoint[1])
    path = tmp_path / "meta.safetensors"
    save_file(tensors, str(path), {**metadata, key: text})
    _refused(path, phrase)


@pytest.mark.parametrize(
    ("config", "phrase"),
    [
        ("[]", "not a mapping"),
        ('{"sources": ["a"]}', "segment"),
        ("null", "not a mapping"),
        ('{"sources": ["a"], "segment": {"numerator": 1, "denominator": 1}, "mystery": 1}',
         "invalid option mystery: not in htsep's config"),
        ('{"sources": ["a"], "segment": {"numerator": 1, "denominator": 1}, "conv": [1]}',
         "option conv must be a mapping"),
    ],
)  # fmt: skip
def test_malformed_htsep_config(tmp_path, own_file, config, phrase):
    tensors, metadata = _metadata(own_file)
    path = tmp_path / "config.safetensors"
    save_file(tensors, str(path), {**metadata, "config": config})
    _refused(path, phrase)


@pytest.mark.parametrize("where", ["top", "nested"])
@pytest.mark.parametrize("fmt", ["htsep", "demucs-safetensors"])
def test_a_key_given_twice_in_json_metadata_is_refused(
    tmp_path, small_checkpoint, own_file, fmt, where
):
    """json.loads kept the last of two values: a file read as 22050 Hz by us could read
    otherwise elsewhere. Refused as a key given twice in a bag or config file is."""
    tensors, metadata = _metadata(own_file if fmt == "htsep" else small_checkpoint[1])
    key = "config" if fmt == "htsep" else "kwargs"
    text = metadata[key]
    assert text.endswith("}")
    data = json.loads(text)
    if where == "top":
        name = "sample_rate" if "sample_rate" in data else "samplerate"
        text = text[:-1] + f', "{name}": 22050}}'
    else:
        inner = next(k for k, v in data.items() if isinstance(v, dict) and v)
        name, value = next(iter(data[inner].items()))
        twice = json.dumps(data[inner])[:-1] + f", {json.dumps(name)}: {json.dumps(value)}}}"
        data[inner] = "@@"
        text = json.dumps(data).replace('"@@"', twice)
    path = tmp_path / "twice.safetensors"
    save_file(tensors, str(path), {**metadata, key: text})
    _refused(path, f"metadata '{key}'", f"'{name}' is given twice")


@pytest.mark.parametrize("fmt", ["demucs-th", "htsep"])
@pytest.mark.parametrize("bad", [1e300, -1e39])
def test_float64_weights_beyond_float32_are_refused_at_load(tmp_path, package, own_file, fmt, bad):
    """A float64 tensor is finite in the file but becomes infinite in the float32 model."""
    name = "encoder.1.conv.weight" if fmt == "demucs-th" else "freq_encoders.1.conv.weight"
    if fmt == "demucs-th":
        state = dict(package["state"])
        state[name] = state[name].double()
        state[name].view(-1)[7] = bad
        path = _write({**package, "state": state}, tmp_path / "big.th")
    else:
        tensors, metadata = _metadata(own_file)
        tensors[name] = tensors[name].double()
        tensors[name].view(-1)[7] = bad
        path = tmp_path / "big.safetensors"
        save_file(tensors, str(path), metadata)
    _refused(path, f"tensor {name} holds NaN or infinite values as torch.float32")


@pytest.mark.parametrize("fmt", ["demucs-th", "htsep"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_infinite_weights_are_refused_at_load(tmp_path, package, own_file, fmt, bad):
    name = "encoder.1.conv.weight" if fmt == "demucs-th" else "freq_encoders.1.conv.weight"
    if fmt == "demucs-th":
        state = dict(package["state"])
        state[name] = state[name].clone()
        state[name].view(-1)[7] = bad
        path = _write({**package, "state": state}, tmp_path / "nan.th")
    else:
        tensors, metadata = _metadata(own_file)
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[7] = bad
        path = tmp_path / "nan.safetensors"
        save_file(tensors, str(path), metadata)
    _refused(path, f"tensor {name} holds NaN or infinite values")


@pytest.mark.parametrize("dtype", [torch.int16, torch.bool, torch.complex64])
def test_tensors_must_hold_floating_point_numbers(tmp_path, package, dtype):
    state = dict(package["state"])
    name = "encoder.1.conv.weight"
    state[name] = torch.zeros(state[name].shape, dtype=dtype)
    _refused(_write({**package, "state": state}, tmp_path / "int.th"), f"tensor {name} holds")


def test_tensor_names_and_values_of_other_types(tmp_path, package):
    state = {**package["state"], 7: torch.zeros(1)}
    _refused(_write({**package, "state": state}, tmp_path / "key.th"), "names must be strings")
    state = {**package["state"], "encoder.1.conv.weight": [1.0, 2.0]}
    _refused(_write({**package, "state": state}, tmp_path / "value.th"), "wrong shapes")


@pytest.mark.parametrize("args", [{"x": 1}, "drums", 5])
def test_demucs_args_of_other_types(tmp_path, package, args):
    kwargs = {k: v for k, v in package["kwargs"].items() if k != "sources"}
    path = _write({**package, "args": args, "kwargs": kwargs}, tmp_path / "args.th")
    _refused(path)


@pytest.mark.parametrize("value", [torch.ones(3), [torch.ones(2)], {"nested": [1]}])
def test_exotic_option_values_are_compared_safely(tmp_path, package, value):
    """A tensor or a mapping where a switch belongs: refused by name, no __eq__ of its run."""
    plain = htsep.load_model(_write(package, tmp_path / "plain.th"))
    for option in ("cac", "multi_freqs", "t_lr"):
        kwargs = {**package["kwargs"], option: value}
        path = _write({**package, "kwargs": kwargs}, tmp_path / "exotic.th")
        if option == "t_lr":  # ignored training-only option: the same network loads
            assert htsep.load_model(path).config == plain.config
        else:
            _refused(path, option)


def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.th"
    os.mkfifo(fifo)
    link = tmp_path / "link.th"
    link.symlink_to(fifo)
    for path in (fifo, link):
        outcome: list[BaseException | None] = []

        def load(path=path, outcome=outcome):
            try:
                htsep.load_model(path)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        thread.join(timeout=10)
        if thread.is_alive():  # unblock the reader before failing
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail(f"load_model blocked on {path}")
        (error,) = outcome
        assert isinstance(error, CheckpointError)
        assert str(error) == f"{path}: is a named pipe (FIFO), not a checkpoint file"
    with pytest.raises(CheckpointError, match="character device, not a checkpoint"):
        htsep.load_model("/dev/null")


def test_symlink_to_a_checkpoint_loads(tmp_path, small_checkpoint):
    link = tmp_path / "link.th"
    link.symlink_to(small_checkpoint[0])
    assert htsep.load_model(link).sources == reference.SOURCES_4


def test_load_builds_the_model_without_random_initialization(small_checkpoint):
    """Built on the meta device then filled: every tensor holds a value of the file (the
    oracle's tensors, under other names), and the network computes what the same network
    built for real (randomly initialized, then loaded) computes: nothing is left unfilled."""
    model = htsep.load_model(small_checkpoint[0])
    ours = model.state_dict()
    assert all(tensor.device.type == "cpu" for tensor in ours.values())

    def contents(state):
        return sorted((tuple(t.shape), t.float().numpy().tobytes()) for t in state.values())

    assert contents(ours) == contents(small_checkpoint[2].state_dict())
    real = type(model)(model.config).eval()
    real.load_state_dict(ours)
    torch.testing.assert_close(_outputs(model), _outputs(real), rtol=0, atol=0)


@pytest.mark.parametrize(
    "sources",
    [
        ["drums", "../../escape", "other", "vocals"],
        ["drums", "ABSOLUTE", "other", "vocals"],
        ["drums", "..", "other", "vocals"],
    ],
)
def test_cli_refuses_a_checkpoint_whose_sources_are_paths(tmp_path, package, sources):
    victim = tmp_path / "x" / "victim"
    victim.parent.mkdir()
    sources = [str(victim) if name == "ABSOLUTE" else name for name in sources]
    work = tmp_path / "work"
    model = _write({**package, "kwargs": {**package["kwargs"], "sources": sources}},
                   tmp_path / "crafted.th")  # fmt: skip
    clip = work / "clip.wav"
    write_clip(clip, 0.5)
    before = sorted(tmp_path.rglob("*"))
    result = htsep_separate("-n", str(model), "-q", "-o", str(work / "out" / "deep"), str(clip))
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("htsep: error:")]
    assert len(errors) == 1 and "source name" in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert sorted(tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not victim.with_suffix(".wav").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_source_names_equal_under_unicode_normalisation_are_one_name(
    tmp_path, package, small_checkpoint, own_file, fmt
):
    """ "café" as one code point and as e + combining accent are two names on Linux, one on
    macOS: refused as a duplicate everywhere."""
    sources = ["caf\u00e9", "cafe\u0301", "other", "vocals"]
    path = _crafted(fmt, tmp_path, package, small_checkpoint[1], own_file, sources=sources)
    _refused(path, "source name", "appears twice")


class _SubarrayDtype:
    def __reduce__(self):
        return (np.dtype, (("f8", (4000, 4000)),))  # 128 MB per scalar


class _VoidDtype:
    def __reduce__(self):
        return (np.dtype, ("V100000000",))


class _ScalarOf:
    def __init__(self, dtype):
        self.dtype = dtype

    def __reduce__(self):
        core = getattr(np, "_core", None) or np.core
        return (core.multiarray.scalar, (self.dtype,))


@pytest.mark.parametrize("dtype", [_SubarrayDtype(), _VoidDtype()])
def test_numpy_scalars_of_huge_dtypes_are_refused_before_allocation(tmp_path, package, dtype):
    """A 1-kB pickle could make numpy build a dtype of any size and ``scalar`` allocate it:
    only plain numeric dtypes are built, and a scalar takes exactly its bytes."""
    path = _write({**package, "metrics": {"bomb": [_ScalarOf(dtype)] * 8}}, tmp_path / "b.th")
    started = time.monotonic()
    _refused(path, "refusing to load", "numpy dtype")
    assert time.monotonic() - started < 10


def test_numpy_scalars_need_their_own_bytes(tmp_path, package):
    path = _write({**package, "metrics": {"x": _ScalarOf(np.dtype("f8"))}}, tmp_path / "s.th")
    _refused(path, "refusing to load", "numpy scalar of float64 without its 8 bytes")


def _rezipped(source: Path, target: Path) -> Path:
    """``source``'s records written again, deflated."""
    with (
        zipfile.ZipFile(source) as given,
        zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out,
    ):
        for info in given.infolist():
            out.writestr(info.filename, given.read(info.filename))
    return target


def test_compressed_records_that_would_inflate_far_are_refused(tmp_path, package):
    """torch.save stores its records as they are; a record deflated in a re-zipped file is
    inflated whole by torch.load, so 1 MB of file could take a gigabyte. Refused from the
    sizes in the zip's directory, before any record is read."""
    zeros = {**package, "metrics": torch.zeros(64 << 20, dtype=torch.uint8)}
    zipped = _rezipped(_write(zeros, tmp_path / "p.th"), tmp_path / "zipped.th")
    assert zipped.stat().st_size < 1 << 20
    message = _refused(zipped, "refusing to load", "compressed records")
    assert f"from a file of {zipped.stat().st_size}" in message
    # The same re-zipping of a checkpoint whose records hold what they say still loads.
    small = _rezipped(_write(package, tmp_path / "q.th"), tmp_path / "small.th")
    assert htsep.load_model(small).sources == ["drums", "bass", "other", "vocals"]


def test_two_names_for_one_tensor_are_refused(tmp_path, package):
    """demucs's name and htsep's for one parameter in one state: the later one won silently."""
    state = dict(package["state"])
    state["freq_encoders.0.conv.weight"] = torch.full_like(state["encoder.0.conv.weight"], 7.0)
    path = _write({**package, "state": state}, tmp_path / "twice.th")
    _refused(path, "encoder.0.conv.weight", "freq_encoders.0.conv.weight", "are both")


def test_checkpoints_in_folders_whose_names_are_not_utf8(tmp_path):
    """safetensors takes UTF-8 names only: a valid file under a folder named with a Latin-1
    byte was "unreadable or truncated (... is not valid UTF-8)", and saving one (train --out)
    was a UnicodeEncodeError traceback. File names are bytes."""
    import os

    folder = os.fsdecode(os.fsencode(str(tmp_path)) + b"/dossier\xe9")
    os.mkdir(folder)
    model = htsep.load_model("htsep-tiny")
    target = os.path.join(folder, "copy.safetensors")
    htsep.save_model(model, target, {"note": "latin-1 folder"})
    again = htsep.load_model(target)
    assert again.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    assert sorted(os.listdir(folder)) == ["copy.safetensors"]


def test_loads_in_two_threads_leave_the_hosts_settings_alone(small_checkpoint):
    """torch.load's allow-list and the warnings filters are process-wide: two threads loading
    at once must neither refuse each other's numpy metrics nor leave warnings silenced."""
    th_path, _, _ = small_checkpoint
    filters = list(warnings.filters)
    errors: list[BaseException] = []

    def load_many() -> None:
        for _ in range(30):
            try:
                htsep.load_model(th_path)
            except BaseException as exc:  # noqa: BLE001 - collected and reported below
                errors.append(exc)

    threads = [threading.Thread(target=load_many) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert warnings.filters == filters


def test_a_load_keeps_the_hosts_own_allowed_globals(small_checkpoint):
    """A global the host allowed itself, which htsep allows too, stays allowed after a load."""
    th_path, _, _ = small_checkpoint
    mine = type(np.dtype("f8"))
    saved = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([mine])
    try:
        htsep.load_model(th_path)
        assert mine in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)
