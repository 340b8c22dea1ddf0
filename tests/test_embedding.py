"""htsep as a library inside another program: threads sharing a Separator, the host's signal
handlers, autocast, default dtype and TF32 settings, and what a call leaves behind."""

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import htsep
from htsep import apply
from htsep.apply import NetworkRunner
from htsep.devices import DeviceSlot
from htsep.errors import AudioError, UsageError
from htsep.interrupts import signals_as_interrupts
from htsep.separator import ScannedFile, write_stems

RATE = 8000


def _mix(seconds: float, channels: int = 2, seed: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(channels, int(seconds * RATE), generator=gen)


@pytest.fixture(scope="module")
def vocals_only(repo):
    return htsep.Separator("aaaa0001", repo=repo, device="cpu", stems=["vocals"], progress=False)


# --- threads ---------------------------------------------------------------------------------


def test_two_threads_sharing_a_bag_on_one_device_slot_get_their_own_stems(repo):
    """The members of a bag take turns in one device copy: a thread loading the other
    member's weights into it while another thread's call ran on it mixed the two networks.
    The slot is forced on the CPU, as a CUDA separator has it."""
    separator = htsep.Separator("mixbag", repo=repo, device="cpu", shifts=0, progress=False)
    separator.slot = DeviceSlot("cpu")
    separator.runner = NetworkRunner("cpu", "fp32", 1, separator.slot)
    # Of different lengths, so that one thread reaches the second member while the other
    # still runs the first.
    inputs = [_mix(1.5, seed=1), _mix(4.5, seed=2)]
    alone = [separator.separate_tensor(mix) for mix in inputs]
    together: list = [None, None]

    def separate(index: int) -> None:
        together[index] = separator.separate_tensor(inputs[index])

    threads = [threading.Thread(target=separate, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for ours, theirs in zip(together, alone, strict=True):
        assert list(ours) == list(theirs)
        for name in theirs:
            assert torch.equal(ours[name], theirs[name]), name


def _tf32_settings() -> tuple[str, str]:
    return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision


def test_full_float32_blocks_in_two_threads_keep_ieee_until_the_last_leaves():
    """A leaves while B is inside: B must still run in IEEE float32, and once B leaves the
    host's own settings are back (not A's IEEE ones that B saw on entry)."""
    saved = _tf32_settings()
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, tuple[str, str]] = {}

    def a() -> None:
        with apply.full_float32():
            a_inside.set()
            b_inside.wait(10)
        a_left.set()

    def b() -> None:
        a_inside.wait(10)
        with apply.full_float32():
            b_inside.set()
            a_left.wait(10)
            seen["b after a left"] = _tf32_settings()

    try:
        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert a_left.is_set()
        assert seen["b after a left"] == ("ieee", "ieee")
        assert _tf32_settings() == ("tf32", "tf32")
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


# --- signals ---------------------------------------------------------------------------------


def test_the_hosts_signal_handlers_are_back_after_an_interrupt():
    """After one Ctrl-C inside the block, the host's handlers were left as SIG_IGN for good:
    its own SIGTERM handler never ran again, a notebook could not be interrupted."""
    calls: list[int] = []

    def host(signum, frame):
        calls.append(signum)

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, host)
    signal.signal(signal.SIGTERM, host)
    try:
        with pytest.raises(KeyboardInterrupt), signals_as_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is host
        assert signal.getsignal(signal.SIGTERM) is host
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_deaf_after_keeps_the_signals_ignored_once_one_came():
    """The command line's choice: after a signal, further ones are ignored until it exits."""
    # All three: the block leaves SIGHUP ignored too, and a leaked SIG_IGN is inherited by
    # every child process a later test starts (its SIGHUP test then saw the run finish).
    stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {sig: signal.getsignal(sig) for sig in stopping}
    try:
        with pytest.raises(KeyboardInterrupt), signals_as_interrupts(deaf_after=True):
            os.kill(os.getpid(), signal.SIGTERM)
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in stopping)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# --- the host's torch settings ---------------------------------------------------------------


def test_a_host_autocast_does_not_change_the_stems(vocals_only):
    """At 48 kHz the resampling's convolutions ran in bfloat16 under the host's autocast."""
    mix = _mix(1.5 * 6, seed=3)  # 1.5 s at 48 kHz
    plain = vocals_only.separate_tensor(mix, 48000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = vocals_only.separate_tensor(mix, 48000)
        assert torch.is_autocast_enabled("cpu")  # the host's own setting, untouched
    assert inside["vocals"].dtype == torch.float32
    assert torch.equal(inside["vocals"], plain["vocals"])


def test_the_stems_are_float32_under_a_float64_default_dtype(repo):
    """Tensors htsep made without a dtype followed the host's default: float64 stems."""
    separator = htsep.Separator("mixbag", repo=repo, device="cpu", shifts=0, progress=False)
    mix = _mix(1.2 * 6, seed=5)
    plain = separator.separate_tensor(mix, 48000)
    torch.set_default_dtype(torch.float64)
    try:
        wide = separator.separate_tensor(mix, 48000)
    finally:
        torch.set_default_dtype(torch.float32)
    for name, stem in plain.items():
        assert wide[name].dtype == torch.float32, name
        assert torch.allclose(wide[name], stem, rtol=0, atol=1e-6), name


def test_the_stems_are_exactly_the_same_under_a_float64_default_dtype(repo):
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0, progress=False)
    mix = _mix(1.2, seed=5)
    plain = separator.separate_tensor(mix)
    torch.set_default_dtype(torch.float64)
    try:
        wide = separator.separate_tensor(mix)
    finally:
        torch.set_default_dtype(torch.float32)
    for name, stem in plain.items():
        assert torch.equal(wide[name], stem), name


# --- what a call leaves behind ---------------------------------------------------------------


def test_a_stem_holds_only_its_own_samples(vocals_only, repo):
    """A stem was a view of the tensor of every source: keeping (or saving) one kept four."""
    mix = _mix(1.0)
    (stem,) = vocals_only.separate_tensor(mix).values()
    assert stem.untyped_storage().nbytes() == stem.nbytes == mix.nbytes
    every = htsep.Separator("aaaa0001", repo=repo, device="cpu", progress=False)
    for name, stem in every.separate_tensor(mix[:1]).items():
        assert stem.is_contiguous(), name
        assert stem.untyped_storage().nbytes() == stem.nbytes == mix[:1].nbytes, name


def _descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_a_scanned_file_is_closed_when_writing_fails_before_separating(
    vocals_only, tmp_path, monkeypatch
):
    """A ScannedFile given to write_stems stayed open, with its decoded temporary, when the
    outputs were refused before the separation started."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    wav = tmp_path / "src.wav"
    sf.write(wav, _mix(0.6).numpy().T, RATE, subtype="PCM_16")
    m4a = tmp_path / "song.m4a"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(wav), "-c:a", "alac", str(m4a)], check=True, timeout=60
    )
    (tmp_path / "taken.wav").write_bytes(b"")
    failures = [
        ({"drums": tmp_path / "d.wav"}, {}),  # not a stem of this separator
        ({"vocals": tmp_path / "taken.wav"}, {}),  # exists, no overwrite
        ({"vocals": m4a}, {"overwrite": True}),  # the input itself
        ({"vocals": tmp_path / "v.wav"}, {"clip_mode": "wrap"}),
    ]
    for outputs, options in failures:
        before = _descriptors()
        scanned = ScannedFile.open(vocals_only, m4a)
        assert list(temporary.iterdir())  # the decoded input
        with pytest.raises((UsageError, AudioError)):
            write_stems(vocals_only, scanned, outputs, **options)
        assert _descriptors() == before, outputs
        assert list(temporary.iterdir()) == [], outputs
    assert m4a.stat().st_size > 0 and not (tmp_path / "v.wav").exists()


def test_placed_lists_the_files_put_in_place_in_order(vocals_only, repo, tmp_path):
    """A track that fails while its final files are written has written some: ``placed``."""
    clip = tmp_path / "clip.wav"
    sf.write(clip, _mix(0.6).numpy().T, RATE)
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0, progress=False)
    targets = {"vocals": tmp_path / "v.wav", "drums": tmp_path / "d.wav"}
    pending = write_stems(separator, clip, targets)
    assert pending.placed == []
    targets["drums"].write_bytes(b"made meanwhile")
    with pytest.raises(AudioError, match="exists"):
        pending.finish()
    assert pending.placed == [targets["vocals"]] and targets["vocals"].stat().st_size > 44
    assert targets["drums"].read_bytes() == b"made meanwhile"
    clamped = {"vocals": tmp_path / "cv.wav", "bass": tmp_path / "cb.wav"}
    done = write_stems(separator, clip, clamped, clip_mode="clamp")
    assert done.placed == list(clamped.values()) and all(p.is_file() for p in done.placed)


# --- arguments -------------------------------------------------------------------------------


class _Path:
    def __init__(self, value) -> None:
        self.value = value

    def __fspath__(self):
        return self.value


@pytest.mark.parametrize("kind", ["pathlike of bytes", "pathlike of an int", "bytes", "int"])
def test_output_paths_are_checked_like_input_paths(vocals_only, tmp_path, kind):
    """A path object whose __fspath__ gave bytes or an int was a raw TypeError."""
    clip = tmp_path / "clip.wav"
    sf.write(clip, _mix(0.3).numpy().T, RATE)
    name = os.fsencode(tmp_path / "v.wav")
    target = {
        "pathlike of bytes": _Path(name),
        "pathlike of an int": _Path(3),
        "bytes": name,
        "int": 3,
    }[kind]
    with pytest.raises(UsageError, match="'vocals' output file path"):
        vocals_only.separate_file_to(clip, {"vocals": target})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.wav"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # both are deprecated or prototypes
def test_quantized_and_nested_tensors_are_refused_in_one_line(vocals_only):
    quantized = torch.quantize_per_tensor(torch.rand(2, 400), 0.01, 0, torch.quint8)
    with pytest.raises(AudioError, match="quantized"):
        vocals_only.separate_tensor(quantized)
    nested = torch.nested.nested_tensor([torch.rand(2, 400), torch.rand(2, 300)])
    with pytest.raises(AudioError, match="nested"):
        vocals_only.separate_tensor(nested)


def test_a_time_channels_array_names_the_python_option(vocals_only):
    """The error named the command line's --downmix to a Python caller."""
    samples = np.zeros((40, 2), dtype=np.float32)  # (time, channels), taken as 40 channels
    with pytest.raises(AudioError, match=r"downmix=True") as caught:
        vocals_only.separate_tensor(samples)
    assert "--downmix" not in str(caught.value) and "(time, channels)" in str(caught.value)
    with pytest.raises(AudioError, match=r"3 audio channels.*pass downmix=True"):
        vocals_only.separate_tensor(_mix(0.3, channels=3))
