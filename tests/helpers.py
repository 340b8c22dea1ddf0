"""Shared by the end-to-end tests: test clips for the small models and the `htsep separate`
command run in this process. Fixtures live in conftest.py; these are plain functions."""

from pathlib import Path

import numpy as np
import soundfile as sf
from typer.testing import CliRunner, Result

from htsep.cli import app

RATE = 8000  # the small test models' sample rate
runner = CliRunner()


def write_clip(
    path: Path,
    seconds: float,
    rate: int = RATE,
    channels: int = 2,
    amplitude: float = 0.05,
    seed: int = 0,
    subtype: str = "FLOAT",
) -> np.ndarray:
    """A 220 Hz tone in seeded noise, written to ``path`` (folders made); returns it (T, C)."""
    rng = np.random.default_rng(seed)
    frames = int(seconds * rate)
    t = np.arange(frames) / rate
    tone = np.sin(2 * np.pi * 220 * t)[:, None] * np.linspace(0.5, 1.0, channels)[None]
    audio = amplitude * (0.6 * tone + 0.4 * rng.standard_normal((frames, channels)))
    audio = audio.astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, rate, subtype=subtype)
    return audio


def htsep(*args: str) -> Result:
    """`htsep separate ARGS` in this process."""
    return runner.invoke(app, ["separate", *args])
