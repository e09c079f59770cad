"""Instruction pools for SALMONN's training tasks, and the checks and filling that prompts go through.

A prompt is written the way the original prompt files write them: `<Speech><SpeechHere></Speech> ` followed by the
instruction, optionally with `{}` where the item's question (`Q`) goes. The pools below are the project's own
wording for the tasks of the paper; a JSON file in the original `{task: [prompts]}` form replaces the pool of every
task it names.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path


logger = logging.getLogger(__name__)

AUDIO_MARKER = "<SpeechHere>"
AUDIO_PREFIX = "<Speech><SpeechHere></Speech> "
QUESTION_SLOT = "{}"


def _pool(*instructions: str) -> list[str]:
    return [AUDIO_PREFIX + text for text in instructions]


# Task names are those of the original annotation files, so that its data loads unchanged.
DEFAULT_PROMPTS: dict[str, list[str]] = {
    "asr": _pool(
        "Transcribe the speech into text.",
        "Write down exactly what is said in this recording.",
        "What words does the speaker say? Give the transcript only.",
        "Produce a verbatim transcription of the spoken words.",
        "Listen and type out the spoken content.",
        "Convert this speech to written English.",
        "Give me a word-for-word transcript of the audio.",
    ),
    "asr_zh": _pool(
        "Transcribe the Mandarin speech into Chinese characters.",
        "Write down in Chinese what the speaker says.",
        "Give the Chinese transcript of this recording.",
    ),
    "asr_de": _pool(
        "Transcribe the German speech.",
        "Write down in German what is said in the recording.",
        "Give the German transcript of the spoken words.",
    ),
    "translation_ec": _pool(
        "Listen to the English speech and translate it into Chinese.",
        "Translate what the speaker says into Chinese.",
        "Give a Chinese translation of the spoken English.",
        "Render the recorded English sentence in Chinese.",
    ),
    "audiocaption": _pool(
        "Describe the audio in detail.",
        "What can be heard in this recording? Describe it.",
        "Write a caption for this sound.",
        "Summarise the acoustic events in the clip.",
        "Tell me what is happening in the audio.",
    ),
    "audiocaption_v2": _pool("Write a short caption that describes the sounds in this clip."),
    "QA": [AUDIO_PREFIX + QUESTION_SLOT],
    "inference_QA": [AUDIO_PREFIX + QUESTION_SLOT],
    "gender_QA": [AUDIO_PREFIX + QUESTION_SLOT],
    "gender_recognition": _pool(
        "Is the speaker male or female?",
        "Judge the gender of the voice in the recording.",
        "Does a man or a woman speak here?",
        "Identify the speaker's gender.",
    ),
    "phone_recognition": _pool(
        "Transcribe the speech as a sequence of phonemes.",
        "Write the phone sequence of the utterance.",
        "Give the phonetic transcription of what is said.",
    ),
    "speech_separation": _pool(
        "Several people talk at once; transcribe each speaker's words.",
        "Two voices overlap in this clip. Write down what each of them says.",
        "Separate the overlapping speech and transcribe every talker.",
    ),
    "emotion_recognition": _pool(
        "What emotion does the speaker's voice convey?",
        "Classify the emotional tone of the speech.",
        "How does the speaker feel, judging from the voice?",
    ),
    "music_description": _pool(
        "Describe the music: genre, instruments, mood and tempo.",
        "What kind of music is this? Describe it.",
        "Give a description of this piece of music.",
    ),
    "speaker_verification": _pool(
        "Are the two utterances spoken by the same person? Answer yes or no.",
        "Decide whether one speaker or two different speakers are heard in these two segments.",
        "Is the voice in the first part the same as in the second part?",
    ),
    "audio_story_telling": _pool(
        "Write a story inspired by what you hear.",
        "Use the sounds in this clip as the setting of a short story.",
        "Imagine the scene behind this audio and tell it as a detailed story.",
    ),
    "speaker_diarization_asr": _pool(
        "Transcribe the conversation and mark which speaker says each part.",
        "Write down who speaks when and what they say.",
        "Give a speaker-labelled transcript of the dialogue.",
    ),
}

# Friendlier names for some tasks.
TASK_ALIASES: dict[str, str] = {
    "translation": "translation_ec",
    "captioning": "audiocaption",
    "audio_captioning": "audiocaption",
    "emotion": "emotion_recognition",
    "gender": "gender_recognition",
    "overlapped_speech": "speech_separation",
    "story_telling": "audio_story_telling",
    "storytelling": "audio_story_telling",
}

# The instruction that activation tuning generates stories with (the paper's stage 3).
DEFAULT_STORY_PROMPT = AUDIO_PREFIX + "Listen to the clip and tell a detailed story that is closely tied to what you hear."


def validate_prompt(prompt: str, where: str) -> str:
    """A prompt must carry exactly one audio marker; anything else would only fail later inside the processor."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: expected a non-empty prompt string, got {prompt!r}")
    count = prompt.count(AUDIO_MARKER)
    if count != 1:
        raise ValueError(
            f"{where}: the prompt {prompt!r} has {count} {AUDIO_MARKER} markers; every prompt needs exactly one, "
            f"e.g. {AUDIO_PREFIX!r} followed by the instruction"
        )
    return prompt


def load_prompt_file(path: str | Path) -> dict[str, list[str]]:
    """Reads a prompt file in the original `{task: [prompt, ...]}` form (a single string per task is accepted too)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ValueError(f"Prompt file {str(path)!r} does not exist") from err
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read prompt file {str(path)!r}: {err}") from err
    if not isinstance(data, dict) or not data:
        raise ValueError(f"Prompt file {str(path)!r} must hold a non-empty JSON object {{task: [prompts]}}")
    pools: dict[str, list[str]] = {}
    for task, prompts in data.items():
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise ValueError(f"Prompt file {str(path)!r}, task {task!r}: expected a non-empty list of prompt strings")
        pools[task] = [validate_prompt(p, f"Prompt file {str(path)!r}, task {task!r}, prompt {i}") for i, p in enumerate(prompts)]
    return pools


class PromptPool:
    """
    Prompts per task. Choosing is a pure function of `(seed, key)` so that a resumed or distributed run picks the
    same prompt for the same item and epoch as an uninterrupted one.
    """

    def __init__(self, pools: Mapping[str, list[str]] | None = None, prompt_file: str | Path | None = None):
        merged = {task: list(prompts) for task, prompts in (DEFAULT_PROMPTS if pools is None else pools).items()}
        if prompt_file is not None:
            overrides = load_prompt_file(prompt_file)
            merged.update(overrides)
            logger.info("Prompt file %s sets the prompts of %d tasks: %s", prompt_file, len(overrides), sorted(overrides))
        for task, prompts in merged.items():
            if not prompts:
                raise ValueError(f"Task {task!r} has an empty prompt pool")
            for i, prompt in enumerate(prompts):
                validate_prompt(prompt, f"Task {task!r}, prompt {i}")
        self.pools = merged

    def resolve_task(self, task: str) -> str:
        if task in self.pools:
            return task
        alias = TASK_ALIASES.get(task)
        if alias is not None and alias in self.pools:
            return alias
        return task

    def __contains__(self, task: str) -> bool:
        return self.resolve_task(task) in self.pools

    def needs_question(self, task: str) -> bool:
        """True when every prompt of the task has a `{}` slot, so an item without a question cannot be prompted."""
        return all(QUESTION_SLOT in p for p in self.pools[self.resolve_task(task)])

    def choose(self, task: str, question: str = "", seed: int | str = 0) -> str:
        """One prompt of `task`, picked by `seed`, with `{}` filled with `question`."""
        resolved = self.resolve_task(task)
        if resolved not in self.pools:
            raise ValueError(
                f"Unknown task {task!r}: no prompt for it. Known tasks: {sorted(self.pools)}; add it with a prompt "
                "file ({task: [prompts]}) via --prompt_file"
            )
        prompts = self.pools[resolved]
        prompt = prompts[random.Random(str(seed)).randrange(len(prompts))] if len(prompts) > 1 else prompts[0]
        return fill_prompt(prompt, question)


def fill_prompt(prompt: str, question: str | None) -> str:
    """Puts the question into the `{}` slot; `str.format` is not used so that other braces in a prompt survive."""
    if QUESTION_SLOT not in prompt:
        return prompt
    return prompt.replace(QUESTION_SLOT, question or "", 1)
