import threading
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from htsep.errors import InputLengthError
from htsep.model import ConvConfig, HTDemucs, HTDemucsConfig, STFTConfig, TransformerConfig, layers
from htsep.model.htdemucs import bfloat16_copy


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_released_parameter_counts():
    htdemucs = HTDemucs(HTDemucsConfig(sources=("drums", "bass", "other", "vocals")))
    assert _params(htdemucs) == 41_984_456
    six = HTDemucsConfig(
        sources=("drums", "bass", "other", "vocals", "guitar", "piano"),
        transformer=TransformerConfig(bottom_channels=0),
    )
    assert _params(HTDemucs(six)) == 27_414_996


def tiny(channels=2, sources=("a", "b", "c"), **kwargs) -> HTDemucsConfig:
    return HTDemucsConfig(
        sources=sources,
        audio_channels=channels,
        sample_rate=8000,
        segment=Fraction(1, 2),
        stft=STFTConfig(n_fft=256),
        conv=ConvConfig(channels=4, depth=2, dconv_compress=2),
        transformer=TransformerConfig(layers=2, heads=2, bottom_channels=0),
        **kwargs,
    )


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("length", [1, 777, 4000])
def test_shapes_over_odd_lengths_and_channel_counts(channels, length):
    torch.manual_seed(0)
    model = HTDemucs(tiny(channels)).eval()
    mix = torch.randn(2, channels, length)
    with torch.no_grad():
        out = model(mix)
    assert out.shape == (2, 3, channels, length)
    assert torch.isfinite(out).all()


def test_forward_does_not_mutate_input():
    model = HTDemucs(tiny()).eval()
    mix = torch.randn(1, 2, 1234)
    before = mix.clone()
    with torch.no_grad():
        model(mix)
    assert torch.equal(mix, before)


def test_batch_items_are_independent():
    torch.manual_seed(0)
    model = HTDemucs(tiny()).eval()
    mix = torch.randn(3, 2, 3000)
    with torch.no_grad():
        together = model(mix)
        alone = model(mix[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-6)


def test_longer_than_segment_is_an_error():
    model = HTDemucs(tiny()).eval()
    with pytest.raises(InputLengthError, match="longer than the model's segment"):
        model(torch.zeros(1, 2, 4001))


def test_wrong_channel_count_is_an_error():
    model = HTDemucs(tiny(channels=2)).eval()
    with pytest.raises(ValueError, match=r"\(batch, 2, time\)"):
        model(torch.zeros(1, 1, 100))


def test_silence_stays_finite():
    model = HTDemucs(tiny()).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 2, 4000))
    assert torch.isfinite(out).all()


def test_training_step_reaches_every_parameter():
    """Training mode runs on the given length (no padding) and backpropagates everywhere."""
    torch.manual_seed(0)
    model = HTDemucs(tiny()).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("scale"):
                param.fill_(0.5)  # layer scales start tiny: give every branch a real gradient
    mix = torch.randn(2, 2, 4000)
    out = model(mix)
    assert out.shape == (2, 3, 2, 4000)
    out.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def _tiny_with_spread_vectors() -> HTDemucs:
    """A tiny network whose biases and norm shifts are random and whose scales and norm
    weights are in [0.3, 1) (the initial ones are zeros and ones, which hide mistakes)."""
    torch.manual_seed(0)
    model = HTDemucs(tiny()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.uniform_(0.3, 1.0) if name.endswith(("scale", "weight")) else param.normal_()
    return model


def test_inference_path_matches_autograd_path():
    """Without autograd the network fuses and reuses buffers (in-place GLU and GELU, folded
    layer scales, oneDNN products, DConv rows in chunks): same numbers as the plain path."""
    model = _tiny_with_spread_vectors()
    mix = torch.randn(2, 2, 3001)
    before = mix.clone()
    plain = model(mix).detach()
    with torch.inference_mode():
        fast = model(mix)
    assert torch.equal(mix, before)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())


@pytest.mark.parametrize("reduced", [False, True])
def test_waveform_branch_runs_time_major_in_cpu_inference(reduced, monkeypatch):
    """In CPU inference the waveform branch is stored time-major from the first encoder to the
    last decoder: none of its convolutions or transposed ones reaches torch's (B, C, T) kernels,
    where oneDNN reorders or runs slower; the output is (B, S, C, T) in the usual order."""
    model = _tiny_with_spread_vectors()
    if reduced:
        model = bfloat16_copy(model)
    calls = []
    for name in ("conv1d", "conv_transpose1d"):
        plain = getattr(F, name)
        monkeypatch.setattr(
            F, name, lambda *a, plain=plain, name=name, **k: calls.append(name) or plain(*a, **k)
        )
    mix = torch.randn(1, 2, 3001)
    with torch.inference_mode():
        out = model(mix)
    assert not calls and out.shape == (1, 3, 2, 3001)
    assert out.stride()[1:] == (2 * out.stride(2), out.stride(2), 1)
    model(mix)  # the plain path, with autograd recording, still takes them
    assert "conv1d" in calls and "conv_transpose1d" in calls


def _snr(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    noise = (estimate.float() - reference.float()).square().sum()
    return (10 * torch.log10(reference.float().square().sum() / noise)).item()


def test_bfloat16_copy_keeps_norms_in_float32_and_follows_the_weights():
    model = _tiny_with_spread_vectors()  # norm parameters that bfloat16 cannot hold exactly
    original = {name: param.clone() for name, param in model.state_dict().items()}
    reduced = bfloat16_copy(model)
    assert bfloat16_copy(model) is reduced  # made once
    norms = {
        name
        for name, module in reduced.named_modules()
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))
    }
    assert norms
    for name, param in reduced.named_parameters():
        expected = torch.float32 if name.rsplit(".", 1)[0] in norms else torch.bfloat16
        assert param.dtype == expected, name
        assert not param.requires_grad
        # Norm parameters keep their float32 values; the others are their bfloat16 rounding.
        assert torch.equal(param, original[name].to(expected)), name
    assert reduced.compute_dtype == torch.bfloat16 and model.compute_dtype == torch.float32
    # The float32 network is left as it was.
    for name, value in model.state_dict().items():
        assert value.dtype == original[name].dtype and torch.equal(value, original[name]), name
    # A change of the weights (here in place, as an optimizer step does) makes a new copy.
    weight = model.time_encoders[0].conv.weight
    with torch.no_grad():
        weight.mul_(2)
    again = bfloat16_copy(model)
    assert again is not reduced
    torch.testing.assert_close(again.time_encoders[0].conv.weight, weight.bfloat16())


def test_bfloat16_inference_matches_its_plain_path_and_float32():
    """The bfloat16 copy in inference (fast paths on bfloat16 tensors) against the same copy
    on the plain path (autograd on) and against the float32 network: the stems differ by
    bfloat16 rounding only (float32 orderings would agree beyond 100 dB), and come out in
    float32."""
    model = _tiny_with_spread_vectors()
    reduced = bfloat16_copy(model)
    mix = torch.randn(2, 2, 3001)
    with torch.inference_mode():
        exact, fast = model(mix), reduced(mix)
    with torch.enable_grad():
        plain = reduced(mix).detach()
    assert fast.dtype == plain.dtype == torch.float32
    assert 30 < _snr(plain, fast) < 80, _snr(plain, fast)
    assert 25 < _snr(exact, fast) < 80, _snr(exact, fast)
    assert 25 < _snr(exact, plain) < 80, _snr(exact, plain)


def test_bfloat16_copy_of_a_network_built_in_inference_mode():
    """Weights made under torch.inference_mode keep no version counter: still copied, once."""
    torch.manual_seed(0)
    with torch.inference_mode():
        model = HTDemucs(tiny()).eval()
        reduced = bfloat16_copy(model)
        assert bfloat16_copy(model) is reduced
        out = reduced(torch.randn(1, 2, 3001))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_float64_network_stays_float64():
    """Only bfloat16 activations come back to float32 at the end; a float64 network (for
    reference computations) keeps float64 throughout and agrees with its float32 self."""
    model = _tiny_with_spread_vectors()
    mix = torch.randn(1, 2, 3001)
    with torch.inference_mode():
        single = model(mix)
        double = model.double()(mix.double())
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), single, rtol=1e-4, atol=1e-4 * single.abs().max())


def _held_buffer() -> torch.Tensor | None:
    """The buffer this thread holds (htsep.model.layers._reused_buffer)."""
    return getattr(layers._held, "buffer", None)


@pytest.mark.parametrize("reduced", [False, True])
def test_last_spectral_output_is_a_reused_buffer_that_never_escapes(reduced, monkeypatch):
    """In CPU inference over bands, the last spectral decoder writes into a buffer it keeps for
    the next call. A later call (another mixture, another batch size, under no_grad rather
    than inference_mode) must not change what an earlier call returned, and every call equals
    the plain autograd path, which allocates everything afresh."""
    monkeypatch.setattr(layers, "_BAND_BYTES", 1)
    model = _tiny_with_spread_vectors()
    net = bfloat16_copy(model) if reduced else model
    first, second, pair = torch.randn(1, 2, 3001), torch.randn(1, 2, 2500), torch.randn(2, 2, 4000)
    with torch.enable_grad():
        plain = [net(mix).detach() for mix in (first, second, pair)]
    with torch.inference_mode():
        got_first = net(first)
        kept = got_first.clone()
        held = _held_buffer()
        assert held is not None
        got_second = net(second)
        assert _held_buffer() is held  # the same buffer served the second call
        assert held.data_ptr() not in (got_first.data_ptr(), got_second.data_ptr())
        assert torch.equal(got_first, kept)
    with torch.no_grad():
        got_pair = net(pair)  # a new shape: a new buffer, made usable outside inference mode
    assert _held_buffer() is not held
    bound = 1e-5 if not reduced else 2e-2
    for got, expected in zip((got_first, got_second, got_pair), plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=bound, atol=bound * expected.abs().max())


def test_threads_running_one_network_keep_their_own_buffers(monkeypatch):
    """Two threads separating with one network at once: each thread has its own reused
    buffer, so each result equals the same mixture separated alone."""
    monkeypatch.setattr(layers, "_BAND_BYTES", 1)
    model = _tiny_with_spread_vectors()
    mixes = [
        torch.randn(1, 2, 4000, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)
    ]
    with torch.inference_mode():
        alone = [model(mix) for mix in mixes]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def run(index: int) -> None:
        start.wait()
        with torch.inference_mode():
            for _ in range(20):
                results[index].append(model(mixes[index]))

    workers = [threading.Thread(target=run, args=(index,)) for index in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for index in (0, 1):
        assert len(results[index]) == 20
        for got in results[index]:
            assert torch.equal(got, alone[index])


@pytest.mark.parametrize("where", ["module", "global"])
def test_a_forward_hook_may_keep_the_last_spectral_output(where, monkeypatch):
    """A forward hook on the last spectral decoder (or a global one) receives its output and
    may keep it: then that output is not the reused buffer, and a later call leaves it as it
    was."""
    monkeypatch.setattr(layers, "_BAND_BYTES", 1)
    model = _tiny_with_spread_vectors()
    last = model.freq_decoders[-1]
    kept: list[torch.Tensor] = []

    def keep(module, args, output):
        if module is last:
            kept.append(output)

    handle = (
        last.register_forward_hook(keep)
        if where == "module"
        else torch.nn.modules.module.register_module_forward_hook(keep)
    )
    try:
        with torch.inference_mode():
            model(torch.randn(1, 2, 3001))
            first = kept[0].clone()
            model(torch.randn(1, 2, 3001))
    finally:
        handle.remove()
    assert len(kept) == 2 and kept[0].data_ptr() != kept[1].data_ptr()
    assert torch.equal(kept[0], first)
