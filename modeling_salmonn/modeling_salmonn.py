"""SALMONN: Whisper and BEATs encoders, a window-level Q-Former and a LLaMA language model with LoRA."""

from __future__ import annotations

import inspect
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoModel, Blip2QFormerModel, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput
from transformers.models.llama.modeling_llama import LlamaModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .configuration_salmonn import SalmonnConfig
from .modeling_beats import BeatsModel


# The flat module files that make a saved folder loadable with `trust_remote_code=True`.
REMOTE_CODE_FILES = (
    "configuration_salmonn.py",
    "modeling_beats.py",
    "modeling_salmonn.py",
    "feature_extraction_salmonn.py",
    "processing_salmonn.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_salmonn.SalmonnConfig",
    "AutoModel": "modeling_salmonn.SalmonnForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_salmonn.SalmonnForConditionalGeneration",
    "AutoProcessor": "processing_salmonn.SalmonnProcessor",
    "AutoFeatureExtractor": "feature_extraction_salmonn.SalmonnFeatureExtractor",
}

# transformers < 5.24 (the range vLLM pins) names the KV cache `past_key_values` in forward arguments and outputs;
# 5.24 renamed it `cache`. Only the name differs.
_LEGACY_CACHE_NAME = "cache" not in inspect.signature(LlamaModel.forward).parameters

# Inputs that hold one row per 30 s audio segment rather than one row per prompt.
AUDIO_INPUT_NAMES = ("input_features", "input_values", "input_values_mask")
# Segments encoded together: bounds the encoders' activation memory for long audio (10 min = 20 segments) while
# keeping batches large enough to use the matrix kernels well.
AUDIO_SEGMENTS_PER_CHUNK = 8


@dataclass
class SalmonnModelOutputWithPast(ModelOutput):
    r"""
    audio_hidden_states (`torch.FloatTensor` of shape `(num_segments, audio_tokens_per_segment, hidden_size)`):
        Projected audio embeddings that replaced the audio placeholders, when audio was given.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    audio_hidden_states: torch.FloatTensor | None = None


@dataclass
class SalmonnCausalLMOutputWithPast(ModelOutput):
    r"""
    loss (`torch.FloatTensor`): mean cross-entropy of the next-token predictions where `labels` is not -100.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`).
    audio_hidden_states: see [`SalmonnModelOutputWithPast`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    audio_hidden_states: torch.FloatTensor | None = None


def original_generation_config(config: SalmonnConfig) -> GenerationConfig:
    """The original decode settings (configs/decode_config.yaml): deterministic 4-beam search, 200 new tokens."""
    text = config.text_config
    return GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
        num_beams=4,
        max_new_tokens=200,
        do_sample=False,
        repetition_penalty=1.0,
        length_penalty=1.0,
    )


class SalmonnPreTrainedModel(PreTrainedModel):
    config: SalmonnConfig
    config_class = SalmonnConfig
    base_model_prefix = "model"
    input_modalities = ("audio", "text")
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["LlamaDecoderLayer", "WhisperEncoderLayer"]
    # Loaded in bfloat16/float16, the window-level Q-Former and the parts around it stay in float32: they are small
    # (about 0.2% of a 13B model) and halve the error of the audio tokens (bf16: 0.7% -> 0.3% relative).
    _keep_in_fp32_modules_strict = ["ln_speech", "ln_audio", "speech_query_tokens", "speech_qformer", "speech_llama_proj"]
    _skip_keys_device_placement = ["cache"]

    @property
    def dtype(self) -> torch.dtype:
        """The language model's dtype (the Q-Former path may be float32 in a half-precision model)."""
        return self.get_input_embeddings().weight.dtype

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SalmonnModel):
            # The original initialises the learned window query as BERT does.
            init.normal_(module.speech_query_tokens, mean=0.0, std=self.config.qformer_config.initializer_range)

    def initialize_weights(self) -> None:
        # LoRA sits inside the language model, whose own `_init_weights` would draw both LoRA matrices from a
        # normal. A fresh adapter must leave the LLM unchanged, as peft's does: A kaiming-uniform, B zero.
        for module in self.modules():
            if isinstance(module, LoraLayer):
                for name in module.lora_A:
                    if getattr(module.lora_A[name], "_is_hf_initialized", False):
                        continue
                    init.kaiming_uniform_(module.lora_A[name].weight, a=math.sqrt(5))
                    init.zeros_(module.lora_B[name].weight)
                    module.lora_A[name]._is_hf_initialized = True
                    module.lora_B[name]._is_hf_initialized = True
        super().initialize_weights()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves weights and config with the remote code, so the folder loads with `trust_remote_code=True`."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        source_dir = Path(__file__).resolve().parent
        for name in REMOTE_CODE_FILES:
            if (source_dir / name).is_file() and not (Path(save_directory) / name).exists():
                shutil.copyfile(source_dir / name, Path(save_directory) / name)


class SalmonnModel(SalmonnPreTrainedModel):
    """The encoders, the window-level Q-Former and the language model without its head."""

    def __init__(self, config: SalmonnConfig):
        super().__init__(config)
        self.speech_encoder = WhisperEncoder(config.whisper_config)
        self.beats = BeatsModel(config.beats_config)
        self.ln_speech = nn.LayerNorm(config.whisper_config.d_model, eps=config.ln_eps)
        self.ln_audio = nn.LayerNorm(config.beats_config.encoder_embed_dim, eps=config.ln_eps)
        self.speech_query_tokens = nn.Parameter(
            torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size)
        )
        self.speech_qformer = Blip2QFormerModel(config.qformer_config)
        self.speech_llama_proj = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.language_model = AutoModel.from_config(config.text_config)
        # LoRA is injected into the language model only: a bare ["q_proj", "v_proj"] target on the whole model
        # would also wrap the Whisper and BEATs attention. `lora_rank=0` describes a checkpoint with LoRA merged.
        if config.lora_rank > 0:
            lora_config = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=list(config.lora_target_modules),
                bias="none",
            )
            inject_adapter_in_model(lora_config, self.language_model)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_audio_features(
        self,
        input_features: torch.FloatTensor,
        input_values: torch.FloatTensor,
        input_values_mask: torch.LongTensor | None = None,
        **kwargs,
    ) -> torch.FloatTensor:
        """
        Encodes audio segments into LLM embeddings, `[num_segments, audio_tokens_per_segment, hidden_size]`.

        `input_features` is the Whisper log-mel of each 30 s segment, `input_values` the normalised BEATs fbank and
        `input_values_mask` marks its real frames, so that a segment padded in a batch is encoded as if alone.
        """
        if input_features.shape[0] != input_values.shape[0]:
            raise ValueError(
                f"`input_features` has {input_features.shape[0]} segments but `input_values` has "
                f"{input_values.shape[0]}; both must hold one row per audio segment"
            )
        # The processor returns float32 features; run each encoder in its own dtype (bf16/fp16 loads).
        encoder_dtype = self.speech_encoder.conv1.weight.dtype
        speech_embeds = torch.cat([
            self.speech_encoder(chunk.to(encoder_dtype), return_dict=True).last_hidden_state
            for chunk in input_features.split(AUDIO_SEGMENTS_PER_CHUNK)
        ])
        speech_embeds = self.ln_speech(speech_embeds.to(self.ln_speech.weight.dtype))
        audio_embeds = self._encode_beats(input_values, input_values_mask)

        # Zero-pad the shorter stream at the end of time, after the LayerNorms, as the original does.
        speech_len, audio_len = speech_embeds.shape[1], audio_embeds.shape[1]
        if audio_len < speech_len:
            audio_embeds = nn.functional.pad(audio_embeds, (0, 0, 0, speech_len - audio_len))
        elif audio_len > speech_len:
            speech_embeds = nn.functional.pad(speech_embeds, (0, 0, 0, audio_len - speech_len))
        hidden = torch.cat([speech_embeds, audio_embeds.to(speech_embeds.dtype)], dim=-1)

        # Windows of `kernel` frames every `stride` frames; a last partial window is dropped (as `F.unfold` does).
        kernel, stride = self.config.window_kernel, self.config.window_stride
        num_segments, _, channels = hidden.shape
        windows = hidden.unfold(1, kernel, stride)  # [segments, windows, channels, kernel]
        num_windows = windows.shape[1]
        windows = windows.permute(0, 1, 3, 2).reshape(num_segments * num_windows, kernel, channels)

        query = self.speech_query_tokens.expand(windows.shape[0], -1, -1)
        windows = windows.to(self.speech_query_tokens.dtype)
        query_output = self.speech_qformer(query_embeds=query, encoder_hidden_states=windows, return_dict=True)
        query_output = query_output.last_hidden_state.to(self.speech_llama_proj.weight.dtype)
        audio_tokens = self.speech_llama_proj(query_output)
        return audio_tokens.reshape(num_segments, num_windows * self.config.num_query_tokens, -1)

    def _encode_beats(self, input_values: torch.FloatTensor, input_values_mask: torch.LongTensor | None) -> torch.FloatTensor:
        """
        `ln_audio(BEATs)` of every segment, zero past its real patches. Segments of similar length are encoded
        together, each group cut to its longest member: padding costs BEATs as much as audio does, and a batch of
        clips from 2 s to 30 s would otherwise pay for 30 s each.
        """
        beats_dtype = self.beats.patch_embedding.weight.dtype
        num_segments = input_values.shape[0]
        # Without a mask every frame counts as audio (as in the original), so the groups are runs of 8 in order.
        if input_values_mask is None:
            lengths = [input_values.shape[1]] * num_segments
        else:
            lengths = input_values_mask.sum(-1).tolist()
        groups: list[list[int]] = []
        for index in sorted(range(num_segments), key=lambda i: -lengths[i]):  # stable: equal lengths keep their order
            group = groups[-1] if groups else None
            if group and len(group) < AUDIO_SEGMENTS_PER_CHUNK and lengths[index] >= 0.75 * lengths[group[0]]:
                group.append(index)
            else:
                groups.append([index])
        outputs: list[torch.Tensor | None] = [None] * num_segments
        for group in groups:
            rows = torch.tensor(group, device=input_values.device)
            width = max(lengths[group[0]], 1)
            values = input_values[rows, :width].to(beats_dtype)
            mask = None if input_values_mask is None else input_values_mask[rows, :width]
            hidden = self.beats(values, attention_mask=mask, return_dict=True).last_hidden_state
            hidden = self.ln_audio(hidden.to(self.ln_audio.weight.dtype))
            if mask is not None:
                # Patches that only exist because of padding become the zeros a lone clip would be padded with.
                hidden = hidden * self.beats.get_patch_attention_mask(mask).unsqueeze(-1).to(hidden.dtype)
            for row, index in enumerate(group):
                outputs[index] = hidden[row]
        longest = max(output.shape[0] for output in outputs)
        return torch.stack([nn.functional.pad(output, (0, 0, 0, longest - output.shape[0])) for output in outputs])

    def get_placeholder_mask(self, input_ids: torch.LongTensor, audio_features: torch.Tensor) -> torch.BoolTensor:
        special_audio_mask = input_ids == self.config.audio_token_index
        n_tokens, n_features = int(special_audio_mask.sum()), audio_features.shape[0] * audio_features.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"The prompt has {n_tokens} audio placeholder tokens but the audio gives {n_features} audio embeddings "
                f"({audio_features.shape[0]} segments x {audio_features.shape[1]}); build inputs with SalmonnProcessor"
            )
        return special_audio_mask

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        input_features: torch.FloatTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        input_values_mask: torch.LongTensor | None = None,
    ) -> tuple[torch.FloatTensor, torch.FloatTensor | None]:
        """Token embeddings with the audio embeddings written over the audio placeholders, in order."""
        is_audio = input_ids == self.config.audio_token_index
        # The placeholder id lies outside the vocabulary on purpose; look up a harmless id instead.
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(is_audio, 0))
        audio_features = None
        if input_features is not None:
            audio_features = self.get_audio_features(input_features, input_values, input_values_mask)
            mask = self.get_placeholder_mask(input_ids, audio_features)
            mask = mask.unsqueeze(-1).expand_as(inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(mask, audio_features.to(inputs_embeds.device, inputs_embeds.dtype))
        elif bool(is_audio.any()):
            raise ValueError("`input_ids` holds audio placeholder tokens but no audio features were given")
        return inputs_embeds, audio_features

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        input_values_mask: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SalmonnModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of `input_ids` and `inputs_embeds`")
        audio_features = None
        if inputs_embeds is None:
            inputs_embeds, audio_features = self.embed_inputs(input_ids, input_features, input_values, input_values_mask)
        cache_name = "past_key_values" if _LEGACY_CACHE_NAME else "cache"
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{cache_name: cache},
            **kwargs,
        )
        return SalmonnModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=getattr(outputs, cache_name, None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            audio_hidden_states=audio_features,
        )


class SalmonnForConditionalGeneration(SalmonnPreTrainedModel, GenerationMixin):
    """SALMONN with its language-model head; `generate` answers prompts about audio."""

    _tied_weights_keys = None

    def __init__(self, config: SalmonnConfig):
        super().__init__(config)
        self.model = SalmonnModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        self._freeze_pretrained_parts()
        self.generation_config = original_generation_config(config)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        # Loading replaces the parameters, and with them the `requires_grad` flags set in `__init__`.
        model._freeze_pretrained_parts()
        return model

    # -- parameters -------------------------------------------------------------------------------------------

    def _freeze_pretrained_parts(self) -> None:
        """Whisper, BEATs and the LLM's base weights are frozen; the Q-Former path and LoRA train."""
        for name, param in self.named_parameters():
            param.requires_grad = self.is_trainable_parameter(name)

    @staticmethod
    def is_trainable_parameter(name: str) -> bool:
        trainable_prefixes = (
            "model.speech_qformer.",
            "model.speech_query_tokens",
            "model.ln_speech.",
            "model.ln_audio.",
            "model.speech_llama_proj.",
        )
        return name.startswith(trainable_prefixes) or ".lora_A." in name or ".lora_B." in name

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors SALMONN training changes: a small export that can be applied to a converted base folder."""
        return {k: v for k, v in self.state_dict().items() if self.is_trainable_parameter(k)}

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen encoders stay deterministic in training (the original flips them to train mode, which turns on
        # BEATs dropout and layer drop).
        self.model.speech_encoder.eval()
        self.model.beats.eval()
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

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
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"`set_lora_scaling` expects a finite non-negative number, got {value!r}")
        previous = self.lora_scaling
        for layer in self._lora_layers():
            for adapter in layer.scaling:
                layer.scaling[adapter] = float(value)
        return previous

    # -- forward and generation ----------------------------------------------------------------------------

    def get_audio_features(
        self,
        input_features: torch.FloatTensor,
        input_values: torch.FloatTensor,
        input_values_mask: torch.LongTensor | None = None,
        **kwargs,
    ) -> torch.FloatTensor:
        """Projected audio embeddings `[num_segments, audio_tokens_per_segment, hidden_size]`."""
        return self.model.get_audio_features(input_features, input_values, input_values_mask)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        input_values_mask: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> SalmonnCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids to predict, -100 where no
            loss is taken (prompt, audio and padding positions); `SalmonnProcessor(text_target=...)` builds them.
        """
        if _LEGACY_CACHE_NAME and cache is None:
            cache = kwargs.pop("past_key_values", None)
        outputs = self.model(
            input_ids=input_ids,
            input_features=input_features,
            input_values=input_values,
            input_values_mask=input_values_mask,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        output = SalmonnCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            audio_hidden_states=outputs.audio_hidden_states,
        )
        if _LEGACY_CACHE_NAME and outputs.cache is not None:
            output["past_key_values"] = outputs.cache  # the name transformers < 5.24's generation loop reads
        return output

    def generate(self, input_ids: torch.LongTensor | None = None, **kwargs):
        """
        `GenerationMixin.generate` with the audio encoded once per prompt, before beam search or
        `num_return_sequences` repeat the rows: every beam shares the embeddings instead of encoding each 30 s
        segment again. Takes the processor's output as is; see `GenerationMixin.generate` for the rest.
        """
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)  # `GenerationMixin.generate`'s name for the first argument
        audio = {name: kwargs.pop(name, None) for name in AUDIO_INPUT_NAMES}
        if audio["input_features"] is not None:
            if input_ids is None or kwargs.get("inputs_embeds") is not None:
                raise ValueError("Audio inputs need `input_ids` with audio placeholders and no `inputs_embeds`")
            if kwargs.get("use_cache") is False:
                # Without a cache every step re-reads the whole prompt, audio placeholders included.
                raise ValueError("Generation from audio needs `use_cache=True`")
            with torch.no_grad():
                kwargs["inputs_embeds"], _ = self.model.embed_inputs(input_ids, **audio)
        return super().generate(input_ids, **kwargs)


SalmonnForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = ["SalmonnForConditionalGeneration", "SalmonnModel", "SalmonnPreTrainedModel"]
