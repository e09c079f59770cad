"""Batches of SALMONN training examples, built by the processor so that training sees exactly what inference sees."""

from __future__ import annotations

from typing import Any

import numpy as np

from salmonn.audio import TARGET_SAMPLING_RATE, resample
from .prompts import validate_prompt


class SalmonnDataCollator:
    """
    Turns `{id, audio, sampling_rate, prompt, answer}` examples into model inputs with `labels`: the prompt goes
    through the processor's chat template (`USER: {prompt}\\nASSISTANT:`), the answer is appended as `text_target`
    with `</s>`, and only the answer and `</s>` carry loss. Answers longer than `max_txt_len` tokens are cut at their
    end (keeping `</s>`); the prompt and the audio are never cut. The batch keeps the example ids under `ids`
    (`SalmonnTrainer` takes them out before the forward pass).
    """

    def __init__(self, processor, max_txt_len: int | None = 300, truncate_audio: bool = True):
        if max_txt_len is not None and max_txt_len < 2:
            raise ValueError(f"`max_txt_len` must be at least 2 (one answer token and </s>), got {max_txt_len}")
        self.processor = processor
        self.max_txt_len = max_txt_len
        self.truncate_audio = truncate_audio
        self._templates: dict[str, str] = {}

    def format_prompt(self, prompt: str) -> str:
        """`prompt` (with its audio marker, as in the prompt pools) wrapped by the processor's chat template."""
        formatted = self._templates.get(prompt)
        if formatted is None:
            formatted = self.processor.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            self._templates[prompt] = formatted
        return formatted

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        prompts, answers, audios, rates = [], [], [], []
        for example in examples:
            name = f"example {example.get('id')!r}"
            answer = example.get("answer")
            if not isinstance(answer, str) or not answer.strip():
                raise ValueError(f"{name}: empty answer; every training example needs a non-empty `text`")
            prompts.append(self.format_prompt(validate_prompt(example.get("prompt"), name)))
            answers.append(answer)
            audio = example.get("audio")
            if audio is None:
                raise ValueError(f"{name}: no audio")
            audios.append(np.asarray(audio))
            rates.append(int(example.get("sampling_rate") or TARGET_SAMPLING_RATE))

        if len(set(rates)) > 1:
            # One processor call takes one rate; mixed batches meet at 16 kHz (what the feature extractor would do).
            audios = [resample(a, r) for a, r in zip(audios, rates)]
            rates = [TARGET_SAMPLING_RATE]

        batch = self.processor(
            text=prompts,
            audio=audios,
            sampling_rate=rates[0],
            text_target=answers,
            truncation=self.truncate_audio,
            padding_side="right",
            max_target_length=self.max_txt_len,
            return_tensors="pt",
        )
        batch = dict(batch)
        batch["ids"] = [str(example.get("id")) for example in examples]
        return batch
