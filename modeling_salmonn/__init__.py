"""SALMONN as a transformers model. The sibling modules are also the remote code saved with checkpoints."""

from .configuration_salmonn import BeatsConfig, SalmonnConfig

__all__ = ["BeatsConfig", "SalmonnConfig"]
