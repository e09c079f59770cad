"""Configuration of SALMONN and of its BEATs audio encoder."""

from __future__ import annotations

import math

from transformers import AutoConfig, Blip2QFormerConfig, PreTrainedConfig


try:
    from transformers.configuration_utils import SubConfigSpec

    _NATIVE_SUB_CONFIGS = True
except ImportError:  # transformers < 5.24 (the range vLLM pins): no `SubConfigSpec`
    _NATIVE_SUB_CONFIGS = False

    class SubConfigSpec:
        """Stand-in that holds the same table; `SalmonnConfig.__post_init__` builds the sub-configs from it."""

        def __init__(self, config_class, model_type: str | None = None, init_kwargs: dict | None = None):
            self.config_class, self.model_type, self.init_kwargs = config_class, model_type, init_kwargs or {}


# The audio adapter between the encoders and the LLM: the two LayerNorms, the learned window query, the window-level
# Q-Former and the projection (modules of `SalmonnModel`, and the keys of saved weights). It is what SALMONN trains,
# what stays in float32 in a half-precision model and what quantization leaves alone.
SALMONN_ADAPTER_MODULES = ("ln_speech", "ln_audio", "speech_query_tokens", "speech_qformer", "speech_llama_proj")


class BeatsConfig(PreTrainedConfig):
    r"""
    Configuration of the BEATs audio encoder. The field names are those of the `cfg` dict stored in the
    original Microsoft BEATs checkpoints, so `BeatsConfig(**checkpoint["cfg"])` reproduces the original
    model. The defaults are the values of `BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt`, the encoder
    that SALMONN was trained with.

    Args:
        input_patch_size (`int`): side of the square fbank patches (time x mel bins).
        embed_dim (`int`): channels of the patch embedding.
        conv_bias (`bool`): whether the patch embedding convolution has a bias.
        encoder_layers (`int`): number of transformer layers.
        encoder_embed_dim (`int`): hidden size of the transformer.
        encoder_ffn_embed_dim (`int`): inner size of the feed-forward blocks.
        encoder_attention_heads (`int`): attention heads per layer.
        activation_fn (`str`): activation of the feed-forward blocks.
        layer_wise_gradient_decay_ratio (`float`): gradient scale per layer (training only; identity forward).
        layer_norm_first (`bool`): pre-LN layers instead of post-LN.
        deep_norm (`bool`): DeepNet residual scaling `(2 * encoder_layers) ** 0.25`.
        dropout, attention_dropout, activation_dropout, dropout_input (`float`): dropout probabilities.
        encoder_layerdrop (`float`): probability of skipping a layer in training.
        conv_pos (`int`): kernel of the convolutional position embedding.
        conv_pos_groups (`int`): groups of that convolution.
        relative_position_embedding (`bool`): bucketed relative position bias.
        num_buckets (`int`): buckets of the relative position bias.
        max_distance (`int`): distance at which the logarithmic buckets saturate.
        gru_rel_pos (`bool`): gate the relative position bias per query.
        finetuned_model, predictor_dropout, predictor_class: describe the AudioSet head of the original
            checkpoint; kept for provenance, the head itself is not part of `BeatsModel`.
        fbank_mean, fbank_std (`float`): statistics that normalise the Kaldi fbank input.
    """

    model_type = "salmonn_beats"
    attribute_map = {
        "hidden_size": "encoder_embed_dim",
        "num_hidden_layers": "encoder_layers",
        "num_attention_heads": "encoder_attention_heads",
        "intermediate_size": "encoder_ffn_embed_dim",
    }

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 0.6
    layer_norm_first: bool = False
    deep_norm: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = True
    predictor_dropout: float = 0.0
    predictor_class: int = 527
    fbank_mean: float = 15.41663
    fbank_std: float = 6.55582
    initializer_range: float = 0.02


class SalmonnConfig(PreTrainedConfig):
    r"""
    Configuration of [`SalmonnForConditionalGeneration`]: a Whisper encoder and a BEATs encoder whose
    concatenated frames are cut into windows, each summarised by a Q-Former query and projected into a
    LLaMA language model that carries LoRA. The defaults describe SALMONN-13B v1.

    Args:
        whisper_config (`WhisperConfig` or `dict`): the Whisper model whose encoder is the speech encoder.
        beats_config (`BeatsConfig` or `dict`): the BEATs audio encoder.
        qformer_config (`Blip2QFormerConfig` or `dict`): the window-level Q-Former; its
            `encoder_hidden_size` is always set to Whisper's `d_model` plus BEATs' hidden size.
        text_config (`LlamaConfig` or `dict`): the language model; `vocab_size` includes the `[PAD]` row.
        num_query_tokens (`int`): learned queries per window (audio tokens per window).
        second_per_window (`float`): window length in seconds on the 30 s / 1500 frame Whisper grid.
        second_stride (`float`): hop between windows in seconds.
        lora_rank, lora_alpha, lora_dropout (`int`, `int`, `float`): LoRA of the language model; the
            scaling is `lora_alpha / lora_rank` (4.0 for the release). `lora_rank=0` means the LoRA was merged
            into the language model's weights (`salmonn-convert --merge-lora`).
        lora_target_modules (`list[str]`): projections of the language model's attention that carry LoRA.
        audio_token_index (`int`): id of the audio placeholder; it lies outside the language model's
            vocabulary, so it changes no existing id and can never be generated.
        ln_eps (`float`): epsilon of `ln_speech` and `ln_audio`.

    Example:

    ```python
    >>> from modeling_salmonn import SalmonnConfig, SalmonnForConditionalGeneration

    >>> # SALMONN-13B v1: Whisper large-v2, BEATs, a 2-layer window-level Q-Former and Vicuna-13B with LoRA (r=8)
    >>> configuration = SalmonnConfig()
    >>> configuration.audio_tokens_per_segment  # 88 windows of 17 Whisper frames per 30 s, one query each
    88

    >>> # A randomly initialised model of that size (the released weights come from `salmonn-convert`)
    >>> model = SalmonnForConditionalGeneration(configuration)
    >>> configuration = model.config
    ```
    """

    model_type = "salmonn"
    attribute_map = {"audio_token_id": "audio_token_index"}
    sub_configs_defaults = {
        "whisper_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="whisper",
            init_kwargs={
                "d_model": 1280,
                "encoder_layers": 32,
                "encoder_attention_heads": 20,
                "encoder_ffn_dim": 5120,
                "decoder_layers": 32,
                "decoder_attention_heads": 20,
                "decoder_ffn_dim": 5120,
                "num_mel_bins": 80,
                "vocab_size": 51865,
            },
        ),
        "beats_config": SubConfigSpec(config_class=BeatsConfig),
        "qformer_config": SubConfigSpec(config_class=Blip2QFormerConfig, init_kwargs={"num_hidden_layers": 2}),
        "text_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="llama",
            init_kwargs={
                "vocab_size": 32001,
                "hidden_size": 5120,
                "intermediate_size": 13824,
                "num_hidden_layers": 40,
                "num_attention_heads": 40,
                "rms_norm_eps": 1e-6,
                "max_position_embeddings": 2048,
                "pad_token_id": 0,
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
        ),
    }

    whisper_config: dict | PreTrainedConfig | None = None
    beats_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 1
    second_per_window: float = 0.333333
    second_stride: float = 0.333333
    lora_rank: int = 8
    lora_alpha: float = 32
    lora_dropout: float = 0.1
    lora_target_modules: list | None = None
    audio_token_index: int = 32001
    ln_eps: float = 1e-5
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # A saved SALMONN folder always describes all its parts; filling a missing one with the default (13B) parts
        # would silently allocate tens of GB for a model that does not match the weights.
        missing = [key for key in cls.sub_configs_defaults if config_dict.get(key) is None and kwargs.get(key) is None]
        if missing:
            raise ValueError(
                f"This SALMONN config.json has no {', '.join(f'`{key}`' for key in missing)}: a saved SALMONN folder "
                f"must describe all of {', '.join(cls.sub_configs_defaults)}. Re-save it from a complete config "
                "(e.g. the one salmonn-convert writes)"
            )
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        if not _NATIVE_SUB_CONFIGS:
            self._build_sub_configs()
        super().__post_init__(**kwargs)
        # Converted SALMONN folders use the id one past the LLM's vocabulary (no embedding row); an id inside the
        # table (a model with an `<audio>` row, as transformers' own audio LLMs have) works too. Whether the id is the
        # one the processor's tokenizer emits is checked on the first forward, where both are known.
        if isinstance(self.audio_token_index, bool) or not isinstance(self.audio_token_index, int) or self.audio_token_index < 0:
            raise ValueError(
                f"`audio_token_index` must be a non-negative integer token id (the processor's `<audio>` token, normally "
                f"the LLM's vocab_size {self.text_config.vocab_size}), got {self.audio_token_index!r}"
            )
        if self.lora_target_modules is None:
            self.lora_target_modules = ["q_proj", "v_proj"]
        # The Q-Former cross-attends to the concatenated Whisper + BEATs frames.
        self.qformer_config.encoder_hidden_size = self.whisper_config.d_model + self.beats_config.encoder_embed_dim
        self.qformer_config.cross_attention_frequency = 1
        self.qformer_config.use_qformer_text_input = False
        self._check_numbers()
        # The window settings are rounded to Whisper frames: below half a frame they give no window at all.
        frame = 30.0 / self.whisper_config.max_source_positions
        for key, frames in (("second_per_window", self.window_kernel), ("second_stride", self.window_stride)):
            if frames < 1:
                raise ValueError(
                    f"`{key}`={getattr(self, key)} is {frames} Whisper frames of {frame:g} s; it must be at least "
                    f"half a frame ({frame / 2:g} s) so that every window has a length and a hop"
                )
        if self.window_kernel > self.whisper_config.max_source_positions:
            raise ValueError(
                f"`second_per_window`={self.second_per_window} gives a window of {self.window_kernel} frames, longer "
                f"than the {self.whisper_config.max_source_positions} Whisper frames of a 30 s segment"
            )

    def _check_numbers(self) -> None:
        """Values that are read as numbers must be numbers in range: a string or a negative value fails late otherwise."""
        limits = {
            # key: (integer only, smallest allowed, whether the smallest is allowed)
            "second_per_window": (False, 0, False),
            "second_stride": (False, 0, False),
            "num_query_tokens": (True, 1, True),
            "lora_rank": (True, 0, True),
            "lora_alpha": (False, 0, True),
            "lora_dropout": (False, 0, True),
            "ln_eps": (False, 0, False),
        }
        for key, (integer, smallest, inclusive) in limits.items():
            value = getattr(self, key)
            kinds = int if integer else (int, float)
            in_range = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
            in_range = in_range and (value >= smallest if inclusive else value > smallest)
            if not in_range:
                kind = "an integer" if integer else "a finite number"
                bound = f">= {smallest}" if inclusive else f"> {smallest}"
                raise ValueError(f"`{key}` must be {kind} {bound}, got {value!r}")
        if self.lora_dropout >= 1:
            raise ValueError(f"`lora_dropout` must be a probability below 1, got {self.lora_dropout!r}")

    def _build_sub_configs(self) -> None:
        """transformers < 5.24 only: what its `sub_configs_defaults` handling does (dict or None -> config)."""
        for key, spec in self.sub_configs_defaults.items():
            value = getattr(self, key)
            if isinstance(value, PreTrainedConfig):
                continue
            values = dict(spec.init_kwargs if value is None else value)
            model_type = values.pop("model_type", spec.model_type)
            config_class = spec.config_class
            setattr(self, key, AutoConfig.for_model(model_type, **values) if config_class is AutoConfig else config_class(**values))

    @property
    def window_kernel(self) -> int:
        """Frames per Q-Former window, on the 1500-frame grid of 30 s that the original hard-codes."""
        return round(self.whisper_config.max_source_positions * self.second_per_window / 30.0)

    @property
    def window_stride(self) -> int:
        return round(self.whisper_config.max_source_positions * self.second_stride / 30.0)

    @property
    def num_windows(self) -> int:
        """Windows per 30 s segment; the last partial window is dropped, as `F.unfold` does in the original."""
        return (self.whisper_config.max_source_positions - self.window_kernel) // self.window_stride + 1

    @property
    def audio_tokens_per_segment(self) -> int:
        return self.num_windows * self.num_query_tokens


if not _NATIVE_SUB_CONFIGS:  # transformers < 5.24 reads the sub-config classes from `sub_configs`
    SalmonnConfig.sub_configs = {key: spec.config_class for key, spec in SalmonnConfig.sub_configs_defaults.items()}

SalmonnConfig.register_for_auto_class()

__all__ = ["BeatsConfig", "SalmonnConfig"]
