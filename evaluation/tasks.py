"""The paper's evaluation tasks: prompts, metrics and the reported numbers.

SALMONN (Tang et al., "SALMONN: Towards Generic Hearing Abilities for Large Language Models", ICLR 2024,
arXiv:2310.13289) evaluates 15 tasks in three levels (its Table 2): level 1, tasks seen in training (ASR,
En2Zh, AAC, PR, ER, MC, OSR, SV); level 2, speech-based NLP tasks not trained on (En2De, En2Ja, KE, SQQA,
SF); level 3, the hardest emergent tasks (audio-based story telling, speech-audio co-reasoning). Gender
recognition (`gr`) was a training task but is not in Table 3; it is here for completeness.

Prompts are written for this project. To reproduce the paper's setting exactly, pass the original
repository's test prompt file with `--prompt_file` (`{task_key: prompt}`); `original_keys` says which of
its keys each task uses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import metrics
from .normalizers import get_text_normalizer


logger = logging.getLogger(__name__)


# SALMONN's results in Table 3 of the paper (arXiv:2310.13289 v2 / ICLR 2024; the final model, after activation
# tuning), as {task: {test set: {metric: value}}}, in the units `salmonn-eval` reports: the paper gives accuracies
# and following rates as fractions (0.69), here they are percent (69.0); BLEU4, METEOR, SPIDEr and ROUGE-L are
# 0-100 in both. The PDF could not be opened here: the values were taken from a public reading note that
# transcribes the table, and the LibriSpeech WERs also agree with a public benchmark listing. The paper reports
# no gender-recognition number in this table, hence no `gr` row.
PAPER_TABLE3: dict[str, dict[str, dict[str, float | None]]] = {
    # level 1
    "asr": {
        "LibriSpeech test-clean": {"wer": 2.1},
        "LibriSpeech test-other": {"wer": 4.9},
        "GigaSpeech": {"wer": 10.0},
    },
    "en2zh": {"CoVoST2-En2Zh": {"bleu4": 33.1}},
    "aac": {"AudioCaps": {"meteor": 24.0, "spider": 40.3}},
    "pr": {"LibriSpeech test-clean": {"per": 4.2}},
    "er": {"IEMOCAP": {"accuracy": 69.0}},
    "mc": {"MusicCaps": {"bleu4": 5.5, "rouge_l": 21.8}},
    "osr": {"LibriMix": {"wer": 23.0}},
    "sv": {"VoxCeleb1": {"accuracy": 94.0}},
    # level 2
    "en2de": {"CoVoST2-En2De": {"bleu4": 18.6}},
    "en2ja": {"CoVoST2-En2Ja": {"bleu4": 22.7}},
    "ke": {"Inspec": {"accuracy": 32.0}},
    "sqqa": {"WikiQA": {"accuracy": 41.0, "following_rate": 98.0}},
    "sf": {"SLURP": {"accuracy": 41.0, "following_rate": 99.0}},
    # level 3
    "story": {"AudioCaps": {"following_rate": 100.0, "diversity": 82.57}},
    "sac": {"SALMONN speech-audio co-reasoning set": {"accuracy": 50.0, "following_rate": 73.0}},
}

METRIC_LABELS = {
    "wer": "%WER",
    "per": "%PER",
    "bleu4": "BLEU4",
    "rouge_l": "ROUGE-L",
    "meteor": "METEOR",
    "spider": "SPIDEr",
    "accuracy": "Accuracy (%)",
    "following_rate": "Following rate (%)",
    "diversity": "Diversity (distinct words)",
}

# Label synonyms for the classification tasks (answer word -> reference label).
EMOTION_SYNONYMS = {"anger": "angry", "happiness": "happy", "sadness": "sad", "neutrality": "neutral"}
GENDER_SYNONYMS = {"man": "male", "men": "male", "woman": "female", "women": "female", "boy": "male", "girl": "female"}


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task.

    `prompt` is this project's instruction (may contain `{}`, filled with the item's question `Q`);
    `original_keys` are the keys of the original test prompt file tried in order; `kind` selects the scorer.
    """

    name: str
    level: int
    description: str
    kind: str  # wer | per | bleu | caption | label | verification | open_answer | story
    metrics: tuple[str, ...]
    prompt: str
    original_keys: tuple[str, ...]
    bleu_tokenize: str = "13a"
    synonyms: dict[str, str] = field(default_factory=dict)
    answer_split: str | None = None
    needs_question: bool = False
    needs_reference: bool = True
    multi_reference: bool = False
    generation_overrides: dict[str, Any] = field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec(
            "asr",
            1,
            "speech recognition",
            "wer",
            ("wer",),
            "Write down exactly what is said in this recording.",
            ("asr",),
        ),
        TaskSpec(
            "pr",
            1,
            "phone recognition",
            "per",
            ("per",),
            "Spell out the speech as a sequence of phonemes.",
            ("phone_recognition",),
        ),
        TaskSpec(
            "en2zh",
            1,
            "English to Chinese speech translation",
            "bleu",
            ("bleu4",),
            "Translate what the speaker says into Chinese.",
            ("translation_ec",),
            bleu_tokenize="zh",
        ),
        TaskSpec(
            "aac",
            1,
            "audio captioning",
            "caption",
            ("bleu4", "rouge_l", "meteor", "spider"),
            "Describe the sounds in this clip in one sentence.",
            ("audiocaption", "audiocaption_v2"),
            multi_reference=True,
        ),
        TaskSpec(
            "er",
            1,
            "emotion recognition",
            "label",
            ("accuracy",),
            "Which emotion does the speaker's voice convey? Reply with a single word.",
            ("emotion_recognition",),
            synonyms=EMOTION_SYNONYMS,
        ),
        TaskSpec(
            "mc",
            1,
            "music captioning",
            "caption",
            ("bleu4", "rouge_l", "meteor", "spider"),
            "Describe this music: its genre, instruments, mood and tempo.",
            ("music_description",),
            multi_reference=True,
        ),
        TaskSpec(
            "osr",
            1,
            "overlapped speech recognition",
            "wer",
            ("wer",),
            "Two people talk at the same time here. Write down what each of them says.",
            ("speech_separation",),
        ),
        TaskSpec(
            "sv",
            1,
            "speaker verification",
            "verification",
            ("accuracy",),
            "Are both parts of this recording spoken by one and the same person? Reply yes or no.",
            ("speaker_verification",),
        ),
        TaskSpec(
            "gr",
            1,
            "gender recognition (not in Table 3)",
            "label",
            ("accuracy",),
            "Is the speaker male or female? Reply with a single word.",
            ("gender_recognition", "gender_QA"),
            synonyms=GENDER_SYNONYMS,
        ),
        TaskSpec(
            "en2de",
            2,
            "English to German speech translation",
            "bleu",
            ("bleu4",),
            "Translate what the speaker says into German.",
            ("translation_en2de",),
        ),
        TaskSpec(
            "en2ja",
            2,
            "English to Japanese speech translation",
            "bleu",
            ("bleu4",),
            "Translate what the speaker says into Japanese.",
            ("translation_en2ja",),
            bleu_tokenize="ja-mecab",
        ),
        TaskSpec(
            "ke",
            2,
            "keyword extraction",
            "open_answer",
            ("accuracy", "following_rate"),
            "List a few keywords that capture what the speaker talks about.",
            ("keywords",),
            answer_split=r"[,;\n]",
        ),
        TaskSpec(
            "sqqa",
            2,
            "spoken-query question answering",
            "open_answer",
            ("accuracy", "following_rate"),
            "The speaker asks a question. Give the answer to it.",
            ("speech_query",),
        ),
        TaskSpec(
            "sf",
            2,
            "slot filling",
            "open_answer",
            ("accuracy", "following_rate"),
            "From what the speaker says, what is the {}? Reply with the value only.",
            ("slot_filling",),
            needs_question=True,
        ),
        TaskSpec(
            "story",
            3,
            "audio-based story telling",
            "story",
            ("following_rate", "diversity"),
            "Make up a story inspired by what you hear in this audio.",
            ("audio_story_telling",),
            needs_reference=False,
            generation_overrides={"max_new_tokens": 200},
        ),
        TaskSpec(
            "sac",
            3,
            "speech-audio co-reasoning",
            "open_answer",
            ("accuracy", "following_rate"),
            "Answer the spoken question, using the background sounds you hear as well.",
            ("speech_audio_coreasoning",),
        ),
    ]
}

# Names users may type for a task: the original prompt keys and a few spelled-out forms.
TASK_ALIASES: dict[str, str] = {
    **{key: spec.name for spec in TASKS.values() for key in spec.original_keys},
    "phone_recognition": "pr",
    "audio_captioning": "aac",
    "music_captioning": "mc",
    "emotion": "er",
    "gender": "gr",
    "speaker_verification": "sv",
    "overlapped_speech": "osr",
    "keyword_extraction": "ke",
    "spoken_qa": "sqqa",
    "slot_filling": "sf",
    "storytelling": "story",
}


def get_task(name: str) -> TaskSpec:
    key = TASK_ALIASES.get(name, name)
    if key not in TASKS:
        raise ValueError(f"--task {name!r} is not a known task; choose one of {', '.join(TASKS)}")
    return TASKS[key]


def task_matches(spec: TaskSpec, item_task: str | None) -> bool:
    """Whether an item's own `task` field (original annotation key or our name) belongs to `spec`."""
    return (
        item_task is None
        or item_task == spec.name
        or item_task in spec.original_keys
        or (TASK_ALIASES.get(item_task) == spec.name)
    )


def paper_values(task: str, dataset: str | None = None) -> dict[str, dict[str, float | None]]:
    """Table 3 rows for a task ({test set: {metric: value}}), optionally one test set only."""
    rows = PAPER_TABLE3.get(task, {})
    if dataset is None:
        return rows
    if dataset not in rows:
        raise ValueError(f"--dataset {dataset!r}: the paper's test sets for {task!r} are {list(rows) or 'none'}")
    return {dataset: rows[dataset]}


def score_task(
    spec: TaskSpec,
    records: Sequence[dict],
    judge: Callable[[str, dict], dict] | None = None,
    normalizer: str = "english",
    spelling_mapping: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Score prediction records (`reference`, `hypothesis`, ...) for one task.

    Returns {"metrics": {name: value or None}, "details": {name: counts}, "unavailable": {name: reason}}.
    """
    refs = [r.get("reference") for r in records]
    hyps = [r.get("hypothesis") or "" for r in records]
    if spec.needs_reference:
        missing = [r.get("id") for r in records if r.get("reference") in (None, "", [])]
        if missing:
            raise ValueError(f"task {spec.name!r} needs a reference for every item; missing for ids {missing[:5]}")
    details: dict[str, dict] = {}
    if spec.kind == "wer":
        details["wer"] = metrics.word_error_rate(refs, hyps, get_text_normalizer(normalizer, spelling_mapping))
    elif spec.kind == "per":
        details["per"] = metrics.phone_error_rate(refs, hyps)
    elif spec.kind == "bleu":
        details["bleu4"] = metrics.bleu4(refs, hyps, tokenize=spec.bleu_tokenize)
    elif spec.kind == "caption":
        details["bleu4"] = metrics.caption_bleu4(refs, hyps)
        details["rouge_l"] = metrics.rouge_l(refs, hyps)
        details["meteor"] = metrics.meteor(refs, hyps)
        details["spider"] = metrics.spider(refs, hyps)
    elif spec.kind == "label":
        details["accuracy"] = metrics.label_accuracy(refs, hyps, spec.synonyms)
    elif spec.kind == "verification":
        details["accuracy"] = metrics.verification_accuracy(refs, hyps)
    elif spec.kind == "open_answer":
        judge = judge or metrics.StringMatchJudge(
            answer_split={s.name: s.answer_split for s in TASKS.values() if s.answer_split}
        )
        out = metrics.following_and_accuracy(spec.name, records, judge)
        details["accuracy"] = details["following_rate"] = out
    elif spec.kind == "story":
        out = metrics.story_metrics(hyps)
        details["following_rate"] = details["diversity"] = out
    else:  # pragma: no cover - TaskSpec values are fixed above
        raise ValueError(f"unknown task kind {spec.kind!r}")
    values = {name: details[name].get(name) for name in spec.metrics}
    unavailable = {name: details[name]["unavailable"] for name in spec.metrics if "unavailable" in details[name]}
    # one entry per distinct details dict (open-answer and story share one for two metrics)
    seen, unique = set(), {}
    for name in spec.metrics:
        if id(details[name]) not in seen:
            seen.add(id(details[name]))
            unique[name] = details[name]
    return {"metrics": values, "details": unique, "unavailable": unavailable}
