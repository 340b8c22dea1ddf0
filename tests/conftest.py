import signal
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


STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture(scope="session", autouse=True)
def _stop_signals_at_their_defaults():
    """Child processes inherit an ignored signal, and htsep keeps a signal ignored at start
    ignored (nohup): a suite started under nohup, or as a background job of a script (SIGINT
    ignored), would see its children run through the signals its tests send them."""
    saved = {sig: signal.getsignal(sig) for sig in STOPPING}
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if saved[signal.SIGINT] is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@pytest.fixture(autouse=True)
def _no_signal_handler_leaks(_stop_signals_at_their_defaults):
    """A test that leaves a stop signal ignored or handled in this process changes every later
    test's child processes; it fails here, and the handlers are put back."""
    before = {sig: signal.getsignal(sig) for sig in STOPPING}
    yield
    after = {sig: signal.getsignal(sig) for sig in STOPPING}
    changed = [signal.Signals(sig).name for sig in STOPPING if after[sig] is not before[sig]]
    for sig, handler in before.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    assert not changed, f"the test left these signals' handlers changed: {', '.join(changed)}"


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
