"""SALMONN as a transformers model. The sibling modules are also the remote code saved with checkpoints."""

from .configuration_salmonn import BeatsConfig, SalmonnConfig
from .feature_extraction_salmonn import SalmonnFeatureExtractor
from .modeling_beats import BeatsModel
from .modeling_salmonn import (
    SALMONN_ADAPTER_MODULES,
    SalmonnForConditionalGeneration,
    SalmonnModel,
    SalmonnPreTrainedModel,
)
from .processing_salmonn import SalmonnProcessor


__all__ = [
    "SALMONN_ADAPTER_MODULES",
    "BeatsConfig",
    "BeatsModel",
    "SalmonnConfig",
    "SalmonnFeatureExtractor",
    "SalmonnForConditionalGeneration",
    "SalmonnModel",
    "SalmonnPreTrainedModel",
    "SalmonnProcessor",
]
