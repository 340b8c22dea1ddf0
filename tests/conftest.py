import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

import reference  # noqa: E402


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """A small demucs model with random weights, written as .th and as .safetensors by demucs's
    own serializer; returns (th_path, safetensors_path, oracle model)."""
    folder = tmp_path_factory.mktemp("small")
    model = reference.build(reference.SOURCES_4, reference.SMALL, seed=7)
    th_path, oracle = reference.write_th(model, folder, "small")
    st_path = reference.write_safetensors(model, folder, "small")
    return th_path, st_path, oracle


@pytest.fixture(autouse=True)
def _private_model_caches(tmp_path, monkeypatch):
    """No test reads or writes the user's model caches or reaches a real download host."""
    monkeypatch.setenv("HTSEP_CACHE", str(tmp_path / "htsep-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HTSEP_MIRROR", "http://127.0.0.1:9/unreachable")


@pytest.fixture(scope="session")
def repo(tmp_path_factory):
    """A demucs-style --repo folder: two small models written by demucs's own serializer, a
    weighted bag of both, and a one-hot bag whose members each serve one source."""
    folder = tmp_path_factory.mktemp("repo")
    for index, sig in enumerate(["aaaa0001", "bbbb0002"]):
        model = reference.build(reference.SOURCES_4, reference.SMALL, seed=11 + index)
        reference.write_th(model, folder, sig)
    (folder / "mixbag.yaml").write_text(
        yaml.safe_dump(
            {
                "models": ["aaaa0001", "bbbb0002"],
                "weights": [[1.0, 0.5, 0.25, 1.0], [0.5, 1.0, 1.0, 0.25]],
            }
        )
    )
    # Members 2..4 of the one-hot bag are not checkpoints at all: a run that loads them fails.
    for sig in ["dead0003", "dead0004", "dead0005"]:
        (folder / f"{sig}.th").write_bytes(b"not a checkpoint")
    (folder / "onehot.yaml").write_text(
        yaml.safe_dump(
            {
                "models": ["dead0003", "dead0004", "dead0005", "aaaa0001"],
                "weights": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
            }
        )
    )
    return folder
