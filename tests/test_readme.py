"""The README's Python code runs as printed (offline, with the shipped htsep-tiny)."""

import re
from pathlib import Path

import numpy as np
import soundfile as sf

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert blocks, "the README has no Python example"
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "song.wav", 0.1 * rng.standard_normal((2 * 44100, 2)), 44100)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:  # one namespace: later blocks go on from earlier ones, as a reader does
        exec(compile(block, str(README), "exec"), namespace)
    assert sf.info(tmp_path / "vocals.flac").frames == 2 * 44100
    assert tuple(namespace["out"].shape) == (1, 4, 2, 2 * 44100)
    assert set(namespace["stems"]) == {"drums", "bass", "other", "vocals"}
    folder = Path("separated", "htsep-tiny", "song")  # as the outputs were named: relative
    assert [(t.status, t.outputs) for t in namespace["tracks"]] == [
        ("ok", [str(folder / f"{stem}.flac") for stem in ("drums", "bass", "other", "vocals")])
    ]
    assert sf.info(tmp_path / folder / "vocals.flac").subtype == "PCM_24"
