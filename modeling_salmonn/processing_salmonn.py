"""SalmonnProcessor: audio features, SALMONN's prompt tokenization and the Vicuna chat template."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.utils import logging

from .feature_extraction_salmonn import SalmonnFeatureExtractor, check_audio_path


logger = logging.get_logger(__name__)


AUDIO_TOKEN = "<audio>"
# Files that hold a LLaMA tokenizer's vocabulary (fast, then sentencepiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
PAD_TOKEN = "[PAD]"

# USER: ... \nASSISTANT: answer</s> -- SALMONN's "USER: {}\nASSISTANT:" template, continued Vicuna-style for
# several turns. An audio item renders as the original's "<Speech><SpeechHere></Speech> " prefix.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'audio' -%}{%- set ns.text = ns.text + '<Speech><SpeechHere></Speech> ' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = ns.text -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ text }}{{ '\\n' }}"
    "{%- elif message['role'] == 'user' -%}USER: {{ text }}{{ '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}ASSISTANT: {{ text }}</s>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)


def add_salmonn_tokens(tokenizer):
    """
    Adds `[PAD]` (as the original does) and then the audio placeholder to a LLaMA tokenizer, so the placeholder lands
    one id past the LLM's vocabulary (which includes the `[PAD]` row).
    """
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if AUDIO_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO_TOKEN]})
    return tokenizer


# More placeholders per 30 s than any LLM context SALMONN runs with; a larger value is a broken config that would
# first allocate the placeholder ids of every segment.
MAX_AUDIO_TOKENS_PER_SEGMENT = 8192


def _check_count(key: str, value, limit: int) -> None:
    """A positive integer no larger than `limit`, or an error naming `key` (a processor setting or argument)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"SalmonnProcessor: `{key}` must be an integer from 1 to {limit}, got {value!r}")


def _as_list_of_audio(audio) -> list:
    """One audio (array, tensor, path) or a list of them -> list."""
    if isinstance(audio, (np.ndarray, torch.Tensor, str)):
        return [audio]
    if isinstance(audio, (list, tuple)):
        if len(audio) > 0 and all(isinstance(x, (int, float, np.number)) for x in audio):
            return [np.asarray(audio)]
        flat = []
        for item in audio:  # `apply_chat_template` nests the audios of each conversation in a list
            flat.extend(_as_list_of_audio(item) if isinstance(item, (list, tuple)) else [item])
        return flat
    raise ValueError(f"`audio` must be an array, a tensor, a file path or a list of them, got {type(audio).__name__}")


class SalmonnProcessor(ProcessorMixin):
    r"""
    Builds SALMONN's inputs. Each `audio_marker` in the text takes the next audio; every 30 s segment of that
    audio becomes `audio_tokens_per_segment` placeholder tokens. As in the original, the text pieces around each
    audio are tokenized separately without special tokens and `[BOS]` comes first.

    Args:
        feature_extractor ([`SalmonnFeatureExtractor`]): Whisper log-mel and BEATs fbank.
        tokenizer: the LLaMA tokenizer with `[PAD]` and the audio placeholder token added.
        chat_template (`str`, *optional*): Jinja template; defaults to SALMONN's Vicuna form.
        audio_marker (`str`): the marker in prompt text where an audio goes.
        audio_token (`str`): the placeholder token the marker expands to (outside the LLM's vocabulary).
        audio_tokens_per_segment (`int`): Q-Former outputs per 30 s segment (88 with the default windows).
    """

    def __init__(
        self,
        feature_extractor,
        tokenizer,
        chat_template: str | None = None,
        audio_marker: str = "<SpeechHere>",
        audio_token: str = AUDIO_TOKEN,
        audio_tokens_per_segment: int = 88,
    ):
        if chat_template is None:
            chat_template = DEFAULT_CHAT_TEMPLATE
        _check_count("audio_tokens_per_segment", audio_tokens_per_segment, MAX_AUDIO_TOKENS_PER_SEGMENT)
        self.audio_marker = audio_marker
        self.audio_token = audio_token
        self.audio_tokens_per_segment = audio_tokens_per_segment
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # Without its vocabulary file a LLaMA tokenizer still loads, as the few added tokens only, and every prompt
        # then fails far from the cause (no audio placeholders); a local folder must hold one of the files.
        folder = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise ValueError(
                f"{folder} has no tokenizer.json (nor {', '.join(TOKENIZER_FILES[1:])}): the LLaMA tokenizer of a SALMONN "
                "folder cannot be built without it; copy it from the folder salmonn-convert wrote or from the LLM"
            )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @property
    def audio_token_id(self) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(self.audio_token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no audio placeholder token {self.audio_token!r}")
        return token_id

    def format_prompt(self, instruction: str, num_audios: int = 1) -> str:
        """The single-turn prompt the original builds: `USER: <Speech><SpeechHere></Speech> {instruction}\\nASSISTANT:`."""
        content = [{"type": "audio"}] * num_audios + [{"type": "text", "text": instruction.strip()}]
        return self.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """
        `ProcessorMixin.apply_chat_template` with SALMONN's audio forms in a message's `{"type": "audio", "audio": ...}`:
        `{"array": ..., "sampling_rate": ...}` (resampled to 16 kHz), a `datasets` Audio value (`path` / `bytes`), a
        file path, or a bare array or tensor, taken at `sampling_rate=` if given and otherwise as 16 kHz with a
        warning (as `processor(...)` does). transformers alone would take any array as 16 kHz without a word.
        """
        if kwargs.get("tokenize"):
            processor_kwargs = dict(kwargs.get("processor_kwargs") or {})
            # The arrays are brought to 16 kHz here; files are read at the feature extractor's rate by transformers.
            sampling_rate = kwargs.pop("sampling_rate", processor_kwargs.pop("sampling_rate", None))
            if "processor_kwargs" in kwargs:
                kwargs["processor_kwargs"] = processor_kwargs
            truncation = bool(kwargs.get("truncation", processor_kwargs.get("truncation", False)))
            conversation = self._chat_audio_at_16k(conversation, sampling_rate, truncation, counter=[0])
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    def _chat_audio_at_16k(self, conversation, sampling_rate: int | None, truncation: bool, counter: list[int]):
        """A copy of `conversation` (one or a batch) whose audio blocks hold 16 kHz arrays or file paths."""
        if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple)):
            return [self._chat_audio_at_16k(c, sampling_rate, truncation, counter) for c in conversation]
        messages = []
        for message in conversation:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, (list, tuple)):
                blocks = []
                for block in content:
                    if isinstance(block, dict) and block.get("type") == "audio" and block.get("audio") is not None:
                        name = f"conversation audio {counter[0]}"
                        counter[0] += 1
                        block = {**block, "audio": self._chat_audio(block["audio"], sampling_rate, truncation, name)}
                    blocks.append(block)
                message = {**message, "content": blocks}
            messages.append(message)
        return messages

    def _chat_audio(self, audio, sampling_rate: int | None, truncation: bool, name: str):
        """One chat audio as a 16 kHz mono array (a file path or URL string stays for transformers' loader)."""
        if isinstance(audio, (str, os.PathLike)):
            return os.fspath(audio)
        if isinstance(audio, dict):
            if audio.get("array") is not None:
                if audio.get("sampling_rate") is None:
                    raise ValueError(f"{name}: an audio dict with 'array' needs its 'sampling_rate' (in Hz) beside it")
                audio, sampling_rate = audio["array"], audio["sampling_rate"]
            elif audio.get("bytes") is not None or audio.get("path") is not None:
                source = audio["bytes"] if audio.get("bytes") is not None else audio["path"]
                audio, sampling_rate = self.feature_extractor.read_audio_file(source, name, truncation=truncation)
            else:
                raise ValueError(
                    f"{name}: an audio dict needs 'array' and 'sampling_rate', or 'path' / 'bytes' (a `datasets` "
                    f"Audio value); got the keys {sorted(audio)}"
                )
        elif sampling_rate is None:
            logger.warning(
                f"No sampling_rate given for {name}; assuming {self.feature_extractor.sampling_rate} Hz. Pass "
                '{"type": "audio", "audio": {"array": waveform, "sampling_rate": rate}} (or `sampling_rate=`) to '
                "avoid silent errors."
            )
        rate = self.feature_extractor.sampling_rate if sampling_rate is None else sampling_rate
        return self.feature_extractor.prepare_audio(audio, rate, truncation=truncation, name=name)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """
        Decodes generated ids (what the `any-to-any` pipeline calls for the prompt and for prompt + answer). LLaMA's
        tokenizer puts the space before an answer's first word into that word's token; it is dropped after the last
        `ASSISTANT:` so that the pipeline's answer, cut after the decoded prompt, starts with the word.
        """
        decoded = super().post_process_image_text_to_text(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        turn = [{"role": "user", "content": ""}]
        without = self.apply_chat_template(turn, tokenize=False)
        generation_prompt = self.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)[len(without):]

        def answer_without_leading_space(text: str) -> str:
            head, prompt, answer = text.rpartition(generation_prompt)
            return head + prompt + answer[1:] if prompt and answer.startswith(" ") else text

        if isinstance(decoded, str):
            return answer_without_leading_space(decoded)
        return [answer_without_leading_space(text) for text in decoded]

    def _tokenize_piece(self, text: str) -> list[int]:
        if not text:
            return []
        return self._without_placeholders(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _without_placeholders(self, ids: list[int]) -> list[int]:
        """
        User text that spells the placeholder token (`<audio>`) must not become audio positions: each such id is
        replaced by the ids of the same characters as plain text. Text without it is tokenized exactly as before.
        """
        audio_id = self.tokenizer.convert_tokens_to_ids(self.audio_token)
        if audio_id is None or audio_id == self.tokenizer.unk_token_id or audio_id not in ids:
            return ids
        as_text = self.tokenizer(self.audio_token, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        out: list[int] = []
        for token_id in ids:
            out.extend(as_text if token_id == audio_id else [token_id])
        return out

    def _load_audio(self, audio, sampling_rate: int | None, truncation: bool = False, name: str = "audio"):
        if isinstance(audio, (str, os.PathLike)):
            return self.feature_extractor.read_audio_file(audio, name, truncation=truncation)
        return audio, sampling_rate

    def __call__(
        self,
        text: str | list[str] | None = None,
        audio=None,
        sampling_rate: int | None = None,
        text_target: str | list[str] | None = None,
        truncation: bool = False,
        padding_side: str | None = None,
        max_target_length: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        r"""
        Args:
            text: one prompt or a batch of prompts, each with one `<SpeechHere>` marker per audio.
            audio: an audio (1-D or `[samples, channels]` array, tensor or file path) or a list of them, taken by
                the markers in order across the batch.
            sampling_rate: rate of array audio (resampled to 16 kHz).
            text_target: answers for teacher forcing; each gets `</s>` and is tokenized on its own. Adds `labels`
                (-100 on every prompt, audio and padding position).
            truncation: keep only the first 30 s of each audio (the original's behaviour) instead of encoding
                longer audio as consecutive 30 s segments.
            padding_side: "left" (default for generation) or "right" (default with `text_target`).
            max_target_length: longest answer in tokens, `</s>` included; longer answers are cut at their end
                and keep their `</s>`.
        """
        # `apply_chat_template` passes these through; SALMONN has no images or videos and always adds [BOS] itself.
        for name in ("images", "videos"):
            if kwargs.pop(name, None) is not None:
                raise ValueError(f"SalmonnProcessor takes audio and text only, got `{name}`")
        kwargs.pop("add_special_tokens", None)
        kwargs.pop("padding", None)
        if kwargs:
            raise ValueError(f"SalmonnProcessor got unexpected arguments: {sorted(kwargs)}")
        if text is None:
            raise ValueError("SalmonnProcessor needs `text` (a prompt with one <SpeechHere> marker per audio)")
        if max_target_length is not None:
            _check_count("max_target_length", max_target_length, 2**31 - 1)
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("`text` must be a string or a non-empty list of strings")
        audios = [] if audio is None else _as_list_of_audio(audio)
        # Paths that are not audio files are named before the markers are counted.
        for k, item in enumerate(audios):
            if isinstance(item, (str, os.PathLike)):
                check_audio_path(item, f"audio[{k}]")

        marker_counts = [t.count(self.audio_marker) for t in texts]
        if audios:
            for i, count in enumerate(marker_counts):
                if count == 0:
                    raise ValueError(
                        f"text[{i}] has no {self.audio_marker} marker but audio was given; put {self.audio_marker} "
                        f"where the audio goes, e.g. via processor.format_prompt(...)"
                    )
        if sum(marker_counts) != len(audios):
            raise ValueError(
                f"The text has {sum(marker_counts)} {self.audio_marker} markers but {len(audios)} audios were given; "
                "each marker takes exactly one audio"
            )

        # Audio -> 30 s segments, in marker order.
        segments_per_audio: list[int] = []
        all_segments: list[np.ndarray] = []
        for k, item in enumerate(audios):
            data, rate = self._load_audio(item, sampling_rate, truncation=truncation, name=f"audio[{k}]")
            segments = self.feature_extractor.to_segments(data, sampling_rate=rate, truncation=truncation, name=f"audio[{k}]")
            segments_per_audio.append(len(segments))
            all_segments.extend(segments)

        # Prompt ids: [BOS] + piece + placeholders + piece + ... (pieces tokenized separately, as the original).
        audio_id = self.audio_token_id if audios else None
        bos_id = self.tokenizer.bos_token_id
        prompt_ids: list[list[int]] = []
        next_audio = 0
        for t in texts:
            pieces = t.split(self.audio_marker)
            ids = [bos_id] + self._tokenize_piece(pieces[0])
            for piece in pieces[1:]:
                ids += [audio_id] * (segments_per_audio[next_audio] * self.audio_tokens_per_segment)
                next_audio += 1
                ids += self._tokenize_piece(piece)
            prompt_ids.append(ids)

        labels: list[list[int]] | None = None
        if text_target is not None:
            targets = [text_target] if isinstance(text_target, str) else list(text_target)
            if len(targets) != len(texts):
                raise ValueError(f"Got {len(texts)} prompts but {len(targets)} `text_target` answers")
            labels = []
            for i, answer in enumerate(targets):
                if not isinstance(answer, str):
                    raise ValueError(f"text_target[{i}] must be a string, got {type(answer).__name__}")
                target_ids = self.tokenizer(answer + self.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
                target_ids = self._without_placeholders(target_ids)
                if max_target_length is not None and len(target_ids) > max_target_length:
                    target_ids = target_ids[: max_target_length - 1] + [self.tokenizer.eos_token_id]
                labels.append([-100] * len(prompt_ids[i]) + target_ids)
                prompt_ids[i] = prompt_ids[i] + target_ids

        side = padding_side or ("right" if text_target is not None else "left")
        if side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}")
        longest = max(len(ids) for ids in prompt_ids)
        pad_id = self.tokenizer.pad_token_id
        input_ids, attention_mask, padded_labels = [], [], []
        for i, ids in enumerate(prompt_ids):
            n_pad = longest - len(ids)
            pad, ones = [pad_id] * n_pad, [1] * len(ids)
            input_ids.append(pad + ids if side == "left" else ids + pad)
            attention_mask.append([0] * n_pad + ones if side == "left" else ones + [0] * n_pad)
            if labels is not None:
                label_pad = [-100] * n_pad
                padded_labels.append(label_pad + labels[i] if side == "left" else labels[i] + label_pad)

        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels is not None:
            data["labels"] = padded_labels
        if all_segments:
            data.update(self.feature_extractor.extract(all_segments, return_tensors="pt"))
        return BatchFeature(data=data, tensor_type=return_tensors)


SalmonnProcessor.register_for_auto_class("AutoProcessor")
SalmonnFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")

__all__ = ["SalmonnProcessor", "add_salmonn_tokens"]
