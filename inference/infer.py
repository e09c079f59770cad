"""salmonn-infer: answer one instruction (or per-item prompts) about many audio files, in batches, as JSONL.

    salmonn-infer --model_name_or_path PATH_OR_ID [--prompt TEXT] [--output_dir DIR] INPUT...

Each INPUT is an audio file, a folder (searched recursively for audio files), a glob (quote it) or a JSONL/CSV
manifest with the fields `audio`, `prompt` (optional; `--prompt` otherwise), `id` (optional; the audio path
otherwise) and `text` (optional, the reference). Every item gives one JSON line `{"id", "audio", "prompt", "answer",
"seconds", "model", "settings", "audio_hash"}`, or the same with `"error"` instead of the answer when the item cannot
be used, written whole and synced at once. Rerunning into the same `--output_dir` skips the items already answered and
retries the failed ones, so an interrupted run resumes where it stopped; an item whose audio file was replaced since
(another `audio_hash`) is answered again, and answers made with another model, prompt or decoding settings are
refused instead of mixed. The exit status is 1 when items failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from salmonn.audio_hash import AUDIO_HASH_KEY, AudioHashes
from salmonn.cli import setup_logging
from salmonn.extras import missing_extra_message
from salmonn.jsonl import split_jsonl

from .options import DEFAULT_PROMPT, PREDICTIONS_FILE, DatasetArguments, DatasetPromptItems, RunArguments, load_for_engine, model_identity
from .output import OutputWriteError, JsonlWriter, check_overwritable, check_resumable, lock_output, read_records


logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".snd", ".w64", ".caf")
MANIFEST_EXTENSIONS = (".jsonl", ".csv")
_BOOL_WORDS = {"true", "false", "yes", "no", "t", "f", "y", "n", "1", "0"}


@dataclass
class InferArguments:
    """salmonn-infer's own options; the rest are `RunArguments` and `DatasetArguments`, shared with salmonn-eval."""

    prompt: str = field(
        default=DEFAULT_PROMPT,
        metadata={
            "help": "Instruction for every item without a manifest prompt; it is wrapped in the chat template "
            "('USER: <Speech><SpeechHere></Speech> {prompt}\\nASSISTANT:'). A prompt that already holds <SpeechHere> "
            "markers is wrapped as it is."
        },
    )
    output: str | None = field(
        default=None,
        metadata={
            "help": f"The older spelling of --output_dir for a file: the JSONL file itself (--output_dir D writes "
            f"D/{PREDICTIONS_FILE}). Without either, or with '-', the records go to stdout."
        },
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the examples' line breaks."""


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        (RunArguments, InferArguments, DatasetArguments),
        prog="salmonn-infer",
        allow_abbrev=False,
        formatter_class=_HelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog=(
            "examples:\n"
            "  salmonn-infer --model_name_or_path ./salmonn-13b --prompt 'Transcribe the speech.' clips/ --output_dir asr\n"
            "  salmonn-infer --model_name_or_path ./salmonn-13b 'data/**/*.flac' --batch_size 16 --dtype bfloat16\n"
            "  salmonn-infer --model_name_or_path ./salmonn-13b --test_file manifest.jsonl --num_beams 1 --max_new_tokens 64\n"
            "  salmonn-infer --model_name_or_path ./salmonn-13b clip.wav --stream --prompt 'What happens in this recording?'\n"
            "  salmonn-infer --model_name_or_path ./salmonn-13b --dataset_name ./librispeech_test --eval_split_name test "
            "--output_dir asr"
        ),
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="Audio files, folders (searched recursively for " + ", ".join(AUDIO_EXTENSIONS) + "), globs, or "
        "JSONL/CSV manifests (as --test_file) with the fields audio, prompt, id and text (all but audio optional; "
        "text is copied into the record as its reference). Relative audio paths in a manifest are relative to the "
        "manifest's folder.",
    )
    return parser


def _bool_flags(parser) -> set[str]:
    return {
        option
        for action in parser._actions
        if action.nargs == "?" and action.const is True
        for option in action.option_strings
    }


def _split_bool_flags(argv: list[str], flags: set[str]) -> list[str]:
    """`--stream clip.wav` would read clip.wav as the flag's value; make such flags explicit (`--stream=true`)."""
    out = []
    for i, token in enumerate(argv):
        if token in flags and (i + 1 == len(argv) or argv[i + 1].lower() not in _BOOL_WORDS):
            token = f"{token}=true"
        out.append(token)
    return out


# ------------------------------------------------------------------------------------------------ inputs


def _is_audio_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in AUDIO_EXTENSIONS


def _read_manifest(path: Path, default_prompt: str) -> list[dict]:
    """Rows of a JSONL or CSV manifest as items; a malformed row raises `ValueError` naming file and line."""
    rows: list[tuple[int, dict]] = []
    try:
        if path.suffix.lower() == ".jsonl":
            for number, line in split_jsonl(path.read_text(encoding="utf-8-sig")):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"manifest {str(path)!r} line {number}: not valid JSON ({err})") from err
                if not isinstance(row, dict):
                    raise ValueError(f"manifest {str(path)!r} line {number}: expected a JSON object, got {row!r}")
                rows.append((number, row))
        else:
            with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets start CSV with a byte-order mark
                reader = csv.DictReader(f)
                if reader.fieldnames is None or not {"audio", "path"} & set(reader.fieldnames):
                    raise ValueError(
                        f"manifest {str(path)!r}: the CSV header must have an 'audio' (or 'path') column, got {reader.fieldnames}"
                    )
                rows.extend((number, row) for number, row in enumerate(reader, start=2))
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"manifest {str(path)!r}: cannot read it: {err}") from err

    if not rows:
        raise ValueError(f"manifest {str(path)!r} holds no items")
    items = []
    for number, row in rows:
        audio = row.get("audio") or row.get("path")  # `path`: the older name of the field
        if not isinstance(audio, str) or not audio.strip():
            raise ValueError(f"manifest {str(path)!r} line {number}: needs an 'audio' (or 'path') file, got {audio!r}")
        audio_path = Path(audio).expanduser()
        if not audio_path.is_absolute():
            audio_path = path.parent / audio_path
        prompt = row.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"manifest {str(path)!r} line {number}: 'prompt' must be a string, got {prompt!r}")
        item_id = row.get("id")
        if item_id is not None and not isinstance(item_id, (str, int)):
            raise ValueError(f"manifest {str(path)!r} line {number}: 'id' must be a string or an integer, got {item_id!r}")
        item = {
            "id": str(item_id) if item_id not in (None, "") else None,
            "audio": str(audio_path),
            "prompt": prompt if prompt else default_prompt,
            "_default_id": audio,
            "_where": f"manifest {str(path)!r} line {number}",
        }
        text = row.get("text", row.get("reference"))  # `reference`: the older name of the field
        if text not in (None, ""):
            item["reference"] = text
        items.append(item)
    return items


def expand_inputs(inputs: list[str], default_prompt: str) -> list[dict]:
    """
    Items `{"id", "audio", "prompt"}` from files, folders, globs and manifests, in the order given (folders and
    globs sorted). An audio file reached twice through files, folders or globs is kept once; ids are unique.
    """
    if not inputs:
        raise ValueError("no INPUT given: pass audio files, folders, globs or JSONL/CSV manifests")
    items: list[dict] = []
    seen_files: set[str] = set()

    def add_file(path: Path, as_given: str):
        key = str(path.resolve())
        if key in seen_files:
            logger.info("Skipping %s: already listed", as_given)
            return
        seen_files.add(key)
        items.append({"id": None, "audio": str(path), "prompt": default_prompt, "_default_id": as_given, "_where": as_given})

    for given in inputs:
        path = Path(given).expanduser()
        if path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
            items.extend(_read_manifest(path, default_prompt))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if _is_audio_file(p))
            if not found:
                raise ValueError(f"INPUT {given!r}: the folder holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
            for p in found:
                add_file(p, str(p))
        elif path.exists():
            add_file(path, given)  # any file: one that does not decode becomes an error line
        elif glob.has_magic(given):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(given), recursive=True))
            found = [p for p in matches if p.is_file()]
            if not found:
                raise ValueError(f"INPUT {given!r}: the glob matches no file")
            for p in found:
                if p.suffix.lower() in MANIFEST_EXTENSIONS:
                    items.extend(_read_manifest(p, default_prompt))
                else:
                    add_file(p, str(p))
        elif path.is_symlink():
            from modeling_salmonn.feature_extraction_salmonn import why_missing

            raise ValueError(f"INPUT {given!r} {why_missing(path)}")
        else:
            raise ValueError(f"INPUT {given!r}: no such file or folder, and not a glob")

    # Explicit ids must be unique; default ids (the audio path) get a #2, #3 ... suffix when repeated.
    used: dict[str, str] = {}
    for item in items:
        if item["id"] is not None:
            if item["id"] in used:
                raise ValueError(f"{item['_where']}: id {item['id']!r} is already used by {used[item['id']]}")
            used[item["id"]] = item["_where"]
    for item in items:
        if item["id"] is None:
            base, candidate, k = item["_default_id"], item["_default_id"], 1
            while candidate in used:
                k += 1
                candidate = f"{base}#{k}"
            item["id"] = candidate
            used[candidate] = item["_where"]
    return [{key: item[key] for key in ("id", "audio", "prompt", "reference") if key in item} for item in items]


# ------------------------------------------------------------------------------------------------ output


def _stream_one(model, processor, item: dict, generation_kwargs: dict, to_stdout: bool) -> dict:
    from .engine import stream_answer

    record = {"id": item["id"], "audio": item["audio"], "prompt": item["prompt"]}
    out = sys.stdout if to_stdout else sys.stderr
    pieces = []
    start = time.perf_counter()
    try:
        for piece in stream_answer(model, processor, item, generation_kwargs):
            pieces.append(piece)
            out.write(piece)
            out.flush()
    except ValueError as err:
        logger.warning("%s", err)
        record["error"] = str(err)
        return record
    out.write("\n")
    out.flush()
    record["answer"] = "".join(pieces).strip()
    record["seconds"] = round(time.perf_counter() - start, 4)
    return record


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, infer_args, data_args, extra, remaining = parser.parse_args_into_dataclasses(
        args=_split_bool_flags(argv, _bool_flags(parser)), return_remaining_strings=True, look_for_args_file=False
    )
    unknown = [token for token in remaining if token.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.model_name_or_path is None:
        parser.error("--model_name_or_path (or --model) is required")
    inputs = list(extra.inputs) + [token for token in remaining if not token.startswith("-")]
    if data_args.test_file is not None:
        inputs.append(data_args.test_file)
    try:
        return _run(args, infer_args, data_args, inputs)
    except ImportError as err:
        message = missing_extra_message(err, "salmonn-infer")
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


def output_path(args: RunArguments, infer_args: InferArguments) -> Path | None:
    """The JSONL file: `--output_dir`/predictions.jsonl, or the file `--output` names, or None for stdout."""
    if args.output_dir is not None and infer_args.output is not None:
        raise ValueError("give --output_dir (a folder) or --output (a file), not both")
    if infer_args.output == "-":  # the usual spelling of stdout, not a file named '-'
        return None
    if infer_args.output is not None:
        return Path(infer_args.output)
    if args.output_dir is None:
        return None
    folder = Path(args.output_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output_dir {str(folder)!r} is a file, not a folder (--output FILE names a file)")
    return folder / PREDICTIONS_FILE


def _items(args: RunArguments, infer_args: InferArguments, data_args: DatasetArguments, inputs: list[str]):
    if data_args.dataset_name is not None:
        if inputs:
            raise ValueError(f"give INPUT files (or --test_file) or --dataset_name, not both (got {len(inputs)} INPUT)")
        return DatasetPromptItems(data_args.load(), infer_args.prompt)
    items = expand_inputs(inputs, infer_args.prompt)
    if args.stream and len(items) != 1:
        raise ValueError(f"--stream answers a single item, but the inputs give {len(items)}")
    return items


def _run(args: RunArguments, infer_args: InferArguments, data_args: DatasetArguments, inputs: list[str]) -> int:
    try:
        args.check()
        generation_kwargs = args.generation_kwargs()
        output = output_path(args, infer_args)
        items = _items(args, infer_args, data_args, inputs)
        if args.stream:
            if generation_kwargs.get("num_beams", 1) != 1:
                raise ValueError("--stream cannot be used with --num_beams > 1 (transformers cannot stream beam search)")
            generation_kwargs["num_beams"] = 1
        if output is not None and args.overwrite_output_dir:
            sources = [] if isinstance(items, DatasetPromptItems) else [item["audio"] for item in items]
            check_overwritable(output, inputs + sources)
        output_lock = lock_output(output) if output is not None else None
    except (ValueError, OSError) as err:
        logger.error("%s", err)
        return 2
    try:  # the lock is held until the run ends
        return _resume_and_answer(args, infer_args, items, generation_kwargs, output)
    finally:
        if output_lock is not None:
            output_lock.close()


def _changed_audio(output: Path, records: dict[str, dict], items: list[dict], hashes: AudioHashes) -> set[str]:
    """Ids answered for audio that has since changed under the same file name: they are answered again."""
    changed = {
        item["id"] for item in items
        if "answer" in records.get(item["id"], {}) and hashes.changed(records[item["id"]], [item["audio"]])
    }
    if changed:
        logger.warning(
            "%d answered items have other audio content now (the file was replaced); answering them again into %s: %s",
            len(changed), output, ", ".join(sorted(changed)[:10]),
        )
    return changed


def _resume_and_answer(args: RunArguments, infer_args: InferArguments, items, generation_kwargs: dict, output: Path | None) -> int:
    run = {"model": model_identity(args.model_name_or_path), "settings": args.settings()}
    hashes = AudioHashes()
    done_ids: set[str] = set()
    if output is not None and not args.overwrite_output_dir:
        try:
            records = read_records(output)
            is_dataset = isinstance(items, DatasetPromptItems)
            check_resumable(output, records, None if is_dataset else items, run, infer_args.prompt if is_dataset else None)
        except (ValueError, OSError) as err:
            logger.error("%s", err)
            return 2
        done_ids = {key for key, record in records.items() if "answer" in record}
        if not is_dataset:
            done_ids -= _changed_audio(output, records, items, hashes)

    # A dataset is read row by row as it is answered: the engine skips the rows already done.
    todo = items if isinstance(items, DatasetPromptItems) and not args.stream else [item for item in items if item["id"] not in done_ids]
    if done_ids and not isinstance(todo, DatasetPromptItems):
        logger.info("Resuming: %d of %d items are already answered in %s", len(items) - len(todo), len(items), output)
    if not todo:
        logger.info("Nothing to do")
        return 0

    from transformers import set_seed

    from .engine import run_items

    set_seed(args.seed)
    try:
        model, processor, sampling_params = load_for_engine(args, generation_kwargs)
    except (ValueError, OSError) as err:
        logger.error("Cannot load --model_name_or_path %s: %s", args.model_name_or_path, err)
        return 2
    if args.max_audio_seconds is not None:
        processor.feature_extractor.max_audio_seconds = args.max_audio_seconds

    # The manifests' reference texts go into the records (a dataset's are collected as its rows are read).
    references = items.references if isinstance(items, DatasetPromptItems) else {i["id"]: i["reference"] for i in items if "reference" in i}
    audio_files = {} if isinstance(items, DatasetPromptItems) else {i["id"]: i["audio"] for i in items}
    writer = JsonlWriter(output, overwrite=args.overwrite_output_dir)
    counts = {"answer": 0, "error": 0}
    start = time.perf_counter()
    try:
        if args.engine == "vllm":
            from .vllm_engine import run_items_vllm

            records = run_items_vllm(model, processor, todo, sampling_params, progress=not args.disable_tqdm)
        elif args.stream:
            records = [_stream_one(model, processor, todo[0], generation_kwargs, to_stdout=output is not None)]
        else:
            records = run_items(
                model, processor, todo, batch_size=args.batch_size, generation_kwargs=generation_kwargs,
                done_ids=frozenset(done_ids), progress=not args.disable_tqdm,
            )
        for record in records:
            if record["id"] in references:
                record["reference"] = references.pop(record["id"])
            if record["id"] in audio_files:
                record[AUDIO_HASH_KEY] = hashes([audio_files[record["id"]]])
            writer.write({**record, **run})
            counts["error" if "error" in record else "answer"] += 1
    except KeyboardInterrupt:
        logger.warning("Interrupted after %d items; rerun the same command to resume", sum(counts.values()))
        return 130
    except OutputWriteError as err:
        logger.error("%s", err)
        return 1
    finally:
        writer.close()
    elapsed = time.perf_counter() - start
    logger.info(
        "%d answered, %d failed, %d skipped in %.1f s%s",
        counts["answer"],
        counts["error"],
        len(items) - len(todo),
        elapsed,
        f"; results in {output}" if output else "",
    )
    if counts["error"]:
        logger.error(
            "%d of %d items failed (see their error records%s); a rerun of the same command retries them",
            counts["error"], sum(counts.values()), f" in {output}" if output else "",
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
