"""
Activation tuning (the paper's stage 3): the instruction-tuned model writes stories about a few clips with its LoRA
scaling discounted (e.g. 4.0 -> 2.0, which lets it answer at length instead of with a short ASR/caption-like
reply), and is then trained on those stories at full scaling for a few steps.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from salmonn.inference import engine

from .data import SalmonnTrainDataset
from .prompts import validate_prompt


logger = logging.getLogger(__name__)

STORIES_FILE = "activation_stories.json"


def generate_answers(
    model,
    processor,
    audios: Sequence[tuple],
    prompt: str,
    lora_scaling: float | None = None,
    batch_size: int = 4,
    generation_kwargs: dict | None = None,
    progress: bool = True,
) -> list[str]:
    """
    Answers to `prompt` (with its `<SpeechHere>` marker) for each `(audio, sampling_rate)`, first 30 s only as in
    training, with the LoRA scaling set to `lora_scaling` for the duration; the model's scaling and train/eval mode
    are restored afterwards.
    """
    validate_prompt(prompt, "story prompt")
    items = [{"audio": audio, "sampling_rate": rate, "prompt": prompt} for audio, rate in audios]
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        with engine.lora_scaled(model, lora_scaling):
            for start in tqdm(range(0, len(items), batch_size), desc="Generating stories", disable=not progress):
                chunk = items[start : start + batch_size]
                answers.extend(engine.generate_answers(model, processor, chunk, generation_kwargs, truncation=True))
    finally:
        model.train(was_training)
    return answers


def build_story_items(
    clips: SalmonnTrainDataset,
    model,
    processor,
    prompt: str,
    lora_scaling: float,
    num_stories: int,
    generation_kwargs: dict | None = None,
    batch_size: int = 4,
) -> list[dict]:
    """Stories for the first `num_stories` clips, as training items `{id, path | array, text, task}`."""
    if num_stories < 1:
        raise ValueError(f"--activation_num_stories must be at least 1, got {num_stories}")
    if len(clips) < num_stories:
        logger.warning("Activation tuning asked for %d stories but only %d clips are usable", num_stories, len(clips))
    count = min(num_stories, len(clips))
    audios, items = [], []
    for index in range(count):
        item = clips.item(index)
        audios.append(clips.load_audio(item))
        items.append(item)
    stories = generate_answers(model, processor, audios, prompt, lora_scaling, batch_size, generation_kwargs)
    results = []
    for item, (audio, rate), story in zip(items, audios, stories):
        if not story:
            logger.warning("The model wrote an empty story for %s; that clip is left out", item["id"])
            continue
        entry = {"id": item["id"], "text": story, "task": "audio_story_telling", "Q": "", "expand_wav": []}
        if "path" in item and "array" not in item and not item.get("expand_wav"):
            entry["path"] = item["path"]
        else:
            entry["array"], entry["sampling_rate"] = audio, rate
        results.append(entry)
    if not results:
        raise ValueError("Activation tuning: the model wrote no non-empty story; check --activation_lora_scaling")
    return results


def write_stories(items: list[dict], path: str | os.PathLike) -> None:
    """Saves the stories next to the run (the audio arrays of in-memory clips are not written, only their ids)."""
    records = [{k: v for k, v in item.items() if k not in ("array", "sampling_rate")} for item in items]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"annotation": records}, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def read_stories(path: str | os.PathLike, clips: SalmonnTrainDataset | None = None) -> list[dict]:
    """Stories written by `write_stories`; clips without a path get their audio back from `clips` by id."""
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))["annotation"]
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read activation stories {str(path)!r}: {err}") from err
    by_id = {}
    if clips is not None:
        by_id = {clips.item(i)["id"]: clips.item(i) for i in range(len(clips))}
    items = []
    for i, record in enumerate(records):
        if not record.get("text"):
            raise ValueError(f"{str(path)!r} item {i}: empty story")
        if "path" not in record:
            source = by_id.get(record.get("id"))
            if source is None:
                raise ValueError(f"{str(path)!r} item {i}: no path and no clip with id {record.get('id')!r}")
            audio, rate = clips.load_audio(source)
            record = {**record, "array": audio, "sampling_rate": rate}
        record.setdefault("Q", "")
        record.setdefault("expand_wav", [])
        record.setdefault("task", "audio_story_telling")
        items.append(record)
    return items
