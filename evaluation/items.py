"""What salmonn-eval reads: a task's items from a manifest or a `datasets` dataset, and the prompt of each item."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from salmonn.inference.options import DatasetArguments
from salmonn.jsonl import split_jsonl

from .tasks import TaskSpec, task_matches


logger = logging.getLogger(__name__)

AUDIO_MARKER = "<Speech><SpeechHere></Speech>"


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist" if not path.exists() else "is not a regular file"
        raise ValueError(f"--test_file {path} {what}; give a JSONL, CSV, TSV or JSON manifest file")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".jsonl":
        rows = []
        for n, line in split_jsonl(text):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"--test_file {path}: line {n} is not JSON ({err})") from err
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--test_file {path}: not JSON ({err})") from err
        if isinstance(data, dict) and isinstance(data.get("annotation"), list):
            return data["annotation"]
        if isinstance(data, list):
            return data
        raise ValueError(f"--test_file {path}: expected a list of items or {{'annotation': [...]}}")
    if suffix in (".csv", ".tsv"):
        return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","))
    raise ValueError(f"--test_file {path}: unknown manifest type {suffix!r}; use .jsonl, .json, .csv or .tsv")


def _resolve(base: Path, audio: str) -> str:
    p = Path(audio).expanduser()
    return str(p if p.is_absolute() else (base / p))


def load_manifest(path: str | Path, spec: TaskSpec) -> list[dict]:
    """Items {id, audio, expand_wav, reference, Q, transcript, task} for `spec`, in manifest order.

    Items whose own `task` belongs to another task are skipped. For caption tasks, items with the same audio
    (and question) are merged into one item with a list of references (e.g. AudioCaps' five captions).
    """
    path = Path(path)
    base = path.parent
    items: list[dict] = []
    skipped = 0
    for n, row in enumerate(_read_rows(path)):
        if not isinstance(row, dict):
            raise ValueError(f"--test_file {path}: item {n} is not an object")
        if not task_matches(spec, row.get("task") or None):
            skipped += 1
            continue
        audio = row.get("audio") or row.get("path")
        if not audio or not isinstance(audio, str):
            raise ValueError(f"--test_file {path}: item {n} has no 'audio' (or 'path') file name")
        reference = row["text"] if "text" in row else row.get("reference")  # `reference`: the older name
        if spec.needs_reference and reference in (None, "", []):
            raise ValueError(f"--test_file {path}: item {n} ({audio}) has no 'text' (or 'reference')")
        expand = row.get("expand_wav") or []
        if isinstance(expand, str):
            expand = [expand]
        if row.get("prompt") is not None and not isinstance(row["prompt"], str):
            raise ValueError(f"--test_file {path}: item {n} ({audio}): 'prompt' must be a string, got {row['prompt']!r}")
        q = row.get("Q") or ""
        if spec.needs_question and not q:
            raise ValueError(f"--test_file {path}: item {n} ({audio}) needs a question 'Q' for task {spec.name!r}")
        items.append(
            {
                "id": str(row["id"]) if row.get("id") not in (None, "") else None,
                "audio": _resolve(base, audio),
                "audio_name": audio,
                "expand_wav": [_resolve(base, e) for e in expand],
                "reference": reference,
                "Q": q,
                "transcript": row.get("transcript"),
                "task": row.get("task") or None,
                "prompt": row.get("prompt") or None,
            }
        )
    if skipped:
        logger.info("skipped %d items of other tasks in %s", skipped, path)
    if not items:
        raise ValueError(f"--test_file {path}: no items for task {spec.name!r}")
    if spec.multi_reference:
        items = _merge_references(items)
    return _assign_ids(items, path)


def load_dataset_items(data_args: DatasetArguments, spec: TaskSpec):
    """
    Items of a `datasets` dataset (read as salmonn-train reads one), with `_row` pointing at the row whose audio is
    decoded when its batch comes. Rows of other tasks (a `task` column) are skipped; a caption task takes its
    several references as a list in the text column.
    """
    rows = data_args.load()
    n = len(rows)
    texts, tasks, questions = (rows.column(key) or [None] * n for key in ("text", "task", "Q"))
    where = f"--dataset_name {data_args.dataset_name} (split {data_args.eval_split_name!r})"
    items = []
    for i in range(n):
        if not task_matches(spec, tasks[i] or None):
            continue
        if spec.needs_reference and texts[i] in (None, "", []):
            raise ValueError(f"{where}: row {i} has no reference in column {data_args.text_column_name!r} (see --text_column_name)")
        if spec.needs_question and not questions[i]:
            raise ValueError(f"{where}: row {i} needs a question 'Q' for task {spec.name!r}")
        name = f"{data_args.dataset_name}[{data_args.eval_split_name}]:{i}"
        items.append(
            {"id": None, "audio": name, "audio_name": name, "expand_wav": [], "reference": texts[i], "Q": questions[i] or "",
             "transcript": None, "task": tasks[i] or None, "_row": i}
        )
    if not items:
        raise ValueError(f"{where}: no rows for task {spec.name!r}")
    return _assign_ids(items, where), rows


def _merge_references(items: list[dict]) -> list[dict]:
    merged: dict[tuple, dict] = {}
    for item in items:
        key = (item["audio"], tuple(item["expand_wav"]), item["Q"])
        refs = item["reference"] if isinstance(item["reference"], list) else [item["reference"]]
        if key in merged:
            merged[key]["reference"].extend(refs)
        else:
            merged[key] = {**item, "reference": list(refs)}
    return list(merged.values())


def _assign_ids(items: list[dict], path: Path) -> list[dict]:
    """Explicit ids must be unique; missing ids default to the audio name (as the original), made unique."""
    explicit = [i["id"] for i in items if i["id"] is not None]
    if len(explicit) != len(set(explicit)):
        dup = next(x for x in explicit if explicit.count(x) > 1)
        raise ValueError(f"{path if isinstance(path, str) else f'--test_file {path}'}: id {dup!r} occurs more than once")
    used = set(explicit)
    counts: dict[str, int] = {}
    for item in items:
        if item["id"] is None:
            base = item["audio_name"]
            counts[base] = counts.get(base, 0) + 1
            candidate = base if counts[base] == 1 else f"{base}#{counts[base]}"
            while candidate in used:
                counts[base] += 1
                candidate = f"{base}#{counts[base]}"
            item["id"] = candidate
            used.add(candidate)
    return items


def load_prompt_file(path: str | Path) -> dict[str, str]:
    path = Path(path)
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--prompt_file {path}: cannot read a JSON object ({err})") from err
    if not isinstance(prompts, dict):
        raise ValueError(f"--prompt_file {path}: expected a JSON object {{task: prompt}}")
    for key, value in prompts.items():
        if isinstance(value, list) and len(value) == 1:  # tolerate the training file's list form
            prompts[key] = value = value[0]
        if not isinstance(value, str):
            raise ValueError(f"--prompt_file {path}: the prompt for {key!r} must be a string")
    return prompts


def build_prompt(
    spec: TaskSpec,
    item: dict,
    prompt_file: dict[str, str] | None = None,
    prompt_override: str | None = None,
    prompt_file_name: str = "--prompt_file",
) -> str:
    """The instruction for one item: override, else the item's own `prompt`, else the prompt file's entry (the
    item's own `task` key first, then the task's original keys), else this project's prompt; `{}` is filled with
    the item's `Q`.

    A leading `<Speech><SpeechHere></Speech>` (the original files carry it) is removed: the chat template adds it.
    """
    if prompt_override is not None:
        template = prompt_override
    elif item.get("prompt"):
        template = item["prompt"]
    elif prompt_file is not None:
        keys = [k for k in (item.get("task"), spec.name, *spec.original_keys) if k]
        found = next((k for k in keys if k in prompt_file), None)
        if found is None:
            raise ValueError(f"{prompt_file_name} has no prompt for task {spec.name!r} (tried keys {keys})")
        template = prompt_file[found]
    else:
        template = spec.prompt
    template = template.strip()
    if template.startswith(AUDIO_MARKER):
        template = template[len(AUDIO_MARKER) :].strip()
    if "<SpeechHere>" in template:
        raise ValueError(f"prompt {template!r}: the audio must come first; a marker inside the text is not supported")
    if "{}" in template:
        template = template.replace("{}", item.get("Q") or "")
    if not template:
        raise ValueError(f"empty prompt for item {item.get('id')!r} (a `{{}}` prompt needs the item's 'Q')")
    return template
