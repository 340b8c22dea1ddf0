"""The test oracle: demucs 4.1.0 models with random weights, written by demucs's own writers.

Nothing here is htsep code; it builds the independent reference that htsep is compared with.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from demucs.htdemucs import HTDemucs as ReferenceHTDemucs
from demucs.states import load_model as reference_load_model
from demucs.states import save_with_checksum, serialize_model
from omegaconf import OmegaConf
from safetensors.torch import save_file

SOURCES_4 = ["drums", "bass", "other", "vocals"]
SOURCES_6 = ["drums", "bass", "other", "vocals", "guitar", "piano"]

# Released htdemucs settings (REFERENCE.md); htdemucs_6s drops the 512-wide bottleneck.
RELEASED: dict[str, Any] = dict(
    channels=48,
    growth=2,
    nfft=4096,
    depth=4,
    kernel_size=8,
    stride=4,
    freq_emb=0.2,
    emb_scale=10,
    rewrite=True,
    cac=True,
    wiener_iters=0,
    end_iters=0,
    dconv_mode=3,
    bottom_channels=512,
    t_layers=5,
    t_heads=8,
    t_hidden_scale=4.0,
    t_norm_first=True,
    t_norm_out=True,
    t_layer_scale=True,
    t_gelu=True,
    t_emb="sin",
    segment=Fraction(39, 5),
    samplerate=44100,
    audio_channels=2,
    # training-only options a real checkpoint carries
    t_lr=None,
    t_weight_decay=0.0,
    rescale=0.1,
)
RELEASED_6S: dict[str, Any] = {**RELEASED, "bottom_channels": 0}

# A small model exercising every block (GroupNorm layers, cross-first transformer, bottleneck)
# that runs in well under a second.
SMALL: dict[str, Any] = dict(
    channels=8,
    growth=2,
    nfft=512,
    depth=3,
    kernel_size=8,
    stride=4,
    freq_emb=0.2,
    dconv_mode=3,
    dconv_comp=4,
    bottom_channels=24,
    t_layers=3,
    t_heads=4,
    norm_starts=2,
    norm_groups=2,
    segment=Fraction(3, 2),
    samplerate=8000,
    audio_channels=2,
)


def build(sources: list[str], kwargs: dict[str, Any], seed: int = 0) -> ReferenceHTDemucs:
    """A demucs HTDemucs with every parameter drawn at random (layer scales and norms too:
    their constant initial values would hide whole branches)."""
    torch.manual_seed(seed)
    model = ReferenceHTDemucs(sources=sources, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                continue  # conv / linear / embedding weights are random already
            if name.endswith("scale"):
                values = torch.rand(param.shape, generator=gen) * 0.7 + 0.3
            elif name.endswith("weight"):
                values = torch.rand(param.shape, generator=gen) + 0.5
            else:
                values = torch.randn(param.shape, generator=gen) * 0.1
            param.copy_(values)
    return model.eval()


def write_th(model: ReferenceHTDemucs, folder: Path, sig: str) -> tuple[Path, ReferenceHTDemucs]:
    """Write ``<sig>-<sha8>.th`` with demucs's serializer; return it and the oracle model loaded
    back from the same package (so both sides use the float16-rounded weights)."""
    package = serialize_model(model, OmegaConf.create({}), half=True)
    package["metrics"] = {"valid": {"main": __import__("numpy").float64(0.25)}}
    folder.mkdir(parents=True, exist_ok=True)
    save_with_checksum(package, folder / f"{sig}.th")
    (path,) = folder.glob(f"{sig}-*.th")
    return path, reference_load_model(package).eval()


def _encode(value: Any) -> Any:
    if isinstance(value, Fraction):
        return {"_type": "fraction", "numerator": value.numerator, "denominator": value.denominator}
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(item) for item in value]
    return value


def write_safetensors(model: ReferenceHTDemucs, folder: Path, sig: str) -> Path:
    """Write ``<sig>.safetensors`` in demucs 4.1.0's Hugging Face layout (float16 state)."""
    package = serialize_model(model, OmegaConf.create({}), half=True)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sig}.safetensors"
    metadata = {
        "klass": f"{package['klass'].__module__}.{package['klass'].__name__}",
        "args": json.dumps(_encode(list(package["args"]))),
        "kwargs": json.dumps(_encode(package["kwargs"])),
    }
    save_file({k: v.contiguous() for k, v in package["state"].items()}, str(path), metadata)
    return path
