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
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
    assert sf.info(tmp_path / "vocals.flac").frames == 2 * 44100
    assert tuple(namespace["out"].shape) == (1, 4, 2, 2 * 44100)
    assert set(namespace["stems"]) == {"drums", "bass", "other", "vocals"}
