"""htsep against the reference demucs 4.1.0 on identical random weights, loaded from files that
demucs's own writers produced. Tolerance: max |ours - ref| <= 1e-4 * max |ref|."""

import pytest
import torch

import htsep
import reference

TOLERANCE = 1e-4


def _worst(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _lengths(segment: int) -> list[tuple[int, int]]:
    """(batch, length): a full segment, a shorter one, an odd one, and a batch of two."""
    return [(1, segment), (1, segment // 2), (1, segment // 3 + 1 | 1), (2, segment - segment // 7)]


def _compare(model, oracle, batch, length, seed=0):
    mix = torch.randn(
        batch, model.audio_channels, length, generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        ref = oracle(mix)
        ours = model(mix)
    assert ours.shape == ref.shape == (batch, len(model.sources), model.audio_channels, length)
    return _worst(ours, ref)


@pytest.mark.parametrize("kind", ["th", "safetensors"])
def test_small_parity(small_checkpoint, kind):
    th_path, st_path, oracle = small_checkpoint
    model = htsep.load_model(th_path if kind == "th" else st_path)
    segment = model.segment_length
    for batch, length in [*_lengths(segment), (1, 1), (3, 1001)]:
        assert _compare(model, oracle, batch, length) <= TOLERANCE, (batch, length)


RELEASED_CONFIGURATIONS = pytest.mark.parametrize(
    "name,sources,kwargs",
    [
        ("htdemucs", reference.SOURCES_4, reference.RELEASED),
        ("htdemucs_6s", reference.SOURCES_6, reference.RELEASED_6S),
    ],
)


def _released(folder, name, sources, kwargs):
    """The released configuration with random weights: (from .th, from .safetensors, oracle)."""
    ref_model = reference.build(sources, kwargs, seed=1)
    th_path, oracle = reference.write_th(ref_model, folder, name)
    st_path = reference.write_safetensors(ref_model, folder, name)
    from_th = htsep.load_model(th_path)
    from_st = htsep.load_model(st_path)
    assert from_th.sources == sources
    assert from_th.segment == kwargs["segment"] and from_th.segment_length == 343_980
    # Both formats carry the same float16 weights and describe the same network.
    assert from_st.config == from_th.config
    pairs = zip(from_th.state_dict().items(), from_st.state_dict().values(), strict=True)
    for (key, a), b in pairs:
        assert torch.equal(a, b), key
    return from_th, from_st, oracle


@RELEASED_CONFIGURATIONS
def test_released_configuration_parity(tmp_path, name, sources, kwargs):
    """One odd length shorter than the segment (each side pads it to a whole segment): a forward
    pass of the released network costs seconds, so the length grid is in the slow test below.
    The .safetensors model has the .th model's config and tensors (checked in _released), hence
    its outputs."""
    from_th, _, oracle = _released(tmp_path, name, sources, kwargs)
    segment = from_th.segment_length
    worst = _compare(from_th, oracle, 1, segment // 3 + 1 | 1)
    print(f"{name}: worst relative difference {worst}")
    assert worst <= TOLERANCE


@pytest.mark.slow
@RELEASED_CONFIGURATIONS
def test_released_configuration_parity_every_length(tmp_path, name, sources, kwargs):
    from_th, from_st, oracle = _released(tmp_path, name, sources, kwargs)
    segment = from_th.segment_length
    worst = {}
    for batch, length in _lengths(segment):
        worst[(batch, length)] = _compare(from_th, oracle, batch, length)
    worst["safetensors"] = _compare(from_st, oracle, 1, segment - 1, seed=5)
    print(f"{name}: worst relative difference {worst}")
    assert max(worst.values()) <= TOLERANCE, worst
