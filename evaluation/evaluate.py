"""Evaluate SALMONN on the paper's tasks.

    salmonn-eval --model_name_or_path PATH_OR_ID --task asr --test_file test.jsonl --output_dir out/asr
    salmonn-eval --task asr --predictions out/asr/predictions.jsonl          # score only, no model
    salmonn-eval --compare out/asr_a out/asr_b                              # two result folders side by side
    salmonn-eval --model_name_or_path PATH_OR_ID --task asr --dataset_name NAME --eval_split_name test --output_dir out/asr

The manifest (`--test_file`) is JSONL, CSV/TSV or JSON (a list, or the original `{"annotation": [...]}` form)
with `audio` (or `path`; relative to the manifest allowed), `text` (or `reference`) and optional `id`, `prompt`,
`Q`, `task`, `transcript` (the spoken words, used by the following-rate judge) and `expand_wav` (more files
appended after 0.1 s of silence, as the original does for speaker verification).

The output folder gets `predictions.jsonl` (one line per item, appended as answers arrive, so an interrupted run
resumes where it stopped; failed items are tried again, an item whose audio file was replaced since (another
`audio_hash`) is answered again, and answers made with another model, prompt, decoding settings or data are refused), `run_config.json` (once the run goes ahead), `results.json` and `results.md`
(written once complete). Decoding uses the model's generation config (the original settings: beam 4, 200 new
tokens) unless the decoding flags, shared with salmonn-infer, say otherwise.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from salmonn.audio import TARGET_SAMPLING_RATE, join_with_silence, load_mono_16k
from salmonn.audio_hash import AUDIO_HASH_KEY, AudioHashes
from salmonn.cli import setup_logging
from salmonn.extras import missing_extra_message
from salmonn.inference.options import PREDICTIONS_FILE, DatasetArguments, RunArguments, load_for_engine, model_identity, row_audio
from salmonn.jsonl import dumps_record

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
    """salmonn-eval's own options; the model, decoding, output and data options are shared with salmonn-infer."""

    task: str | None = field(
        default=None, metadata={"help": f"Task to evaluate: one of {', '.join(TASKS)} (or an original prompt key)."}
    )
    output: str | None = field(default=None, metadata={"help": "The older spelling of --output_dir."})
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
            "`{}` is filled with the item's `Q`. Default: the item's own `prompt`, else this project's prompts."
        },
    )
    prompt: str | None = field(default=None, metadata={"help": "One instruction for every item (overrides the others)."})
    dataset: str | None = field(
        default=None,
        metadata={"help": "Which of the paper's test sets to compare against (default: all of the task's)."},
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N items."})
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


# --------------------------------------------------------------------------------------------------------
# Manifest and prompts


# --------------------------------------------------------------------------------------------------------
# Running the model


def _load_joined_audio(item: dict):
    """
    Main audio + `expand_wav` files, channel 0, 16 kHz, joined by 0.1 s of silence (the original's layout); each file
    decoded in bounded blocks as salmonn-infer decodes its inputs.
    """
    parts = [item["audio"], *item["expand_wav"]]
    return join_with_silence([(load_mono_16k(path, f"item {item.get('id')!r}"), TARGET_SAMPLING_RATE) for path in parts])[0]


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


def _record(item: dict, prompt: str, hypothesis: str | None, hashes: AudioHashes, **extra) -> dict:
    record = {"id": item["id"], "prompt": prompt, "reference": item["reference"], "hypothesis": hypothesis}
    for key in ("Q", "transcript"):
        if item.get(key):
            record[key] = item[key]
    record["audio"] = item["audio_name"]
    record["data"] = item_identity(item)
    if "_row" not in item:  # a dataset row is known by its dataset, split and index only
        record[AUDIO_HASH_KEY] = hashes(_audio_files(item))
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


def item_identity(item: dict) -> str:
    """
    What an answer was given to, as a short hash recorded with it: the audio file(s) as resolved, the reference and
    the question. A resumed run compares it, so that another manifest naming the same files is not scored with
    answers made for the first one.
    """
    content = [item["audio"], item["expand_wav"], item["reference"], item["Q"]]
    return hashlib.sha256(json.dumps(content, ensure_ascii=True).encode("ascii")).hexdigest()[:16]


def _audio_files(item: dict) -> list[str]:
    return [item["audio"], *item["expand_wav"]]


# What run_config.json keys a resumed run must share with the run that made the predictions.
RESUME_KEYS = ("task", "model", "generation_kwargs", "lora_scaling", "engine", "seed")


def _previous_answers(
    output: Path, pred_path: Path, config_path: Path, current: dict, items, prompts, hashes: AudioHashes
) -> set[str]:
    """
    Ids answered by an earlier run of the same settings on the same data; anything else is refused, but for audio
    files replaced under the same name: their items are answered again.
    """
    way_out = "use another --output_dir, or --overwrite_output_dir to start afresh"
    previous = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    for key in RESUME_KEYS:
        if key in previous and previous[key] != current.get(key):
            raise ValueError(
                f"--output_dir {output} holds predictions made with {key}={previous[key]!r}, not {current.get(key)!r}; "
                f"{way_out}"
            )
    latest = latest_by_id(read_predictions(pred_path, repair_tail=True))
    done, changed = set(), []
    for item in items:
        record = latest.get(item["id"])
        if record is None or record.get("hypothesis") is None:
            continue  # failed items are tried again
        if record.get("prompt") != prompts[item["id"]]:
            raise ValueError(
                f"--output_dir {output}: item {item['id']!r} was answered with another prompt "
                f"({record.get('prompt')!r}); {way_out}"
            )
        if record.get("data") != item_identity(item):
            raise ValueError(
                f"--output_dir {output}: item {item['id']!r} was answered for other data (another audio file, "
                f"reference or question under the same id); {way_out}"
            )
        if "_row" not in item and hashes.changed(record, _audio_files(item)):
            changed.append(item["id"])
            continue
        done.add(item["id"])
    if changed:
        logger.warning(
            "%d answered items have other audio content now (the file was replaced); answering them again: %s",
            len(changed), ", ".join(changed[:10]),
        )
    logger.info("resuming: %d of %d items already answered in %s", len(done), len(items), pred_path)
    return done


def _refuse_data_among_outputs(output: Path, data: str | None) -> None:
    """The manifest must not be one of the files this run writes (it would be replaced by answers or results)."""
    if data is None or not Path(data).is_file():
        return
    for name in (PREDICTIONS_FILE, "run_config.json", "results.json", "results.md"):
        target = output / name
        if target.exists() and os.path.samefile(target, data):
            raise ValueError(
                f"--test_file {data} is {target}, a file salmonn-eval writes in --output_dir; give another --output_dir"
            )


def _stream_items(model, processor, items, generation_kwargs: dict) -> Iterator[dict]:
    """`--stream`: the items one at a time, each answer printed to stderr as it is generated."""
    engine = importlib.import_module("salmonn.inference.engine")
    for item in items:
        record = {"id": item["id"], "prompt": item["prompt"]}
        try:
            pieces = []
            for piece in engine.stream_answer(model, processor, item, generation_kwargs):
                pieces.append(piece)
                sys.stderr.write(piece)
                sys.stderr.flush()
            sys.stderr.write("\n")
            record["answer"] = "".join(pieces).strip()
        except ValueError as err:
            record["error"] = str(err)
        yield record


def run_evaluation(
    run: RunArguments, args: EvalArguments, spec: TaskSpec, data_args: DatasetArguments | None = None
) -> dict[str, Any]:
    scoring = _scoring_options(args, spec)
    run.check()
    if args.limit is not None and args.limit < 1:  # items[:-1] would silently drop the last item
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    rows = None
    if data_args is not None and data_args.dataset_name is not None:
        items, rows = load_dataset_items(data_args, spec)
    else:
        items = load_manifest(data_args.test_file, spec)
    if args.limit is not None:
        items = items[: args.limit]
    prompt_file = load_prompt_file(args.prompt_file) if args.prompt_file else None
    prompts = {
        i["id"]: build_prompt(spec, i, prompt_file, args.prompt, f"--prompt_file {args.prompt_file}") for i in items
    }
    generation_kwargs = {**spec.generation_overrides, **run.generation_kwargs()}
    if run.stream:
        if generation_kwargs.get("num_beams", 1) != 1:
            raise ValueError("--stream cannot be used with --num_beams > 1 (transformers cannot stream beam search)")
        if run.engine == "vllm":
            raise ValueError("--stream needs --engine transformers")
        generation_kwargs["num_beams"] = 1
    settings = {
        "model": model_identity(run.model_name_or_path),
        "data": str(data_args.test_file) if rows is None else f"{data_args.dataset_name}[{data_args.eval_split_name}]",
        "prompt_source": "--prompt" if args.prompt else (args.prompt_file or "salmonn-eval defaults"),
        "generation_kwargs": generation_kwargs or "model generation_config",
        "lora_scaling": run.lora_scaling,
        "engine": run.engine,
        "seed": run.seed if run.do_sample else None,
        "normalizer": args.normalizer,
        "spelling_mapping": args.spelling_mapping or "whisper",
        "judge": args.judge or "string match",
    }

    output = Path(run.output_dir)
    pred_path = output / PREDICTIONS_FILE
    config_path = output / "run_config.json"
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output_dir {output} is a file, not a folder")
    _refuse_data_among_outputs(output, data_args.test_file if data_args is not None else None)
    done: set[str] = set()
    hashes = AudioHashes()
    if pred_path.exists() and not run.overwrite_output_dir:
        done = _previous_answers(output, pred_path, config_path, {"task": spec.name, **settings}, items, prompts, hashes)

    todo = [i for i in items if i["id"] not in done]
    if todo:
        from transformers import set_seed

        set_seed(run.seed)
        try:
            model, processor, sampling_params = load_for_engine(run, generation_kwargs)
        except OSError as err:
            raise ValueError(f"Cannot load --model_name_or_path {run.model_name_or_path}: {err}") from err
        if run.max_audio_seconds is not None:
            processor.feature_extractor.max_audio_seconds = run.max_audio_seconds
    # Written only now that the run goes ahead: a run refused or failing before this point leaves nothing behind.
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, json.dumps({"task": spec.name, **settings}, indent=2) + "\n")
    if todo:
        _answer(run, model, processor, sampling_params, generation_kwargs, items, todo, prompts, rows, pred_path, done, hashes)

    latest = latest_by_id(read_predictions(pred_path))
    records = []
    for item in items:
        record = dict(latest.get(item["id"]) or _record(item, prompts[item["id"]], None, hashes, error="no prediction"))
        record["reference"] = item["reference"]
        records.append(record)
    results = evaluate_records(spec, records, settings=settings, **scoring)
    write_results(output, results)
    return results


def _answer(
    run, model, processor, sampling_params, generation_kwargs, items, todo, prompts, rows, pred_path, done, hashes
) -> None:
    """Answers `todo` into predictions.jsonl, a resumable log: one complete line per answer, flushed as it arrives."""
    by_id = {i["id"]: i for i in items}
    with open(pred_path, "w" if run.overwrite_output_dir else "a", encoding="utf-8") as log:

        def write(record: dict) -> None:
            log.write(dumps_record(record) + "\n")
            log.flush()

        def on_error(item: dict, message: str) -> None:
            logger.error("item %s: %s", item["id"], message)
            write(_record(item, prompts[item["id"]], None, hashes, error=message))

        model_items = _ModelItems(todo, prompts, on_error, rows)
        if run.engine == "vllm":
            vllm_engine = importlib.import_module("salmonn.inference.vllm_engine")
            results = vllm_engine.run_items_vllm(model, processor, model_items, sampling_params, not run.disable_tqdm)
        elif run.stream:
            results = _stream_items(model, processor, model_items, generation_kwargs)
        else:
            results = importlib.import_module("salmonn.inference.engine").run_items(
                model,
                processor,
                model_items,
                batch_size=run.batch_size,
                generation_kwargs=generation_kwargs or None,
                done_ids=frozenset(done),
                progress=not run.disable_tqdm,
            )
        for out in results:
            item = by_id[out["id"]]
            if "error" in out:
                on_error(item, out["error"])
            else:
                write(_record(item, out["prompt"], out["answer"], hashes, seconds=out.get("seconds")))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = HfArgumentParser((RunArguments, EvalArguments, DatasetArguments), prog="salmonn-eval", allow_abbrev=False)
    run, args, data_args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if run.output_dir is None:
        run.output_dir = args.output
    elif args.output is not None:
        parser.error("give --output_dir (or its older spelling --output), not both")
    try:
        return _main(parser, run, args, data_args)
    except ImportError as err:
        message = missing_extra_message(err, "salmonn-eval", preferred_extra="eval")
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


def _main(parser: HfArgumentParser, run: RunArguments, args: EvalArguments, data_args: DatasetArguments) -> int:
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
            if run.model_name_or_path is not None:
                raise ValueError("--predictions scores existing answers; do not pass --model_name_or_path with it")
            settings = {
                "predictions": args.predictions,
                "normalizer": args.normalizer,
                "spelling_mapping": args.spelling_mapping or "whisper",
                "judge": args.judge or "string match",
            }
            records = list(latest_by_id(read_predictions(args.predictions)).values())
            results = evaluate_records(spec, records, settings=settings, **_scoring_options(args, spec))
            if run.output_dir:
                write_results(Path(run.output_dir), results)
        else:
            if data_args.test_file is not None and data_args.dataset_name is not None:
                raise ValueError("give --test_file (or --data) or --dataset_name, not both")
            missing = [f"--{n}" for n in ("model_name_or_path", "output_dir") if getattr(run, n) is None]
            if data_args.test_file is None and data_args.dataset_name is None:
                missing.append("--test_file (or --dataset_name)")
            if missing:
                raise ValueError(f"{', '.join(missing)} required (or --predictions FILE to score existing answers)")
            results = run_evaluation(run, args, spec, data_args)
    except ValueError as err:
        parser.error(str(err))
    print(results_markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
