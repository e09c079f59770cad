"""SALMONN: Whisper and BEATs encoders, a window-level Q-Former and a LLaMA language model with LoRA."""

from __future__ import annotations

import inspect
import math
import os
import re
import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoModel, Blip2QFormerModel, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg

from .integrations_salmonn import SalmonnLoraMixin, quantize_language_model_only
from .configuration_salmonn import SALMONN_ADAPTER_MODULES, SalmonnConfig
from .feature_extraction_salmonn import check_audio_inputs
from .generation_salmonn import SalmonnGenerationMixin, check_generation_config_file, original_generation_config
from .modelcard_salmonn import SalmonnHubMixin
from .modeling_beats import BeatsModel


logger = logging.get_logger(__name__)

QUERY_TOKENS = "speech_query_tokens"
DEVICE_MAP_NO_SUBMODULE = "The following device_map keys do not match any submodules in the model:"


# transformers 5.24 renamed the KV cache `past_key_values` -> `cache`, in forward arguments and in the output classes;
# vLLM pins transformers < 5.20. Only the name differs: this is the installed version's.
CACHE_NAME = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
# `past_key_values=` reaches `forward` as `cache`: with transformers' deprecation warning from 5.24 on, and silently
# before (where the generation loop itself still passes the old name; a version at or below the installed one is
# transformers' way of saying "no warning").
accepts_old_cache_name = deprecate_kwarg(
    "past_key_values", version="5.40.0" if CACHE_NAME == "cache" else "0", new_name="cache"
)

# Segments encoded together on an accelerator: bounds the encoders' activation memory for long audio (10 min = 20
# segments) while keeping batches large enough to use the matrix kernels well. On the CPU one 30 s segment already
# keeps every core busy, and batches were measured slower per segment (larger activations out of cache; BEATs also
# pays for the padding of shorter clips), so there each segment is encoded on its own.
AUDIO_SEGMENTS_PER_CHUNK = 8
CPU_AUDIO_SEGMENTS_PER_CHUNK = 1


def _segments_per_chunk(device: torch.device) -> int:
    return CPU_AUDIO_SEGMENTS_PER_CHUNK if device.type == "cpu" else AUDIO_SEGMENTS_PER_CHUNK


# Trained weights stay far below this; a finite tensor above it is corrupt and answers nothing useful.
ABSURD_WEIGHT = 1e10


@dataclass
class SalmonnModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    audio_hidden_states (`torch.FloatTensor` of shape `(num_segments, audio_tokens_per_segment, hidden_size)`):
        Projected audio embeddings that replaced the audio placeholders, when audio was given.
    """

    audio_hidden_states: torch.FloatTensor | None = None


@dataclass
class SalmonnCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor`): mean cross-entropy of the next-token predictions where `labels` is not -100.
    audio_hidden_states: see [`SalmonnModelOutputWithPast`].
    """

    audio_hidden_states: torch.FloatTensor | None = None


def _cat_per_layer(chunks: list[tuple[torch.Tensor, ...] | None]) -> tuple[torch.Tensor, ...] | None:
    """Joins per-layer outputs of audio encoded in chunks of segments back into one tensor per layer."""
    if chunks[0] is None:
        return None
    return tuple(torch.cat(layer) for layer in zip(*chunks))


class SalmonnPreTrainedModel(SalmonnHubMixin, PreTrainedModel):
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
    # A cached decoding step is the language model's step and nothing else (no host reads, no data-dependent
    # branches): `generate(cache_implementation="static")` compiles it whole, as it does a stock LLaMA.
    _can_compile_fullgraph = True
    _no_split_modules = ["LlamaDecoderLayer", "WhisperEncoderLayer"]
    # Loaded in bfloat16/float16, the window-level Q-Former and the parts around it stay in float32: they are small
    # (about 0.2% of a 13B model) and halve the error of the audio tokens (bf16: 0.7% -> 0.3% relative).
    # `SalmonnModel.__init__` creates them in float32, so `from_config` under a half-precision default agrees.
    _keep_in_fp32_modules_strict = list(SALMONN_ADAPTER_MODULES)
    _skip_keys_device_placement = ["cache"]

    @property
    def is_gradient_checkpointing(self) -> bool:
        """The deprecated name that peft reads on every adapter call, answered without transformers' FutureWarning."""
        return self.is_activation_checkpointing

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

class SalmonnModel(SalmonnPreTrainedModel):
    """The encoders, the window-level Q-Former and the language model without its head."""

    def __init__(self, config: SalmonnConfig):
        super().__init__(config)
        self.speech_encoder = WhisperEncoder(config.whisper_config)
        self.beats = BeatsModel(config.beats_config)
        # The audio adapter (SALMONN_ADAPTER_MODULES), in float32 whatever the default dtype.
        fp32 = torch.float32
        self.ln_speech = nn.LayerNorm(config.whisper_config.d_model, eps=config.ln_eps, dtype=fp32)
        self.ln_audio = nn.LayerNorm(config.beats_config.encoder_embed_dim, eps=config.ln_eps, dtype=fp32)
        self.speech_query_tokens = nn.Parameter(
            torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size, dtype=fp32)
        )
        self.speech_qformer = Blip2QFormerModel(config.qformer_config).to(fp32)
        self.speech_llama_proj = nn.Linear(
            config.qformer_config.hidden_size, config.text_config.hidden_size, dtype=fp32
        )
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
            # peft also freezes the LLM's base weights; what trains is training policy (`salmonn.training.trainable`).
            self.language_model.requires_grad_(True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_audio_features(
        self,
        input_features: torch.FloatTensor,
        input_values: torch.FloatTensor,
        input_values_mask: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """
        Encodes audio segments. `pooler_output` holds the LLM embeddings that replace the audio placeholders,
        `[num_segments, audio_tokens_per_segment, text hidden_size]`; `last_hidden_state` the frames the Q-Former
        reads, `ln_speech(Whisper)` and `ln_audio(BEATs)` side by side, `[num_segments, frames, whisper d_model +
        beats hidden_size]`; `hidden_states` and `attentions` those of the Whisper encoder when requested
        (`output_hidden_states`, `output_attentions`).

        `input_features` is the Whisper log-mel of each 30 s segment, `input_values` the normalised BEATs fbank and
        `input_values_mask` marks its real frames, so that a segment padded in a batch is encoded as if alone.
        """
        check_audio_inputs(input_features, input_values, input_values_mask, self.config.whisper_config.num_mel_bins)
        if input_features.shape[0] != input_values.shape[0]:
            raise ValueError(
                f"`input_features` has {input_features.shape[0]} segments but `input_values` has "
                f"{input_values.shape[0]}; both must hold one row per audio segment"
            )
        whisper_kwargs = {k: kwargs[k] for k in ("output_hidden_states", "output_attentions") if k in kwargs}
        # The processor returns float32 features; run each encoder in its own dtype (bf16/fp16 loads).
        encoder_dtype = self.speech_encoder.conv1.weight.dtype
        speech_outputs = [
            self.speech_encoder(chunk.to(encoder_dtype), return_dict=True, **whisper_kwargs)
            for chunk in input_features.split(_segments_per_chunk(input_features.device))
        ]
        speech_embeds = torch.cat([output.last_hidden_state for output in speech_outputs])
        speech_embeds = self.ln_speech(speech_embeds.to(self.ln_speech.weight.dtype))
        audio_embeds = self._encode_beats(input_values, input_values_mask)

        # Zero-pad the shorter stream at the end of time, after the LayerNorms, as the original does.
        speech_len, audio_len = speech_embeds.shape[1], audio_embeds.shape[1]
        if audio_len < speech_len:
            audio_embeds = nn.functional.pad(audio_embeds, (0, 0, 0, speech_len - audio_len))
        elif audio_len > speech_len:
            speech_embeds = nn.functional.pad(speech_embeds, (0, 0, 0, audio_len - speech_len))
        frames = torch.cat([speech_embeds, audio_embeds.to(speech_embeds.dtype)], dim=-1)

        # Windows of `kernel` frames every `stride` frames; a last partial window is dropped (as `F.unfold` does).
        kernel, stride = self.config.window_kernel, self.config.window_stride
        num_segments, _, channels = frames.shape
        windows = frames.unfold(1, kernel, stride)  # [segments, windows, channels, kernel]
        num_windows = windows.shape[1]
        windows = windows.permute(0, 1, 3, 2).reshape(num_segments * num_windows, kernel, channels)

        query = self.speech_query_tokens.expand(windows.shape[0], -1, -1)
        windows = windows.to(self.speech_query_tokens.dtype)
        query_output = self.speech_qformer(query_embeds=query, encoder_hidden_states=windows, return_dict=True)
        query_output = query_output.last_hidden_state.to(self.speech_llama_proj.weight.dtype)
        audio_tokens = self.speech_llama_proj(query_output)
        return BaseModelOutputWithPooling(
            last_hidden_state=frames,
            pooler_output=audio_tokens.reshape(num_segments, num_windows * self.config.num_query_tokens, -1),
            hidden_states=_cat_per_layer([output.hidden_states for output in speech_outputs]),
            attentions=_cat_per_layer([output.attentions for output in speech_outputs]),
        )

    def _encode_beats(self, input_values: torch.FloatTensor, input_values_mask: torch.LongTensor | None) -> torch.FloatTensor:
        """
        `ln_audio(BEATs)` of every segment, zero past its real patches. Segments of similar length are encoded
        together, each group cut to its longest member: padding costs BEATs as much as audio does, and a batch of
        clips from 2 s to 30 s would otherwise pay for 30 s each.
        """
        beats_dtype = self.beats.patch_embedding.weight.dtype
        num_segments, per_chunk = input_values.shape[0], _segments_per_chunk(input_values.device)
        # Without a mask every frame counts as audio (as in the original): the groups are runs of `per_chunk`, in order.
        if input_values_mask is None:
            lengths = [input_values.shape[1]] * num_segments
        else:
            lengths = input_values_mask.sum(-1).tolist()
        groups: list[list[int]] = []
        for index in sorted(range(num_segments), key=lambda i: -lengths[i]):  # stable: equal lengths keep their order
            group = groups[-1] if groups else None
            if group and len(group) < per_chunk and lengths[index] >= 0.75 * lengths[group[0]]:
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

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor, audio_features: torch.Tensor
    ) -> torch.BoolTensor:
        """
        `[batch, seq_len]` mask of the audio placeholders. Without `input_ids` they are the positions whose embedding
        is the placeholder's row, which exists only where the placeholder id lies inside the embedding table.
        """
        if input_ids is not None:
            special_audio_mask = input_ids == self.config.audio_token_index
        else:
            embeddings = self.get_input_embeddings()
            if self.config.audio_token_index >= embeddings.num_embeddings:
                raise ValueError(
                    f"The audio placeholder id {self.config.audio_token_index} lies outside the embedding table "
                    f"({embeddings.num_embeddings} rows), so `inputs_embeds` cannot mark where the audio goes; pass "
                    "`input_ids` with the audio"
                )
            placeholder = embeddings(torch.tensor(self.config.audio_token_index, device=inputs_embeds.device))
            special_audio_mask = (inputs_embeds == placeholder.to(inputs_embeds.dtype)).all(-1)
        n_tokens, n_features = int(special_audio_mask.sum()), audio_features.shape[0] * audio_features.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"The prompt has {n_tokens} audio placeholder tokens but the audio gives {n_features} audio embeddings "
                f"({audio_features.shape[0]} segments x {audio_features.shape[1]}); build inputs with SalmonnProcessor"
            )
        return special_audio_mask

    def _check_ids_in_vocabulary(self, input_ids: torch.LongTensor, is_audio: torch.BoolTensor) -> None:
        """Ids past the vocabulary that are not the placeholder mean the tokenizer and the config disagree."""
        vocab_size = self.get_input_embeddings().num_embeddings
        outside = ((input_ids >= vocab_size) | (input_ids < 0)) & ~is_audio
        if bool(outside.any()):
            raise ValueError(
                f"`input_ids` holds id {int(input_ids[outside][0])}, outside the language model's vocabulary of "
                f"{vocab_size}, which is not the audio placeholder (config.audio_token_index="
                f"{self.config.audio_token_index}): the processor's tokenizer and the model's config disagree"
            )

    def check_input_ids(self, input_ids: torch.LongTensor, has_audio: bool) -> None:
        """
        The checks on a prompt's ids (two host reads): every id lies in the vocabulary or is the audio placeholder,
        and placeholders come with audio where the placeholder has no embedding row. Run on prompts, not on the
        ids of cached decoding steps, which the model itself generated.
        """
        is_audio = input_ids == self.config.audio_token_index
        self._check_ids_in_vocabulary(input_ids, is_audio)
        outside_table = self.config.audio_token_index >= self.get_input_embeddings().num_embeddings
        if outside_table and not has_audio and bool(is_audio.any()):
            raise ValueError("`input_ids` holds audio placeholder tokens but no audio features were given")

    def embed_inputs(
        self,
        input_ids: torch.LongTensor | None,
        input_features: torch.FloatTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        input_values_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        check_ids: bool = True,
    ) -> tuple[torch.FloatTensor, torch.FloatTensor | None]:
        """
        Token embeddings (`inputs_embeds`, or those of `input_ids`) with the audio embeddings written over the audio
        placeholders, in order; also returns the audio embeddings. `check_ids=False` (cached decoding steps) skips
        `check_input_ids` and embeds the ids as a stock LLaMA does.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of `input_ids` and `inputs_embeds`")
        placeholder_ids = input_ids
        if inputs_embeds is None:
            embeddings = self.get_input_embeddings()
            if check_ids:
                self.check_input_ids(input_ids, has_audio=input_features is not None)
                if self.config.audio_token_index >= embeddings.num_embeddings:
                    # Released checkpoints put the placeholder id one past the embedding table (it changes no LLM
                    # weight and can never be generated); look up a harmless id instead.
                    input_ids = input_ids.masked_fill(input_ids == self.config.audio_token_index, 0)
            inputs_embeds = embeddings(input_ids)
        audio_features = None
        if input_features is not None:
            audio_features = self.get_audio_features(
                input_features, input_values, input_values_mask, return_dict=True
            ).pooler_output
            mask = self.get_placeholder_mask(placeholder_ids, inputs_embeds, audio_features)
            mask = mask.unsqueeze(-1).expand_as(inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(mask, audio_features.to(inputs_embeds.device, inputs_embeds.dtype))
        return inputs_embeds, audio_features

    @accepts_old_cache_name
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        input_values_mask: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SalmonnModelOutputWithPast:
        # A one-token step with a cache and no audio is a decoding step: its id was generated, the prompt was checked.
        decoding_step = cache is not None and input_features is None and input_ids is not None and input_ids.shape[1] == 1
        inputs_embeds, audio_features = self.embed_inputs(
            input_ids, input_features, input_values, input_values_mask, inputs_embeds=inputs_embeds,
            check_ids=not decoding_step,
        )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            return_dict=True,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        return SalmonnModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            audio_hidden_states=audio_features,
        )


def _refuse_integer_weights(model: nn.Module, checkpoint_files: list[str] | None) -> None:
    """Reads the dtypes from the safetensors headers (no data) and names integer tensors where the model has floats."""
    from safetensors import safe_open

    expected = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    wrong = []
    for path in checkpoint_files or []:
        if not str(path).endswith(".safetensors"):
            continue
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                dtype = handle.get_slice(key).get_dtype()
                if key in expected and expected[key].is_floating_point and dtype[0] in "IUB":  # I64, U8, BOOL, ...
                    wrong.append(f"{key} ({dtype}) in {path}")
    if wrong:
        raise ValueError(
            f"Weights that must be floating point are stored as integers: {wrong[:10]}; the checkpoint is corrupt or "
            "not a SALMONN checkpoint (casting them would give a model that answers nonsense)"
        )


class SalmonnForConditionalGeneration(SalmonnPreTrainedModel, SalmonnLoraMixin, SalmonnGenerationMixin):
    """SALMONN with its language-model head; `generate` answers prompts about audio."""

    _tied_weights_keys = None

    def __init__(self, config: SalmonnConfig):
        super().__init__(config)
        self.model = SalmonnModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        self.generation_config = original_generation_config(config)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # A user's `quantization_config` would quantize every linear layer (Whisper, BEATs, the Q-Former); SALMONN
        # quantizes the language model only. transformers copies the config before `__init__`, so it is done here.
        quantize_language_model_only(kwargs.get("quantization_config"))
        if args and isinstance(args[0], (str, os.PathLike)) and os.path.isdir(args[0]):
            check_generation_config_file(args[0])
        with warnings.catch_warnings():
            # A device map that splits `SalmonnModel` lists its bare parameter `speech_query_tokens` by name (as
            # BLIP-2's `query_tokens`), which accelerate's `check_device_map` reports as "no submodule" although it
            # places it correctly. Only that exact report is silenced, only while loading.
            warnings.filterwarnings(
                "ignore", message=re.escape(f"{DEVICE_MAP_NO_SUBMODULE} ['model.{QUERY_TOKENS}']"), category=UserWarning
            )
            return super().from_pretrained(*args, **kwargs)

    @classmethod
    def _load_pretrained_model(cls, model, state_dict, checkpoint_files, *args, **kwargs):
        # transformers casts every tensor to the parameter's dtype while loading, so an integer tensor where a weight
        # belongs (a corrupt or foreign file; conversion refuses it) would load silently: refuse it from the headers.
        _refuse_integer_weights(model, checkpoint_files)
        return super()._load_pretrained_model(model, state_dict, checkpoint_files, *args, **kwargs)

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        # Runs once the weights are loaded: a corrupt checkpoint with NaN/inf weights would otherwise answer '' silently.
        super()._adjust_missing_and_unexpected_keys(loading_info)
        self._warn_non_finite_weights()

    def _warn_non_finite_weights(self) -> list[str]:
        bad = [
            name
            for name, tensor in self.state_dict().items()
            if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all())
        ]
        if bad:
            logger.warning(
                f"{len(bad)} loaded weight tensor(s) hold NaN or inf values: {bad[:10]}; the checkpoint is corrupt and "
                "its answers will be meaningless (often empty)"
            )
        absurd = []
        for name, tensor in self.state_dict().items():
            if name in bad or not tensor.is_floating_point() or tensor.device.type == "meta" or not tensor.numel():
                continue
            low, high = torch.aminmax(tensor)  # no copy of the tensor, unlike abs()
            if max(-float(low), float(high)) > ABSURD_WEIGHT:
                absurd.append(name)
        if absurd:
            logger.warning(
                f"{len(absurd)} loaded weight tensor(s) hold values above {ABSURD_WEIGHT:.0e} in size: {absurd[:10]}; the "
                "checkpoint is corrupt and its answers will be meaningless (often empty)"
            )
        return bad + absurd

    def train(self, mode: bool = True):
        super().train(mode)
        # Model behaviour, not training policy: Whisper and BEATs are pretrained feature extractors whose output
        # must not depend on the mode (the original flips them to train mode, which turns on BEATs dropout and layer
        # drop). Which parameters train is decided in `salmonn.training.trainable`.
        self.model.speech_encoder.eval()
        self.model.beats.eval()
        if mode:
            self.free_merged_lora()
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    # -- forward and generation ----------------------------------------------------------------------------

    def get_audio_features(
        self,
        input_features: torch.FloatTensor,
        input_values: torch.FloatTensor,
        input_values_mask: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """See [`SalmonnModel.get_audio_features`]; `pooler_output` holds the projected audio embeddings."""
        return self.model.get_audio_features(input_features, input_values, input_values_mask, **kwargs)

    @accepts_old_cache_name
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        input_values_mask: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
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
            return_dict=True,
            **kwargs,
        )
        # `transformers.modeling_utils.slice_logits_to_keep` is not in transformers 5.19 (vLLM's pin).
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, slice_indices])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return SalmonnCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            audio_hidden_states=outputs.audio_hidden_states,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )



SalmonnForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = ["SALMONN_ADAPTER_MODULES", "SalmonnForConditionalGeneration", "SalmonnModel", "SalmonnPreTrainedModel"]
