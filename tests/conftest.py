import sys
from pathlib import Path

import pytest

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
