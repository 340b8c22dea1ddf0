"""Property-based tests of the checkpoint loaders: whatever the bytes, ``load_model`` returns a
model or raises an HtsepError, quickly and without a huge allocation.

Three small valid files are mutated: htsep's own safetensors (``save_model``), demucs's
safetensors layout and demucs's ``.th`` (both written by demucs's serializer, tests/reference.py).
Mutations: truncation, bit flips, byte overwrites, and JSON value replacements in the
safetensors metadata (numbers -> 0 / -1 / 1e9 / NaN / strings, sources -> random strings).
The default run is short; ``-m slow`` runs many more examples.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import htsep
import reference
from htsep.checkpoint import save_model
from htsep.errors import HtsepError

# Smaller than reference.SMALL: loading (and refusing) takes milliseconds.
FUZZ: dict = {**reference.SMALL, "channels": 4, "bottom_channels": 8, "t_layers": 1}
QUICK = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SLOW = settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SECONDS_PER_CASE = 20


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("fuzz")
    model = reference.build(reference.SOURCES_4, FUZZ, seed=11)
    th_path, _ = reference.write_th(model, folder, "fuzz")
    st_path = reference.write_safetensors(model, folder, "fuzz")
    own = save_model(htsep.load_model(th_path), folder / "own.safetensors")
    return {name: path.read_bytes() for name, path in
            [("th", th_path), ("demucs", st_path), ("htsep", own)]}  # fmt: skip


def _outcome(path: Path) -> str:
    """Load ``path``: 'loaded' or 'refused'; anything else fails the test."""
    started = time.monotonic()
    try:
        model = htsep.load_model(path)
    except HtsepError as exc:
        message = str(exc)
        assert "\n" not in message, message
        outcome = "refused"
    else:
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert sum(p.numel() for p in model.parameters()) < 10_000_000
        outcome = "loaded"
    assert time.monotonic() - started < SECONDS_PER_CASE
    return outcome


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / ("case.th" if name == "th" else "case.safetensors")
    path.write_bytes(data)
    return path


FORMATS = st.sampled_from(["th", "demucs", "htsep"])


def _apply(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    buffer = bytearray(data)
    for kind, where, value in edits:
        where = where % max(len(buffer), 1)
        if kind == "truncate":
            del buffer[where:]
        elif buffer and kind == "flip":
            buffer[where] ^= 1 << (value % 8)
        elif buffer:
            buffer[where] = value
    return bytes(buffer)


@st.composite
def header_biased(draw: st.DrawFn, size: int) -> int:
    """Positions mostly in the first few KB (headers, pickles, metadata), sometimes anywhere."""
    return draw(st.one_of(st.integers(0, min(size, 4096) - 1), st.integers(0, size - 1)))


@pytest.fixture
def counts(request: pytest.FixtureRequest) -> dict[str, int]:
    tally = {"loaded": 0, "refused": 0}
    yield tally
    print(f"\n{request.node.name}: {tally['loaded']} loaded, {tally['refused']} refused")


def _byte_test(originals, tmp_path, counts, data) -> None:
    name = data.draw(FORMATS)
    original = originals[name]
    position = header_biased(len(original))
    edits = data.draw(
        st.lists(
            st.tuples(st.sampled_from(["flip", "byte", "truncate"]), position, st.integers(0, 255)),
            min_size=1,
            max_size=4,
        )
    )
    counts[_outcome(_write(tmp_path, name, _apply(original, edits)))] += 1


@QUICK
@given(data=st.data())
def test_damaged_bytes_are_loaded_or_refused(originals, tmp_path, counts, data) -> None:
    _byte_test(originals, tmp_path, counts, data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_damaged_bytes_are_loaded_or_refused_many(originals, tmp_path, counts, data) -> None:
    _byte_test(originals, tmp_path, counts, data)


# --- metadata edits --------------------------------------------------------------------------

HOSTILE_VALUES = st.one_of(
    st.sampled_from(
        [
            0,
            -1,
            1,
            2,
            3,
            1e9,
            10**12,
            0.5,
            -0.0,
            math.nan,
            math.inf,
            -math.inf,
            True,
            False,
            None,
            "",
            "4",
            [],
            [1],
            {},
            {"_type": "fraction"},
        ]
    ),  # fmt: skip
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
SOURCE_NAMES = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(["..", "/x", "a/b"])),
                        min_size=0, max_size=6)  # fmt: skip


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every leaf of a JSON value, as a path of keys and indices."""
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _paths(item, (*prefix, key))]
    if isinstance(value, list) and value:
        return [p for index, item in enumerate(value) for p in _paths(item, (*prefix, index))]
    return [prefix]


def _replace(value: object, path: tuple, new: object) -> object:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    assert isinstance(value, list)
    return [_replace(item, rest, new) if index == head else item
            for index, item in enumerate(value)]  # fmt: skip


def _metadata_test(originals, tmp_path, counts, data) -> None:
    name = data.draw(st.sampled_from(["demucs", "htsep"]))
    source = _write(tmp_path, name, originals[name])
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    key = "kwargs" if name == "demucs" else "config"
    document = json.loads(metadata[key])
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):
            document = _replace(document, ("sources",), data.draw(SOURCE_NAMES))
        else:
            leaf = data.draw(st.sampled_from(_paths(document)))
            document = _replace(document, leaf, data.draw(HOSTILE_VALUES))
    metadata[key] = json.dumps(document)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata)
    counts[_outcome(path)] += 1


@QUICK
@given(data=st.data())
def test_metadata_edits_are_loaded_or_refused(originals, tmp_path, counts, data) -> None:
    _metadata_test(originals, tmp_path, counts, data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_metadata_edits_are_loaded_or_refused_many(originals, tmp_path, counts, data) -> None:
    _metadata_test(originals, tmp_path, counts, data)


# --- demucs .th constructor keywords ---------------------------------------------------------


def _kwargs_test(tmp_path, counts, data) -> None:
    from demucs.states import serialize_model
    from omegaconf import OmegaConf

    package = _package_cache.get("th")
    if package is None:
        model = reference.build(reference.SOURCES_4, FUZZ, seed=12)
        package = _package_cache.setdefault(
            "th", serialize_model(model, OmegaConf.create({}), half=True)
        )
    kwargs = dict(package["kwargs"])
    for _ in range(data.draw(st.integers(1, 3))):
        option = data.draw(st.sampled_from(sorted(kwargs) + ["segment", "sources"]))
        kwargs[option] = data.draw(SOURCE_NAMES if option == "sources" else HOSTILE_VALUES)
    path = tmp_path / "kwargs.th"
    torch.save({**package, "kwargs": kwargs}, path)
    counts[_outcome(path)] += 1


_package_cache: dict = {}


@QUICK
@given(data=st.data())
def test_th_keyword_edits_are_loaded_or_refused(tmp_path, counts, data) -> None:
    _kwargs_test(tmp_path, counts, data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_th_keyword_edits_are_loaded_or_refused_many(tmp_path, counts, data) -> None:
    _kwargs_test(tmp_path, counts, data)


def test_the_unmodified_files_load(originals, tmp_path) -> None:
    """The starting points are valid: what the mutations refuse, they broke."""
    for name, data in originals.items():
        assert _outcome(_write(tmp_path, name, data)) == "loaded", name
