"""peft and quantization with SALMONN: its own LoRA stays active beside a user's adapter, a fine-tune is shareable as
a PEFT adapter, and a `quantization_config` quantizes the language model only."""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from transformers.utils import logging

from .configuration_salmonn import SALMONN_ADAPTER_MODULES


logger = logging.get_logger(__name__)


# The largest LoRA scaling accepted: far above any alpha / r in use (the release's is 4.0; the paper discounts it), but
# below the values at which the LoRA term swamps the base weights and the model answers nothing, silently.
MAX_LORA_SCALING = 1000.0
# SALMONN injects its LoRA into the language model under peft's default adapter name.
SALMONN_ADAPTER_NAME = "default"
# What SALMONN training changes besides the LoRA: the audio adapter. Its modules are saved by peft as
# `modules_to_save`; the learned window query is a bare parameter that peft cannot wrap (saved under its own key).
QUERY_TOKENS_KEY = "model.speech_query_tokens"
ADAPTER_MODULES_TO_SAVE = [name for name in SALMONN_ADAPTER_MODULES if f"model.{name}" != QUERY_TOKENS_KEY]
PEFT_KEY_PREFIX = "base_model.model."


def salmonn_lora_config(model, modules_to_save: list[str] | None = None) -> LoraConfig:
    """SALMONN's LoRA as a peft config on the whole model: the language model's projections only."""
    config = model.config
    targets = "|".join(re.escape(name) for name in config.lora_target_modules)
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=rf"model\.language_model\..*\.({targets})",
        bias="none",
        modules_to_save=modules_to_save,
    )


def _salmonn_lora_layers(model) -> dict[str, LoraLayer]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and SALMONN_ADAPTER_NAME in module.lora_A and name.startswith("model.language_model.")
    }


def _is_salmonn_layout(model, config) -> bool:
    """Whether `config` describes SALMONN's LoRA itself: same layers, rank and alpha (e.g. a salmonn-train adapter)."""
    layers = _salmonn_lora_layers(model)
    if not isinstance(config, LoraConfig) or not layers or model.config.lora_rank != config.r:
        return False
    if float(model.config.lora_alpha) != float(config.lora_alpha):
        return False
    targeted = {name for name, _ in model.named_modules() if check_target_module_exists(config, name)}
    return targeted == set(layers)


class SalmonnPeftConfigs(dict):
    """
    The adapters peft sees on a SALMONN model (`model.peft_config`). peft's tuners store each new adapter here before
    injecting it, which is where a user's `get_peft_model` / `PeftModel.from_pretrained` is checked: SALMONN's
    trained LoRA is the adapter "default" of the language model, and peft would silently re-create it (rank, scaling
    and trained weights lost) and deactivate it for a new adapter.
    """

    def __init__(self, model):
        super().__init__()
        self._model_ref = [model]  # a list keeps nn.Module from registering the model as a submodule
        self._saved_lora: dict[str, torch.Tensor] | None = None
        self._added: str | None = None
        if _salmonn_lora_layers(model):
            super().__setitem__(SALMONN_ADAPTER_NAME, salmonn_lora_config(model))

    def __setitem__(self, adapter_name: str, config) -> None:
        model = self._model_ref[0]
        if adapter_name == SALMONN_ADAPTER_NAME and _salmonn_lora_layers(model):
            if not _is_salmonn_layout(model, config):
                raise ValueError(
                    f"SALMONN's own trained LoRA is the adapter {SALMONN_ADAPTER_NAME!r} of its language model "
                    f"(r={model.config.lora_rank}, lora_alpha={model.config.lora_alpha:g}); peft would replace it. "
                    "Add yours beside it with `get_peft_model(model, config, adapter_name='my_adapter')` (SALMONN's "
                    "LoRA stays active and frozen, yours trains alone), or fine-tune SALMONN's LoRA with salmonn-train"
                )
            # The same layout continues SALMONN's LoRA: keep its trained values through peft's re-initialisation
            # (an adapter loaded with `PeftModel.from_pretrained` then overwrites them with its own).
            self._saved_lora = {
                f"{name}.{part}": getattr(layer, part)[SALMONN_ADAPTER_NAME].weight.detach().clone()
                for name, layer in _salmonn_lora_layers(model).items()
                for part in ("lora_A", "lora_B")
            }
        self._added = adapter_name
        super().__setitem__(adapter_name, config)

    def update(self, other=(), **kwargs) -> None:
        for name, config in dict(other, **kwargs).items():
            self[name] = config

    def keys(self) -> list[str]:
        """
        The adapters peft saves, lists and deletes. SALMONN's LoRA belongs to the base model (it is saved with it):
        beside a user's adapter it is not one of them, so `PeftModel.save_pretrained` writes the user's adapter only
        and a reload never applies SALMONN's LoRA a second time.
        """
        names = list(super().keys())
        users = [name for name in names if name != SALMONN_ADAPTER_NAME]
        if users and SALMONN_ADAPTER_NAME in names and _salmonn_lora_layers(self._model_ref[0]):
            return users
        return names

    def after_injection(self) -> None:
        """Restores SALMONN's LoRA values, and keeps it active (and frozen) beside a newly added adapter."""
        model = self._model_ref[0]
        layers = _salmonn_lora_layers(model)
        if self._saved_lora is not None:
            with torch.no_grad():
                for name, layer in layers.items():
                    for part in ("lora_A", "lora_B"):
                        getattr(layer, part)[SALMONN_ADAPTER_NAME].weight.copy_(self._saved_lora[f"{name}.{part}"])
            self._saved_lora = None
        if self._added in (None, SALMONN_ADAPTER_NAME):
            return
        for layer in layers.values():
            others = [name for name in layer.active_adapters if name != SALMONN_ADAPTER_NAME]
            layer._active_adapter = [SALMONN_ADAPTER_NAME, *others]
        # peft keeps the trainability of what a model already trains (here the Q-Former path and SALMONN's LoRA)
        # when an adapter is added; the new adapter is to train alone, as on a model without adapters.
        added = self._added
        for name, param in model.named_parameters():
            if f".{added}." not in name and not name.endswith(f".{added}"):
                param.requires_grad_(False)
        self._added = None
        if not getattr(self.get(added), "inference_mode", True):  # a new adapter to train, not one being loaded
            _warn_about_audio_encoder_layers(model, added)


def _warn_about_audio_encoder_layers(model, adapter_name: str) -> None:
    """Names the layers outside the language model that an adapter wraps: plain `["q_proj", "v_proj"]` targets
    Whisper's and BEATs' attention as well."""
    outside = [
        name
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A and not name.startswith("model.language_model.")
    ]
    if outside:
        encoders = sorted({name.split(".")[1] for name in outside})
        logger.warning(
            f"The adapter {adapter_name!r} wraps {len(outside)} layers outside the language model (in "
            f"{', '.join(encoders)}, e.g. {outside[0]}). To adapt the language model only, target it with a regex: "
            r"target_modules=r'model\.language_model\..*\.(q_proj|v_proj)'"
        )


def adapter_state_dict(model, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """
    The fine-tuned tensors in `PeftModel.save_pretrained`'s key format: SALMONN's LoRA (adapter name dropped), the
    Q-Former path as `modules_to_save`, and the window query under its plain key (loaded into the base model).
    `state` (default: the model's state dict) may be the full weights read back from a saved folder.
    """
    state = model.state_dict() if state is None else state
    tensors = {}
    for name in _salmonn_lora_layers(model):
        for part in ("lora_A", "lora_B"):
            tensors[f"{PEFT_KEY_PREFIX}{name}.{part}.weight"] = state[f"{name}.{part}.{SALMONN_ADAPTER_NAME}.weight"]
    prefixes = tuple(f"model.{module}." for module in ADAPTER_MODULES_TO_SAVE)
    for key, value in state.items():
        if key.startswith(prefixes) or key == QUERY_TOKENS_KEY:
            tensors[PEFT_KEY_PREFIX + key] = value
    return {key: value.detach().contiguous().cpu() for key, value in tensors.items()}


def save_salmonn_adapter(
    model, save_directory: str | os.PathLike, base_model: str | None, state: dict[str, torch.Tensor] | None = None
) -> Path:
    """
    Writes `adapter_config.json` + `adapter_model.safetensors` (+ README.md): `PeftModel.from_pretrained(base,
    save_directory)` on the base SALMONN (`base_model`) is then this fine-tuned model.
    """
    from safetensors.torch import save_file

    from .modelcard_salmonn import adapter_model_card

    if not _salmonn_lora_layers(model):
        raise ValueError("This SALMONN has no LoRA (it was merged at conversion); it cannot be saved as a PEFT adapter")
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    config = salmonn_lora_config(model, modules_to_save=list(ADAPTER_MODULES_TO_SAVE))
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(save_directory))
    tmp = save_directory / "adapter_model.safetensors.tmp"
    save_file(adapter_state_dict(model, state), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, save_directory / "adapter_model.safetensors")
    adapter_model_card(model.config, base_model).save(save_directory / "README.md")
    return save_directory


# Parts that stay in full precision when the language model is quantized: the encoders, the Q-Former path, the LoRA
# matrices (tiny, and their scaling must stay adjustable) and the output head. `from_pretrained(quantization_config=)`
# skips them as `salmonn-infer --quantize` does.
NOT_QUANTIZED_MODULES = (
    "model.speech_encoder",
    "model.beats",
    *(f"model.{name}" for name in SALMONN_ADAPTER_MODULES),
    "lm_head",
    r".*\.lora_A",
    r".*\.lora_B",
    r".*\.lora_dropout",
)


def quantize_language_model_only(quantization) -> None:
    """
    Adds `NOT_QUANTIZED_MODULES` to the skip list of a `quantization_config` given to `from_pretrained` (quanto's
    `modules_to_not_convert`, bitsandbytes' `llm_int8_skip_modules`); transformers would otherwise quantize every
    linear layer, the Whisper, BEATs and Q-Former ones included.
    """
    if quantization is None:
        return
    is_dict = isinstance(quantization, dict)
    fields = quantization if is_dict else vars(quantization)
    name = "llm_int8_skip_modules" if "llm_int8_skip_modules" in fields else "modules_to_not_convert"
    skip = list(fields.get(name) or [])
    skip += [module for module in NOT_QUANTIZED_MODULES if module not in skip]
    if is_dict:
        quantization[name] = skip
    else:
        setattr(quantization, name, skip)


MERGED_WEIGHT_NAME = "salmonn_merged_weight"


class MergedLoraLinear(LoraLinear):
    """
    A LoRA layer of SALMONN's adapter while `generate` runs: one matmul with `W + scaling * B @ A`, the cost of the
    plain layer (see `SalmonnLoraMixin.merged_lora`). Its parameters are those of the peft layer, untouched.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.salmonn_merged_weight, self.base_layer.bias)


def _can_merge(layer: LoraLayer) -> bool:
    """A plain peft `Linear` over a plain `nn.Linear` with SALMONN's adapter alone active: not quantized, offloaded,
    peft-merged or disabled, and no user adapter beside it."""
    base = layer.base_layer if isinstance(layer, LoraLayer) else None
    return (
        type(layer) in (LoraLinear, MergedLoraLinear)
        and type(base) is torch.nn.Linear
        and type(base.weight) is torch.nn.Parameter
        and base.weight.device.type != "meta"
        and not hasattr(base, "_hf_hook")
        and list(layer.lora_A) == [SALMONN_ADAPTER_NAME]
        and SALMONN_ADAPTER_NAME in layer.active_adapters
        and not layer.disable_adapters
        and not layer.merged
        and not layer.lora_variant
        and not getattr(layer, "lora_bias", {}).get(SALMONN_ADAPTER_NAME, False)
    )


def _refresh_merged_weight(layer: LoraLayer) -> None:
    """`W + scaling * B @ A`, summed in float32 and rounded once to W's dtype, in a non-persistent buffer kept beside
    W (written in place when its shape, dtype and device still fit, so that a compiled step keeps reading it)."""
    weight = layer.base_layer.weight
    lora_a, lora_b = layer.lora_A[SALMONN_ADAPTER_NAME].weight, layer.lora_B[SALMONN_ADAPTER_NAME].weight
    delta = (lora_b.float() @ lora_a.float()).to(weight.device) * layer.scaling[SALMONN_ADAPTER_NAME]
    merged = (weight.float() + delta).to(weight.dtype)
    buffer = layer._buffers.get(MERGED_WEIGHT_NAME)
    if buffer is not None and buffer.shape == merged.shape and buffer.dtype == merged.dtype and buffer.device == merged.device:
        buffer.copy_(merged)
    else:
        layer.register_buffer(MERGED_WEIGHT_NAME, merged, persistent=False)


class SalmonnLoraMixin:
    """SALMONN's LoRA on a model holding the language model as `self.model.language_model`."""

    # -- LoRA at the cost of the plain LLM while generating (DESIGN.md section 8) ----------------------------

    @contextlib.contextmanager
    def merged_lora(self) -> Iterator[int]:
        """
        While not training, SALMONN's LoRA layers run as one matmul with `W + scaling * B @ A`, recomputed from the
        current weights and scaling on entry (a few ms on a GPU), for the duration of the block. The parameters are
        never changed: state dicts, saved folders and PEFT adapters are what they would be without it. Layers that
        cannot be merged exactly this way (quantized or offloaded base weights, a user's adapter beside SALMONN's,
        peft's own merge) stay live. Yields the number of merged layers.
        """
        depth = self.__dict__.get("_salmonn_merge_depth", 0)
        layers = [] if self.training or depth else [layer for layer in self._lora_layers() if _can_merge(layer)]
        # Normal tensors even under `torch.inference_mode()`, which a later call outside it could not update in place.
        with torch.inference_mode(False), torch.no_grad():
            for layer in layers:
                _refresh_merged_weight(layer)
                layer.__class__ = MergedLoraLinear
        self.__dict__["_salmonn_merge_depth"] = depth + 1
        try:
            yield len(layers)
        finally:
            self.__dict__["_salmonn_merge_depth"] = depth
            for layer in layers:
                layer.__class__ = LoraLinear

    def free_merged_lora(self) -> None:
        """Frees the merged weights `merged_lora` keeps between calls (training does not use them)."""
        for layer in self._lora_layers():
            if MERGED_WEIGHT_NAME in layer._buffers:
                delattr(layer, MERGED_WEIGHT_NAME)

    # -- LoRA scaling (the paper's test-time discount, section 5.2) ------------------------------------------

    def _lora_layers(self) -> list[LoraLayer]:
        return [m for m in self.model.language_model.modules() if isinstance(m, LoraLayer)]

    @property
    def lora_scaling(self) -> float:
        """Current LoRA scaling factor (lora_alpha / lora_rank unless changed with `set_lora_scaling`)."""
        layers = self._lora_layers()
        if not layers:
            raise ValueError("This model has no LoRA layers (its LoRA was merged into the LLM at conversion)")
        return float(next(iter(layers[0].scaling.values())))

    def set_lora_scaling(self, value: float) -> float:
        """Sets the LoRA scaling factor of every LoRA layer in place and returns the previous value."""
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= MAX_LORA_SCALING:
            raise ValueError(f"`set_lora_scaling` expects a number from 0 to {MAX_LORA_SCALING:g}, got {value!r}")
        previous = self.lora_scaling
        for layer in self._lora_layers():
            for adapter in layer.scaling:
                layer.scaling[adapter] = float(value)
        return previous

    # -- peft: a user's adapter goes beside SALMONN's LoRA ----------------------------------------------------

    @property
    def peft_config(self) -> SalmonnPeftConfigs:
        """The adapters as peft sees them; peft's tuners check every new adapter here (see `SalmonnPeftConfigs`)."""
        if "_salmonn_peft_configs" not in self.__dict__:
            self.__dict__["_salmonn_peft_configs"] = SalmonnPeftConfigs(self)
        return self.__dict__["_salmonn_peft_configs"]

    @peft_config.setter
    def peft_config(self, value) -> None:
        # peft assigns the configs right after injecting an adapter: SALMONN's LoRA is restored and kept active.
        configs = self.peft_config
        if value is not configs:
            configs.update(value)
        configs.after_injection()

    @peft_config.deleter
    def peft_config(self) -> None:
        self.__dict__.pop("_salmonn_peft_configs", None)
