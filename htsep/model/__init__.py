"""The HT Demucs network only: no audio files, no downloads."""

from htsep.model.config import ConvConfig, HTDemucsConfig, STFTConfig, TransformerConfig
from htsep.model.htdemucs import HTDemucs

__all__ = ["ConvConfig", "HTDemucs", "HTDemucsConfig", "STFTConfig", "TransformerConfig"]
