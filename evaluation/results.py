"""What salmonn-eval writes: the resumable predictions log, the scores, and the results reports (and their comparison)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from .tasks import METRIC_LABELS, TaskSpec, paper_values, score_task


logger = logging.getLogger(__name__)


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


def check_record_fields(spec: TaskSpec, records: list[dict]) -> None:
    """
    The text fields scoring reads, checked with the item named: a `hypothesis` is a string (or null for a failed
    item), a `reference` a string or a list of strings (speaker verification also takes true/false or 1/0).
    """
    for record in records:
        hypothesis, reference = record.get("hypothesis"), record.get("reference")
        if hypothesis is not None and not isinstance(hypothesis, str):
            raise ValueError(
                f"item {record.get('id')!r}: 'hypothesis' must be a string (or null for a failed item), got "
                f"{type(hypothesis).__name__} {hypothesis!r}"
            )
        texts = reference if isinstance(reference, list) else [reference]
        allowed = (str, bool, int) if spec.kind == "verification" else (str,)
        if reference is not None and not all(isinstance(text, allowed) for text in texts):
            raise ValueError(
                f"item {record.get('id')!r}: 'reference' must be a string or a list of strings, got "
                f"{type(reference).__name__} {reference!r}"
            )


def latest_by_id(records: list[dict]) -> dict[str, dict]:
    return {str(r["id"]): r for r in records}


def atomic_write_text(path: Path, text: str) -> None:
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
    check_record_fields(spec, records)
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
    atomic_write_text(output / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(output / "results.md", results_markdown(results))


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
