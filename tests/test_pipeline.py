"""Batches with the pipeline: the next track is decoded and the previous one encoded while a
track is separated. Same bytes as one track at a time, reports in input order, and an
interruption leaves no partial file or staging folder behind."""

import json
import threading
from collections import defaultdict
from pathlib import Path

import pytest
import soundfile as sf
from helpers import htsep, write_clip

from htsep import apply as apply_module
from htsep import separator as separator_module
from htsep.separator import PendingOutputs, ScannedFile, Separator

WAIT = 20  # seconds a patched step waits for the background step it expects to overlap


def _batch(tmp_path: Path) -> list[Path]:
    """Three tracks; the second clips (its stems are rescaled), the third is FLAC."""
    clips = [tmp_path / "in" / "a.wav", tmp_path / "in" / "b.wav", tmp_path / "in" / "c.flac"]
    write_clip(clips[0], 1.3, seed=1)
    write_clip(clips[1], 0.9, seed=2, amplitude=4.0)
    write_clip(clips[2], 0.7, seed=3, subtype="PCM_24")
    return clips


def _stems(folder: Path, ext: str = "wav") -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob(f"*.{ext}"))}


def test_pipelined_batch_equals_one_track_at_a_time(tmp_path, repo):
    clips = _batch(tmp_path)
    common = ["--repo", str(repo), "-n", "mixbag", "--shifts", "1", "-q", "--json"]
    piped = htsep(*common, "-o", str(tmp_path / "piped"), *map(str, clips))
    serial = htsep(*common, "--no-pipeline", "-o", str(tmp_path / "serial"), *map(str, clips))
    assert piped.exit_code == serial.exit_code == 0, piped.output + serial.output
    records = [json.loads(line) for line in piped.stdout.splitlines()]
    assert [Path(r["input"]).name for r in records] == ["a.wav", "b.wav", "c.flac"]
    assert all(r["status"] == "ok" for r in records)
    ours, theirs = _stems(tmp_path / "piped"), _stems(tmp_path / "serial")
    assert len(ours) == 12 and ours == theirs
    # and the library's one-call path, which has no threads, writes the same files
    separator = Separator("mixbag", repo=repo, shifts=1, progress=False)
    alone = tmp_path / "alone" / "b"
    separator.separate_file_to(clips[1], {s: alone / f"{s}.wav" for s in separator.sources})
    for stem in separator.sources:
        assert (alone / f"{stem}.wav").read_bytes() == ours[f"mixbag/b/{stem}.wav"]
    peak = max(abs(sf.read(tmp_path / "piped" / "mixbag" / "b" / f"{s}.wav")[0]).max()
               for s in separator.sources)  # fmt: skip
    # the loud track was rescaled (its loudest stem to 1 / 1.01, up to 16-bit rounding), so
    # its encoding pass had work to do
    assert abs(peak - 1 / 1.01) <= 1 / 32768


def test_decoding_and_encoding_overlap_the_networks(tmp_path, repo, monkeypatch):
    """Track b's first pass starts while track a runs its networks, and a's final encoding is
    still going when b's networks start. Each patched step waits for the step it should
    overlap, so one track at a time (--no-pipeline) fails both checks by timing out."""
    clips = _batch(tmp_path)
    started: dict[str, threading.Event] = defaultdict(threading.Event)
    threads: dict[str, str] = {}
    overlapped: dict[str, bool] = {}
    current: list[str] = []

    scan_file = ScannedFile.open

    def scan(separator, path, downmix=False):
        name = Path(path).name
        threads[f"scan {name}"] = threading.current_thread().name
        started[f"scan {name}"].set()
        return scan_file(separator, path, downmix)

    staged = separator_module.write_stems

    def separate(separator, scanned, outputs, **kwargs):
        current.append(Path(scanned.name).name)
        return staged(separator, scanned, outputs, **kwargs)

    finish = PendingOutputs.finish

    def encode(self, stop=None):
        if self._work is not None:
            name = next(iter(self._work[1].values())).parent.name
            threads[f"encode {name}"] = threading.current_thread().name
            if name == "a":
                overlapped["encode a during networks of b"] = started["networks b.wav"].wait(WAIT)
        return finish(self, stop)

    network = apply_module.run_network

    def run_network(*args, **kwargs):
        track = current[-1]
        started[f"networks {track}"].set()
        if track == "a.wav" and "scan b during networks of a" not in overlapped:
            overlapped["scan b during networks of a"] = started["scan b.wav"].wait(WAIT)
        return network(*args, **kwargs)

    monkeypatch.setattr(ScannedFile, "open", scan)
    monkeypatch.setattr(separator_module, "write_stems", separate)
    monkeypatch.setattr(PendingOutputs, "finish", encode)
    monkeypatch.setattr(apply_module, "run_network", run_network)
    result = htsep("--repo", str(repo), "-n", "aaaa0001", "-o", str(tmp_path / "out"), "-q",
                   *map(str, clips))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert overlapped == {
        "scan b during networks of a": True,
        "encode a during networks of b": True,
    }
    assert threads["scan b.wav"].startswith("htsep-decode")
    assert threads["encode a"].startswith("htsep-encode")
    assert len(_stems(tmp_path / "out")) == 12


@pytest.mark.parametrize("flag", ["--mp3", "--flac"])
def test_pipelined_encoders_write_the_same_bytes(tmp_path, repo, flag):
    """MP3 and FLAC encoding on the background thread (while the next track's staging WAVs
    are written on the main one) gives the files one track at a time gives."""
    clips = _batch(tmp_path)
    common = ["--repo", str(repo), "-n", "aaaa0001", "-q", flag, *map(str, clips)]
    assert htsep(*common, "-o", str(tmp_path / "piped")).exit_code == 0
    assert htsep(*common, "--no-pipeline", "-o", str(tmp_path / "serial")).exit_code == 0
    ext = flag.strip("-")
    ours, theirs = _stems(tmp_path / "piped", ext), _stems(tmp_path / "serial", ext)
    assert len(ours) == 12 and ours == theirs


def test_interrupted_pipeline_leaves_no_partial_output(tmp_path, repo, monkeypatch):
    """Ctrl-C while track b runs its networks and track a is being encoded: exit 130, the
    encoding stops, and no staging folder, temporary file or partial stem is left."""
    clips = _batch(tmp_path)
    encoding = threading.Event()
    finish = PendingOutputs.finish

    def encode(self, stop=None):
        encoding.set()
        assert stop is not None and stop.wait(WAIT)  # until the interruption stops it
        return finish(self, stop)

    network = apply_module.run_network
    calls = []

    def run_network(*args, **kwargs):
        calls.append(1)
        if encoding.is_set():
            raise KeyboardInterrupt
        return network(*args, **kwargs)

    monkeypatch.setattr(PendingOutputs, "finish", encode)
    monkeypatch.setattr(apply_module, "run_network", run_network)
    out = tmp_path / "out"
    result = htsep("--repo", str(repo), "-n", "aaaa0001", "-o", str(out), *map(str, clips))
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert encoding.is_set() and len(calls) >= 2
    left = [p for p in out.rglob("*")]
    assert all(p.is_dir() and not p.name.startswith(".") for p in left), left


def test_keep_memory_same_bytes(tmp_path, repo):
    """--keep-memory tunes the process's malloc (so it runs in a process of its own here) and
    skips the per-chunk release; the stems are the same bytes."""
    import subprocess
    import sys

    clip = tmp_path / "song.wav"
    write_clip(clip, 4.0)
    digests = []
    for extra in ([], ["--keep-memory"]):
        out = tmp_path / ("keep" if extra else "default")
        command = [sys.executable, "-m", "htsep", "separate", "--repo", str(repo), "-n"]
        command += ["mixbag", "-q", "-o", str(out), *extra, str(clip)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        digests.append(_stems(out))
    assert len(digests[0]) == 4 and digests[0] == digests[1]


def test_keep_memory_skips_the_release_where_malloc_was_tuned(repo, monkeypatch):
    import htsep.separator

    assert Separator("aaaa0001", repo=repo).options.release_memory
    tuned = []
    monkeypatch.setattr(htsep.separator, "keep_freed_memory", lambda: tuned.append(1) or True)
    assert not Separator("aaaa0001", repo=repo, keep_memory=True).options.release_memory
    monkeypatch.setattr(htsep.separator, "keep_freed_memory", lambda: False)  # not glibc
    assert Separator("aaaa0001", repo=repo, keep_memory=True).options.release_memory
    assert tuned == [1]


def test_a_failed_background_encoding_fails_only_its_track(tmp_path, repo, monkeypatch):
    """Writing b's final files fails in the background (a full disk, say): b is reported failed
    in its place, a and c are written, and b leaves neither stems nor staging files."""
    from htsep.errors import AudioError

    clips = _batch(tmp_path)
    finish = PendingOutputs.finish

    def encode(self, stop=None):
        if self._work is not None and next(iter(self._work[1].values())).parent.name == "b":
            self.discard()
            raise AudioError("no space left on device")
        return finish(self, stop)

    monkeypatch.setattr(PendingOutputs, "finish", encode)
    out = tmp_path / "out"
    result = htsep("--repo", str(repo), "-n", "aaaa0001", "-o", str(out), "-q", "--json",
                   *map(str, clips))  # fmt: skip
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(Path(r["input"]).name, r["status"]) for r in records] == [
        ("a.wav", "ok"), ("b.wav", "failed"), ("c.flac", "ok")
    ]  # fmt: skip
    assert "no space left on device" in records[1]["error"]
    assert result.stderr.count("htsep: error:") == 1
    assert sorted(p.parent.name for p in out.rglob("*.wav")) == ["a"] * 4 + ["c"] * 4
    assert not [p for p in out.rglob(".*")]


def test_helper_threads_run_torch_operators_serially(tmp_path, repo, monkeypatch):
    """The batch's decoding and encoding threads start with ``serial_torch_thread`` (each
    would otherwise get OpenMP workers of its own, which slow the network calls of the main
    thread)."""
    import htsep.devices as devices_module

    seen = set()
    serial = devices_module.serial_torch_thread

    def recording():
        seen.add(threading.current_thread().name.rsplit("_", 1)[0])
        serial()

    monkeypatch.setattr(devices_module, "serial_torch_thread", recording)
    clips = _batch(tmp_path)
    result = htsep("--repo", str(repo), "-n", "aaaa0001", "-o", str(tmp_path / "out"), "-q",
                   *map(str, clips))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen == {"htsep-decode", "htsep-encode"}


_OPENMP_WORKERS = """
import os, threading, torch
from htsep.devices import serial_torch_thread, yield_to_helper

torch.set_num_threads(2)
x = torch.randn(4_000_000)
(x * 2).sum()  # the main thread's own team of OpenMP workers


def tasks():
    return len(os.listdir("/proc/self/task"))


def helper(serial, out):
    if serial:
        serial_torch_thread()
    out.append(torch.get_num_threads())
    (x * 2).sum()
    out.append(tasks())  # with this thread alive


before = tasks()
for serial in (True, False):
    out = []
    thread = threading.Thread(target=helper, args=(serial, out))
    thread.start()
    thread.join()
    print(serial, out[0], out[1] - before, torch.get_num_threads())


def yielding(out):
    serial_torch_thread()
    yield_to_helper()
    out.append(torch.get_num_threads())
    (x * 2).sum()  # serial still
    out.append(tasks())


import time


def settled(count):  # once the OpenMP workers of ended threads, released as they end, are gone
    deadline = time.monotonic() + 10
    while tasks() > count and time.monotonic() < deadline:
        time.sleep(0.01)
    return tasks()


settled(before)
out = []
thread = threading.Thread(target=yielding, args=(out,))
thread.start()
thread.join()
print("yield", out[0], out[1] - before, settled(before) - before, torch.get_num_threads())
"""


def test_a_serial_helper_thread_gets_no_openmp_workers():
    """torch's CPU operators on a thread that called ``serial_torch_thread`` run on it alone:
    it reports one thread, its parallel operator adds no OpenMP worker to the process (a
    plain helper thread's adds one), and the main thread keeps its two."""
    import subprocess
    import sys

    from htsep.devices import _openmp

    if _openmp() is None:
        pytest.skip("torch runs no OpenMP runtime here: no per-thread setting to make")
    done = subprocess.run(
        [sys.executable, "-c", _OPENMP_WORKERS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["True 1 1 2", "False 2 2 2"], done.stdout


def test_a_yielding_helper_holds_an_idle_team_until_it_ends():
    """``yield_to_helper`` on a serial helper: one more OpenMP worker in the process while the
    thread lives (libgomp's idle workers then sleep rather than spin, leaving the helper its
    core), none once it has ended; its own operators stay serial, the main thread keeps two."""
    import subprocess
    import sys

    from htsep.devices import _openmp

    if _openmp() is None:
        pytest.skip("torch runs no OpenMP runtime here: no team to start")
    done = subprocess.run(
        [sys.executable, "-c", _OPENMP_WORKERS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[2] == "yield 1 2 0 2", done.stdout


def test_each_encoding_runs_on_a_thread_that_ends_with_it(tmp_path, repo, monkeypatch):
    """Every track's final files are written on a helper thread of its own that has called
    ``yield_to_helper``, and that thread has ended by the time the track is reported (its idle
    OpenMP team, which makes the network's workers sleep, must not outlive the encoding). The
    stems are those of --no-pipeline."""
    import htsep.devices as devices_module
    from htsep.separator import PendingOutputs

    calls, finishers = [], []
    finish = PendingOutputs.finish

    def recording_finish(self, stop=None):
        finishers.append(threading.current_thread())
        finish(self, stop)

    monkeypatch.setattr(devices_module, "yield_to_helper", lambda: calls.append(
        threading.current_thread()))  # fmt: skip
    monkeypatch.setattr(PendingOutputs, "finish", recording_finish)
    clips = _batch(tmp_path)
    outs = {}
    for flag in ("--pipeline", "--no-pipeline"):
        finishers.clear()
        out = tmp_path / flag.strip("-")
        result = htsep("--repo", str(repo), "-n", "aaaa0001", "-o", str(out), "-q", flag,
                       *map(str, clips))  # fmt: skip
        assert result.exit_code == 0, result.output
        outs[flag] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.wav"))}
        if flag == "--pipeline":
            assert len(finishers) == len(clips) == len(set(finishers))
            assert calls == finishers
            assert all(t.name.startswith("htsep-encode") and not t.is_alive() for t in finishers)
        else:
            assert finishers == [threading.main_thread()] * len(clips)
    assert len(calls) == len(clips)  # none without the pipeline
    assert outs["--pipeline"] == outs["--no-pipeline"] and outs["--pipeline"]
