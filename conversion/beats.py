"""Reading an original Microsoft BEATs checkpoint (`{"cfg": ..., "model": ...}`) into `BeatsModel` names."""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import torch

from salmonn.conversion.sources import refuse_raw_pickle
from modeling_salmonn.configuration_salmonn import BeatsConfig
from modeling_salmonn.feature_extraction_salmonn import why_missing
from modeling_salmonn.modeling_beats import BeatsModel


logger = logging.getLogger(__name__)

# `BEATsConfig` defaults of the original code. A checkpoint's `cfg` only overrides these, so a key it lacks means the
# original default, not `BeatsConfig`'s (which describes the checkpoint SALMONN uses).
ORIGINAL_BEATS_DEFAULTS = {
    "input_patch_size": -1,
    "embed_dim": 512,
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 1.0,
    "layer_norm_first": False,
    "deep_norm": False,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.0,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": False,
    "num_buckets": 320,
    "max_distance": 1280,
    "gru_rel_pos": False,
    "finetuned_model": False,
    "predictor_dropout": 0.1,
    "predictor_class": 527,
}

_POS_CONV_PREFIX = "encoder.pos_conv_embed.conv."
# Original key -> BeatsModel key for the weight-normed positional convolution (old-style and parametrized names).
_POS_CONV_RENAMES = {
    "encoder.pos_conv.0.weight_g": _POS_CONV_PREFIX + "parametrizations.weight.original0",
    "encoder.pos_conv.0.weight_v": _POS_CONV_PREFIX + "parametrizations.weight.original1",
    "encoder.pos_conv.0.parametrizations.weight.original0": _POS_CONV_PREFIX + "parametrizations.weight.original0",
    "encoder.pos_conv.0.parametrizations.weight.original1": _POS_CONV_PREFIX + "parametrizations.weight.original1",
    "encoder.pos_conv.0.bias": _POS_CONV_PREFIX + "bias",
}
_RELATIVE_BIAS_KEY = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight$")
# The AudioSet classifier of fine-tuned checkpoints; SALMONN only uses the features (`feature_only=True`).
_DROPPED_PREFIXES = ("predictor.",)


def _load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"BEATs checkpoint {path} {why_missing(path)}")
    if not path.is_file():
        raise FileNotFoundError(f"BEATs checkpoint {path} does not exist or is not a file")
    refuse_raw_pickle(path, "BEATs checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: refusing to load the BEATs checkpoint: it needs arbitrary code to unpickle, and only "
            f"`torch.load(weights_only=True)` is allowed ({error})"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable torch checkpoint ({error})") from error


def _build_config(path: Path, cfg: object) -> BeatsConfig:
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: `cfg` must be a dict of BEATs settings, got {type(cfg).__name__}")
    bad_keys = [key for key in cfg if not isinstance(key, str) or not key.isidentifier()]
    if bad_keys:
        raise ValueError(f"{path}: `cfg` has invalid keys {bad_keys}")
    values = {**ORIGINAL_BEATS_DEFAULTS, **cfg}
    if values["input_patch_size"] <= 0:
        raise ValueError(f"{path}: `cfg['input_patch_size']` must be positive, got {values['input_patch_size']}")
    try:
        return BeatsConfig(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: `cfg` does not describe a valid BEATs model ({error})") from error


def _rename_keys(path: Path, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed: dict[str, torch.Tensor] = {}
    relative_bias: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: `model` entry {key!r} is not a named tensor")
        if key.startswith(_DROPPED_PREFIXES):
            continue
        if _RELATIVE_BIAS_KEY.match(key):
            relative_bias[key] = tensor
            continue
        new_key = _POS_CONV_RENAMES.get(key, key)
        if new_key in renamed:
            raise ValueError(f"{path}: `model` holds {new_key!r} twice (as {key!r} too)")
        renamed[new_key] = tensor

    if relative_bias:
        # The original shares one table between all layers, so it is saved once per layer; they must all agree.
        (first_key, table), *others = sorted(relative_bias.items())
        for key, other in others:
            if other.shape != table.shape or (not other.is_meta and not torch.equal(other, table)):
                raise ValueError(
                    f"{path}: the relative position bias is shared by all layers, but {key!r} differs from "
                    f"{first_key!r}"
                )
        renamed["encoder.relative_attention_bias.weight"] = table
    return renamed


def load_original_beats(path: str | os.PathLike) -> tuple[BeatsConfig, dict[str, torch.Tensor]]:
    """
    Reads an original BEATs checkpoint (a `torch.save`d dict with `cfg` and `model`, as Microsoft and SALMONN ship it)
    and returns the `BeatsConfig` and a state dict in `BeatsModel` names. Every checkpoint tensor is used or
    deliberately dropped (the AudioSet `predictor`), and every model tensor is filled with the right shape.

    Raises:
        ValueError: the file is not a weights-only torch checkpoint, or its keys or shapes do not match the model
            described by its `cfg`; the message names the file and the keys.
    """
    path = Path(path)
    checkpoint = _load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a dict with `cfg` and `model`, got {type(checkpoint).__name__}")
    missing_entries = [name for name in ("cfg", "model") if name not in checkpoint]
    if missing_entries:
        raise ValueError(
            f"{path}: not an original BEATs checkpoint: missing entries {missing_entries} (found {sorted(checkpoint)})"
        )
    if not isinstance(checkpoint["model"], dict):
        raise ValueError(f"{path}: `model` must be a state dict, got {type(checkpoint['model']).__name__}")

    config = _build_config(path, checkpoint["cfg"])
    state_dict = _rename_keys(path, checkpoint["model"])

    try:
        with torch.device("meta"):
            expected = BeatsModel(config).state_dict()
    except ValueError as error:
        raise ValueError(f"{path}: `cfg` does not describe a valid BEATs model ({error})") from error

    unexpected = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)}, model {tuple(expected[key].shape)}"
        for key in sorted(set(state_dict) & set(expected))
        if state_dict[key].shape != expected[key].shape
    ]
    problems = []
    if unexpected:
        problems.append(f"unknown keys {unexpected}")
    if missing:
        problems.append(f"missing keys {missing}")
    if mismatched:
        problems.append(f"mismatched shapes [{'; '.join(mismatched)}]")
    if problems:
        raise ValueError(f"{path}: checkpoint does not match the BEATs model of its `cfg`: {', '.join(problems)}")

    not_floating = [key for key, tensor in state_dict.items() if not tensor.is_floating_point()]
    if not_floating:
        raise ValueError(f"{path}: expected floating-point weights, got other tensors for {not_floating}")
    logger.info("Read %d BEATs tensors from %s", len(state_dict), path)
    return config, {key: tensor.contiguous() for key, tensor in state_dict.items()}


__all__ = ["ORIGINAL_BEATS_DEFAULTS", "load_original_beats"]
