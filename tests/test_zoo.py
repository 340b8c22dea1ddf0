"""The model zoo: the shipped registry, name resolution, and downloads from a local HTTP server.

Nothing here touches the network beyond 127.0.0.1: every test points HTSEP_CACHE, TORCH_HOME and
HTSEP_MIRROR into its own temporary folder. The checkpoints served are real demucs files written
by demucs's own serializer (tests/reference.py), so signatures and checksums are genuine.
"""

from __future__ import annotations

import hashlib
import http.server
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import htsep
import reference
from htsep import zoo
from htsep.errors import CheckpointError, DownloadError, ModelNotFoundError
from htsep.zoo import MemberSpec, fetch, find_model, is_cached

RELEASE_HOST = "https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/"
OFFLINE_ADVICE = "to work offline, copy '"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


@pytest.fixture(autouse=True)
def private_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read or write the user's caches, never reach a real host."""
    monkeypatch.setenv("HTSEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HTSEP_MIRROR", "http://127.0.0.1:9/unreachable")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)


@dataclass(frozen=True)
class Served:
    """A real checkpoint file named ``<sig>-<sha8>.th`` and its member spec."""

    path: Path
    member: MemberSpec


@pytest.fixture(scope="session")
def served(small_checkpoint: tuple[Path, Path, object]) -> Served:
    th_path = small_checkpoint[0]
    signature, checksum = th_path.stem.rsplit("-", 1)
    return Served(th_path, MemberSpec(signature, checksum=checksum))


@pytest.fixture(scope="session")
def impostor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different real checkpoint: valid bytes that do not match ``served``'s checksum."""
    model = reference.build(reference.SOURCES_4, reference.SMALL, seed=8)
    path, _ = reference.write_th(model, tmp_path_factory.mktemp("impostor"), "small")
    return path


@dataclass
class Server:
    """A local HTTP server over ``root``; counts requests and can misbehave on demand."""

    root: Path
    url: str = ""
    requests: list[str] = field(default_factory=list)
    truncate: set[str] = field(default_factory=set)  # names served with half their body
    barrier: threading.Barrier | None = None  # holds responses until this many requests arrived
    stall: threading.Event | None = None  # when set, full bodies pause halfway until it fires
    halfway: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    length: str | None = None  # the Content-Length to announce ("": none) instead of the size
    drip: float | None = None  # when set, bodies go out 16 bytes at a time, this many s apart
    header_drip: float | None = None  # when set, the headers go out a byte at a time


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    state = Server(root=tmp_path / "www")
    state.root.mkdir()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            state.requests.append(self.path)
            if state.barrier is not None:
                state.barrier.wait(timeout=10)
            path = state.root / self.path.split("?")[0].lstrip("/")
            if not path.is_file():
                self.send_error(404, "Not Found")
                return
            body = path.read_bytes()
            if state.header_drip is not None:
                head = b"HTTP/1.1 200 OK\r\n" + b"X-Padding: " + b"x" * 10_000
                for byte in head:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(state.header_drip)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if state.length != "":
                self.send_header("Content-Length", state.length or str(len(body)))
            self.end_headers()
            if path.name in state.truncate:
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True  # the client sees the socket close early
                return
            if state.stall is not None:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                state.halfway.release()
                state.stall.wait(timeout=10)
                body = body[len(body) // 2 :]
            if state.drip is not None:
                for start in range(0, len(body), 16):
                    self.wfile.write(body[start : start + 16])
                    time.sleep(state.drip)
                return
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def mirror(server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    monkeypatch.setenv("HTSEP_MIRROR", server.url + "/")
    return server


# --- where files live --------------------------------------------------------------------------


def test_cache_folders_follow_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert zoo.cache_dir() == tmp_path / "cache"
    assert zoo.torch_hub_dir() == tmp_path / "torch" / "hub" / "checkpoints"
    monkeypatch.delenv("HTSEP_CACHE")
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "xdg" / "htsep"
    assert zoo.torch_hub_dir() == tmp_path / "xdg" / "torch" / "hub" / "checkpoints"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.cache_dir() == tmp_path / "home" / ".cache" / "htsep"
    assert zoo.torch_hub_dir() == tmp_path / "home" / ".cache" / "torch" / "hub" / "checkpoints"


@pytest.mark.parametrize("xdg", ["relative/cache", "~/tilde-cache", ".", "/abs/cache"])
def test_a_relative_xdg_cache_home_is_ignored_for_ours_and_followed_like_torch_for_demucs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, xdg: str
) -> None:
    """The XDG specification: a relative $XDG_CACHE_HOME is invalid, so htsep's cache does not
    land in whatever folder a script runs from; demucs's files are still looked for where
    torch.hub puts them (torch takes the value as it is: the oracle here)."""
    import torch.hub

    monkeypatch.delenv("HTSEP_CACHE")
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.chdir(tmp_path)
    ours = Path(xdg) / "htsep" if xdg.startswith("/") else tmp_path / "home" / ".cache" / "htsep"
    assert zoo.cache_dir() == ours
    assert zoo.torch_hub_dir() == Path(torch.hub.get_dir()) / "checkpoints"


# --- the shipped registry ----------------------------------------------------------------------


def test_registry_holds_the_released_models_and_the_shipped_one() -> None:
    models = {spec.name: spec for spec in zoo.registry_models()}
    assert list(models) == ["htdemucs", "htdemucs_6s", "htdemucs_ft", "htsep-tiny"]
    (tiny,) = models.pop("htsep-tiny").members
    assert tiny.url is None and tiny.path is not None and tiny.path.parent.name == "models"
    assert zoo.DEFAULT_MODEL in models
    four = ("drums", "bass", "other", "vocals")

    htdemucs = models["htdemucs"]
    assert htdemucs.sources == four
    assert [(m.signature, m.checksum) for m in htdemucs.members] == [("955717e8", "8726e21a")]
    assert htdemucs.weights is None and htdemucs.segment is None

    ft = models["htdemucs_ft"]
    assert ft.sources == four
    assert [(m.signature, m.checksum) for m in ft.members] == [
        ("f7e0c4bc", "ba3fe64a"),
        ("d12395a8", "e57c48e6"),
        ("92cfc3b6", "ef3bcb9c"),
        ("04573f0d", "f3cf25b2"),
    ]
    assert ft.weights == tuple(
        tuple(1.0 if row == col else 0.0 for col in range(4)) for row in range(4)
    )

    six = models["htdemucs_6s"]
    assert six.sources == (*four, "guitar", "piano")
    assert [(m.signature, m.checksum) for m in six.members] == [("5c90dfd2", "34c22ccb")]

    for spec in models.values():
        assert spec.description
        for member in spec.members:
            assert member.url == f"{RELEASE_HOST}{member.signature}-{member.checksum}.th"
            assert member.path is None


def test_registry_names_and_signatures_resolve() -> None:
    assert find_model("htdemucs_ft") == {m.name: m for m in zoo.registry_models()}["htdemucs_ft"]
    single = find_model("d12395a8")
    assert single.name == "d12395a8"
    assert single.members == (
        MemberSpec("d12395a8", checksum="e57c48e6", url=f"{RELEASE_HOST}d12395a8-e57c48e6.th"),
    )
    assert single.weights is None
    assert single.sources == ("drums", "bass", "other", "vocals")


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        find_model("htdemucs_fx")
    assert str(caught.value) == (
        "unknown model 'htdemucs_fx'; did you mean 'htdemucs_ft'? "
        "Known models: htdemucs, htdemucs_6s, htdemucs_ft, htsep-tiny"
    )
    with pytest.raises(ModelNotFoundError) as caught:
        find_model("mdx_extra")
    assert str(caught.value) == (
        "unknown model 'mdx_extra'; known models: htdemucs, htdemucs_6s, htdemucs_ft, htsep-tiny"
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name: x\nsources: [a, b]\nmembers: []\n", "'members' must be a non-empty list"),
        (
            "name: x\nsources: [a, b]\nmembers: [{signature: '01234567', checksum: 12345678, "
            "url: u}]\n",
            "quote all-digit values",
        ),
        (
            "name: x\nsources: [a, b]\nmembers: [{signature: s, checksum: nothex, url: u}]\n",
            "is not a hexadecimal SHA-256 prefix",
        ),
        (
            "name: x\nsources: [a, b]\nmembers: [{signature: s, checksum: ab, url: u}]\n"
            "weights: [[1, 0, 0]]\n",
            "'weights' must be a 1 x 2 matrix",
        ),
        (
            "name: x\nsources: [a, b]\nmembers: [{signature: s, checksum: ab, url: u}]\n"
            "segment: -1\n",
            "'segment' must be at least 1 second",
        ),
        ("[1, 2]\n", "expected a mapping of keys, got list"),
    ],
)
def test_malformed_registry_entries_are_named(text: str, problem: str) -> None:
    with pytest.raises(ModelNotFoundError, match="^bad.yaml: .*" + problem):
        zoo._parse_registry_entry(zoo._load_yaml(text, "bad.yaml"), "bad.yaml")


# --- explicit checkpoint files -----------------------------------------------------------------


def test_explicit_th_path(served: Served) -> None:
    spec = find_model(str(served.path))
    assert spec.name == served.member.signature == "small"
    assert spec.members == (MemberSpec("small", checksum=served.member.checksum, path=served.path),)
    assert spec.sources is None and spec.weights is None
    assert fetch(spec.members[0]) == served.path


def test_explicit_safetensors_path(small_checkpoint: tuple[Path, Path, object]) -> None:
    spec = find_model(str(small_checkpoint[1]))
    assert spec.name == "small"
    assert spec.members == (MemberSpec("small", path=small_checkpoint[1]),)


def test_missing_path(tmp_path: Path) -> None:
    for name in (str(tmp_path / "nothing.th"), "nothing.safetensors", "dir/nothing"):
        with pytest.raises(ModelNotFoundError) as caught:
            find_model(name)
        assert str(caught.value) == f"{name}: no such checkpoint file"


def test_folder_given_as_a_model_name(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="is a folder, not a checkpoint file.*--repo"):
        find_model(str(tmp_path))


def test_fetch_checks_a_local_files_checksum(served: Served, tmp_path: Path) -> None:
    wrong = "0" * 8 if not served.member.checksum.startswith("0") else "1" * 8
    member = MemberSpec("small", checksum=wrong, path=served.path)
    with pytest.raises(CheckpointError) as caught:
        fetch(member)
    message = str(caught.value)
    assert str(served.path) in message
    assert f"SHA-256 starts with {served.member.checksum}, expected {wrong}" in message
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        fetch(MemberSpec("small", path=tmp_path / "gone.th"))


# --- local repositories ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demucs-style --repo folder: a hashed .th, a plain .th, a .safetensors and a bag."""
    folder = tmp_path_factory.mktemp("repo")
    model = reference.build(reference.SOURCES_4, reference.SMALL, seed=3)
    reference.write_th(model, folder, "aaaa1111")
    reference.write_safetensors(model, folder, "bbbb2222")
    hashed, _ = reference.write_th(model, folder / "tmp", "cccc3333")
    shutil.move(hashed, folder / "cccc3333.th")  # demucs also accepts files without a hash
    (folder / "tmp").rmdir()
    (folder / "mybag.yaml").write_text(
        "models: ['aaaa1111', 'bbbb2222', 'cccc3333']\n"
        "weights: [[1, 0, 0, 0], [0, 1, 1, 0.5], [0, 0, 0, 0.5]]\n"
        "segment: 7.8\n"
    )
    (folder / "plain.yaml").write_text("models: ['aaaa1111']\n")
    return folder


def test_repo_bag(repo: Path) -> None:
    spec = find_model("mybag", repo)
    (hashed,) = repo.glob("aaaa1111-*.th")
    assert spec.name == "mybag"
    assert spec.members == (
        MemberSpec("aaaa1111", checksum=hashed.stem.split("-")[1], path=hashed),
        MemberSpec("bbbb2222", path=repo / "bbbb2222.safetensors"),
        MemberSpec("cccc3333", path=repo / "cccc3333.th"),
    )
    assert spec.weights == ((1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 1.0, 0.5), (0.0, 0.0, 0.0, 0.5))
    assert spec.segment == Fraction("7.8") == Fraction(39, 5)
    assert spec.sources is None
    for member in spec.members:
        assert fetch(member) == member.path
        assert htsep.load_model(fetch(member)).config.sources == tuple(reference.SOURCES_4)

    plain = find_model("plain", repo)
    assert plain.weights is None and plain.segment is None and len(plain.members) == 1


def test_repo_single_checkpoints(repo: Path) -> None:
    for signature, file in [
        ("aaaa1111", next(repo.glob("aaaa1111-*.th"))),
        ("bbbb2222", repo / "bbbb2222.safetensors"),
        ("cccc3333", repo / "cccc3333.th"),
    ]:
        spec = find_model(signature, repo)
        assert spec.name == signature
        assert [member.path for member in spec.members] == [file]


def test_repo_without_the_name(repo: Path) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        find_model("mybg", repo)
    assert str(caught.value) == (
        f"no model 'mybg' in {repo}; did you mean 'mybag'? "
        "It holds: mybag, plain, aaaa1111, bbbb2222, cccc3333"
    )
    # With a repo, the registry is not consulted (like demucs --repo).
    with pytest.raises(ModelNotFoundError, match="no model 'htdemucs' in"):
        find_model("htdemucs", repo)


def test_repo_that_is_not_a_folder(served: Served, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        find_model("small", served.path)
    assert str(caught.value) == f"{served.path}: model repository is not a folder"
    with pytest.raises(ModelNotFoundError, match="model repository does not exist"):
        find_model("small", tmp_path / "missing")


def test_repo_duplicate_signature(tmp_path: Path) -> None:
    model = reference.build(reference.SOURCES_4, reference.SMALL, seed=4)
    hashed, _ = reference.write_th(model, tmp_path, "dup")
    reference.write_safetensors(model, tmp_path, "dup")
    with pytest.raises(ModelNotFoundError) as caught:
        find_model("dup", tmp_path)
    assert str(caught.value) == (
        f"{tmp_path}: several checkpoints for signature 'dup' "
        f"({hashed.name}, dup.safetensors); keep only one"
    )


def test_repo_bag_with_a_missing_member(tmp_path: Path) -> None:
    model = reference.build(reference.SOURCES_4, reference.SMALL, seed=5)
    reference.write_th(model, tmp_path, "present")
    (tmp_path / "bag.yaml").write_text("models: [present, absent]\n")
    with pytest.raises(ModelNotFoundError) as caught:
        find_model("bag", tmp_path)
    assert str(caught.value) == (
        f"{tmp_path / 'bag.yaml'}: no checkpoint with signature 'absent' in {tmp_path}"
    )


def test_repo_bag_with_bad_weights(tmp_path: Path) -> None:
    model = reference.build(reference.SOURCES_4, reference.SMALL, seed=5)
    reference.write_th(model, tmp_path, "one")
    (tmp_path / "bag.yaml").write_text("models: [one]\nweights: [[1, 1], [1, 1]]\n")
    with pytest.raises(ModelNotFoundError, match=r"'weights' must be a 1 x sources matrix"):
        find_model("bag", tmp_path)


# --- downloads ---------------------------------------------------------------------------------


def test_download_lands_verified_in_the_cache(mirror: Server, served: Served) -> None:
    shutil.copy(served.path, mirror.root / served.path.name)
    assert not is_cached(served.member)
    path = fetch(served.member, progress=False)
    assert path == zoo.cache_dir() / served.path.name
    assert sha256(path) == sha256(served.path)
    assert mirror.requests == [f"/{served.path.name}"]
    assert cache_leftovers(zoo.cache_dir()) == [served.path.name]
    assert is_cached(served.member)
    model = htsep.load_model(path)
    assert model.config.sources == tuple(reference.SOURCES_4)

    # The second time the verified cache answers; the server is not asked again.
    assert fetch(served.member, progress=False) == path
    assert len(mirror.requests) == 1


def test_download_from_the_members_url(
    server: Server, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HTSEP_MIRROR")
    (server.root / "elsewhere").mkdir()
    shutil.copy(served.path, server.root / "elsewhere" / "file.th")
    member = MemberSpec("small", served.member.checksum, url=f"{server.url}/elsewhere/file.th")
    path = fetch(member, progress=False)
    assert path == zoo.cache_dir() / served.path.name
    assert server.requests == ["/elsewhere/file.th"]


def test_mirror_replaces_the_registry_host(mirror: Server) -> None:
    member = find_model("htdemucs").members[0]
    with pytest.raises(DownloadError) as caught:
        fetch(member, progress=False)
    assert mirror.requests == ["/955717e8-8726e21a.th"]
    assert f"could not download {mirror.url}/955717e8-8726e21a.th: HTTP 404" in str(caught.value)


def test_wrong_file_is_refused_and_nothing_is_kept(
    mirror: Server, served: Served, impostor: Path
) -> None:
    shutil.copy(impostor, mirror.root / served.path.name)
    url = f"{mirror.url}/{served.path.name}"
    with pytest.raises(DownloadError) as caught:
        fetch(served.member, progress=False)
    message = str(caught.value)
    actual = sha256(impostor)[:8]
    assert message.startswith(
        f"{url}: downloaded file has SHA-256 {actual}..., expected {served.member.checksum}...; "
    )
    assert "\n" not in message
    assert cache_leftovers(zoo.cache_dir()) == []


def test_truncated_download_is_refused_and_nothing_is_kept(mirror: Server, served: Served) -> None:
    shutil.copy(served.path, mirror.root / served.path.name)
    mirror.truncate.add(served.path.name)
    size = served.path.stat().st_size
    with pytest.raises(DownloadError) as caught:
        fetch(served.member, progress=False)
    assert str(caught.value).startswith(
        f"could not download {mirror.url}/{served.path.name}: the connection closed after "
        f"{size // 2} of {size} bytes; {OFFLINE_ADVICE}"
    )
    assert cache_leftovers(zoo.cache_dir()) == []


def test_missing_file_on_the_server(mirror: Server, served: Served) -> None:
    with pytest.raises(DownloadError) as caught:
        fetch(served.member, progress=False)
    assert str(caught.value) == (
        f"could not download {mirror.url}/{served.path.name}: HTTP 404 Not Found; "
        f"{OFFLINE_ADVICE}{served.path.name}' from the cache of a machine with network "
        f"(htsep.Separator(name) downloads it there) into {zoo.cache_dir()}, check "
        "HTSEP_MIRROR (the mirror's URL the download came from), give htsep.Separator a "
        "checkpoint file path or repo=DIR (a folder of checkpoints), or use the shipped model "
        "'htsep-tiny'"
    )
    assert cache_leftovers(zoo.cache_dir()) == []


def test_unreachable_host(served: Served) -> None:
    # The autouse fixture points the mirror at port 9 (discard), where nothing listens.
    with pytest.raises(DownloadError, match="^could not download http://127.0.0.1:9/unreachable/"):
        fetch(served.member, progress=False)


@pytest.mark.parametrize("address", ["mirror.example.com/demucs", "http://[::1", "notaurl"])
def test_a_malformed_mirror_is_one_download_error(
    served: Served, monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    monkeypatch.setenv("HTSEP_MIRROR", address)
    with pytest.raises(DownloadError, match="^could not download .*: not a valid URL"):
        fetch(served.member, progress=False)
    cache = zoo.cache_dir()
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


def test_torch_hub_cache_is_used_in_place(mirror: Server, served: Served) -> None:
    hub = zoo.torch_hub_dir()
    hub.mkdir(parents=True)
    shutil.copy(served.path, hub / served.path.name)
    assert is_cached(served.member)
    assert fetch(served.member, progress=False) == hub / served.path.name
    assert mirror.requests == []
    assert cache_leftovers(zoo.cache_dir()) == []


def test_bad_torch_hub_file_is_ignored_not_deleted(
    mirror: Server, served: Served, impostor: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub = zoo.torch_hub_dir()
    hub.mkdir(parents=True)
    shutil.copy(impostor, hub / served.path.name)
    shutil.copy(served.path, mirror.root / served.path.name)
    with caplog.at_level(logging.WARNING, logger="htsep.zoo"):
        path = fetch(served.member, progress=False)
    assert path == zoo.cache_dir() / served.path.name
    assert sha256(path) == sha256(served.path)
    assert sha256(hub / served.path.name) == sha256(impostor)
    assert "ignoring it" in caplog.text


def test_corrupt_cached_file_is_downloaded_again(mirror: Server, served: Served) -> None:
    cached = zoo.cache_dir() / served.path.name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(served.path.read_bytes()[:1000])
    shutil.copy(served.path, mirror.root / served.path.name)
    assert fetch(served.member, progress=False) == cached
    assert sha256(cached) == sha256(served.path)
    assert len(mirror.requests) == 1


def test_concurrent_downloads_end_with_one_good_file(mirror: Server, served: Served) -> None:
    shutil.copy(served.path, mirror.root / served.path.name)
    # Both requests are in flight, each paused halfway through its body, before either ends.
    mirror.barrier = threading.Barrier(2)
    mirror.stall = threading.Event()
    results: list[Path | BaseException] = []

    def download() -> None:
        try:
            results.append(fetch(served.member, progress=False))
        except BaseException as exc:  # reported below, not lost in the thread
            results.append(exc)

    threads = [threading.Thread(target=download) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        assert mirror.halfway.acquire(timeout=10) and mirror.halfway.acquire(timeout=10)
        # Mid-download, another reader must not find a partial file under the final name.
        partial = cache_leftovers(zoo.cache_dir())
        assert len(partial) == 2 and all(name.endswith(".part") for name in partial)
        assert not is_cached(served.member)
    finally:
        mirror.stall.set()
        for thread in threads:
            thread.join(timeout=30)
    final = zoo.cache_dir() / served.path.name
    assert results == [final, final]
    assert len(mirror.requests) == 2
    assert sha256(final) == sha256(served.path)
    assert cache_leftovers(zoo.cache_dir()) == [served.path.name]


# --- hostile registries, repositories and caches -----------------------------------------------

ENTRY = "name: x\nsources: [a, b]\nmembers: [{signature: s, checksum: ab, url: u}]\n"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (ENTRY + "weights: [[.nan, 1]]\n", r"weights\[0\]\[0\] is nan"),
        (ENTRY + "weights: [[.inf, 1]]\n", r"weights\[0\]\[0\] is inf"),
        (ENTRY + "weights: [[-1, 1]]\n", r"weights\[0\]\[0\] is -1"),
        (ENTRY + "weights: [[1.0e+300, 1]]\n", r"to 1e\+06"),
        (ENTRY + "weights: [[1, 0]]\n", "source 2 no weight"),
        (ENTRY + "weights: [[0, 0]]\n", "source 1 no weight"),
        (ENTRY + f"weights: [[{10**400}, 1]]\n", "matrix of numbers"),
        (ENTRY + "segment: .nan\n", "'segment' must be a number"),
        (ENTRY + "segment: .inf\n", "'segment' must be a number"),
        (ENTRY + "segment: 1e999999999\n", "'segment' must be a number"),
        (ENTRY + "segment: '1/0'\n", "'segment' must be a number"),
        (ENTRY + "segment: 601\n", "at most 600 seconds"),
        (ENTRY + "segment: 0\n", "must be at least 1 second"),
        (ENTRY + "segment: 0.5\n", "must be at least 1 second"),
        ("name: x\nsources: [a, ../b]\nmembers: [{signature: s, checksum: ab, url: u}]\n",
         "path separator"),
        ("name: x\nsources: [a, a]\nmembers: [{signature: s, checksum: ab, url: u}]\n",
         "appears twice"),
        ("name: x\nsources: vocals\nmembers: [{signature: s, checksum: ab, url: u}]\n",
         "'sources' must be a non-empty list"),
        ("name: x\nsources: [a]\nmembers: [{signature: ../../s, checksum: ab, url: u}]\n",
         "signature '../../s' contains a path separator"),
        ("name: x\nsources: [a]\nmembers: [{signature: .., checksum: ab, url: u}]\n",
         "signature '..' starts with '.'"),
        ("name: ../x\nsources: [a]\nmembers: [{signature: s, checksum: ab, url: u}]\n",
         "'name' '../x' contains a path separator"),
        ("name: x\nsources: [a]\nmembers: [{signature: s, checksum: ab, file: ..}]\n",
         "plain file name"),
        ("[" * 5000 + "]" * 5000, "not valid YAML"),
    ],
)  # fmt: skip
def test_hostile_registry_entries_are_named(text: str, problem: str) -> None:
    with pytest.raises(ModelNotFoundError, match="^bad.yaml: .*" + problem) as caught:
        zoo._parse_registry_entry(zoo._load_yaml(text, "bad.yaml"), "bad.yaml")
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def one_member_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("one")
    model = reference.build(reference.SOURCES_4, reference.SMALL, seed=6)
    reference.write_th(model, folder, "one")
    return folder


@pytest.mark.parametrize(
    ("bag", "problem"),
    [
        ("models: [one]\nweights: [[0, 0, 0, 0]]\n", "source 1 no weight"),
        ("models: [one]\nweights: [[1, .nan, 1, 1]]\n", "is nan"),
        ("models: [one]\nweights: [[1, -2, 1, 1]]\n", "is -2"),
        ("models: [one]\nsegment: -inf\n", "must be a number"),
        ("models: [one]\nsegment: 1e999999999\n", "must be a number"),
        ("models: ['../one']\n", r"models\[0\]: signature '../one' contains a path separator"),
        ('models: ["one\\tx"]\n', "control"),
        ("models: []\n", "non-empty list"),
    ],
)
def test_hostile_repo_bags_are_refused_at_load(
    one_member_repo: Path, tmp_path: Path, bag: str, problem: str
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(one_member_repo, repo)
    (repo / "bag.yaml").write_text(bag)
    with pytest.raises(ModelNotFoundError, match=problem) as caught:
        find_model("bag", repo)
    assert "\n" not in str(caught.value)


def test_all_zero_bag_weights_fail_before_separating(one_member_repo: Path, tmp_path: Path) -> None:
    """Once an IndexError deep in the bag planning: now the one-line error of find_model."""
    repo = tmp_path / "repo"
    shutil.copytree(one_member_repo, repo)
    (repo / "bag.yaml").write_text("models: [one]\nweights: [[0, 0, 0, 0]]\n")
    with pytest.raises(htsep.HtsepError, match="no weight"):
        htsep.Separator("bag", repo=repo)


def test_a_file_name_that_is_not_a_model_name(served: Served, tmp_path: Path) -> None:
    """'...th' would name its output folder '..' (outside -o)."""
    for name in ("...th", "..safetensors"):
        bad = tmp_path / name
        shutil.copy(served.path, bad)
        with pytest.raises(ModelNotFoundError, match="rename the file"):
            find_model(str(bad))
    with pytest.raises(ModelNotFoundError, match="no model '..'"):
        find_model("..", tmp_path)


def test_special_files_as_models_never_block(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.th"
    os.mkfifo(fifo)
    results: list[BaseException] = []

    def attempt() -> None:
        for call in (
            lambda: find_model(str(fifo)),
            lambda: fetch(MemberSpec("pipe", checksum="ab", path=fifo)),
        ):
            try:
                call()
            except BaseException as exc:
                results.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("blocked on a FIFO")
    assert [type(exc) for exc in results] == [ModelNotFoundError, CheckpointError]
    assert "named pipe (FIFO)" in str(results[0]) and "named pipe (FIFO)" in str(results[1])
    assert not is_cached(MemberSpec("pipe", path=fifo))
    # A FIFO in a repository is not a checkpoint; a FIFO bag is not read.
    os.mkfifo(tmp_path / "bag.yaml")
    with pytest.raises(ModelNotFoundError, match="it holds no"):
        find_model("bag", tmp_path)


def _blocked_cache(tmp_path: Path, how: str, member: MemberSpec, monkeypatch) -> Path:
    if how == "under a file":
        (tmp_path / "file").write_text("x")
        monkeypatch.setenv("HTSEP_CACHE", str(tmp_path / "file" / "cache"))
    elif how == "entry is a folder":
        (zoo.cache_dir() / member.file_name).mkdir(parents=True)
    elif how == "permission denied":

        def refuse(*args: object, **kwargs: object) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(zoo.files, "create_temporary", refuse)
    elif how == "rename refused":

        def refuse_place(*args: object, **kwargs: object) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(zoo.files, "place", refuse_place)
    return zoo.cache_dir()


CACHE_PROBLEMS = ["under a file", "entry is a folder", "permission denied", "rename refused"]


@pytest.mark.parametrize("how", CACHE_PROBLEMS)
def test_unusable_cache_is_one_download_error(
    mirror: Server, served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    shutil.copy(served.path, mirror.root / served.path.name)
    folder = _blocked_cache(tmp_path, how, served.member, monkeypatch)
    assert not is_cached(served.member)
    with pytest.raises(DownloadError) as caught:
        fetch(served.member, progress=False)
    message = str(caught.value)
    assert str(folder) in message and "\n" not in message
    assert "HTSEP_CACHE" in message
    if how != "under a file":
        assert not [name for name in cache_leftovers(folder) if name.endswith(".part")]


@pytest.mark.parametrize("how", CACHE_PROBLEMS)
def test_unusable_cache_through_the_cli_and_the_api(
    mirror: Server, served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    from typer.testing import CliRunner

    from htsep.cli import app

    shutil.copy(served.path, mirror.root / served.path.name)
    _blocked_cache(tmp_path, how, served.member, monkeypatch)
    registry = [zoo.ModelSpec("small", (served.member,), sources=tuple(reference.SOURCES_4))]
    monkeypatch.setattr(zoo, "registry_models", lambda: registry)
    result = CliRunner().invoke(app, ["models", "download", "-q", "small"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    listing = CliRunner().invoke(app, ["models"])
    assert listing.exit_code == 0
    assert listing.output.split() == [
        *("small", "1", "member", "not", "downloaded", "drums,", "bass,", "other,", "vocals")
    ]
    with pytest.raises(DownloadError) as caught:
        htsep.Separator("small")
    # The command says what the API raises, on one line.
    assert "\n" not in str(caught.value)
    assert result.stderr == f"htsep: error: {caught.value}\n"


def test_stale_partial_downloads_are_removed_live_ones_kept(mirror: Server, served: Served) -> None:
    from htsep import files

    cache = zoo.cache_dir()
    cache.mkdir(parents=True)
    mine = files.owner_tag()
    dead = mine.split("p")[0] + "p" + "999999999" + "s1"
    stale = cache / f".{served.path.name}.{dead}.0123abcd.part"
    live = cache / f".{served.path.name}.{mine}.0123abcd.part"
    old_style = cache / f".{served.path.name}.x1y2z3.part"  # mkstemp's, owner unknown
    for path in (stale, live, old_style):
        path.write_bytes(b"partial")
    shutil.copy(served.path, mirror.root / served.path.name)
    fetch(served.member, progress=False)
    assert cache_leftovers(cache) == sorted([served.path.name, live.name, old_style.name])


def test_trained_runs_name_their_outputs_after_the_run_folder(tmp_path: Path) -> None:
    shipped = find_model("htsep-tiny").members[0].path
    assert shipped is not None
    names = []
    for run in ("run-a", "run-b"):
        folder = tmp_path / "runs" / run
        folder.mkdir(parents=True)
        (folder / "run.json").write_text("{}")
        shutil.copyfile(shipped, folder / "model.safetensors")
        names.append(find_model(str(folder / "model.safetensors")).name)
    assert names == ["run-a", "run-b"]
    # A model.safetensors that is not an htsep run's export keeps its file name.
    (tmp_path / "model.safetensors").write_bytes(shipped.read_bytes())
    assert find_model(str(tmp_path / "model.safetensors")).name == "model"


def test_a_content_length_of_other_digits_is_no_length(mirror: Server, served: Served) -> None:
    """str.isdigit takes "²" for a digit, and int() then failed: reported as a bad URL."""
    shutil.copy(served.path, mirror.root / served.path.name)
    mirror.length = "\u00b2"
    assert sha256(fetch(served.member, progress=False)) == sha256(served.path)


@pytest.mark.parametrize("length", [None, ""])
def test_a_download_larger_than_any_checkpoint_stops(
    mirror: Server, served: Served, monkeypatch: pytest.MonkeyPatch, length: str | None
) -> None:
    """Announced (refused before the body) or not (stopped once past the limit): a server
    sending without end no longer fills the disk before the checksum would refuse it."""
    shutil.copy(served.path, mirror.root / served.path.name)
    monkeypatch.setattr(zoo, "MAX_DOWNLOAD_BYTES", 1000)
    mirror.length = length
    with pytest.raises(DownloadError) as caught:
        fetch(served.member, progress=False)
    size = served.path.stat().st_size
    announced = f"the server offers {size} bytes" if length is None else "more than 1000 bytes"
    assert announced in str(caught.value) and "\n" not in str(caught.value)
    assert cache_leftovers(zoo.cache_dir()) == []


def test_a_server_that_drips_bytes_is_stopped(
    mirror: Server, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each read got a byte or two within the read timeout, so a download from a server
    sending a few bytes at a time never ended: a window of too little progress stops it."""
    shutil.copy(served.path, mirror.root / served.path.name)
    monkeypatch.setattr(zoo, "STALL_WINDOW_SECONDS", 0.5)
    monkeypatch.setattr(zoo, "STALL_MIN_BYTES", 10_000)
    mirror.drip = 0.005  # about 3 kB/s
    started = time.monotonic()
    with pytest.raises(DownloadError) as caught:
        fetch(served.member, progress=False)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "the server sent only" in message and "in 0.5 s" in message and "\n" not in message
    assert cache_leftovers(zoo.cache_dir()) == []
    # A server as slow but within the limit completes.
    monkeypatch.setattr(zoo, "STALL_MIN_BYTES", 100)
    mirror.drip = 0.0005 if served.path.stat().st_size < 200_000 else None
    assert sha256(fetch(served.member, progress=False)) == sha256(served.path)


@pytest.mark.parametrize("command", [["models", "download", "-q"], ["info"]])
def test_sigterm_during_a_download_leaves_no_partial_file(
    mirror: Server, served: Served, command: list[str]
) -> None:
    """Only `separate` took SIGTERM as Ctrl-C: `models download` and `info` died at once and
    left their .part file behind."""
    import signal
    import subprocess
    import sys
    import time

    member = find_model("htdemucs").members[0]
    assert member.url is not None
    name = member.url.rsplit("/", 1)[1]
    shutil.copy(served.path, mirror.root / name)  # any bytes: the checksum is never reached
    mirror.stall = threading.Event()
    process = subprocess.Popen(
        [sys.executable, "-m", "htsep", *command, "htdemucs"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    cache = zoo.cache_dir()
    try:
        assert mirror.halfway.acquire(timeout=60)
        deadline = time.monotonic() + 30
        while not (cache.is_dir() and any(n.endswith(".part") for n in os.listdir(cache))):
            assert time.monotonic() < deadline, "no partial download appeared"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        mirror.stall.set()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("htsep: error: terminated"), stderr
    assert cache_leftovers(cache) == []


@pytest.mark.parametrize(("option", "value"), [("samplerate", 16000), ("audio_channels", 1)])
def test_bag_members_must_take_the_same_audio(tmp_path: Path, option: str, value: int) -> None:
    """One input feeds every member: a 16-kHz member was fed 8-kHz audio without a word, and
    a mono one failed with a traceback."""
    repo = tmp_path / "repo"
    repo.mkdir()
    reference.write_th(reference.build(reference.SOURCES_4, reference.SMALL, seed=1), repo, "base")
    other = reference.build(reference.SOURCES_4, {**reference.SMALL, option: value}, seed=2)
    reference.write_th(other, repo, "odd")
    (repo / "bag.yaml").write_text("models: [base, odd]\n")
    with pytest.raises(htsep.HtsepError) as caught:
        htsep.Separator("bag", repo=repo)
    message = str(caught.value)
    assert "member odd takes" in message and "member base" in message and "\n" not in message


# --- names, files and bags from a hostile current folder ---------------------------------------


def test_a_file_here_named_like_a_model_is_not_taken_for_it(
    served: Served, one_member_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stray file "aaaa1111" in the current folder replaced the model of --repo (or the
    registry's "htsep-tiny") without a word: a plain name is never a file; "./name" is."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(served.path, tmp_path / "one")
    shutil.copy(served.path, tmp_path / "htsep-tiny")
    (tmp_path / "htdemucs").mkdir()  # the default output folder of `-o .`
    spec = find_model("one", one_member_repo)
    assert spec.members[0].path is not None and spec.members[0].path.parent == one_member_repo
    assert find_model("htsep-tiny").members[0].path.parent.name == "models"  # the shipped one
    assert find_model("./one").members[0].path == Path("./one")
    # load_model (and `htsep info`) resolve as -n does.
    assert htsep.load_model("htsep-tiny").config.sources == ("drums", "bass", "other", "vocals")
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(served.path, home / "mine.th")
    monkeypatch.setenv("HOME", str(home))
    assert find_model("~/mine.th").members[0].path == home / "mine.th"
    assert htsep.load_model("~/mine.th").config.sources == tuple(reference.SOURCES_4)


def test_a_cache_variable_of_spaces_is_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTSEP_CACHE=" " made a folder named " " in the current folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for value in (" ", "  \t"):
        monkeypatch.setenv("HTSEP_CACHE", value)
        monkeypatch.setenv("TORCH_HOME", value)
        assert zoo.cache_dir() == tmp_path / "xdg" / "htsep"
        assert zoo.torch_hub_dir() == tmp_path / "xdg" / "torch" / "hub" / "checkpoints"


@pytest.mark.parametrize("tiny", ["1.0e-300", "1.0e-40"])
def test_bag_weights_that_float32_cannot_hold_are_refused(
    one_member_repo: Path, tmp_path: Path, tiny: str
) -> None:
    """A weight of 1e-300 passed as "some weight", then became 0 in the float32 sums: 0 / 0,
    NaN stems (returned silently by the API)."""
    repo = tmp_path / "repo"
    shutil.copytree(one_member_repo, repo)
    (repo / "bag.yaml").write_text(
        f"models: [one, one]\nweights: [[{tiny}, 1, 1, 1], [0, 1, 1, 1]]\n"
    )
    with pytest.raises(
        ModelNotFoundError, match=r"weights\[0\]\[0\] is 1e-(300|40); weights must be 0"
    ):
        find_model("bag", repo)
    (repo / "bag.yaml").write_text(
        "models: [one, one]\nweights: [[1.2e-38, 1, 1, 1], [0, 1, 1, 1]]\n"
    )
    separator = htsep.Separator("bag", repo=repo)
    mix = torch.randn(2, 8000, generator=torch.Generator().manual_seed(0))
    stems = separator.separate_tensor(mix, 8000)
    assert all(bool(torch.isfinite(stem).all()) for stem in stems.values())


def test_a_bag_is_at_most_32_networks_and_loads_a_repeated_one_once(
    one_member_repo: Path, tmp_path: Path
) -> None:
    """A bag listing one checkpoint 200 times loaded it 200 times (3,000: 5 GB and rising)."""
    repo = tmp_path / "repo"
    shutil.copytree(one_member_repo, repo)
    (repo / "many.yaml").write_text("models:\n" + "- one\n" * (zoo.MAX_BAG_MEMBERS + 1))
    with pytest.raises(ModelNotFoundError, match="lists 33 networks, more than the 32"):
        find_model("many", repo)
    (repo / "twice.yaml").write_text("models: [one, one, one]\n")
    separator = htsep.Separator("twice", repo=repo)
    networks = [model for model, _ in separator.bag.members]
    assert len(networks) == 3 and networks[0] is networks[1] is networks[2]


def test_models_download_checks_every_name_before_downloading(
    mirror: Server, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from htsep.cli import app

    shutil.copy(served.path, mirror.root / served.path.name)
    registry = [zoo.ModelSpec("small", (served.member,), sources=tuple(reference.SOURCES_4))]
    monkeypatch.setattr(zoo, "registry_models", lambda: registry)
    result = CliRunner().invoke(app, ["models", "download", "-q", "small", "smal1"])
    assert result.exit_code == 2 and "unknown model 'smal1'" in result.output, result.output
    assert mirror.requests == []
    assert cache_leftovers(zoo.cache_dir()) == []


def test_a_full_cache_disk_is_the_caches_fault_not_the_networks(
    mirror: Server, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing a download was reported as "could not download ...", with advice
    for a machine without network."""
    import builtins
    import errno

    shutil.copy(served.path, mirror.root / served.path.name)

    class FullDisk:
        def __init__(self, path: object, mode: str) -> None:
            self.file = builtins.open(path, mode)  # noqa: SIM115 - closed in __exit__

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

        def write(self, block: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zoo, "open", FullDisk, raising=False)
    with pytest.raises(DownloadError) as caught:
        fetch(served.member, progress=False)
    message = str(caught.value)
    assert message.startswith(f"cannot use the download cache {zoo.cache_dir()} (No space left")
    assert "could not download" not in message
    assert cache_leftovers(zoo.cache_dir()) == []


@pytest.mark.parametrize(
    "text",
    [
        "models: [one]\nmodels: [one, one]\n",
        "models: [one]\nweights: [[1, 1, 1, 1]]\nweights: [[0, 1, 1, 1]]\n",
    ],
)
def test_a_key_given_twice_in_a_bag_is_refused(
    one_member_repo: Path, tmp_path: Path, text: str
) -> None:
    """YAML lets the last of two keys win: the first models: or weights: line was dropped
    without a word."""
    repo = tmp_path / "repo"
    shutil.copytree(one_member_repo, repo)
    (repo / "bag.yaml").write_text(text)
    with pytest.raises(ModelNotFoundError, match="not valid YAML .*is given twice at line [23]"):
        find_model("bag", repo)
    # Merge keys may still be overridden, as YAML means them to be.
    assert zoo.parse_yaml("b: &b {x: 1}\nm: {<<: *b, x: 2}\n") == {"b": {"x": 1}, "m": {"x": 2}}


def test_a_mirror_with_a_query_or_credentials(
    mirror: Server, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file name was appended after a mirror's ?query (and #fragment); a user:password in
    the address failed name resolution and the error repeated the password."""
    shutil.copy(served.path, mirror.root / served.path.name)
    monkeypatch.setenv("HTSEP_MIRROR", f"{mirror.url}/?token=abc#part")
    assert sha256(fetch(served.member, progress=False)) == sha256(served.path)
    assert mirror.requests == [f"/{served.path.name}?token=abc"]
    zoo.cache_dir().joinpath(served.path.name).unlink()
    monkeypatch.setenv("HTSEP_MIRROR", mirror.url.replace("//", "//me:s3cret@") + "/")
    with pytest.raises(DownloadError) as caught:
        fetch(served.member, progress=False)
    assert "user name or password" in str(caught.value) and "s3cret" not in str(caught.value)


@pytest.mark.parametrize("failure", ["404", "unreachable", "impostor"])
def test_a_failed_download_leaves_no_cache_folder_it_made(
    mirror: Server,
    served: Served,
    impostor: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    """A download that fails removes the cache folders it made (they held nothing before);
    a cache folder that was there before stays."""
    if failure == "unreachable":
        monkeypatch.setenv("HTSEP_MIRROR", "http://127.0.0.1:9/unreachable")
    if failure == "impostor":
        shutil.copy(impostor, mirror.root / served.path.name)
    made = tmp_path / "new" / "deeper" / "cache"
    monkeypatch.setenv("HTSEP_CACHE", str(made))
    with pytest.raises(DownloadError):
        fetch(served.member, progress=False)
    assert not (tmp_path / "new").exists()

    made.mkdir(parents=True)
    (made.parent / "mine.txt").write_text("the user's")
    with pytest.raises(DownloadError):
        fetch(served.member, progress=False)
    assert made.is_dir() and cache_leftovers(made) == []
    assert (made.parent / "mine.txt").read_text() == "the user's"


def test_a_server_that_drips_its_headers_is_stopped(
    mirror: Server, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read timeout is per read and the stall window counted the body only: headers sent
    a byte at a time held a download forever."""
    shutil.copy(served.path, mirror.root / served.path.name)
    monkeypatch.setattr(zoo, "HEADERS_WITHIN_SECONDS", 0.5)
    mirror.header_drip = 0.01
    started = time.monotonic()
    with pytest.raises(DownloadError) as caught:
        fetch(served.member, progress=False)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"{mirror.url}/{served.path.name}: no response from the server within 0.5 s" in message
    assert "\n" not in message and cache_leftovers(zoo.cache_dir()) == []
    # A server that answers in time is not cut off by the deadline later, in the body.
    mirror.header_drip = None
    mirror.drip = 0.0005 if served.path.stat().st_size < 200_000 else None
    assert sha256(fetch(served.member, progress=False)) == sha256(served.path)


def test_a_file_mirror_reads_regular_files_and_never_blocks_on_others(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO where the mirror's file should be blocked the download forever."""
    folder = tmp_path / "shared models"
    folder.mkdir()
    monkeypatch.setenv("HTSEP_MIRROR", folder.as_uri())
    os.mkfifo(folder / served.path.name)
    outcome: list[BaseException | Path] = []

    def download() -> None:
        try:
            outcome.append(fetch(served.member, progress=False))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=download, daemon=True)
    thread.start()
    thread.join(timeout=20)
    if thread.is_alive():  # unblock the open so that the thread ends
        with open(folder / served.path.name, "wb"):
            pass
        thread.join(timeout=5)
        pytest.fail("the download blocked on a FIFO")
    (error,) = outcome
    assert isinstance(error, DownloadError)
    assert "is a named pipe (FIFO), not a regular file" in str(error), error
    assert "\n" not in str(error) and cache_leftovers(zoo.cache_dir()) == []

    (folder / served.path.name).unlink()
    (folder / served.path.name).symlink_to("/dev/zero")
    with pytest.raises(DownloadError, match="is a character device"):
        fetch(served.member, progress=False)

    (folder / served.path.name).unlink()
    with pytest.raises(DownloadError, match="No such file or directory"):
        fetch(served.member, progress=False)

    shutil.copy(served.path, folder / served.path.name)
    assert sha256(fetch(served.member, progress=False)) == sha256(served.path)


def test_a_mirrors_query_is_never_shown(
    mirror: Server, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror's ?token went into every error message (and so into logs)."""
    monkeypatch.setenv("HTSEP_MIRROR", f"{mirror.url}/?token=s3cret")
    with pytest.raises(DownloadError) as caught:
        fetch(served.member, progress=False)
    message = str(caught.value)
    assert f"could not download {mirror.url}/{served.path.name}?...: HTTP 404" in message
    assert "s3cret" not in message and mirror.requests == [f"/{served.path.name}?token=s3cret"]


def test_a_mirror_variable_of_spaces_is_unset(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTSEP_MIRROR=" " (an unset variable in quotes) downloaded from the address "/<file>"."""
    monkeypatch.setenv("HTSEP_MIRROR", "  ")
    with pytest.raises(DownloadError, match="^no download address for") as caught:
        fetch(served.member, progress=False)
    # Unset, a mirror is advised; set (the address that failed), it is to be checked.
    assert "set HTSEP_MIRROR to a mirror's URL" in str(caught.value)


def test_a_cached_file_larger_than_any_checkpoint_is_not_hashed(
    mirror: Server,
    served: Served,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An 8 GiB file in the cache was hashed whole (30 s) before being found wrong."""
    shutil.copy(served.path, mirror.root / served.path.name)
    cached = zoo.cache_dir() / served.path.name
    cached.parent.mkdir(parents=True)
    with open(cached, "wb") as handle:  # sparse: no disk used
        handle.truncate(zoo.MAX_DOWNLOAD_BYTES + 1)
    hashed: list[Path] = []
    plain = zoo._sha256
    monkeypatch.setattr(zoo, "_sha256", lambda path: hashed.append(path) or plain(path))
    with caplog.at_level(logging.WARNING, logger="htsep"):
        assert fetch(served.member, progress=False) == cached
    assert hashed == [] and sha256(cached) == sha256(served.path)
    assert "larger than any checkpoint; downloading it again" in caplog.text
