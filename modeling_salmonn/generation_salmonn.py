"""
Generation for SALMONN: the original decode settings, and `generate` with the audio encoded once per prompt (before
beam search repeats the rows), with the checks that keep a request from failing silently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import GenerationConfig, GenerationMixin
from transformers.utils import logging

from .configuration_salmonn import SalmonnConfig


logger = logging.get_logger(__name__)

# Inputs that hold one row per 30 s audio segment rather than one row per prompt.
AUDIO_INPUT_NAMES = ("input_features", "input_values", "input_values_mask")
# More beams than any decode uses (the original's is 4); 200000 beams would first allocate GBs of cache.
MAX_BEAMS = 256


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


def check_generation_config_file(folder: str | os.PathLike) -> None:
    """
    Refuses a local `generation_config.json` that transformers cannot read, naming the file and the key: a value of
    the wrong type (`"max_new_tokens": "abc"`) otherwise ends in a `TypeError` deep inside `GenerationConfig.validate`.
    """
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of generation settings, got {type(values).__name__}")
    # Unset settings are None in the config; their effective defaults (transformers >= 5.2x) tell the expected kind.
    effective = getattr(GenerationConfig, "_get_default_generation_params", dict)()
    defaults = {**vars(GenerationConfig()), **{key: value for key, value in effective.items() if value is not None}}
    for key, value in values.items():
        default = defaults.get(key)
        # A setting whose default is a number takes a number (an int is a float too, a bool is neither); flags and
        # settings defaulting to None are left to GenerationConfig's own checks below (`early_stopping` may be "never").
        if value is None or isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        expected = (int,) if isinstance(default, int) else (int, float)
        if isinstance(value, bool) or not isinstance(value, expected):
            kind = "an integer" if expected == (int,) else "a number"
            raise ValueError(f"{path}: {key!r} = {value!r} is not a valid generation setting (expected {kind})")
    try:
        GenerationConfig.from_dict(dict(values))
    except (TypeError, ValueError) as err:
        # Each setting on its own finds the one at fault (a combination of valid values fails only as a whole).
        for key, value in values.items():
            try:
                GenerationConfig.from_dict({key: value})
            except (TypeError, ValueError) as key_err:
                raise ValueError(f"{path}: {key!r} = {value!r} is not a valid generation setting ({key_err})") from None
        raise ValueError(f"{path} holds generation settings that do not go together ({err})") from None


class SalmonnGenerationMixin(GenerationMixin):
    """`generate` of `SalmonnForConditionalGeneration` (which holds the audio path as `self.model`)."""

    def _check_streamer(self, kwargs: dict) -> None:
        """Streaming needs greedy or sampled decoding, and SALMONN's default decode is the original's 4 beams."""
        if kwargs.get("streamer") is None:
            return
        num_beams = kwargs.get("num_beams") or (kwargs.get("generation_config") or self.generation_config).num_beams
        if num_beams > 1:
            raise ValueError(
                f"`streamer` works only with num_beams=1, but this generation uses num_beams={num_beams} (SALMONN's "
                "default decode is the original 4-beam search): call generate(..., streamer=streamer, num_beams=1)"
            )

    def _check_prompt_inputs(self, input_ids: torch.Tensor | None, kwargs: dict) -> None:
        """Once per call, before anything is allocated: inputs with data, a real token in every row, a bounded beam."""
        for name, value in {"input_ids": input_ids, **kwargs}.items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                raise ValueError(f"input `{name}` is on the meta device (a tensor without data); pass real tensors")
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            empty = torch.nonzero(attention_mask.sum(-1) == 0).flatten().tolist()
            if empty:
                raise ValueError(
                    f"`attention_mask` row {empty[0]} marks no token (rows: {empty[:10]}); every prompt needs at least one"
                )
        generation_config = kwargs.get("generation_config") or self.generation_config
        for key in ("num_beams", "num_return_sequences"):
            value = kwargs.get(key, getattr(generation_config, key))
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BEAMS):
                raise ValueError(
                    f"`{key}` must be an integer from 1 to {MAX_BEAMS} (each beam holds its own cache), got {value!r}"
                )

    def _fit_context(self, prompt: torch.Tensor | None, kwargs: dict) -> None:
        """
        A prompt that does not fit the language model's context is an error; an answer that would run past it is
        cut at the context's end (with a warning) instead of going on at positions the model was never trained on.
        """
        limit = self.config.text_config.max_position_embeddings
        if prompt is None or not limit:
            return
        length = prompt.shape[1]
        if length >= limit:
            raise ValueError(
                f"The prompt is {length} positions long (audio placeholders included: "
                f"{self.config.audio_tokens_per_segment} per 30 s of audio), but the language model's context is "
                f"{limit}; shorten the text or the audio"
            )
        generation_config = kwargs.get("generation_config") or self.generation_config
        max_new_tokens = kwargs.get("max_new_tokens", generation_config.max_new_tokens)
        if max_new_tokens is None:
            max_length = kwargs.get("max_length", generation_config.max_length)
            if max_length is None or max_length > limit:
                kwargs["max_length"] = limit
        elif length + max_new_tokens > limit:
            logger.warning(
                f"The prompt takes {length} of the language model's {limit} positions: the answer is cut at "
                f"{limit - length} new tokens instead of max_new_tokens={max_new_tokens}"
            )
            kwargs["max_new_tokens"] = limit - length

    def generate(self, input_ids: torch.LongTensor | None = None, **kwargs):
        """
        `GenerationMixin.generate` with the audio encoded once per prompt, before beam search or
        `num_return_sequences` repeat the rows: every beam shares the embeddings instead of encoding each 30 s
        segment again. Takes the processor's output as is; see `GenerationMixin.generate` for the rest.
        """
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)  # `GenerationMixin.generate`'s name for the first argument
        self._check_prompt_inputs(input_ids, kwargs)
        self._check_streamer(kwargs)
        self._fit_context(input_ids if input_ids is not None else kwargs.get("inputs_embeds"), kwargs)
        audio = {name: kwargs.pop(name, None) for name in AUDIO_INPUT_NAMES}
        if audio["input_features"] is None and input_ids is not None and bool((input_ids == self.config.audio_token_index).any()):
            raise ValueError(
                "`input_ids` holds audio placeholder tokens but no audio was given: pass the processor's whole output "
                "(`SalmonnProcessor(text=..., audio=...)`), or use pipeline('any-to-any') for audio conversations"
            )
        if audio["input_features"] is None and input_ids is not None:
            # Checked here, once: the prompt's prefill may be a one-token cached step, which is not checked.
            self.model.check_input_ids(input_ids, has_audio=False)
        if audio["input_features"] is not None:
            if input_ids is None or kwargs.get("inputs_embeds") is not None:
                raise ValueError("Audio inputs need `input_ids` with audio placeholders and no `inputs_embeds`")
            if kwargs.get("use_cache") is False:
                # Without a cache every step re-reads the whole prompt, audio placeholders included.
                raise ValueError("Generation from audio needs `use_cache=True`")
            with torch.no_grad():
                kwargs["inputs_embeds"], _ = self.model.embed_inputs(input_ids, **audio)
        with self.merged_lora():
            return super().generate(input_ids, **kwargs)


__all__ = ["AUDIO_INPUT_NAMES", "SalmonnGenerationMixin", "check_generation_config_file", "original_generation_config"]
