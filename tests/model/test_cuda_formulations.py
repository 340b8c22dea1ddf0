"""The formulations htsep runs on CUDA devices (norms over few rows, the inverse STFT without a
host check), run here on the CPU: each against torch's own function
in float64, and the whole network with all of them against demucs."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import htsep
from htsep.apply import run_network
from htsep.model import kernels, stft
from htsep.model.transformer import sequence_norm


def _relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize(
    "shape, groups", [((4, 48, 64, 10), 1), ((3, 96, 500), 4), ((2, 8, 7), 1), ((1, 6, 5), 3)]
)
@pytest.mark.parametrize("affine", [True, False])
def test_normalize_rows_is_group_norm(shape, groups, affine):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 3 + 1  # a mean that does not vanish
    weight = torch.rand(shape[1], generator=gen) + 0.5 if affine else None
    bias = torch.randn(shape[1], generator=gen) if affine else None
    wide = (None, None) if not affine else (weight.double(), bias.double())
    ref = F.group_norm(x.double(), groups, *wide, 1e-5)
    ours = kernels.normalize_rows(x, shape[0] * groups, weight, bias, 1, 1e-5)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    assert _relative(ours, ref) < 1e-6
    # Reduced precision: float32 statistics; float32 out under autocast (as torch's group norm
    # under autocast), the input's dtype outside it.
    half = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = kernels.normalize_rows(half, shape[0] * groups, weight, bias, 1, 1e-5)
    assert under.dtype == torch.float32
    expected = F.group_norm(half.double(), groups, *wide, 1e-5)
    assert _relative(under, expected) < 1e-6
    outside = kernels.normalize_rows(half, shape[0] * groups, weight, bias, 1, 1e-5)
    assert outside.dtype == torch.bfloat16
    assert _relative(outside, expected) < 1e-2


def test_sequence_norm_over_few_rows_is_the_layer_norm_form(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 100, 16, generator=gen) * 2 + 0.5
    weight, bias = torch.rand(16, generator=gen) + 0.5, torch.randn(16, generator=gen)
    ref = sequence_norm(x.double(), weight.double(), bias.double())
    assert not kernels.few_rows(x, 3)  # the CPU takes the layer norm
    monkeypatch.setattr(kernels, "cuda_formulation", lambda x: True)
    assert kernels.few_rows(x, 3) and not kernels.few_rows(x, kernels._FEW_ROWS)
    ours = sequence_norm(x, weight, bias)
    assert ours.dtype == torch.float32 and _relative(ours, ref) < 1e-6


def test_group_norm_dispatch(monkeypatch):
    """kernels.group_norm is F.group_norm unless the rows are few on a CUDA device."""
    calls = []
    real = kernels.normalize_rows
    monkeypatch.setattr(kernels, "normalize_rows", lambda *a: calls.append(a[1]) or real(*a))
    x = torch.randn(2, 8, 30)
    kernels.group_norm(x, 4, None, None, 1e-5)
    assert calls == []
    monkeypatch.setattr(kernels, "cuda_formulation", lambda x: True)
    kernels.group_norm(x, 4, None, None, 1e-5)
    assert calls == [8]
    kernels.group_norm(torch.randn(kernels._FEW_ROWS, 2, 3), 1, None, None, 1e-5)
    assert calls == [8]


@pytest.mark.parametrize(
    "bins, frames, hop, length",
    [
        (2049, 40, 1024, 39 * 1024),
        (9, 12, 4, 40),
        (9, 12, 4, 48),  # past the last frame's centre, not past its end: no padding
        (9, 12, 4, 60),
        (65, 9, 32, 200),
        (5, 3, 2, 3),
    ],
)
def test_overlap_add_istft_is_torch_istft(bins, frames, hop, length):
    """Also where ``length`` reaches past the frames (torch pads with zeros, after a warning)."""
    spec = torch.randn(3, bins, frames, dtype=torch.complex128,
                       generator=torch.Generator().manual_seed(bins))  # fmt: skip
    n_fft = 2 * (bins - 1)
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    kept = (frames - 1) * hop + n_fft // 2  # samples the frames reach, past the centring
    with pytest.warns(UserWarning) if length > kept else contextlib.nullcontext():
        ref = torch.istft(spec, n_fft, hop, window=window, normalized=True, length=length)
    ours = stft.overlap_add_istft(spec.to(torch.complex64), hop, length)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert _relative(ours, ref) < 1e-6
    assert not ours[:, kept:].any()


def test_network_with_the_cuda_formulations_matches_demucs(small_checkpoint, monkeypatch):
    """The whole network as a CUDA device runs it (the CPU's fused paths off, every CUDA
    formulation on), on the CPU: the same numbers as demucs, and each formulation ran."""
    th_path, _, oracle = small_checkpoint
    model = htsep.load_model(th_path)
    mix = torch.randn(2, 2, model.segment_length, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        theirs = oracle(mix)
    ran: dict[str, int] = {}

    def counting(name, function):
        def wrapped(*args, **kwargs):
            ran[name] = ran.get(name, 0) + 1
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(kernels, "fast_path", lambda x: None)
    monkeypatch.setattr(kernels, "cuda_formulation", lambda x: True)
    monkeypatch.setattr(kernels, "normalize_rows", counting("rows", kernels.normalize_rows))
    monkeypatch.setattr(stft, "overlap_add_istft", counting("istft", stft.overlap_add_istft))
    ours = run_network(model, [mix], "cpu", "fp32")
    assert _relative(ours, theirs) < 1e-5
    assert ran.get("istft", 0) >= 1 and ran.get("rows", 0) >= 10


def test_overlap_add_istft_drops_dc_and_nyquist_imaginary_parts(monkeypatch):
    """cuFFT's complex-to-real transform spreads the imaginary parts of the DC and Nyquist bins
    over the signal where the CPU's FFT ignores them: the transform never sees them, and the
    caller's spectrum is left as it was."""
    seen = []
    real_irfft = torch.fft.irfft

    def spying(spec, *args, **kwargs):
        seen.append(spec.clone())
        return real_irfft(spec, *args, **kwargs)

    monkeypatch.setattr(torch.fft, "irfft", spying)
    spec = torch.randn(2, 9, 6, dtype=torch.complex64, generator=torch.Generator().manual_seed(5))
    before = spec.clone()
    stft.overlap_add_istft(spec, 2, 10)
    assert torch.equal(spec, before)
    (given,) = seen
    assert not given[:, 0].imag.any() and not given[:, -1].imag.any()
    assert torch.equal(given[:, 1:-1], spec[:, 1:-1]) and torch.equal(given.real, spec.real)


def test_training_through_the_cuda_formulations(small_checkpoint, monkeypatch):
    """Training on CUDA differentiates through the norms over few rows and the written-out
    inverse STFT: the same loss and gradients as the CPU's formulation."""
    th_path, _, _ = small_checkpoint
    mix = torch.randn(2, 2, 12000, generator=torch.Generator().manual_seed(4))

    def loss_and_grads(forced: bool):
        model = htsep.load_model(th_path).train()
        with monkeypatch.context() as patch:
            if forced:
                patch.setattr(kernels, "cuda_formulation", lambda x: True)
            loss = model(mix).square().mean()
            loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    plain_loss, plain = loss_and_grads(False)
    forced_loss, forced = loss_and_grads(True)
    assert abs(float(forced_loss / plain_loss) - 1) < 1e-5
    assert plain.keys() == forced.keys()
    for name, grad in plain.items():
        assert grad is not None and forced[name] is not None, name
        scale = float(grad.abs().max()) + 1e-12
        assert float((forced[name] - grad).abs().max()) / scale < 1e-3, name


def test_window_envelope_cached_in_inference_serves_training():
    """The envelope is cached; the first call may come from a separation (inference mode)."""
    spec = torch.randn(1, 9, 31, dtype=torch.complex64)
    with torch.inference_mode():
        stft.overlap_add_istft(spec, 4, 100)
    trained = spec.clone().requires_grad_()
    stft.overlap_add_istft(trained, 4, 100).square().sum().backward()
    assert trained.grad is not None and torch.isfinite(torch.view_as_real(trained.grad)).all()


def test_overlap_add_istft_refuses_a_vanishing_envelope():
    """As torch.istft does: a frame hop that leaves samples without window weight."""
    spec = torch.randn(1, 9, 4, dtype=torch.complex64)
    with pytest.raises(RuntimeError):
        torch.istft(spec, 16, 16, window=torch.hann_window(16), normalized=True, length=40)
    with pytest.raises(ValueError, match="window envelope vanishes"):
        stft.overlap_add_istft(spec, 16, 40)
