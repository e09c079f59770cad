"""
What SALMONN training changes: the audio adapter (`SALMONN_ADAPTER_MODULES`: window query, Q-Former, the two
LayerNorms, projection) and the LoRA of the language model. Whisper, BEATs and the LLM's base weights stay frozen.

The rule lives here rather than in the model, so training does not depend on which remote-code version a converted
folder carries.
"""

from __future__ import annotations

import torch
from torch import nn

from modeling_salmonn import SALMONN_ADAPTER_MODULES


def is_trainable_parameter(name: str) -> bool:
    """Whether SALMONN training updates the parameter (or state-dict key) `name` of `SalmonnForConditionalGeneration`."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "model" and parts[1] in SALMONN_ADAPTER_MODULES:
        return True
    return ".lora_A." in name or ".lora_B." in name


def freeze_for_training(model: nn.Module) -> int:
    """Sets `requires_grad` from `is_trainable_parameter` on every parameter; returns how many elements train."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad = is_trainable_parameter(name)
        trainable += param.numel() if param.requires_grad else 0
    return trainable


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors SALMONN training changes: a small export that can be applied to a converted base folder."""
    return {k: v for k, v in model.state_dict().items() if is_trainable_parameter(k)}
