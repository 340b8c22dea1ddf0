"""The model zoo: named models, local repositories of checkpoints, download and verification.

A model is resolved by ``find_model`` from, in order: a checkpoint file path, a folder laid out
like demucs's ``--repo`` (``<sig>-<sha8>.th``, ``<sig>.th``, ``<sig>.safetensors`` and
``<name>.yaml`` bags), or the registry shipped in ``models/`` (installed as ``htsep.registry``).
``fetch`` turns one member into a local file whose SHA-256 matches the checksum it names.

Where files live (environment variables):

- ``HTSEP_CACHE``: our download cache (default ``$XDG_CACHE_HOME/htsep`` where that is an
  absolute path, else ``~/.cache/htsep``). Files are named ``<sig>-<checksum>.th`` like demucs's.
- ``TORCH_HOME``: demucs's (torch.hub's) cache, ``$TORCH_HOME/hub/checkpoints`` (default
  ``$XDG_CACHE_HOME/torch``, else ``~/.cache/torch``). A verified file there is used in place,
  so a machine that already ran demucs downloads nothing; it is never modified.
- ``HTSEP_MIRROR``: a base URL; when set, ``<base>/<sig>-<checksum>.th`` is downloaded instead
  of the registry's URL (self-hosted mirrors, offline sites, tests).

Downloads stream into a temporary file in the cache folder (``.<name>.<owner>.<hex>.part``,
see ``htsep.files``) and are renamed into place only after the hash matched, so the cache never
holds a partial or wrong file, even when several processes download the same checkpoint at
once; the temporaries of killed processes are removed by the next download.

Registry entries, ``--repo`` folders and file names are untrusted data like checkpoints: the
names they give (models, signatures, sources) become file and folder names, so they must be
plain names (``htsep.model.config.name_problem``), and bag weights and segments are checked.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import http.client
import importlib.resources
import logging
import math
import os
import re
import socket
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

import yaml
from tqdm import tqdm

from htsep import files
from htsep.errors import CheckpointError, DownloadError, ModelNotFoundError
from htsep.model.config import (
    MAX_SEGMENT_SECONDS,
    check_sources,
    name_problem,
    show,
    show_number,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "htdemucs"

CHECKPOINT_SUFFIXES = (".th", ".safetensors")
DOWNLOAD_TIMEOUT_SECONDS = 30.0
# The timeout is per read, so a server sending a byte now and then would hold a download
# forever: one that receives less than STALL_MIN_BYTES in any STALL_WINDOW_SECONDS is stopped
# (1 KiB/s, at which the smallest published checkpoint would take a day).
STALL_WINDOW_SECONDS = 60.0
STALL_MIN_BYTES = 64 << 10
# ... and the response must begin (status line and headers) within this many seconds.
HEADERS_WITHIN_SECONDS = 60.0
_BLOCK_BYTES = 1 << 20
_HEX = re.compile(r"[0-9a-fA-F]+")
# demucs's save_with_checksum names files "<sig>-<first 8 hex of the SHA-256>"; a full hash is
# accepted too. Anything else after a dash stays part of the signature.
_CHECKSUM_SUFFIX = re.compile(r"^(?P<signature>.+)-(?P<checksum>[0-9a-f]{8}|[0-9a-f]{64})$")
# YAML 1.1 reads 12345678 as an integer and 01234567 as an octal one: hex values must be quoted.
_QUOTE_HINT = " (quote all-digit values, e.g. '01234567')"
# Model names and signatures come from file names, which may be longer than source names.
_MAX_MODEL_NAME = 200
# A bag or registry file is a few lines; anything much larger is not one.
_MAX_YAML_BYTES = 1 << 20
# A bag weight above this only serves to overflow the weighted sums.
_MAX_WEIGHT = 1e6
# The sums are float32: a positive weight below its smallest normal number would be 0 there
# (a source weighted 1e-300 became 0 / 0, NaN stems).
_MIN_WEIGHT = 2.0**-126
# Every member of a bag is a whole separation (demucs's bags have at most 4): a list of
# thousands would take that many times the memory and the time.
MAX_BAG_MEMBERS = 32
# The shortest segment a bag may ask for, as --segment (htsep.separator.MIN_SEGMENT).
MIN_SEGMENT_SECONDS = 1
# A segment given as text: plain decimals or a fraction (Fraction('1e999999999') would compute a
# billion-digit number).
SEGMENT_TEXT = re.compile(r"^\s*\d{1,9}(\.\d{1,9})?\s*$|^\s*\d{1,9}\s*/\s*\d{1,9}\s*$")


@dataclass(frozen=True)
class MemberSpec:
    """One checkpoint of a model: where to find or download it and how to check it."""

    signature: str
    checksum: str | None = None  # hex prefix (or all) of the file's SHA-256
    url: str | None = None  # where to download it (registry models)
    path: Path | None = None  # an already-local file (repository folder or explicit path)

    def __post_init__(self) -> None:
        problem = name_problem(self.signature, _MAX_MODEL_NAME)
        if problem is not None:
            raise ValueError(f"signature {show(self.signature)} {problem}")
        if self.checksum is not None:
            if not isinstance(self.checksum, str):
                raise ValueError(f"checksum {show(self.checksum)} is not a string")
            if not _HEX.fullmatch(self.checksum):
                raise ValueError(f"checksum {self.checksum!r} is not a hexadecimal SHA-256 prefix")
            object.__setattr__(self, "checksum", self.checksum.lower())

    @property
    def file_name(self) -> str:
        """The cache file name, demucs's ``<sig>-<checksum>.th``."""
        return f"{self.signature}-{self.checksum}.th" if self.checksum else f"{self.signature}.th"


@dataclass(frozen=True)
class ModelSpec:
    """A named model: one checkpoint, or a bag of them whose outputs are averaged per source."""

    name: str  # used for the output folder <out>/<name>/
    members: tuple[MemberSpec, ...]
    weights: tuple[tuple[float, ...], ...] | None = None  # members x sources; None = all ones
    segment: Fraction | None = None  # a bag's segment override in seconds, else None
    sources: tuple[str, ...] | None = None  # known for registry models, None before loading
    description: str = ""

    def __post_init__(self) -> None:
        problem = name_problem(self.name, _MAX_MODEL_NAME)
        if problem is not None:
            raise ValueError(f"model name {show(self.name)} {problem}")


# --- where files live --------------------------------------------------------------------------


def expand_user(path: str) -> Path:
    """``~`` expanded where it can be (an unknown user's ``~name`` stays as written)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def _user_cache_home(*, relative: bool = False) -> Path:
    """``$XDG_CACHE_HOME``, else ``~/.cache``. A relative value is ignored, as the XDG base
    directory specification asks (a script run from a music folder must not fill it with a
    cache), unless ``relative``: torch.hub takes it as it is, relative to the current folder,
    and demucs's files are looked for where torch put them."""
    configured = _configured("XDG_CACHE_HOME")
    if configured and (relative or os.path.isabs(configured)):
        return Path(configured)
    try:
        return Path.home() / ".cache"
    except (RuntimeError, KeyError):  # no HOME and no password entry
        return Path(".cache")


def _status(path: Path) -> os.stat_result | None:
    """``os.stat(path)`` (following links), or None when nothing can be found there: missing,
    a parent that is not a folder, no permission to look, a name the system refuses."""
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _is_regular(path: Path) -> bool:
    status = _status(path)
    return status is not None and stat.S_ISREG(status.st_mode)


def _open_regular(path: Path) -> IO[bytes]:
    """``path`` open for reading, refused (IsADirectoryError or OSError) unless a regular file;
    never blocks on a FIFO."""
    handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        status = os.fstat(handle)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(f"{path}: is {files.kind_of(status.st_mode)}, not a regular file")
        return os.fdopen(handle, "rb")
    except BaseException:
        os.close(handle)
        raise


def _read_text(path: Path) -> str:
    """A small text file (a bag, a registry entry), read without following it into a FIFO."""
    with _open_regular(path) as handle:
        data = handle.read(_MAX_YAML_BYTES + 1)
    if len(data) > _MAX_YAML_BYTES:
        raise OSError(f"larger than {_MAX_YAML_BYTES} bytes")
    return data.decode("utf-8")


def _configured(variable: str) -> str | None:
    """The value of a folder or address variable; one of only spaces (an unset variable in a
    script's quotes) counts as unset, not as a folder named " " in the current folder."""
    value = os.environ.get(variable)
    return value if value and value.strip() else None


def cache_dir() -> Path:
    """Our download cache: ``$HTSEP_CACHE``, else ``$XDG_CACHE_HOME/htsep`` or ``~/.cache/htsep``.

    The folder is not created here; ``fetch`` creates it when it downloads.
    """
    configured = _configured("HTSEP_CACHE")
    return expand_user(configured) if configured else _user_cache_home() / "htsep"


def torch_hub_dir() -> Path:
    """Where torch.hub (hence demucs) caches downloads: ``$TORCH_HOME/hub/checkpoints``.

    Computed like ``torch.hub.get_dir`` without importing torch.
    """
    configured = _configured("TORCH_HOME")
    home = expand_user(configured or str(_user_cache_home(relative=True) / "torch"))
    return home / "hub" / "checkpoints"


# --- the shipped registry ----------------------------------------------------------------------


def registry_models() -> list[ModelSpec]:
    """The models shipped in ``models/`` (package ``htsep.registry``), sorted by name."""
    folder = importlib.resources.files("htsep.registry")
    models = []
    for entry in folder.iterdir():
        if entry.name.endswith(".yaml") and entry.is_file():
            origin = f"htsep.registry/{entry.name}"
            spec = _parse_registry_entry(_load_yaml(entry.read_text("utf-8"), origin), origin)
            if spec.name != entry.name.removesuffix(".yaml"):
                raise ModelNotFoundError(f"{origin}: 'name' is {spec.name!r}, not the file name")
            models.append(spec)
    return sorted(models, key=lambda spec: spec.name)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a mapping that gives a key twice (YAML would let
    the last one win without a word: two ``models:`` lines, the first silently dropped)."""


def _unique_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<": merged keys may be overridden
            continue
        key = loader.construct_object(key_node)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping names it
            break
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)


def parse_yaml(text: str) -> Any:
    """YAML as ``yaml.safe_load`` reads it, with no key given twice; ValueError with a
    one-line reason for anything it cannot read (nesting too deep included)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        reason = " ".join(str(exc).replace(' in "<unicode string>",', " at").split())
        raise ValueError(reason[:200] or type(exc).__name__) from None


def _load_yaml(text: str, origin: str) -> Mapping[str, Any]:
    try:
        data = parse_yaml(text)
    except ValueError as exc:
        raise ModelNotFoundError(f"{origin}: not valid YAML ({exc})") from None
    if not isinstance(data, Mapping):
        raise ModelNotFoundError(f"{origin}: expected a mapping of keys, got {type(data).__name__}")
    return data


def _sources(value: Any, origin: str) -> tuple[str, ...]:
    """A registry entry's 'sources': the names a checkpoint may have (``check_sources``)."""
    if not isinstance(value, list) or not value:
        raise ModelNotFoundError(f"{origin}: 'sources' must be a non-empty list of names")
    try:
        return check_sources(value)
    except CheckpointError as exc:
        raise ModelNotFoundError(f"{origin}: {exc}") from None


def _plain_name(value: Any, what: str, origin: str) -> str:
    problem = name_problem(value, _MAX_MODEL_NAME)
    if problem is not None:
        raise ModelNotFoundError(f"{origin}: {what} {show(value)} {problem}")
    return str(value)


def _check_bag_size(count: int, key: str, origin: str) -> None:
    if count > MAX_BAG_MEMBERS:
        raise ModelNotFoundError(
            f"{origin}: '{key}' lists {count} networks, more than the {MAX_BAG_MEMBERS} a bag "
            "may hold (each runs a whole separation)"
        )


def _parse_registry_entry(data: Mapping[str, Any], origin: str) -> ModelSpec:
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ModelNotFoundError(f"{origin}: 'name' must be a non-empty string")
    _plain_name(name, "'name'", origin)
    sources = _sources(data.get("sources"), origin)
    raw_members = data.get("members")
    if not isinstance(raw_members, list) or not raw_members:
        raise ModelNotFoundError(f"{origin}: 'members' must be a non-empty list")
    _check_bag_size(len(raw_members), "members", origin)
    members = []
    for index, raw in enumerate(raw_members):
        if not isinstance(raw, Mapping):
            raise ModelNotFoundError(f"{origin}: members[{index}] must be a mapping")
        where = "file" if "file" in raw else "url"
        fields = {key: raw.get(key) for key in ("signature", "checksum", where)}
        if not all(isinstance(value, str) and value for value in fields.values()):
            raise ModelNotFoundError(
                f"{origin}: members[{index}] needs 'signature', 'checksum' and 'url' (or "
                f"'file') as strings{_QUOTE_HINT}"
            )
        # The signature names the cache file <signature>-<checksum>.th.
        _plain_name(raw["signature"], f"members[{index}]: signature", origin)
        try:
            if where == "file":
                members.append(
                    MemberSpec(raw["signature"], checksum=raw["checksum"],
                               path=_shipped_file(raw["file"], origin))
                )  # fmt: skip
            else:
                members.append(
                    MemberSpec(raw["signature"], checksum=raw["checksum"], url=raw["url"])
                )
        except ValueError as exc:
            raise ModelNotFoundError(f"{origin}: members[{index}]: {exc}") from None
    return ModelSpec(
        name=name,
        members=tuple(members),
        weights=_parse_weights(data.get("weights"), len(members), len(sources), origin),
        segment=_parse_segment(data.get("segment"), origin),
        sources=sources,
        description=str(data.get("description") or ""),
    )


def _shipped_file(name: str, origin: str) -> Path:
    """A checkpoint shipped inside the registry package (``file:`` instead of ``url:``)."""
    if Path(name).name != name or name_problem(name, _MAX_MODEL_NAME) is not None:
        raise ValueError(f"'file' must be a plain file name in the registry, got {show(name)}")
    return Path(str(importlib.resources.files("htsep.registry") / name))


def _parse_weights(
    value: Any, members: int, sources: int | None, origin: str
) -> tuple[tuple[float, ...], ...] | None:
    """A members x sources matrix of finite, non-negative numbers in which every source has
    some weight; ``sources`` is None where it is not known yet."""
    if value is None:
        return None
    expected = f"{members} x {sources if sources is not None else 'sources'}"
    problem = f"{origin}: 'weights' must be a {expected} matrix of numbers"
    if not isinstance(value, list) or len(value) != members:
        raise ModelNotFoundError(problem)
    rows = []
    for row in value:
        if not isinstance(row, list) or not all(
            isinstance(item, (int, float)) and not isinstance(item, bool) for item in row
        ):
            raise ModelNotFoundError(problem)
        try:
            rows.append(tuple(float(item) for item in row))
        except OverflowError:
            raise ModelNotFoundError(f"{problem} (finite, at most {_MAX_WEIGHT:g})") from None
    widths = {len(row) for row in rows}
    if len(widths) != 1 or (sources is not None and widths != {sources}) or widths == {0}:
        raise ModelNotFoundError(problem)
    for index, row in enumerate(rows):
        for column, weight in enumerate(row):
            if not (
                math.isfinite(weight) and (weight == 0 or _MIN_WEIGHT <= weight <= _MAX_WEIGHT)
            ):
                raise ModelNotFoundError(
                    f"{origin}: weights[{index}][{column}] is {show_number(weight)}; weights "
                    f"must be 0 or finite numbers from {_MIN_WEIGHT:.3g} to {_MAX_WEIGHT:g}"
                )
    for column in range(len(rows[0])):
        if not any(row[column] for row in rows):
            raise ModelNotFoundError(
                f"{origin}: 'weights' give source {column + 1} no weight in any member "
                "(its estimate would be 0 / 0)"
            )
    return tuple(rows)


def _parse_segment(value: Any, origin: str) -> Fraction | None:
    """A bag's segment in seconds: a number or a short decimal or fraction text, in
    (0, MAX_SEGMENT_SECONDS]."""
    if value is None:
        return None
    problem = f"{origin}: 'segment' must be a number of seconds"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ModelNotFoundError(problem)
    if isinstance(value, str) and not SEGMENT_TEXT.match(value):
        raise ModelNotFoundError(problem)
    if isinstance(value, float) and not math.isfinite(value):
        raise ModelNotFoundError(f"{problem}, got {value}")
    try:
        # Via str so that 7.8 means 39/5 exactly, not the binary float nearest to it.
        segment = Fraction(str(value).replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        raise ModelNotFoundError(problem) from None
    if segment < MIN_SEGMENT_SECONDS:
        raise ModelNotFoundError(
            f"{origin}: 'segment' must be at least {MIN_SEGMENT_SECONDS} second (every chunk "
            f"costs a whole network call), got {show(value)}"
        )
    if segment > MAX_SEGMENT_SECONDS:
        raise ModelNotFoundError(
            f"{origin}: 'segment' must be at most {MAX_SEGMENT_SECONDS} seconds, got {show(value)}"
        )
    return segment


# --- resolving a name --------------------------------------------------------------------------


def find_model(name: str, repo: str | os.PathLike[str] | None = None) -> ModelSpec:
    """Resolve ``name`` to a model: a checkpoint path, a model in ``repo``, or a registry model.

    Raises ModelNotFoundError (one line) when nothing matches, with close names suggested.
    """
    is_path = isinstance(name, os.PathLike)  # a file whatever its name, as load_model takes it
    if is_path:
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise ModelNotFoundError(f"a model is a name or a checkpoint path, not {name!r}")
    file_spec = _find_file(name, is_path)
    if file_spec is not None:
        return file_spec
    if repo is not None:
        if isinstance(repo, str) and not repo.strip():  # repo=os.environ.get(...) unset
            raise ModelNotFoundError(
                f"repo {repo!r}: empty folder name (an unset variable?); give a folder of "
                "checkpoints, or None for the registry"
            )
        return _find_in_repo(name, Path(repo))
    registry = registry_models()
    for spec in registry:
        if spec.name == name:
            return spec
    for spec in registry:
        for index, member in enumerate(spec.members):
            if member.signature == name:
                return ModelSpec(
                    name=member.signature,
                    members=(member,),
                    sources=spec.sources,
                    description=f"member {index + 1} of {spec.name}",
                )
    known = [spec.name for spec in registry]
    raise ModelNotFoundError(
        _not_found(f"unknown model '{name}'", name, known, "known models: " + ", ".join(known))
    )


def names_a_file(name: str) -> bool:
    """Whether the model name ``name`` is a checkpoint file's path (it has a path separator or
    a checkpoint's suffix) rather than a model of --repo or the registry."""
    separators = [os.sep] + ([os.altsep] if os.altsep else [])
    return any(sep in name for sep in separators) or name.endswith((*CHECKPOINT_SUFFIXES, ".pt"))


def _find_file(name: str, is_path: bool = False) -> ModelSpec | None:
    if not is_path and not names_a_file(name):
        # A plain name is a model of --repo or the registry, even if a file or folder of that
        # name happens to be here (the stems' folder <out>/htdemucs, a stray copy): a file is
        # named with its suffix or a path ("./mymodel").
        return None
    path = expand_user(name)
    status = _status(path)
    if status is not None and stat.S_ISREG(status.st_mode):
        return _file_spec(path)
    if status is not None and stat.S_ISDIR(status.st_mode):
        raise ModelNotFoundError(
            f"{name}: is a folder, not a checkpoint file (pass a folder of checkpoints with --repo)"
        )
    if status is not None:
        raise ModelNotFoundError(
            f"{name}: is {files.kind_of(status.st_mode)}, not a checkpoint file"
        )
    raise ModelNotFoundError(f"{name}: no such checkpoint file")


def _split_checksum(stem: str) -> tuple[str, str | None]:
    match = _CHECKSUM_SUFFIX.match(stem)
    return (match["signature"], match["checksum"]) if match else (stem, None)


# What ``htsep train`` writes in its run folder: the exported model, and the run's options.
_RUN_MODEL, _RUN_OPTIONS = "model.safetensors", "run.json"


def _file_spec(path: Path) -> ModelSpec:
    signature, checksum = _split_checksum(path.stem)
    run = files.real_path(path).parent
    # Every run of htsep train exports "model.safetensors": name it after its run folder, so
    # that the stems of runs/a and runs/b do not share <out>/model/.
    if (
        path.name == _RUN_MODEL
        and (run / _RUN_OPTIONS).is_file()
        and name_problem(run.name, _MAX_MODEL_NAME) is None
    ):
        signature = run.name
    # The name becomes the output folder <out>/<name>/: "...th" would name it "..".
    problem = name_problem(signature, _MAX_MODEL_NAME)
    if problem is not None:
        raise ModelNotFoundError(
            f"{path}: the file name gives the model name {show(signature)}, which {problem}; "
            "rename the file"
        )
    return ModelSpec(
        name=signature,
        members=(MemberSpec(signature=signature, checksum=checksum, path=path),),
        description=f"checkpoint {path}",
    )


@dataclass(frozen=True)
class _RepoContents:
    checkpoints: dict[str, list[Path]]  # signature -> files (more than one is a conflict)
    bags: dict[str, Path]


def _scan_repo(repo: Path) -> _RepoContents:
    status = _status(repo)
    if status is None or not stat.S_ISDIR(status.st_mode):
        what = "does not exist" if status is None else "is not a folder"
        raise ModelNotFoundError(f"{repo}: model repository {what}")
    try:
        entries = sorted(repo.iterdir())
    except OSError as exc:
        raise ModelNotFoundError(
            f"{repo}: cannot list the model repository ({exc.strerror or exc})"
        ) from None
    checkpoints: dict[str, list[Path]] = {}
    bags: dict[str, Path] = {}
    for file in entries:
        # Only regular files with plain names: the names become model names and folders.
        if not _is_regular(file) or name_problem(file.stem, _MAX_MODEL_NAME) is not None:
            continue
        if file.suffix in CHECKPOINT_SUFFIXES:
            signature, _ = _split_checksum(file.stem)
            if name_problem(signature, _MAX_MODEL_NAME) is None:
                checkpoints.setdefault(signature, []).append(file)
        elif file.suffix == ".yaml":
            bags[file.stem] = file
    return _RepoContents(checkpoints, bags)


def _repo_member(contents: _RepoContents, signature: str, repo: Path) -> MemberSpec:
    files = contents.checkpoints.get(signature)
    if not files:
        raise ModelNotFoundError(f"no checkpoint with signature '{signature}' in {repo}")
    if len(files) > 1:
        # Which one the user meant is a guess; demucs refuses duplicates too.
        names = ", ".join(file.name for file in files)
        raise ModelNotFoundError(
            f"{repo}: several checkpoints for signature '{signature}' ({names}); keep only one"
        )
    _, checksum = _split_checksum(files[0].stem)
    return MemberSpec(signature=signature, checksum=checksum, path=files[0])


def _find_in_repo(name: str, repo: Path) -> ModelSpec:
    contents = _scan_repo(repo)
    if name in contents.bags:
        return _repo_bag(name, contents, repo)
    if name in contents.checkpoints:
        member = _repo_member(contents, name, repo)
        return ModelSpec(name=name, members=(member,), description=f"checkpoint {member.path}")
    names = sorted(contents.bags) + sorted(set(contents.checkpoints) - set(contents.bags))
    listing = (
        "it holds: " + ", ".join(names) if names else "it holds no .th, .safetensors or .yaml files"
    )
    raise ModelNotFoundError(_not_found(f"no model '{name}' in {repo}", name, names, listing))


def _repo_bag(name: str, contents: _RepoContents, repo: Path) -> ModelSpec:
    path = contents.bags[name]
    try:
        text = _read_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        reason = (isinstance(exc, OSError) and exc.strerror) or str(exc)
        raise ModelNotFoundError(f"{path}: cannot read ({reason})") from None
    data = _load_yaml(text, str(path))
    signatures = data.get("models")
    if not isinstance(signatures, list) or not signatures:
        raise ModelNotFoundError(f"{path}: 'models' must be a non-empty list of signatures")
    _check_bag_size(len(signatures), "models", str(path))
    if not all(isinstance(signature, str) for signature in signatures):
        raise ModelNotFoundError(f"{path}: 'models' must be a list of signatures{_QUOTE_HINT}")
    for index, signature in enumerate(signatures):
        _plain_name(signature, f"models[{index}]: signature", str(path))
    members = []
    for signature in signatures:
        try:
            members.append(_repo_member(contents, signature, repo))
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"{path}: {exc}") from None
    return ModelSpec(
        name=name,
        members=tuple(members),
        weights=_parse_weights(data.get("weights"), len(members), None, str(path)),
        segment=_parse_segment(data.get("segment"), str(path)),
        description=f"bag of {len(members)} checkpoints from {repo}",
    )


def _not_found(head: str, name: str, candidates: Iterable[str], listing: str) -> str:
    """One line: what failed, the closest known name if any, then what is known."""
    close = difflib.get_close_matches(name, list(candidates), n=1)
    if close:
        return f"{head}; did you mean '{close[0]}'? {listing[0].upper()}{listing[1:]}"
    return f"{head}; {listing}"


# --- verification and download -----------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with _open_regular(path) as handle:
        while block := handle.read(_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, checksum: str | None) -> tuple[bool, str]:
    """Whether ``path`` is a readable file whose SHA-256 starts with ``checksum``, and the
    hash."""
    if checksum is None:
        return _is_regular(path), ""
    try:
        actual = _sha256(path)
    except OSError as exc:
        logger.warning("%s: cannot read (%s)", path, exc.strerror or exc)
        return False, ""
    return actual.startswith(checksum), actual


def is_cached(member: MemberSpec) -> bool:
    """Whether ``fetch`` would find ``member`` on disk (present; the hash is not checked here).
    An unusable cache (missing, unreadable, not a folder) holds nothing."""
    if member.path is not None:
        return _is_regular(member.path)
    return any(_is_regular(folder / member.file_name) for folder in (cache_dir(), torch_hub_dir()))


def fetch(member: MemberSpec, *, progress: bool = True) -> Path:
    """A local file for ``member`` whose SHA-256 matches its checksum; downloads it if needed.

    Looks in our cache, then in torch.hub's (used in place), then downloads into our cache.
    Raises CheckpointError for a bad explicit file, DownloadError when downloading fails or the
    cache cannot hold the download.
    """
    if member.path is not None:
        return _check_local(member.path, member.checksum)

    ours = cache_dir() / member.file_name
    status = _status(ours)
    if status is not None and not stat.S_ISREG(status.st_mode):
        raise DownloadError(
            f"{ours}: is {files.kind_of(status.st_mode)} where the cache keeps the checkpoint; "
            "remove it, or set HTSEP_CACHE to another folder"
        )
    if status is not None and status.st_size > MAX_DOWNLOAD_BYTES:
        # No checkpoint is that large: not worth hashing (8 GiB took 30 s).
        logger.warning(
            "%s: %d bytes, larger than any checkpoint; downloading it again", ours, status.st_size
        )
    elif status is not None:
        good, actual = _verified(ours, member.checksum)
        if good:
            return ours
        if actual:  # else _verified said why it could not read it
            logger.warning(
                "%s: SHA-256 %s does not match %s; downloading it again",
                ours,
                actual[:12],
                member.checksum,
            )

    theirs = torch_hub_dir() / member.file_name
    if _is_regular(theirs):
        good, actual = _verified(theirs, member.checksum)
        if good:
            logger.info("using %s from torch.hub's cache", theirs)
            return theirs
        # Not ours to delete: demucs manages that folder.
        logger.warning(
            "%s: SHA-256 %s does not match %s; ignoring it", theirs, actual[:12], member.checksum
        )

    if member.checksum is None:
        logger.warning("%s has no checksum: the download cannot be verified", member.signature)
    # A bad file in the cache is replaced by the verified download, never removed before.
    return _download(_download_url(member), ours, member.checksum, progress=progress)


def _check_local(path: Path, checksum: str | None) -> Path:
    status = _status(path)
    if status is None:
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not stat.S_ISREG(status.st_mode):
        raise CheckpointError(f"{path}: is {files.kind_of(status.st_mode)}, not a checkpoint file")
    if checksum is not None:
        try:
            actual = _sha256(path)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if not actual.startswith(checksum):
            raise CheckpointError(
                f"{path}: SHA-256 starts with {actual[: len(checksum)]}, expected {checksum} "
                "(the file is damaged or not the checkpoint its name claims)"
            )
    return path


def _download_url(member: MemberSpec) -> str:
    mirror = _configured("HTSEP_MIRROR")  # only spaces: an unset variable in quotes
    if mirror:
        try:
            parts = urllib.parse.urlsplit(mirror)
            with_user = parts.username is not None or parts.password is not None
        except ValueError:  # a malformed address: _stream names it when it is used
            return f"{mirror.rstrip('/')}/{member.file_name}"
        if with_user:  # never repeated in a message: it may hold a password
            raise DownloadError(
                "HTSEP_MIRROR holds a user name or password, which htsep does not send: "
                "use a mirror address without them"
            )
        # The file name goes at the end of the path, before a query (a token), and a
        # "#fragment", which is never sent, is dropped.
        path = f"{parts.path.rstrip('/')}/{member.file_name}"
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
    if member.url is None:
        raise _offline_error(f"no download address for '{member.signature}'", member.file_name)
    return member.url


def mirror_advice() -> str:
    """How a mirror helps a failed download: set one, or, where HTSEP_MIRROR is set (the
    address that failed), check it."""
    if _configured("HTSEP_MIRROR"):
        return "check HTSEP_MIRROR (the mirror's URL the download came from)"
    return "set HTSEP_MIRROR to a mirror's URL"


def _offline_error(problem: str, file_name: str) -> DownloadError:
    """``problem`` with the ways to go on without downloading ``file_name``, in the words of
    the Python API (the command line puts its commands' words in their place)."""
    mirror = mirror_advice()
    advice = (
        f"to work offline, copy '{file_name}' from the cache of a machine with network "
        f"(htsep.Separator(name) downloads it there) into {cache_dir()}, {mirror}, give "
        "htsep.Separator a checkpoint file path or repo=DIR (a folder of checkpoints), or use "
        "the shipped model 'htsep-tiny'"
    )
    return DownloadError(problem, file_name=file_name, advice=advice)


def _unusable_cache(folder: Path, exc: OSError) -> DownloadError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return DownloadError(
        f"cannot use the download cache {folder} ({reason}); set HTSEP_CACHE to a writable "
        "folder, or use a checkpoint file by its path"
    )


def _download(url: str, final: Path, checksum: str | None, *, progress: bool) -> Path:
    """Download ``url`` to ``final`` through a private temporary file, renamed once verified."""
    folder = final.parent
    made: list[Path] = []
    try:
        made = files.make_folder(folder)
        files.remove_stale(folder)  # .part files of downloads that were killed
        # Each download writes its own file in the same folder, so the rename is atomic and
        # concurrent downloads of the same checkpoint cannot interleave their bytes.
        temp = files.create_temporary(final, suffix=".part")
    except OSError as exc:
        files.remove_empty(made)
        raise _unusable_cache(folder, exc) from None
    placed = False
    try:
        try:
            with open(temp, "wb") as out:
                actual = _stream(url, out, final.name, progress=progress)
        except _CacheWriteFailed as failed:  # a full disk: no network advice
            raise _unusable_cache(folder, failed.cause) from None
        except OSError as exc:  # opening or closing; _stream reports its own failures
            raise _unusable_cache(folder, exc) from None
        if checksum is not None and not actual.startswith(checksum):
            raise _offline_error(
                f"{_shown(url)}: downloaded file has SHA-256 {actual[: len(checksum)]}..., "
                f"expected {checksum}...; the server sent a different file (nothing was kept)",
                final.name,
            )
        try:
            files.place(temp, final, replace=True)
        except OSError as exc:
            raise _unusable_cache(folder, exc) from None
        placed = True
    finally:
        if not placed:
            with contextlib.suppress(OSError):  # else remove_stale takes it the next time
                temp.unlink(missing_ok=True)
            files.remove_empty(made)  # a cache folder this download made, if left empty
    logger.info("downloaded %s to %s", _shown(url), final)
    return final


# The most a download may take: the published checkpoints are 80-170 MB each, and the SHA-256
# check at the end would refuse anything else, but only after it had filled the disk.
MAX_DOWNLOAD_BYTES = 1 << 30
_TOO_BIG = f"over the {MAX_DOWNLOAD_BYTES >> 20} MiB any checkpoint of the registry takes"


class _CacheWriteFailed(Exception):
    """Writing a downloaded block into the cache failed (``cause``): the cache's fault."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _shown(url: str) -> str:
    """``url`` as messages show it: a query (a mirror's token, a signed address) hidden."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if not parts.query:
        return url
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "...", ""))


class _HeaderDeadline:
    """Stops a request whose response has not begun (status line and headers, redirects
    included) within ``HEADERS_WITHIN_SECONDS``: the read timeout is per read, so a server
    sending its headers a byte at a time held a download forever. The connections it watches
    are shut down when the time is up; their reads then fail, and ``expired`` says why."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connections: list[http.client.HTTPConnection] = []
        self.state = "waiting"  # then "began" or "expired", whichever comes first
        self.timer = threading.Timer(HEADERS_WITHIN_SECONDS, self._expire)
        self.timer.daemon = True

    def watch(self, connection: http.client.HTTPConnection) -> None:
        with self.lock:
            self.connections.append(connection)

    def _expire(self) -> None:
        with self.lock:
            if self.state != "waiting":
                return
            self.state = "expired"
            for connection in self.connections:
                with contextlib.suppress(OSError, AttributeError):
                    connection.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]

    def began(self) -> bool:
        """The response has begun: stop watching. -> False if the time ran out first."""
        self.timer.cancel()
        with self.lock:
            if self.state == "waiting":
                self.state = "began"
            self.connections.clear()
            return self.state == "began"


def _watched(klass: type[http.client.HTTPConnection], deadline: _HeaderDeadline) -> Any:
    def connection(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
        made = klass(*args, **kwargs)
        deadline.watch(made)
        return made

    return connection


class _DeadlineHTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline: _HeaderDeadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_watched(http.client.HTTPConnection, self.deadline), req)


class _DeadlineHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _HeaderDeadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connection = _watched(http.client.HTTPSConnection, self.deadline)
        return self.do_open(connection, req, context=self._context)  # type: ignore[attr-defined]


@contextlib.contextmanager
def _opened(url: str, shown: str, label: str) -> Iterator[tuple[Any, int | None]]:
    """The body of ``url`` to read (an object with read1) and its announced length. A
    ``file:`` address must name a regular file (a FIFO would block the open, a device never
    end); http and https responses must begin within ``HEADERS_WITHIN_SECONDS``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise _failed(shown, "a file: address must name a file on this machine", label)
        path = Path(urllib.request.url2pathname(parts.path))
        try:
            handle = _open_regular(path)
        except OSError as exc:
            reason = f"{path}: {exc.strerror}" if exc.strerror else str(exc)
            raise _failed(shown, reason, label) from None
        with handle:
            yield handle, os.fstat(handle.fileno()).st_size
        return
    deadline = _HeaderDeadline()
    opener = urllib.request.build_opener(_DeadlineHTTP(deadline), _DeadlineHTTPS(deadline))
    deadline.timer.start()
    try:
        response = opener.open(url, timeout=DOWNLOAD_TIMEOUT_SECONDS)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        if deadline.began():
            raise
        raise _failed(shown, _no_response(), label) from exc
    finally:
        deadline.timer.cancel()
    with response:
        if not deadline.began():
            raise _failed(shown, _no_response(), label)
        length = (response.headers.get("Content-Length") or "").strip()
        yield response, int(length) if length.isascii() and length.isdigit() else None


def _no_response() -> str:
    return f"no response from the server within {HEADERS_WITHIN_SECONDS:g} s"


def _stream(url: str, out: IO[bytes], label: str, *, progress: bool) -> str:
    """Copy ``url`` into ``out``; return the SHA-256 of what was received."""
    digest = hashlib.sha256()
    received = 0
    total: int | None = None
    shown = _shown(url)
    logger.info("downloading %s", shown)
    try:
        with _opened(url, shown, label) as (response, total):
            if total is not None and total > MAX_DOWNLOAD_BYTES:
                raise _failed(shown, f"the server offers {total} bytes, {_TOO_BIG}", label)
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                disable=not progress,
                leave=False,
            ) as bar:
                window_start, window_received = time.monotonic(), 0
                # read1 returns what one read of the socket gives, so a drip is seen as one.
                while block := response.read1(_BLOCK_BYTES):
                    digest.update(block)
                    try:
                        out.write(block)
                    except OSError as exc:  # the cache's disk, not the network
                        raise _CacheWriteFailed(exc) from exc
                    received += len(block)
                    bar.update(len(block))
                    if received > MAX_DOWNLOAD_BYTES:  # a server that sends without end
                        raise _failed(
                            shown, f"more than {MAX_DOWNLOAD_BYTES} bytes, {_TOO_BIG}", label
                        )
                    if time.monotonic() - window_start >= STALL_WINDOW_SECONDS:
                        if received - window_received < STALL_MIN_BYTES:
                            raise _failed(shown, _stalled(received - window_received), label)
                        window_start, window_received = time.monotonic(), received
    except (_CacheWriteFailed, DownloadError):
        raise
    except urllib.error.HTTPError as exc:
        raise _failed(shown, f"HTTP {exc.code} {exc.reason}", label) from exc
    except urllib.error.URLError as exc:
        raise _failed(shown, str(exc.reason), label) from exc
    except http.client.IncompleteRead as exc:
        raise _truncated(shown, received + len(exc.partial), total, label) from exc
    except (http.client.HTTPException, OSError) as exc:
        # Resets, timeouts mid-transfer, and a full disk while writing the temporary file.
        raise _failed(shown, str(exc) or type(exc).__name__, label) from exc
    except ValueError as exc:
        # A malformed address (HTSEP_MIRROR without a scheme, a broken IPv6 host, ...).
        raise _failed(shown, f"not a valid URL ({exc})", label) from exc
    if total is not None and received != total:
        raise _truncated(shown, received, total, label)
    return digest.hexdigest()


def _stalled(received: int) -> str:
    return (
        f"the server sent only {received} bytes in {STALL_WINDOW_SECONDS:g} s "
        f"(at least {STALL_MIN_BYTES} are needed to go on)"
    )


def _failed(url: str, reason: str, label: str) -> DownloadError:
    return _offline_error(f"could not download {url}: {reason}", label)


def _truncated(url: str, received: int, total: int | None, label: str) -> DownloadError:
    of_total = f" of {total}" if total is not None else ""
    return _failed(url, f"the connection closed after {received}{of_total} bytes", label)
