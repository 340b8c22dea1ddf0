"""Chunking, shifts and bags against demucs 4.1.0's apply_model on identical weights."""

from fractions import Fraction
from functools import partial

import demucs.apply
import pytest
import torch

import htsep
from htsep.apply import (
    ChunkOptions,
    SeparationStream,
    mix_statistics,
    plan_bag,
    triangle_weights,
    zero_extended,
)

TOLERANCE = 1e-5


def _relative(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def pair(small_checkpoint):
    th_path, _, oracle = small_checkpoint
    return htsep.load_model(th_path), oracle


def apply_shifts(model, mix, *, shifts, generator, options=None):
    """The engine on one model over a whole (B, C, T) mix -> (B, S, C, T)."""
    stream = SeparationStream(
        [(model, [1.0] * len(model.sources))],
        lambda start, count: zero_extended(mix, start, count),
        mix.shape[-1],
        shifts=shifts,
        generator=generator,
        options=options or ChunkOptions(),
    )
    return stream.take(mix.shape[-1])


def _mix(seconds, rate=8000, batch=1, seed=0):
    return torch.randn(batch, 2, int(seconds * rate), generator=torch.Generator().manual_seed(seed))


def test_triangle_weights_analytic():
    torch.testing.assert_close(triangle_weights(6), torch.tensor([1, 2, 3, 3, 2, 1]) / 3.0)
    torch.testing.assert_close(triangle_weights(5), torch.tensor([1, 2, 3, 2, 1]) / 3.0)
    torch.testing.assert_close(triangle_weights(4, 2.0), (torch.tensor([1, 2, 2, 1]) / 2.0) ** 2)


def test_zero_extended():
    x = torch.arange(1.0, 6.0)[None]  # [1 2 3 4 5]
    assert zero_extended(x, -2, 4).tolist() == [[0, 0, 1, 2]]
    assert zero_extended(x, 3, 4).tolist() == [[4, 5, 0, 0]]
    assert zero_extended(x, 1, 3).tolist() == [[2, 3, 4]]
    assert zero_extended(x, 7, 2).tolist() == [[0, 0]]
    assert zero_extended(x, -1, 7).tolist() == [[0, 1, 2, 3, 4, 5, 0]]


@pytest.mark.parametrize("seconds", [0.3, 1.5, 5.55])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_chunking_matches_reference(pair, seconds, overlap):
    model, oracle = pair
    mix = _mix(seconds)
    ref = demucs.apply.apply_model(oracle, mix, shifts=0, split=True, overlap=overlap)
    ours = apply_shifts(
        model, mix, shifts=0, generator=torch.Generator(), options=ChunkOptions(overlap=overlap)
    )
    assert ours.shape == ref.shape
    assert _relative(ours, ref) <= TOLERANCE


def test_shorter_segment_matches_reference(pair):
    model, oracle = pair
    mix = _mix(4.2)
    ref = demucs.apply.apply_model(oracle, mix, shifts=0, split=True, segment=Fraction(1))
    ours = apply_shifts(
        model, mix, shifts=0, generator=torch.Generator(), options=ChunkOptions(segment=Fraction(1))
    )
    assert _relative(ours, ref) <= TOLERANCE


def test_shifts_match_reference_given_the_same_offsets(pair, monkeypatch):
    """demucs draws offsets from Python's global RNG; feed it the offsets ours draws."""
    model, oracle = pair
    mix = _mix(3.3)
    max_shift = int(0.5 * model.sample_rate)
    offsets = torch.randint(0, max_shift + 1, (3,), generator=torch.Generator().manual_seed(5))
    queue = [int(o) for o in offsets]
    monkeypatch.setattr(demucs.apply.random, "randint", lambda lo, hi: queue.pop(0))
    ref = demucs.apply.apply_model(oracle, mix, shifts=3, split=True)
    assert not queue
    ours = apply_shifts(model, mix, shifts=3, generator=torch.Generator().manual_seed(5))
    assert _relative(ours, ref) <= TOLERANCE


def test_shifts_are_deterministic_for_a_seed(pair):
    model, _ = pair
    mix = _mix(2.0)
    first = apply_shifts(model, mix, shifts=2, generator=torch.Generator().manual_seed(1))
    again = apply_shifts(model, mix, shifts=2, generator=torch.Generator().manual_seed(1))
    other = apply_shifts(model, mix, shifts=2, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_batched_chunks_equal_one_at_a_time(pair):
    model, _ = pair
    mix = _mix(6.1, batch=2)
    one = apply_shifts(model, mix, shifts=0, generator=torch.Generator())
    many = apply_shifts(
        model, mix, shifts=0, generator=torch.Generator(), options=ChunkOptions(batch_size=4)
    )
    # Equal to float32 rounding at the outputs' scale (peaks near 5 here): oneDNN's kernels
    # for 4 chunks and for 1 may sum in different orders (1e-6 of the peak seen).
    assert many.shape == one.shape
    assert _relative(many, one) <= TOLERANCE


def test_no_split_equals_split_within_one_stride(pair):
    model, oracle = pair
    mix = _mix(1.1)  # one chunk: shorter than the 1.125 s stride of the 1.5 s segment
    split = apply_shifts(model, mix, shifts=0, generator=torch.Generator())
    whole = apply_shifts(
        model, mix, shifts=0, generator=torch.Generator(), options=ChunkOptions(split=False)
    )
    ref = demucs.apply.apply_model(oracle, mix, shifts=0, split=False)
    torch.testing.assert_close(whole, split, rtol=1e-6, atol=1e-6)
    assert _relative(whole, ref) <= TOLERANCE


def test_input_is_not_mutated(pair):
    model, _ = pair
    mix = _mix(2.0)
    before = mix.clone()
    apply_shifts(model, mix, shifts=1, generator=torch.Generator())
    assert torch.equal(mix, before)


def test_plan_bag():
    one_hot = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    running, weights = plan_bag(one_hot, [3])
    assert running == [3]
    assert weights == [[1.0, 1.0, 1.0, 1.0]]  # other sources fall back to the member that ran
    running, weights = plan_bag(one_hot, [0, 1, 2, 3])
    assert running == [0, 1, 2, 3] and weights == [list(map(float, r)) for r in one_hot]
    running, weights = plan_bag([[1, 2], [3, 0]], [1])
    assert running == [0] and weights == [[1.0, 2.0]]


def _statistics(mix, block):
    return mix_statistics(partial(zero_extended, mix), mix.shape[-1], block)


@pytest.mark.parametrize("block", [1, 7, 1000, 4096])
def test_mix_statistics_equal_float64_whole_track(block):
    """Blockwise statistics equal the whole track's, computed in float64 at once, whatever the
    block size; a single sample has std 0 (not NaN), silence a finite normalization."""
    mix = torch.randn(2, 1000, generator=torch.Generator().manual_seed(3)) * 0.3 + 0.1
    mono = mix.double().mean(0)
    mean, std = _statistics(mix, block)
    assert mean == pytest.approx(float(mono.mean()), rel=1e-12)
    assert std == pytest.approx(float(mono.std()) + 1e-8, rel=1e-12)
    assert _statistics(torch.tensor([[0.5], [0.25]]), block) == (0.375, 1e-8)
    assert _statistics(torch.zeros(2, 100), block) == (0.0, 1e-8)
