"""Options that salmonn-infer and salmonn-eval share, so that both spell, default and check them the same way."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


DTYPE_CHOICES = ("float32", "bfloat16", "float16")
QUANTIZE_CHOICES = ("int8", "8bit", "4bit")


@dataclass
class DatasetArguments:
    """A `datasets` dataset instead of files: read as `salmonn-train` reads it (`load_hf_dataset`)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` dataset: a Hub name or a folder written by save_to_disk."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    split: str = field(default="test", metadata={"help": "Split of --dataset_name to read."})
    audio_column: str = field(default="audio", metadata={"help": "Column with the audio (Audio feature, path or array)."})
    text_column: str = field(
        default="text", metadata={"help": "Column with the reference text (scored by salmonn-eval, copied by salmonn-infer)."}
    )

    def load(self):
        """The rows as `salmonn.training.data.HFDatasetItems` (audio decoded only when a row is read)."""
        from salmonn.training.data import load_hf_dataset

        return load_hf_dataset(
            self.dataset_name, self.dataset_config_name, split=self.split, audio_column=self.audio_column,
            text_column=self.text_column,
        )


def load_for_engine(args, generation_kwargs: dict) -> tuple:
    """
    The model and processor for `args.engine` (salmonn-infer's and salmonn-eval's model options), with the vLLM
    sampling parameters (`None` for transformers, whose `generate` takes `generation_kwargs` itself).
    """
    if args.engine == "vllm":
        from .vllm_engine import load_llm_and_processor

        return load_llm_and_processor(args, generation_kwargs)
    from .engine import load_model_and_processor

    model, processor = load_model_and_processor(
        args.model,
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
