import copy
import os
import shutil
from pathlib import Path

import pytest
import torch
from demucs.hdemucs import HDemucs as ReferenceHDemucs
from demucs.hf import load_safetensors_model
from demucs.states import serialize_model
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import htsep
import reference
from htsep.checkpoint import save_model
from htsep.errors import CheckpointError, UnsupportedOptionError


@pytest.fixture(scope="module")
def package():
    model = reference.build(reference.SOURCES_4, reference.SMALL, seed=3)
    return serialize_model(model, OmegaConf.create({}), half=True)


def _write(package, path: Path, **save_kwargs) -> Path:
    torch.save(package, path, **save_kwargs)
    return path


def _outputs(model, length=5000):
    mix = torch.randn(1, 2, length, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(mix)


def test_th_package_with_numpy_metrics_loads(small_checkpoint):
    th_path, _, oracle = small_checkpoint
    raw = torch.load(th_path, weights_only=False)
    assert "metrics" in raw  # numpy scalars inside: must not need weights_only=False
    model = htsep.load_model(th_path)
    assert not model.training
    assert model.sources == ["drums", "bass", "other", "vocals"]
    assert model.sample_rate == 8000 and model.audio_channels == 2
    assert model.segment == reference.SMALL["segment"]


def test_our_safetensors_writer_is_demucs_layout(small_checkpoint):
    """The test writer produces what demucs 4.1.0's own Hugging Face loader reads."""
    _, st_path, oracle = small_checkpoint
    loaded = load_safetensors_model(st_path)
    for (key, a), b in zip(loaded.state_dict().items(), oracle.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


@pytest.mark.parametrize(
    "option,value,named",
    [
        ({"wiener_iters": 1, "end_iters": 1}, None, "wiener_iters"),
        ({"cac": False}, None, "cac"),
        ({"t_emb": "cape"}, None, "t_emb"),
        ({"t_emb": "scaled"}, None, "t_emb"),
        ({"t_sparse_self_attn": True}, None, "t_sparse_self_attn"),
        ({"t_sparse_cross_attn": True}, None, "t_sparse_cross_attn"),
        ({"multi_freqs": [0.3, 0.6]}, None, "multi_freqs"),
        ({"t_norm_first": False}, None, "t_norm_first"),
        ({"t_group_norm": 1}, None, "t_group_norm"),
        ({"channels_time": 16}, None, "channels_time"),
        ({"depth": 4}, None, "merging the branches"),
    ],
)
def test_unsupported_option_names_itself(tmp_path, package, option, value, named):
    bad = copy.copy(package)
    bad["kwargs"] = {**package["kwargs"], **option}
    path = _write(bad, tmp_path / "bad.th")
    with pytest.raises(UnsupportedOptionError) as info:
        htsep.load_model(path)
    message = str(info.value)
    assert named in message and str(path) in message and "\n" not in message


def test_training_only_and_unknown_options_are_ignored(tmp_path, package, small_checkpoint):
    extra = copy.copy(package)
    extra["kwargs"] = {
        **package["kwargs"],
        "t_lr": 3e-4,
        "t_weight_decay": 0.05,
        "rescale": 0.2,
        "option_from_the_future": [1, 2],
    }
    model = htsep.load_model(_write(extra, tmp_path / "extra.th"))
    plain = htsep.load_model(_write(package, tmp_path / "plain.th"))
    torch.testing.assert_close(_outputs(model), _outputs(plain), rtol=0, atol=0)


def test_other_demucs_model_classes_are_refused_by_name(tmp_path, package):
    other = copy.copy(package)
    other["klass"] = ReferenceHDemucs
    with pytest.raises(UnsupportedOptionError, match=r"demucs\.hdemucs\.HDemucs is not supported"):
        htsep.load_model(_write(other, tmp_path / "hdemucs.th"))


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_crafted_pickle_is_refused_and_never_runs(tmp_path, package, zipped):
    marker = tmp_path / "pwned"
    # The legacy (non-zip) writer cannot hold a pickled model class: use a bare dict there.
    evil = copy.copy(package) if zipped else {"state": {}}
    evil["training_args"] = _RunsACommand(marker)
    path = _write(evil, tmp_path / "evil.th", _use_new_zipfile_serialization=zipped)
    # Sanity: the file really runs the command when loaded the unsafe way.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match=r"refusing to load: .*system") as info:
        htsep.load_model(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_foreign_classes_are_refused(tmp_path, package):
    import argparse

    foreign = copy.copy(package)
    foreign["training_args"] = argparse.Namespace(lr=1)
    with pytest.raises(CheckpointError, match=r"refusing to load: .*argparse\.Namespace"):
        htsep.load_model(_write(foreign, tmp_path / "foreign.th"))


@pytest.mark.parametrize("which", ["th", "safetensors"])
def test_truncated_files(tmp_path, small_checkpoint, which):
    th_path, st_path, _ = small_checkpoint
    source = th_path if which == "th" else st_path
    data = source.read_bytes()
    path = tmp_path / source.name
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated") as info:
        htsep.load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_unexpected_and_misshapen_tensors(tmp_path, package):
    state = dict(package["state"])
    del state["crosstransformer.layers.1.norm2.weight"]
    state["decoder.0.mystery"] = torch.zeros(3)
    state["encoder.1.conv.weight"] = torch.zeros(2, 2)
    broken = {**package, "state": state}
    with pytest.raises(CheckpointError) as info:
        htsep.load_model(_write(broken, tmp_path / "broken.th"))
    message = str(info.value)
    # Layer 1 is a cross layer: its norm2 is the context norm.
    assert "missing tensors: transformer.freq_layers.1.context_norm.weight" in message
    assert "unexpected tensors: decoder.0.mystery" in message
    assert "wrong shapes: encoder.1.conv.weight (file [2, 2], model [16, 8, 8, 1])" in message


def test_missing_file_folder_and_non_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        htsep.load_model(tmp_path / "absent.th")
    with pytest.raises(CheckpointError, match="is a folder"):
        htsep.load_model(tmp_path)
    text = tmp_path / "notes.th"
    text.write_text("hello, this is not a model\n")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        htsep.load_model(text)
    empty = tmp_path / "empty.th"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        htsep.load_model(empty)


def test_own_format_round_trip(tmp_path, small_checkpoint):
    th_path, _, _ = small_checkpoint
    model = htsep.load_model(th_path)
    path = save_model(model, tmp_path / "models" / "mine.safetensors", {"note": "test"})
    assert [p.name for p in path.parent.iterdir()] == ["mine.safetensors"]  # no temp file left
    again = htsep.load_model(path)
    assert again.config == model.config
    for (key, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    torch.testing.assert_close(_outputs(again), _outputs(model), rtol=0, atol=0)


def test_own_format_version_and_metadata_checks(tmp_path, small_checkpoint):
    th_path, _, _ = small_checkpoint
    good = save_model(htsep.load_model(th_path), tmp_path / "good.safetensors")
    tensors = load_file(str(good))
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as handle:
        metadata = handle.metadata()
    future = tmp_path / "future.safetensors"
    save_file(tensors, str(future), {**metadata, "format_version": "99"})
    with pytest.raises(CheckpointError, match="format version '99'"):
        htsep.load_model(future)
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))
    with pytest.raises(CheckpointError, match="without model metadata"):
        htsep.load_model(bare)


def test_loading_does_not_need_demucs_importable(tmp_path, small_checkpoint):
    """Run the loader in a fresh interpreter where importing demucs fails."""
    import subprocess
    import sys

    th_path, _, _ = small_checkpoint
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "demucs.py").write_text("raise ImportError('demucs must not be imported')\n")
    shutil.copy(th_path, tmp_path / "model.th")
    code = (
        "import htsep; m = htsep.load_model('model.th'); "
        "import sys; assert 'demucs' not in sys.modules or False; print(m.sources)"
    )
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "drums" in result.stdout
