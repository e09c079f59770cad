"""
Training data for SALMONN: the original annotation JSON, JSONL and CSV manifests and `datasets` datasets, turned into
items `{id, path | array, sampling_rate, text, prompt, task, Q, expand_wav}` and served as (audio, prompt, answer)
examples. Manifest fields are those of salmonn-infer and salmonn-eval (`audio`, `text`, `prompt`, `id`), plus the
original's `path` (for `audio`), `task`, `Q` and `expand_wav`.

Bad items are found before training starts, not deep inside a batch: missing or unreadable audio and empty answers
are skipped with one warning that counts them (or raise with `strict=True`), an unknown task or a prompt with more than
one `<SpeechHere>` is an error that names it. An audio body that fails to decode during training is replaced by the
next item with a warning naming both, so one bad file never ends a run.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling_salmonn.feature_extraction_salmonn import MAX_ABS_AMPLITUDE
from salmonn.audio import join_with_silence, read_audio
from salmonn.jsonl import split_jsonl

from .prompts import AUDIO_MARKER, AUDIO_PREFIX, PromptPool, validate_prompt


logger = logging.getLogger(__name__)

ITEM_KEYS = ("id", "path", "array", "sampling_rate", "text", "prompt", "task", "Q", "expand_wav")
# An audio that fails to decode during training is replaced by the next item; this many failures in a row end the run.
MAX_FAILED_LOADS_IN_A_ROW = 8


# --------------------------------------------------------------------------------------------------------------
# audio


def check_samples(audio: np.ndarray, name: str) -> np.ndarray:
    """Refuses NaN/inf samples and absurd amplitudes, naming the audio, before they reach a batch."""
    finite = np.isfinite(audio)
    if not finite.all():
        raise ValueError(f"Audio {name!r} has {int((~finite).sum())} non-finite sample(s) (NaN or inf)")
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak > MAX_ABS_AMPLITUDE:
        raise ValueError(f"Audio {name!r} has samples up to {peak:.3g}; float audio must lie in [-1, 1]")
    return audio


def _audio_problem(path: str) -> str | None:
    """Why a file cannot serve as audio, or None; reads only the header."""
    if not os.path.isfile(path):
        return "missing audio file"
    import soundfile

    try:
        info = soundfile.info(path)
    except Exception:
        return "unreadable audio file"
    if info.frames == 0:
        return "empty audio file"
    return None


# --------------------------------------------------------------------------------------------------------------
# manifests


def _resolve(path: str, base_dir: Path | None) -> str:
    if os.path.isabs(path) or base_dir is None:
        return path
    candidate = base_dir / path
    # Relative paths are taken next to the manifest first, then (as the original does) from the working directory.
    return str(candidate) if candidate.exists() or not os.path.exists(path) else path


def _as_path_list(value: Any, where: str) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: `expand_wav` {value!r} is not a JSON list of paths") from err
        else:
            return [p.strip() for p in text.split(";") if p.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{where}: `expand_wav` must be a list of audio paths, got {value!r}")
    return list(value)


def item_prompt(value: Any, where: str) -> str | None:
    """An item's own instruction, as salmonn-infer takes it: the audio goes first unless it holds `<SpeechHere>`."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: `prompt` must be a string, got {value!r}")
    return validate_prompt(value if AUDIO_MARKER in value else AUDIO_PREFIX + value, where)


def normalise_item(raw: dict, where: str, base_dir: Path | None = None, default_task: str = "asr") -> dict:
    """One raw record -> an item; `audio` (or `path`) or `array` + `sampling_rate` give the audio."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object with `audio` and `text`, got {type(raw).__name__}")
    item: dict[str, Any] = {}
    path = raw.get("audio", raw.get("path"))
    if isinstance(path, dict):  # {"array", "sampling_rate"} as datasets writes it
        item["array"] = path.get("array")
        item["sampling_rate"] = path.get("sampling_rate")
        path = path.get("path")
        if item["array"] is None:
            item.pop("array")
            item.pop("sampling_rate")
    elif raw.get("array") is not None:
        item["array"] = raw["array"]
        item["sampling_rate"] = raw.get("sampling_rate")
    if "array" in item:
        array = np.asarray(item["array"], dtype=np.float64)
        if array.ndim == 2:
            array = array[:, 0]
        if array.ndim != 1:
            raise ValueError(f"{where}: audio array must be 1-D or [samples, channels], got shape {array.shape}")
        if not isinstance(item.get("sampling_rate"), (int, np.integer)) or item["sampling_rate"] <= 0:
            raise ValueError(f"{where}: an audio array needs a positive integer `sampling_rate`")
        item["array"], item["sampling_rate"] = array, int(item["sampling_rate"])
        if path is not None:
            item["path"] = str(path)
    elif isinstance(path, (str, os.PathLike)) and str(path):
        item["path"] = _resolve(str(path), base_dir)
    else:
        raise ValueError(f"{where}: no audio; give `audio` (a file) or `array` with `sampling_rate`")

    text = raw.get("text")
    item["text"] = "" if text is None or (isinstance(text, float) and np.isnan(text)) else str(text)
    item["prompt"] = item_prompt(raw.get("prompt"), where)
    task = raw.get("task")
    item["task"] = default_task if task is None or (isinstance(task, str) and not task.strip()) else str(task).strip()
    question = raw.get("Q", raw.get("question"))
    item["Q"] = "" if question is None or (isinstance(question, float) and np.isnan(question)) else str(question)
    item["expand_wav"] = [_resolve(p, base_dir) for p in _as_path_list(raw.get("expand_wav"), where)]
    item["id"] = str(raw["id"]) if raw.get("id") is not None else item.get("path", where)
    return item


def load_manifest(path: str | os.PathLike, audio_root: str | None = None, default_task: str = "asr") -> list[dict]:
    """
    Reads JSONL, a JSON list, `{"annotation": [...]}` JSON (the original format) or CSV/TSV (columns `audio` or
    `path`, `text`, `prompt`, `id`, `task`, `Q`, `expand_wav` with `;` between paths). Relative audio paths are taken
    from `audio_root`, else next to the manifest, else from the working directory.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Data file {str(path)!r} does not exist")
    base_dir = Path(audio_root) if audio_root else path.resolve().parent
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(data, dict):
                if "annotation" not in data:
                    raise ValueError(f"Data file {str(path)!r}: expected {{\"annotation\": [...]}} or a JSON list of items")
                data = data["annotation"]
            if not isinstance(data, list):
                raise ValueError(f"Data file {str(path)!r}: `annotation` must be a list of items")
            records = data
        elif suffix == ".jsonl":
            records = []
            for line_no, line in split_jsonl(path.read_text(encoding="utf-8-sig")):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"Data file {str(path)!r}, line {line_no}: invalid JSON ({err})") from err
        elif suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                if reader.fieldnames is None or not ({"path", "audio"} & set(reader.fieldnames)):
                    raise ValueError(f"Data file {str(path)!r}: the header needs an `audio` column, got {reader.fieldnames}")
                records = list(reader)
        else:
            raise ValueError(f"Data file {str(path)!r}: unsupported extension {suffix!r} (use .json, .jsonl, .csv or .tsv)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read data file {str(path)!r}: {err}") from err
    if not records:
        raise ValueError(f"Data file {str(path)!r} holds no items")
    return [normalise_item(r, f"{path.name} item {i}", base_dir, default_task) for i, r in enumerate(records)]


class HFDatasetItems(Sequence):
    """
    A `datasets.Dataset` seen as a sequence of items, decoded lazily. An `Audio` column is read undecoded and its
    bytes or file decoded with soundfile (no torchcodec or FFmpeg needed); a path column or `{array, sampling_rate}`
    values work too.
    """

    def __init__(
        self,
        dataset,
        audio_column: str = "audio",
        text_column: str = "text",
        prompt_column: str | None = None,
        task_column: str | None = "task",
        question_column: str | None = "Q",
        id_column: str | None = None,
        expand_column: str | None = "expand_wav",
        default_task: str = "asr",
        audio_root: str | None = None,
        name: str = "dataset",
    ):
        from datasets import Audio

        columns = set(dataset.column_names)
        if audio_column not in columns:
            raise ValueError(f"{name}: no audio column {audio_column!r}; columns are {sorted(columns)} (see --audio_column_name)")
        if isinstance(dataset.features.get(audio_column), Audio):
            dataset = dataset.cast_column(audio_column, Audio(decode=False))
        self.dataset = dataset
        self.name = name
        self.audio_column = audio_column
        self.text_column = text_column if text_column in columns else None
        self.prompt_column = prompt_column if prompt_column and prompt_column in columns else None
        self.task_column = task_column if task_column and task_column in columns else None
        self.question_column = question_column if question_column and question_column in columns else None
        self.id_column = id_column if id_column and id_column in columns else None
        self.expand_column = expand_column if expand_column and expand_column in columns else None
        self.rate_column = "sampling_rate" if "sampling_rate" in columns else None
        self.default_task = default_task
        self.base_dir = Path(audio_root) if audio_root else None
        if id_column and self.id_column is None:
            raise ValueError(f"{name}: no id column {id_column!r}; columns are {sorted(columns)}")

    def __len__(self) -> int:
        return len(self.dataset)

    def column(self, key: str) -> list | None:
        """The text-like fields of every row without touching the audio column."""
        column = {"text": self.text_column, "prompt": self.prompt_column, "task": self.task_column, "Q": self.question_column}[key]
        return None if column is None else list(self.dataset[column])

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[int(index)]
        value = row[self.audio_column]
        raw: dict[str, Any] = {}
        if isinstance(value, dict) and value.get("bytes") is not None:
            raw["array"], raw["sampling_rate"] = read_audio(value["bytes"], name=value.get("path") or f"{self.name} row {index}")
        elif isinstance(value, dict) and value.get("array") is not None:
            raw["array"], raw["sampling_rate"] = value["array"], value.get("sampling_rate")
        elif isinstance(value, dict):
            raw["path"] = value.get("path")
        elif isinstance(value, str):
            raw["path"] = value
        else:
            raw["array"] = value
            raw["sampling_rate"] = row.get(self.rate_column) if self.rate_column else None
        raw["text"] = row[self.text_column] if self.text_column else None
        raw["prompt"] = row[self.prompt_column] if self.prompt_column else None
        raw["task"] = row[self.task_column] if self.task_column else None
        raw["Q"] = row[self.question_column] if self.question_column else None
        raw["expand_wav"] = row[self.expand_column] if self.expand_column else None
        raw["id"] = row[self.id_column] if self.id_column else f"{self.name}:{index}"
        return normalise_item(raw, f"{self.name} row {index}", self.base_dir, self.default_task)


def load_hf_dataset(
    name_or_path: str, config_name: str | None = None, split: str = "train", cache_dir: str | None = None, **columns
) -> HFDatasetItems:
    """`load_from_disk` for a saved dataset folder, else `load_dataset(name_or_path, config_name, split=split)`."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("Training from a `datasets` dataset needs `pip install datasets` (extra `train`)") from err
    if os.path.isdir(name_or_path) and os.path.isfile(os.path.join(name_or_path, "dataset_info.json")) or (
        os.path.isdir(name_or_path) and os.path.isfile(os.path.join(name_or_path, "dataset_dict.json"))
    ):
        loaded = datasets.load_from_disk(name_or_path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"Dataset {name_or_path!r} has no split {split!r}; splits: {sorted(loaded)}")
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(name_or_path, config_name, split=split, cache_dir=cache_dir)
    return HFDatasetItems(loaded, name=f"{name_or_path}[{split}]", **columns)


# --------------------------------------------------------------------------------------------------------------
# checks and the torch dataset


def filter_items(
    items: Sequence[dict] | HFDatasetItems,
    prompts: PromptPool,
    name: str,
    strict: bool = False,
    require_text: bool = True,
    verify_audio: bool = True,
) -> list[int]:
    """
    Indices of the usable items. Unknown tasks of items without their own prompt always raise (a configuration error);
    missing or unreadable audio, empty answers and question prompts without a question are skipped with one counting
    warning, or raise if strict.
    """
    lazy = isinstance(items, HFDatasetItems)
    if lazy:
        n = len(items)
        texts = items.column("text") or [None] * n
        own_prompts = [item_prompt(p, f"{name} row {i}") for i, p in enumerate(items.column("prompt") or [None] * n)]
        tasks = [t if t else items.default_task for t in (items.column("task") or [None] * n)]
        questions = items.column("Q") or [None] * n
        if require_text and items.text_column is None:
            raise ValueError(f"{name}: no answer column {items.text_column!r}; columns are {items.dataset.column_names} (see --text_column_name)")
    else:
        n = len(items)
        texts = [it["text"] for it in items]
        own_prompts = [it.get("prompt") for it in items]
        tasks = [it["task"] for it in items]
        questions = [it["Q"] for it in items]

    unknown = Counter(t for t, own in zip(tasks, own_prompts) if own is None and t not in prompts)
    if unknown:
        first = next(i for i, t in enumerate(tasks) if t in unknown and own_prompts[i] is None)
        raise ValueError(
            f"{name}: no prompt for task(s) {dict(unknown)} (first at item {first}); known tasks are "
            f"{sorted(prompts.pools)}. Give their prompts with --prompt_file ({{task: [prompts]}})"
        )

    problems: dict[str, list[str]] = {}
    keep: list[int] = []
    for i in range(n):
        problem = None
        if require_text and not (texts[i] or "").strip():
            problem = "empty answer"
        elif own_prompts[i] is None and prompts.needs_question(tasks[i]) and not (questions[i] or "").strip():
            problem = f"no question (`Q`) for task {tasks[i]!r}"
        elif verify_audio and not lazy:
            item = items[i]
            for path in ([item["path"]] if "array" not in item else []) + item["expand_wav"]:
                problem = _audio_problem(path)
                if problem:
                    problem = f"{problem} ({path})"
                    break
        if problem is None:
            keep.append(i)
            continue
        label = f"item {i}" if lazy else f"item {i} ({items[i]['id']})"
        if strict:
            raise ValueError(f"{name}: {label}: {problem}")
        kind = problem.split(" (")[0]
        problems.setdefault(kind, []).append(f"{label}: {problem}")

    if problems:
        summary = "; ".join(f"{len(v)} x {k} (first: {v[0]})" for k, v in problems.items())
        logger.warning("%s: skipped %d of %d items: %s", name, n - len(keep), n, summary)
    if not keep:
        raise ValueError(f"{name}: none of its {n} items is usable")
    return keep


class SalmonnTrainDataset(torch.utils.data.Dataset):
    """
    Examples `{id, audio, sampling_rate, prompt, answer, task}` for `SalmonnDataCollator`. An item's prompt is its own
    `prompt`, else drawn from its task's pool by `(seed, epoch, index)`, so it does not depend on worker processes,
    ranks or resumption. An audio that fails to load at run time is replaced by the next item that loads, with a
    warning naming both (an error if strict, or after `MAX_FAILED_LOADS_IN_A_ROW` failures in a row): batches keep
    their size, so every rank of a distributed run keeps taking the same steps.
    """

    def __init__(
        self,
        items: Sequence[dict] | HFDatasetItems,
        prompts: PromptPool,
        seed: int = 42,
        name: str = "train",
        strict: bool = False,
        require_text: bool = True,
        verify_audio: bool = True,
    ):
        self.items = items
        self.prompts = prompts
        self.seed = seed
        self.name = name
        self.strict = strict
        self.epoch = 0
        self.indices = filter_items(items, prompts, name, strict=strict, require_text=require_text, verify_audio=verify_audio)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def item(self, index: int) -> dict:
        return self.items[self.indices[index]]

    def load_audio(self, item: dict) -> tuple[np.ndarray, int]:
        if "array" in item:
            main = (check_samples(np.asarray(item["array"], dtype=np.float64), f"item {item['id']} array"), item["sampling_rate"])
        else:
            main = read_audio(item["path"])
            check_samples(main[0], item["path"])
        if not item.get("expand_wav"):
            return main
        parts = [read_audio(p) for p in item["expand_wav"]]
        for path, (audio, _) in zip(item["expand_wav"], parts):
            check_samples(audio, path)
        return join_with_silence([main] + parts)

    def __getitem__(self, index: int) -> dict:
        failures = []
        for offset in range(MAX_FAILED_LOADS_IN_A_ROW):
            position = (index + offset) % len(self)
            try:
                item = self.item(position)
                audio, rate = self.load_audio(item)
            except ValueError as err:
                if self.strict:
                    raise ValueError(f"{self.name}: item {position}: {err}") from err
                failures.append(f"item {position} skipped at load time: {err}")
                continue
            if failures:
                logger.warning("%s: %s; item %d (%r) is used in its place", self.name, "; ".join(failures), position, item["id"])
            return self.example(position, item, audio, rate)
        raise ValueError(
            f"{self.name}: {MAX_FAILED_LOADS_IN_A_ROW} items in a row from item {index} failed to load their audio "
            f"(first: {failures[0]}); check these files or leave them out of the data"
        )

    def example(self, index: int, item: dict, audio: np.ndarray, rate: int) -> dict:
        prompt = item.get("prompt") or self.prompts.choose(item["task"], item["Q"], seed=f"{self.seed}:{self.epoch}:{index}")
        return {
            "id": item["id"],
            "audio": audio,
            "sampling_rate": rate,
            "prompt": prompt,
            "answer": item["text"],
            "task": item["task"],
        }
