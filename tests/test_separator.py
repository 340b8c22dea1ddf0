"""The public Python API against demucs.api.Separator on the same checkpoint files."""

import pytest
import torch
from demucs.api import Separator as ReferenceSeparator
from test_separate import repo  # noqa: F401  (a fixture)

import htsep
from htsep.errors import AudioError, UsageError


def _mix(seconds=3.2, channels=2, rate=8000):
    gen = torch.Generator().manual_seed(4)
    return 0.1 * torch.randn(channels, int(seconds * rate), generator=gen)


def test_separate_tensor_matches_demucs_api(repo):  # noqa: F811
    mix = _mix()
    reference = ReferenceSeparator(model="mixbag", repo=repo, shifts=0, progress=False)
    _, ref = reference.separate_tensor(mix, 8000)
    ours = htsep.Separator("mixbag", repo=repo, shifts=0, device="cpu").separate_tensor(mix, 8000)
    assert list(ours) == list(ref)
    for name, stem in ours.items():
        assert (stem - ref[name]).abs().max() <= 1e-4 * ref[name].abs().max(), name


def test_separate_tensor_contract(repo):  # noqa: F811
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", stems=["vocals"])
    assert separator.sources == ["drums", "bass", "other", "vocals"]
    assert separator.sample_rate == 8000 and separator.audio_channels == 2
    mono = _mix(channels=1, rate=22050)
    before = mono.clone()
    stems = separator.separate_tensor(mono, 22050)
    assert list(stems) == ["vocals"] and stems["vocals"].shape == mono.shape
    assert torch.equal(mono, before)
    with pytest.raises(AudioError, match="--downmix"):
        separator.separate_tensor(_mix(channels=3), 8000)
    with pytest.raises(AudioError, match="NaN"):
        separator.separate_tensor(torch.full((2, 100), float("nan")), 8000)


def test_progress_reports_all_the_work(repo):  # noqa: F811
    done = []
    separator = htsep.Separator("mixbag", repo=repo, device="cpu", shifts=2)
    separator.separate_tensor(_mix(), 8000, progress=done.append)
    assert sum(done) == pytest.approx(1.0)


def test_constructor_usage_errors(repo):  # noqa: F811
    with pytest.raises(UsageError, match="no source 'kazoo'"):
        htsep.Separator("aaaa0001", repo=repo, stems=["kazoo"])
    with pytest.raises(UsageError, match="overlap"):
        htsep.Separator("aaaa0001", repo=repo, overlap=1.0)
    with pytest.raises(UsageError, match="longer than the model's segment"):
        htsep.Separator("aaaa0001", repo=repo, segment=1.6)


def test_precision_options(repo):  # noqa: F811
    mix = _mix(seconds=2.0)
    exact = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0)
    assert exact.options.batch_size == 1  # automatic batch size on the CPU
    reduced = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0, precision="bf16")
    ref, low = exact.separate_tensor(mix, 8000), reduced.separate_tensor(mix, 8000)
    for name in ref:
        noise = (low[name] - ref[name]).square().sum()
        snr = 10 * torch.log10(ref[name].square().sum() / noise)
        assert 10 < snr < 120, (name, snr)  # close, and really computed in bfloat16
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        htsep.Separator("aaaa0001", repo=repo, device="cpu", precision="fp16")
    with pytest.raises(UsageError, match="precision 'fp8'"):
        htsep.Separator("aaaa0001", repo=repo, device="cpu", precision="fp8")
