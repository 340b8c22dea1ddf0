"""The public Python API against demucs.api.Separator on the same checkpoint files."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from demucs.api import Separator as ReferenceSeparator

import htsep
from htsep import separator as separator_module
from htsep.errors import AudioError, UsageError


def _mix(seconds=3.2, channels=2, rate=8000):
    gen = torch.Generator().manual_seed(4)
    return 0.1 * torch.randn(channels, int(seconds * rate), generator=gen)


def test_separate_tensor_matches_demucs_api(repo):
    mix = _mix()
    reference = ReferenceSeparator(model="mixbag", repo=repo, shifts=0, progress=False)
    _, ref = reference.separate_tensor(mix, 8000)
    ours = htsep.Separator("mixbag", repo=repo, shifts=0, device="cpu").separate_tensor(mix, 8000)
    assert list(ours) == list(ref)
    for name, stem in ours.items():
        assert (stem - ref[name]).abs().max() <= 1e-4 * ref[name].abs().max(), name


def test_separate_tensor_contract(repo):
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", stems=["vocals"])
    assert separator.sources == ["drums", "bass", "other", "vocals"]
    assert separator.sample_rate == 8000 and separator.audio_channels == 2
    mono = _mix(channels=1, rate=22050)
    before = mono.clone()
    stems = separator.separate_tensor(mono, 22050)
    assert list(stems) == ["vocals"] and stems["vocals"].shape == mono.shape
    assert torch.equal(mono, before)
    with pytest.raises(AudioError, match="pass downmix=True"):
        separator.separate_tensor(_mix(channels=3), 8000)
    with pytest.raises(AudioError, match="NaN"):
        separator.separate_tensor(torch.full((2, 100), float("nan")), 8000)


def test_progress_reports_all_the_work(repo):
    done = []
    separator = htsep.Separator("mixbag", repo=repo, device="cpu", shifts=2)
    separator.separate_tensor(_mix(), 8000, progress=done.append)
    assert sum(done) == pytest.approx(1.0)


def test_constructor_usage_errors(repo):
    with pytest.raises(UsageError, match="no source 'kazoo'"):
        htsep.Separator("aaaa0001", repo=repo, stems=["kazoo"])
    with pytest.raises(UsageError, match="overlap"):
        htsep.Separator("aaaa0001", repo=repo, overlap=1.0)
    with pytest.raises(UsageError, match="longer than the model's segment"):
        htsep.Separator("aaaa0001", repo=repo, segment=1.6)


def test_precision_options(repo, monkeypatch):
    # bf16 runs everywhere it is asked for here, emulated where the CPU lacks it (slow, but this
    # model is small): the numbers are the same either way.
    monkeypatch.setattr(separator_module, "bf16_arithmetic", lambda: True)
    mix = _mix(seconds=2.0)
    exact = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0)
    assert exact.options.batch_size == 1  # automatic batch size on the CPU
    reduced = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0, precision="bf16")
    ref, low = exact.separate_tensor(mix, 8000), reduced.separate_tensor(mix, 8000)
    for name in ref:
        noise = (low[name] - ref[name]).square().sum()
        snr = 10 * torch.log10(ref[name].square().sum() / noise)
        # Close, and really computed in bfloat16 (float32 would give > 100 dB). Measured 33.2 to
        # 37.3 dB (bass lowest) on an AMD EPYC without bfloat16 instructions, torch 2.14.
        assert 30 < snr < 50, (name, snr)
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        htsep.Separator("aaaa0001", repo=repo, device="cpu", precision="fp16")
    with pytest.raises(UsageError, match="precision 'fp8'"):
        htsep.Separator("aaaa0001", repo=repo, device="cpu", precision="fp8")


def test_bf16_is_refused_in_one_line_where_the_cpu_would_emulate_it(repo, monkeypatch, tmp_path):
    from helpers import htsep as run_htsep
    from helpers import write_clip

    monkeypatch.setattr(separator_module, "bf16_arithmetic", lambda: False)
    message = "--precision bf16: this CPU has no bfloat16 arithmetic"
    with pytest.raises(UsageError, match="^" + message):
        htsep.Separator("aaaa0001", repo=repo, device="cpu", precision="bf16")
    write_clip(tmp_path / "a.wav", 0.5)
    result = run_htsep("--repo", str(repo), "-n", "aaaa0001", "--precision", "bf16",
                       "-o", str(tmp_path / "out"), str(tmp_path / "a.wav"))  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("htsep: error: " + message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("cpuinfo", "expected", "amx"),
    [
        ("flags\t\t: fpu sse avx2 fma avx512f\n", False, False),  # AVX-512 without BF16
        ("flags\t\t: fpu avx2 avx512f avx512_bf16\n", True, False),  # Zen 4, Cooper Lake
        ("flags\t\t: fpu avx2 avx512_bf16 amx_bf16 amx_tile\n", True, True),  # Sapphire Rapids
        ("flags\t\t: fpu avx2 amx_tile amx_int8\n", False, False),  # tiles without BF16
        ("Features\t: fp asimd bf16 i8mm\n", True, False),  # Arm v8.6
        ("Features\t: fp asimd\n", False, False),
        ("processor\t: 0\n", True, None),  # no flags to read: torch decides
    ],
)
def test_bf16_arithmetic_reads_the_cpu_flags(tmp_path, monkeypatch, cpuinfo, expected, amx):
    from htsep import devices

    (tmp_path / "cpuinfo").write_text(cpuinfo)
    real_path = devices.Path
    monkeypatch.setattr(
        devices, "Path", lambda p: real_path(tmp_path / "cpuinfo") if p == "/proc/cpuinfo" else p
    )
    if amx is None:  # torch's own probe answers; here one that says yes
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
        amx = True
    devices.bf16_arithmetic.cache_clear()
    devices.amx_bf16.cache_clear()
    try:
        assert devices.bf16_arithmetic() is expected
        assert devices.amx_bf16() is amx
    finally:
        devices.bf16_arithmetic.cache_clear()
        devices.amx_bf16.cache_clear()


# --- the API checks its inputs --------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocals_only(repo):
    return htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0, stems="vocals")


def test_a_single_stem_name_is_one_stem_not_its_letters(vocals_only):
    assert vocals_only.stems == ["vocals"]


def test_numpy_and_integer_samples(vocals_only):
    import numpy as np

    mix = _mix(seconds=0.6)
    expected = vocals_only.separate_tensor(mix, 8000)["vocals"]
    from_numpy = vocals_only.separate_tensor(mix.numpy(), 8000)["vocals"]
    assert torch.equal(from_numpy, expected)
    # int16 samples are scaled as audio files store them: k / 2^15.
    quantized = (mix * 32768).round().clamp(-32768, 32767)
    as_float = vocals_only.separate_tensor(quantized / 32768, 8000)["vocals"]
    as_int16 = vocals_only.separate_tensor(quantized.numpy().astype(np.int16), 8000)["vocals"]
    assert torch.allclose(as_int16, as_float, atol=1e-6)


@pytest.mark.parametrize(
    "audio,rate,error,phrase",
    [
        (torch.zeros(2, 800, dtype=torch.complex64), 8000, AudioError, "complex"),
        (torch.zeros(2, 800, dtype=torch.bool), 8000, AudioError, "bool"),
        (np.zeros((2, 800), np.clongdouble), 8000, AudioError, "complex"),
        (np.zeros((2, 800), np.complex64), 8000, AudioError, "complex"),
        (np.zeros((2, 800), bool), 8000, AudioError, "bool"),
        (torch.zeros(800), 8000, AudioError, "(channels, time)"),
        (torch.zeros(800, 2), 8000, AudioError, "more than 64 channels"),
        ([[0.0] * 800] * 2, 8000, AudioError, "list"),
        (torch.zeros(2, 0), 8000, AudioError, "no audio"),
        (torch.zeros(2, 800), 0, UsageError, "sample rate"),
        (torch.zeros(2, 800), -8000, UsageError, "sample rate"),
        (torch.zeros(2, 800), 8000.5, UsageError, "sample rate"),
        (torch.zeros(2, 800), "8000", UsageError, "sample rate"),
        (torch.zeros(2, 800), 10**12, UsageError, "sample rate"),
        (torch.zeros(2, 800), float("nan"), UsageError, "sample rate"),
        (torch.zeros(2, 800), True, UsageError, "sample rate"),
        (torch.full((2, 800), 1e300, dtype=torch.float64), 8000, AudioError, "beyond float32"),
        (torch.full((2, 800), float("inf")), 8000, AudioError, "NaN or infinite"),
        (torch.zeros(2, 800).to_sparse(), 8000, AudioError, "dense"),
        (torch.zeros(2, 800, device="meta"), 8000, AudioError, "meta device"),
        # Refused from the shape, before 8 TB of float32 would be made of a broadcast view.
        (torch.zeros(2, 1).expand(2, 10**12), 8000, UsageError, "over 6 hours"),
    ],
)
def test_bad_tensors_and_rates(vocals_only, audio, rate, error, phrase):
    with pytest.raises(error, match=None) as caught:
        vocals_only.separate_tensor(audio, rate)
    assert phrase in str(caught.value)


def test_long_double_samples_are_taken_as_float64(vocals_only):
    """numpy's long double (80-bit on x86) has no torch type: its samples go through float64
    rather than failing in torch.from_numpy."""
    mix = _mix(seconds=0.6).double().numpy()
    got = vocals_only.separate_tensor(mix.astype(np.longdouble), 8000)["vocals"]
    assert torch.equal(got, vocals_only.separate_tensor(mix, 8000)["vocals"])


def test_unsigned_samples_are_centred_as_audio_stores_them(vocals_only):
    """Unsigned integers hold audio offset by half their range (WAV's 8-bit samples): uint8
    k -> (k - 128) / 128, uint16 k -> (k - 2^15) / 2^15, ..., uint64 included."""
    import numpy as np

    mix = _mix(seconds=0.6).clamp(-0.99, 0.99)
    for dtype, bits in [(np.uint8, 8), (np.uint16, 16), (np.uint32, 32), (np.uint64, 64)]:
        half = 2.0 ** (bits - 1)
        stored = np.round(mix.double().numpy() * half + half).astype(dtype)
        expected = torch.from_numpy((stored.astype(np.float64) - half) / half).float()
        got = vocals_only.separate_tensor(stored, 8000)["vocals"]
        want = vocals_only.separate_tensor(expected, 8000)["vocals"]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "call,phrase",
    [
        (lambda s, clip, tmp: s.separate_file(None), "audio file path"),
        (lambda s, clip, tmp: s.separate_file(3), "audio file path"),
        (lambda s, clip, tmp: s.stream_file(b"x.wav"), "audio file path"),
        (lambda s, clip, tmp: s.separate_tensor(torch.zeros(1, 800), downmix="no"), "downmix"),
        (lambda s, clip, tmp: s.separate_tensor(torch.zeros(1, 800), all_sources=1), "all_sources"),
        (
            lambda s, clip, tmp: s.separate_file_to(
                clip, {"vocals": tmp / "v.wav"}, overwrite="no"
            ),
            "overwrite",
        ),
        (lambda s, clip, tmp: s.separate_file_to(clip, {"vocals": clip}, overwrite=True), "input"),
        (
            lambda s, clip, tmp: s.separate_file_to(
                clip, {"vocals": tmp / "v.mp3"}, mp3_bitrate="320"
            ),
            "mp3_bitrate must be an integer",
        ),
        (
            lambda s, clip, tmp: s.separate_file_to(
                clip, {"vocals": tmp / "v.mp3"}, mp3_bitrate=128.5
            ),
            "mp3_bitrate must be an integer",
        ),
        (
            lambda s, clip, tmp: s.separate_file_to(clip, {"vocals": tmp / "v.mp3"}, mp3_preset=9),
            "mp3_preset must be in 2..7",
        ),
        (
            lambda s, clip, tmp: s.separate_file_to(
                clip, {"vocals": tmp / "link.wav"}, overwrite=True
            ),
            "input",
        ),
    ],
)
def test_api_arguments_are_checked_before_any_file_is_touched(repo, tmp_path, call, phrase):
    """Wrong types raise a UsageError (a string "no" must not read as true), and an output
    that is the input file itself, by name or through a link, is refused even with
    overwrite: the input would be lost."""
    import soundfile as sf

    clip = tmp_path / "clip.wav"
    sf.write(clip, _mix(seconds=0.6).numpy().T, 8000)
    (tmp_path / "link.wav").symlink_to(clip)
    (tmp_path / "v.wav").write_bytes(b"mine")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0, progress=False)
    with pytest.raises(UsageError) as caught:
        call(separator, clip, tmp_path)
    assert phrase in str(caught.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize(
    "arguments,phrase",
    [
        ({"model": None}, "model must be"),
        ({"model": 3}, "model must be"),
        ({"repo": 3}, "repo must be"),
        ({"progress": "yes"}, "progress"),
        ({"keep_memory": "no"}, "keep_memory"),
    ],
)
def test_constructor_argument_types(repo, arguments, phrase):
    arguments = {"model": "aaaa0001", "repo": repo, **arguments}
    with pytest.raises(UsageError) as caught:
        htsep.Separator(arguments.pop("model"), device="cpu", **arguments)
    assert phrase in str(caught.value)


@pytest.mark.parametrize("rate", [999, 384001])
def test_files_outside_the_rate_range_are_audio_errors(vocals_only, tmp_path, rate):
    """As for tensors: a file's rate must be 1000..384000 Hz, whichever call reads it."""
    import soundfile as sf

    clip = tmp_path / "clip.wav"
    sf.write(clip, np.zeros((rate // 2, 2), np.float32), rate, subtype="FLOAT")
    for call in (
        lambda: vocals_only.separate_file(clip),
        lambda: vocals_only.separate_file_to(clip, {"vocals": tmp_path / "v.wav"}),
        lambda: vocals_only.stream_file(clip),
    ):
        with pytest.raises(AudioError, match=f"sample rate {rate} Hz is outside"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.wav"]


def test_an_integral_float_rate_is_a_rate(vocals_only):
    mix = _mix(seconds=0.6)
    assert torch.equal(
        vocals_only.separate_tensor(mix, 8000.0)["vocals"],
        vocals_only.separate_tensor(mix, 8000)["vocals"],
    )


@pytest.mark.parametrize(
    "settings,phrase",
    [
        ({"overlap": "0.5"}, "overlap"),
        ({"overlap": float("nan")}, "overlap"),
        ({"segment": float("nan")}, "segment"),
        ({"segment": "1"}, "segment"),
        ({"segment": 0.01}, "too short"),
        ({"shifts": 1.5}, "shifts"),
        ({"shifts": True}, "shifts"),
        ({"seed": 2**70}, "seed"),
        ({"seed": "0"}, "seed"),
        ({"batch_size": 0}, "batch size"),
        ({"split": "no"}, "split"),
        ({"stems": [1, 2]}, "stems"),
        ({"stems": []}, "no stems"),
        ({"precision": None}, "precision"),
    ],
)
def test_bad_settings_are_usage_errors(repo, settings, phrase):
    with pytest.raises(UsageError) as caught:
        htsep.Separator("aaaa0001", repo=repo, device="cpu", **settings)
    assert phrase in str(caught.value)


def test_separate_file_to_checks_its_outputs(repo, tmp_path):
    import numpy as np
    import soundfile as sf

    clip = tmp_path / "clip.wav"
    sf.write(clip, _mix(seconds=0.6).numpy().T, 8000)
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0)
    for outputs, phrase in [
        ({}, "non-empty"),
        ({"kazoo": tmp_path / "k.wav"}, "kazoo"),
        ({"vocals": 3}, "file path"),
        ({"vocals": ""}, "file path"),
        ({"vocals": tmp_path / "same.wav", "bass": tmp_path / "same.wav"}, "same file"),
        (["vocals"], "mapping"),
    ]:
        with pytest.raises(UsageError) as caught:
            separator.separate_file_to(clip, outputs)
        assert phrase in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.wav"]
    # str paths work; an existing file is not replaced unless asked.
    target = str(tmp_path / "v.wav")
    assert separator.separate_file_to(clip, {"vocals": target}) == (8000, 4800)
    first = sf.read(target)[0]
    with pytest.raises(htsep.HtsepError, match="exists"):
        separator.separate_file_to(clip, {"vocals": target})
    separator.separate_file_to(clip, {"vocals": target}, overwrite=True)
    assert np.array_equal(sf.read(target)[0], first)


def _hostile_calls(separator, repo, clip, tmp):
    from htsep.audio import AudioReader, AudioWriter, audio_info, read_audio, write_audio
    from htsep.batch import Batch
    from htsep.checkpoint import save_model

    model = separator.bag.model(0)
    return {
        "progress not callable": lambda: separator.separate_tensor(_mix(0.3), progress=1),
        "file progress not callable": lambda: separator.separate_file(clip, progress="x"),
        "NUL in an input": lambda: separator.separate_file(f"{clip}\0"),
        "NUL in an output": lambda: separator.separate_file_to(clip, {"vocals": "a\0.wav"}),
        "bytes path": lambda: read_audio(os.fsencode(clip)),
        "None path": lambda: audio_info(None),
        "int path": lambda: AudioReader(3),
        "empty path": lambda: write_audio("", torch.zeros(1, 10), 8000),
        "replace not a bool": lambda: write_audio(clip, torch.zeros(1, 10), 8000, replace="no"),
        "bool samples": lambda: write_audio(
            tmp / "b.wav", torch.ones(1, 9, dtype=torch.bool), 8000
        ),
        "rate past 32 bits": lambda: write_audio(tmp / "r.wav", torch.zeros(1, 9), 2**31),
        "channels as text": lambda: AudioWriter(tmp / "c.wav", 8000, "2"),
        "bits as a list": lambda: write_audio(tmp / "l.wav", torch.zeros(1, 9), 8000, bits=[16]),
        "block of 0": lambda: AudioReader(clip, block_frames=0),
        "stream block -1": lambda: separator.stream_file(clip, block=-1),
        "huge overlap": lambda: htsep.Separator("aaaa0001", repo=repo, overlap=10**400),
        "model None": lambda: htsep.load_model(None),
        "model a Path to nothing": lambda: htsep.Separator(Path(tmp / "none.th")),
        "keep as text": lambda: separator.separate_file_to(
            clip, {"vocals": tmp / "v.wav"}, keep="vocals"
        ),
        "other_method a list": lambda: separator.output_names("vocals", ["x"]),
        "Batch out empty": lambda: Batch(separator, ""),
        "Batch settings a dict": lambda: Batch(separator, tmp, {}),
        "Batch pipeline text": lambda: Batch(separator, tmp, pipeline="no"),
        "save onto a folder": lambda: save_model(model, tmp),
        "save metadata of ints": lambda: save_model(model, tmp / "m.st", metadata={"a": 1}),
        "save no model": lambda: save_model(None, tmp / "m.st"),
        # Found by a hostile audit (2026-12-06): torch's own TypeErrors, CPU for device 0,
        # a bare TypeError from Batch.run, a checkpoint load_model refuses, ignored bits.
        "device True": lambda: htsep.Separator("aaaa0001", repo=repo, device=True),
        "device 2.5": lambda: htsep.Separator("aaaa0001", repo=repo, device=2.5),
        "device a list": lambda: htsep.Separator("aaaa0001", repo=repo, device=["cpu"]),
        "device 0": lambda: htsep.Separator("aaaa0001", repo=repo, device=0),
        "device empty": lambda: htsep.Separator("aaaa0001", repo=repo, device=""),
        "Batch.run None": lambda: Batch(separator, tmp / "o").run(None),
        "Batch.run 3": lambda: Batch(separator, tmp / "o").run(3),
        "Batch.run [3]": lambda: Batch(separator, tmp / "o").run([3]),
        "bits 24 to mp3": lambda: separator.separate_file_to(
            clip, {"vocals": tmp / "v.mp3"}, bits=24
        ),
        "save on meta": lambda: save_model(_on_meta(model), tmp / "meta.safetensors"),
        "save NaN": lambda: save_model(_with_nan(model), tmp / "nan.safetensors"),
        "network on text": lambda: model("x"),
        "network on one channel": lambda: model(torch.zeros(2, 1000)),
        "network on int16": lambda: model(torch.zeros(1, 2, 1000, dtype=torch.int16)),
        "network on meta": lambda: model(torch.zeros(1, 2, 1000, device="meta")),
        "numpy to write_audio": lambda: write_audio(tmp / "n.wav", np.zeros((2, 10)), 8000),
        # Found by a hostile audit (2026-12-07): torch's allocator errors (one a C++ trace),
        # torch's shape error for an empty batch.
        "read 10**12 frames": lambda: _read(clip, 0, 10**12),
        "read 10**30 frames": lambda: _read(clip, 0, 10**30),
        "network on a batch of 0": lambda: model(torch.zeros(0, 2, 1000)),
        "network on 0 samples": lambda: model(torch.zeros(1, 2, 0)),
    }


def _read(path, start, length):
    from htsep.audio import AudioReader

    with AudioReader(path) as reader:
        return reader.read(start, length)


def _on_meta(model):
    import copy

    return copy.deepcopy(model).to("meta")


def _with_nan(model):
    import copy

    spoiled = copy.deepcopy(model)
    with torch.no_grad():
        next(iter(spoiled.parameters())).fill_(float("nan"))
    return spoiled


def test_hostile_api_arguments_raise_htsep_errors(repo, tmp_path):
    """Each was a raw TypeError, ValueError, AttributeError, OverflowError or torch
    RuntimeError (or, for replace="no", a replaced file)."""
    import soundfile as sf

    clip = tmp_path / "clip.wav"
    sf.write(clip, _mix(seconds=0.6).numpy().T, 8000)
    before = clip.read_bytes()
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0, progress=False)
    for label, call in _hostile_calls(separator, repo, clip, tmp_path).items():
        with pytest.raises(htsep.HtsepError) as caught:
            call()
        assert "\n" not in str(caught.value), label
    assert clip.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.wav"]


def test_the_networks_input_errors_are_value_errors_too(repo):
    from htsep.errors import InputError

    model = htsep.Separator("aaaa0001", repo=repo, device="cpu").bag.model(0)
    with pytest.raises(ValueError) as caught:
        model(torch.zeros(2, 1000))
    assert isinstance(caught.value, InputError)


@pytest.mark.skipif(os.name != "posix", reason="FIFOs and links")
@pytest.mark.parametrize("kind", ["fifo", "dangling link", "folder"])
def test_separate_file_to_never_takes_what_cannot_hold_a_stem(repo, tmp_path, kind):
    """As the command line refuses them whatever --overwrite says; overwrite=True replaced a
    named pipe or a link to nothing with the stem (and a folder failed after the networks)."""
    import soundfile as sf

    clip = tmp_path / "clip.wav"
    sf.write(clip, _mix(seconds=0.6).numpy().T, 8000)
    target = tmp_path / "v.wav"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    else:
        os.symlink(tmp_path / "nowhere.wav", target)
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0, progress=False)
    calls = []
    separator.bag.model(0).register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(AudioError, match="where a stem file goes"):
        separator.separate_file_to(clip, {"vocals": target}, overwrite=True)
    assert calls == []  # refused before the networks ran
    assert os.path.lexists(target) and not target.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.wav", "v.wav"]


def test_a_stem_to_keep_whose_file_is_missing_is_written(repo, tmp_path):
    import soundfile as sf

    clip = tmp_path / "clip.wav"
    sf.write(clip, _mix(seconds=0.6).numpy().T, 8000)
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0, progress=False)
    outputs = {"vocals": tmp_path / "k" / "v.wav", "bass": tmp_path / "k" / "b.wav"}
    separator.separate_file_to(clip, outputs, keep=["vocals"])
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["b.wav", "v.wav"]
    # A kept file that is there stays as it is.
    (tmp_path / "k" / "v.wav").write_bytes(b"kept")
    separator.separate_file_to(clip, outputs, keep=["vocals"], overwrite=True)
    assert (tmp_path / "k" / "v.wav").read_bytes() == b"kept"


def test_a_numpy_integer_block_is_a_block(repo, tmp_path):
    import soundfile as sf

    clip = tmp_path / "clip.wav"
    sf.write(clip, _mix(seconds=0.6).numpy().T, 8000)
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0, progress=False)
    with separator.stream_file(clip, block=np.int64(1000)) as stream:
        blocks = list(stream)
    assert sum(stems["vocals"].shape[-1] for _, stems in blocks) == 4800


def test_write_audio_without_replace_refuses_a_file_there_before_writing(tmp_path):
    from htsep import audio

    path = tmp_path / "vocals.wav"
    path.write_bytes(b"mine")
    with pytest.raises(AudioError) as caught, audio.AudioWriter(path, 8000, 1, replace=False):
        pass
    assert str(caught.value) == f"{path}: exists already; not replaced"
    assert path.read_bytes() == b"mine" and os.listdir(tmp_path) == ["vocals.wav"]


def test_integer_tensors_are_written_as_audio_files_store_them(tmp_path):
    from htsep.audio import read_audio, write_audio

    for dtype, value, expected in [(torch.int16, 1000, 1000 / 2**15), (torch.uint8, 192, 0.5)]:
        path = tmp_path / f"{dtype}.wav"
        write_audio(path, torch.full((1, 10), value, dtype=dtype), 8000, bits=32)
        assert read_audio(path)[0][0, 0].item() == pytest.approx(expected, abs=1e-7)


def test_a_single_path_is_one_input_not_its_letters(repo, tmp_path, monkeypatch):
    """Batch.run("song.wav") took the string for a list of inputs "s", "o", ...; one of them,
    "/" for an absolute path, sent it searching the whole file system."""
    import soundfile as sf

    from htsep.batch import Batch, find_inputs

    monkeypatch.chdir(tmp_path)
    sf.write(tmp_path / "a.wav", _mix(seconds=0.6).numpy().T, 8000)
    assert [t.source for t in find_inputs("a.wav", tmp_path / "out")] == ["a.wav"]
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0, progress=False)
    done = Batch(separator, tmp_path / "out").run(str(tmp_path / "a.wav"))
    assert [t.status for t in done] == ["ok"]


def test_a_scanned_file_serves_one_separation(repo, tmp_path):
    """A second use read past the end of its consumed separation: a ValueError."""
    import soundfile as sf

    from htsep.separator import ScannedFile

    clip = tmp_path / "clip.wav"
    sf.write(clip, _mix(seconds=0.6).numpy().T, 8000)
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0, progress=False)
    scanned = ScannedFile.open(separator, clip)
    try:
        separator.separate_file_to(scanned, {"vocals": tmp_path / "a.wav"})
        with pytest.raises(UsageError, match="separated already; open it again"):
            separator.separate_file_to(scanned, {"vocals": tmp_path / "b.wav"})
    finally:
        scanned.close()
    assert (tmp_path / "a.wav").is_file() and not (tmp_path / "b.wav").exists()


@pytest.mark.parametrize("method", ["add", "minus"])
def test_two_stems_complement_wins_over_a_source_of_that_name(tmp_path, method):
    """A model with a source named "no_vocals" (or "minus_vocals") wrote that source as the
    complement of --two-stems vocals; the complement is the sum of the other sources (or the
    mix minus the stem), as demucs writes it."""
    import soundfile as sf

    import reference

    complement = f"{'no' if method == 'add' else 'minus'}_vocals"
    sources = ["vocals", complement, "mixture"]
    reference.write_th(reference.build(sources, reference.SMALL, seed=3), tmp_path, "odd")
    clip = tmp_path / "clip.wav"
    mix = _mix(seconds=0.6)
    sf.write(clip, mix.numpy().T, 8000, subtype="FLOAT")
    separator = htsep.Separator("odd", repo=tmp_path, device="cpu", shifts=0)
    plain = separator.separate_tensor(mix, 8000)
    target = tmp_path / "complement.wav"
    separator.separate_file_to(
        clip, {complement: target}, two_stems="vocals", other_method=method, bits=32
    )
    expected = plain[complement] + plain["mixture"] if method == "add" else mix - plain["vocals"]
    written = torch.from_numpy(sf.read(target, dtype="float32")[0].T)
    assert torch.allclose(written, expected, atol=1e-6)
    assert not torch.allclose(written, plain[complement], atol=1e-2)


def test_clamp_clips_at_099_and_rescale_takes_the_stems_written(repo, tmp_path):
    """What the README says of the clip modes, against their formulas: clamp is +-0.99 (as
    demucs); rescale divides by max(1.01 * peak, 1) with the peak of the stems written, so the
    loudest stem written peaks at exactly 1 / 1.01."""
    import soundfile as sf

    clip = tmp_path / "loud.wav"
    sf.write(clip, (40 * _mix(seconds=0.6)).numpy().T, 8000, subtype="FLOAT")
    separator = htsep.Separator("aaaa0001", repo=repo, device="cpu", shifts=0)
    plain = separator.separate_tensor(40 * _mix(seconds=0.6), 8000)
    assert max(float(stem.abs().max()) for stem in plain.values()) > 1.5  # it does clip

    def peak(name: str, **options) -> float:
        target = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.wav"
        separator.separate_file_to(clip, {name: target}, bits=32, **options)
        return float(np.abs(sf.read(target, dtype="float32")[0]).max())

    for name in plain:
        expected = min(float(plain[name].abs().max()), 0.99)
        assert abs(peak(name, clip_mode="clamp") - expected) < 1e-6
        if float(plain[name].abs().max()) > 1:
            assert abs(peak(name, clip_mode="rescale") - 1 / 1.01) < 1e-6


def test_a_path_object_is_a_checkpoint_file_for_separator_as_for_load_model(
    tmp_path, repo, monkeypatch
):
    """load_model(Path("mymodel")) loaded the file; Separator(Path("mymodel")) said "unknown
    model", and Separator(Path("htdemucs")) went to download the registry's model."""
    import shutil

    from htsep.errors import ModelNotFoundError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HTSEP_MIRROR", "http://127.0.0.1:9/unreachable")
    monkeypatch.setenv("HTSEP_CACHE", str(tmp_path / "cache"))
    for name in ("mymodel", "htdemucs"):
        (checkpoint,) = repo.glob("aaaa0001-*.th")
        shutil.copy(checkpoint, tmp_path / name)
        separator = htsep.Separator(Path(name), progress=False)
        assert separator.sources == htsep.load_model(Path(name)).sources
        assert [m.path for m in separator.spec.members] == [Path(name)]
    with pytest.raises(ModelNotFoundError, match="unknown model 'mymodel'"):
        htsep.Separator("mymodel", progress=False)  # a plain name is never a file here


@pytest.mark.parametrize("repo_value", ["", "  "])
def test_an_empty_repo_is_refused_not_the_current_folder(tmp_path, repo, monkeypatch, repo_value):
    """repo=os.environ.get("MODELS", "") searched the current folder."""
    import shutil

    from htsep.errors import ModelNotFoundError

    monkeypatch.chdir(tmp_path)
    (checkpoint,) = repo.glob("aaaa0001-*.th")
    shutil.copy(checkpoint, tmp_path / checkpoint.name)
    with pytest.raises(ModelNotFoundError, match="empty folder name"):
        htsep.Separator("aaaa0001", repo=repo_value, progress=False)


@pytest.mark.parametrize("shifts", [1, 2])
def test_a_bag_run_for_some_stems_gives_those_of_the_whole_run(tmp_path, repo, shifts):
    """The shift trick's delays were drawn only for the members that run: with --stems (or
    --two-stems X --other-method minus) the later members got other delays, and their stems
    differed from a whole run's by as much as the signal (htdemucs_ft serves one stem per
    network)."""
    import shutil

    import yaml

    for sig in ("aaaa0001", "bbbb0002"):
        (checkpoint,) = repo.glob(f"{sig}-*.th")
        shutil.copy(checkpoint, tmp_path / checkpoint.name)
    (tmp_path / "halves.yaml").write_text(yaml.safe_dump({
        "models": ["aaaa0001", "bbbb0002"],
        "weights": [[1, 1, 0, 0], [0, 0, 1, 1]],  # drums, bass | other, vocals
    }))  # fmt: skip
    mix = _mix(seconds=1.3)
    settings = {"repo": tmp_path, "device": "cpu", "shifts": shifts, "seed": 7, "progress": False}
    whole = htsep.Separator("halves", **settings).separate_tensor(mix, 8000)
    for stems in (["vocals"], ["other", "vocals"], ["bass", "vocals"]):
        some = htsep.Separator("halves", stems=stems, **settings)
        assert some.members_running == (1 if stems != ["bass", "vocals"] else 2)
        got = some.separate_tensor(mix, 8000)
        for stem in stems:
            assert torch.allclose(got[stem], whole[stem], rtol=0, atol=1e-7), stem
    # The delays differ between members, so a wrong draw shows (not all members alike).
    assert not torch.allclose(whole["vocals"], whole["drums"])
