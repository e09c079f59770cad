"""
salmonn-train: the paper's three training stages on the `transformers` Trainer.

    salmonn-train --stage pretrain --model_name_or_path converted/ --train_file asr_aac.json --output_dir stage1/
    salmonn-train --stage instruct --model_name_or_path stage1/ --train_file instruct.json --output_dir stage2/
    salmonn-train --stage activation --model_name_or_path stage2/ --train_file story_clips.json --output_dir stage3/
    torchrun --nproc_per_node 8 -m salmonn.training.train --stage pretrain ...              # DDP
    accelerate launch --config_file training/recipes/accelerate_deepspeed_zero2.yaml -m salmonn.training.train ...

The recipe of the stage (`training/recipes/{stage}.yaml`: the paper's optimiser, schedule and batch size) gives the
defaults; a YAML or JSON file of arguments given first (`salmonn-train my_run.yaml --seed 3`) overrides the recipe, and
flags on the command line override both. Every `TrainingArguments` flag works. `--output_dir` (new or empty, unless
`--resume_from_checkpoint` or `--overwrite_output_dir`) receives the model and its processor (ready for `AutoModel` /
`AutoProcessor` with `trust_remote_code=True`) and `salmonn_trainable.safetensors`, the trainable weights alone (apply
it to a converted base with `python -m salmonn.training.export`), and `adapter/`, the same as a PEFT adapter of the
starting model (`PeftModel.from_pretrained`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from salmonn.cli import setup_logging as cli_setup_logging


logger = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
STAGES = ("pretrain", "instruct", "activation")
ADAPTER_DIR = "adapter"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=None,
        metadata={
            "aliases": ["--model"],
            "help": "A converted or previously trained SALMONN folder or Hub id (loaded with trust_remote_code).",
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the loaded weights: float32 (with --bf16/--fp16 for mixed precision), bfloat16, float16 or auto.",
            "choices": ["float32", "bfloat16", "float16", "auto"],
            "aliases": ["--model_dtype"],
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of --model_name_or_path."})
    cache_dir: str | None = field(default=None, metadata={"help": "Hugging Face cache folder for downloads."})
    init_trainable_from: str | None = field(
        default=None,
        metadata={"help": "A salmonn_trainable.safetensors export loaded into the model before training starts."},
    )


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a JSONL, JSON list or CSV/TSV manifest with the fields audio (path; `path` is "
            "accepted too), text (the answer), prompt or task (+ Q), id; the original annotation JSON "
            "({\"annotation\": [...]}); or a folder written by datasets' save_to_disk. For --stage activation: the "
            "clips to write stories about (their text is not used)."
        },
    )
    validation_file: str | None = field(default=None, metadata={"help": "Validation data, same formats as --train_file."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` dataset (name or local folder) to train on instead of --train_file."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_split_name: str = field(
        default="train",
        metadata={"help": "Split of --dataset_name (or of a DatasetDict folder) to train on.", "aliases": ["--train_split"]},
    )
    validation_split_name: str | None = field(
        default=None, metadata={"help": "Split used for validation, if any.", "aliases": ["--validation_split"]}
    )
    audio_column_name: str = field(
        default="audio",
        metadata={
            "help": "Column of a `datasets` dataset with the audio (Audio feature, path or array).",
            "aliases": ["--audio_column"],
        },
    )
    text_column_name: str = field(default="text", metadata={"help": "Column with the answer.", "aliases": ["--text_column"]})
    prompt_column_name: str = field(
        default="prompt",
        metadata={"help": "Column with an item's own instruction (used instead of its task's prompts when present)."},
    )
    task_column_name: str = field(
        default="task",
        metadata={"help": "Column with the task name (missing -> --default_task).", "aliases": ["--task_column"]},
    )
    question_column_name: str = field(
        default="Q",
        metadata={"help": "Column with the question that fills `{}` in prompts.", "aliases": ["--question_column"]},
    )
    id_column_name: str | None = field(
        default=None, metadata={"help": "Column with example ids (default: row numbers).", "aliases": ["--id_column"]}
    )
    default_task: str = field(default="asr", metadata={"help": "Task of items that name none (the original's default)."})
    prompt_file: str | None = field(
        default=None,
        metadata={"help": "JSON {task: [prompts]} in the original form; replaces the built-in pool of every task it names."},
    )
    audio_root: str | None = field(
        default=None, metadata={"help": "Folder that relative audio paths start from (default: the manifest's folder)."}
    )
    max_txt_len: int = field(
        default=300, metadata={"help": "Longest answer in tokens, </s> included; longer answers are cut at their end."}
    )
    truncate_audio: bool = field(
        default=True,
        metadata={"help": "Use only the first 30 s of each clip (the original). false: longer audio becomes several 30 s segments."},
    )
    strict_data: bool = field(
        default=False, metadata={"help": "Stop with an error at the first bad item instead of skipping bad items with a warning."}
    )
    verify_audio: bool = field(
        default=True, metadata={"help": "Check every audio file's header before training (finds unreadable files early)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training items."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation items."})


@dataclass
class SalmonnArguments:
    stage: str = field(
        default=None,
        metadata={
            "help": "Training stage; its recipe in training/recipes/ gives the defaults.",
            "choices": list(STAGES),
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an --output_dir that holds an earlier one: its checkpoint-N/ and data_order/ "
            "are removed first and its other files replaced. Without it a non-empty --output_dir is refused "
            "(continue the run there with --resume_from_checkpoint last)."
        },
    )
    lr_schedule: str = field(
        default="salmonn",
        metadata={
            "help": "salmonn: linear warm-up from --warmup_start_lr to --learning_rate over --warmup_steps, then cosine "
            "to --min_lr (the original). trainer: the Trainer's --lr_scheduler_type.",
            "choices": ["salmonn", "trainer"],
        },
    )
    warmup_start_lr: float = field(default=1e-6, metadata={"help": "Learning rate at step 0 of the warm-up."})
    min_lr: float = field(default=1e-5, metadata={"help": "Learning rate the cosine ends at."})
    decay_matrices_only: bool = field(
        default=True, metadata={"help": "Weight decay only on parameters with 2 or more dimensions (the original)."}
    )
    checkpoint_trainable_only: bool = field(
        default=False,
        metadata={
            "help": "Checkpoints hold only the trainable weights (+ optimizer/scheduler/RNG), not the frozen encoders and LLM. "
            "Resuming works the same; not with --load_best_model_at_end."
        },
    )
    record_data_order: bool = field(
        default=False, metadata={"help": "Each rank appends the example ids of its batches to output_dir/data_order/rankN.jsonl."}
    )
    eval_accuracy: bool = field(
        default=True, metadata={"help": "Report next-token accuracy on the answers at evaluation (the original's metric)."}
    )
    activation_lora_scaling: float = field(
        default=2.0, metadata={"help": "Activation tuning: LoRA scaling while writing the stories (the release uses 4.0)."}
    )
    activation_num_stories: int = field(default=12, metadata={"help": "Activation tuning: number of clips/stories."})
    activation_prompt: str | None = field(
        default=None,
        metadata={"help": "Activation tuning: the story instruction, with <SpeechHere> (default: the built-in story prompt)."},
    )
    activation_stories_file: str | None = field(
        default=None,
        metadata={"help": "Activation tuning: use these stories (a file written by an earlier run) instead of generating."},
    )
    activation_max_new_tokens: int = field(default=200, metadata={"help": "Activation tuning: longest story in tokens."})
    activation_num_beams: int = field(default=4, metadata={"help": "Activation tuning: beams while writing stories."})
    activation_batch_size: int = field(default=4, metadata={"help": "Activation tuning: clips per generate call."})
    export_trainable: bool = field(
        default=True, metadata={"help": "Also write output_dir/salmonn_trainable.safetensors (the trainable weights only)."}
    )
    export_adapter: bool = field(
        default=True,
        metadata={
            "help": "Also write output_dir/adapter/, a PEFT adapter (LoRA + the Q-Former path as modules_to_save) for "
            "PeftModel.from_pretrained(<base SALMONN>, 'output_dir/adapter')."
        },
    )


# ------------------------------------------------------------------------------------------------------------
# arguments


def _dict_to_argv(values: dict[str, Any], source: str) -> list[str]:
    argv: list[str] = []
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{source}: keys must be argument names, got {key!r}")
        if value is None:
            continue
        flag = f"--{key}"
        if isinstance(value, bool):
            argv += [flag, "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *[str(v) for v in value]]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def read_arguments_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"Cannot read arguments file {str(path)!r}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"Arguments file {str(path)!r} must hold a mapping of argument names to values")
    return data


def recipe_path(stage: str) -> Path:
    return RECIPES_DIR / f"{stage}.yaml"


def _length_flags(values: dict[str, Any]) -> set[str]:
    """Which of --max_steps (when positive) and --num_train_epochs a layer of arguments sets."""
    found = set()
    if values.get("num_train_epochs") is not None:
        found.add("num_train_epochs")
    max_steps = values.get("max_steps")
    if max_steps is not None:
        try:
            if float(max_steps) > 0:
                found.add("max_steps")
        except (TypeError, ValueError) as err:
            raise ValueError(f"--max_steps must be an integer, got {max_steps!r}") from err
    return found


def _argv_values(argv: list[str], names: tuple[str, ...]) -> dict[str, str]:
    """The values of the flags `names` on a command line (`--name value`, `--name=value` or `--name-with-dashes`)."""
    values = {}
    for i, arg in enumerate(argv):
        flag, has_value, value = arg.partition("=")
        name = flag[2:].replace("-", "_") if flag.startswith("--") else None
        if name in names:
            values[name] = value if has_value else (argv[i + 1] if i + 1 < len(argv) else None)
    return values


def settle_training_length(layers: list[tuple[str, dict[str, Any]]]) -> None:
    """
    The training length is one setting spelled two ways: the highest layer (command line > arguments file > recipe)
    that sets --max_steps or --num_train_epochs decides it, so `--num_train_epochs 3` is not silently beaten by a
    recipe's `max_steps` (the Trainer lets a positive max_steps win). One layer setting both is refused.
    """
    for where, values in layers:
        flags = _length_flags(values)
        if len(flags) == 2:
            raise ValueError(f"{where} sets both --max_steps and --num_train_epochs; give one of them")
        if flags == {"num_train_epochs"}:
            for _, lower in layers:
                lower.pop("max_steps", None)
        if flags:
            return


def build_parser():
    from transformers import HfArgumentParser, TrainingArguments

    return HfArgumentParser((ModelArguments, DataArguments, SalmonnArguments, TrainingArguments), allow_abbrev=False)


def parse_arguments(argv: list[str] | None = None):
    """Recipe of the stage < optional arguments file (first argument, .yaml/.yml/.json) < command-line flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    file_values: dict[str, Any] = {}
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith((".yaml", ".yml", ".json")):
        file_values = read_arguments_file(argv.pop(0))

    stage = file_values.get("stage")
    for i, arg in enumerate(argv):
        if arg == "--stage" and i + 1 < len(argv):
            stage = argv[i + 1]
        elif arg.startswith("--stage="):
            stage = arg.split("=", 1)[1]
    recipe_values: dict[str, Any] = {}
    if stage is not None and "-h" not in argv and "--help" not in argv:
        if stage not in STAGES:
            raise ValueError(f"--stage must be one of {list(STAGES)}, got {stage!r}")
        recipe_values = read_arguments_file(recipe_path(stage))

    command_line = _argv_values(argv, ("max_steps", "num_train_epochs"))
    settle_training_length([("the command line", command_line), ("the arguments file", file_values), (f"recipe {stage}", recipe_values)])
    merged = _dict_to_argv(recipe_values, f"recipe {stage}") + _dict_to_argv(file_values, "arguments file") + argv
    parser = build_parser()
    model_args, data_args, salmonn_args, training_args = parser.parse_args_into_dataclasses(args=merged, look_for_args_file=False)
    if salmonn_args.stage is None:
        parser.error("--stage is required: one of pretrain, instruct, activation")
    if model_args.model_name_or_path is None:
        parser.error("--model_name_or_path is required")
    if salmonn_args.stage != "activation" and data_args.train_file is None and data_args.dataset_name is None:
        parser.error("give the training data with --train_file or --dataset_name")
    if salmonn_args.stage == "activation" and data_args.train_file is None and data_args.dataset_name is None and salmonn_args.activation_stories_file is None:
        parser.error("--stage activation needs clips (--train_file / --dataset_name) or --activation_stories_file")
    for flag in ("max_train_samples", "max_eval_samples"):
        value = getattr(data_args, flag)
        if value is not None and value < 1:  # items[:-1] would silently drop the last item
            parser.error(f"--{flag} must be at least 1, got {value}")
    length_error = training_length_error(training_args)
    if length_error is not None:
        parser.error(length_error)
    return model_args, data_args, salmonn_args, training_args


def training_length_error(training_args) -> str | None:
    """A run that would take no step (saving the untouched base model as if trained) or divide by zero, refused early."""
    if training_args.gradient_accumulation_steps < 1:
        return f"--gradient_accumulation_steps must be at least 1, got {training_args.gradient_accumulation_steps}"
    if training_args.max_steps > 0:
        return None
    if training_args.max_steps != -1:
        return f"--max_steps must be positive (or -1 to train for --num_train_epochs), got {training_args.max_steps}"
    if not 0 < training_args.num_train_epochs < float("inf"):
        return f"--num_train_epochs must be a positive finite number, got {training_args.num_train_epochs}"
    return None


# ------------------------------------------------------------------------------------------------------------
# data


def load_items(data_args: DataArguments, split: str):
    """The items of `split` ("train" or "validation") from a manifest, a saved dataset folder or --dataset_name."""
    from .data import load_hf_dataset, load_manifest

    path = data_args.train_file if split == "train" else data_args.validation_file
    columns = dict(
        audio_column=data_args.audio_column_name,
        text_column=data_args.text_column_name,
        prompt_column=data_args.prompt_column_name,
        task_column=data_args.task_column_name,
        question_column=data_args.question_column_name,
        id_column=data_args.id_column_name,
        default_task=data_args.default_task,
        audio_root=data_args.audio_root,
    )
    if path is not None:
        if os.path.isdir(path):
            folder_split = data_args.train_split_name if split == "train" else (data_args.validation_split_name or "validation")
            return load_hf_dataset(path, split=folder_split, **columns)
        return load_manifest(path, audio_root=data_args.audio_root, default_task=data_args.default_task)
    if data_args.dataset_name is not None:
        hf_split = data_args.train_split_name if split == "train" else data_args.validation_split_name
        if hf_split is None:
            return None
        return load_hf_dataset(data_args.dataset_name, data_args.dataset_config_name, split=hf_split, **columns)
    return None


def _limit(items, limit: int | None):
    if limit is None or limit >= len(items):
        return items
    if isinstance(items, list):
        return items[:limit]
    items.dataset = items.dataset.select(range(limit))
    return items


def prepare_activation_items(model, processor, data_args, salmonn_args, training_args, prompts) -> list[dict]:
    """Writes the stories (main process first; the other ranks read them) or reads a given stories file."""
    from .activation import STORIES_FILE, build_story_items, read_stories, write_stories
    from .data import SalmonnTrainDataset
    from .prompts import DEFAULT_STORY_PROMPT

    clips = None
    raw = load_items(data_args, "train")
    if raw is not None:
        clips = SalmonnTrainDataset(
            _limit(raw, data_args.max_train_samples), prompts, seed=training_args.seed, name="activation clips",
            strict=data_args.strict_data, require_text=False, verify_audio=data_args.verify_audio,
        )
    if salmonn_args.activation_stories_file:
        return read_stories(salmonn_args.activation_stories_file, clips)

    stories_path = Path(training_args.output_dir) / STORIES_FILE
    with training_args.main_process_first(desc="activation stories"):
        if training_args.process_index == 0 and not (training_args.resume_from_checkpoint and stories_path.is_file()):
            import torch

            if not (training_args.deepspeed or training_args.fsdp):
                model.to(training_args.device)  # the Trainer would move it there anyway
            autocast_dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
            autocast = torch.autocast(training_args.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
            with autocast:
                items = build_story_items(
                    clips,
                    model,
                    processor,
                    salmonn_args.activation_prompt or DEFAULT_STORY_PROMPT,
                    salmonn_args.activation_lora_scaling,
                    salmonn_args.activation_num_stories,
                    generation_kwargs={
                        "max_new_tokens": salmonn_args.activation_max_new_tokens,
                        "num_beams": salmonn_args.activation_num_beams,
                        "do_sample": False,
                    },
                    batch_size=salmonn_args.activation_batch_size,
                )
            write_stories(items, stories_path)
            logger.info("Wrote %d stories (LoRA scaling %.3g) to %s", len(items), salmonn_args.activation_lora_scaling, stories_path)
    return read_stories(stories_path, clips)


# ------------------------------------------------------------------------------------------------------------
# main


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def last_complete_checkpoint(output_dir: str) -> str | None:
    """
    The newest `checkpoint-N` that holds the trainer state and weights. A folder left empty or half-written by a
    kill during saving is skipped with a warning (the Trainer writes `trainer_state.json` last).
    """
    from .export import TRAINABLE_EXPORT_NAME

    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, folder in sorted(found, reverse=True):
        has_state = os.path.isfile(os.path.join(folder, "trainer_state.json"))
        has_weights = any(os.path.isfile(os.path.join(folder, f)) for f in (*_WEIGHT_FILES, TRAINABLE_EXPORT_NAME))
        if has_state and has_weights:
            return folder
        logger.warning("Skipping %s: incomplete checkpoint (no %s)", folder, "trainer_state.json" if not has_state else "weights")
    return None


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _local_inputs(model_args, data_args, salmonn_args) -> list[tuple[str, str]]:
    given = [
        ("--train_file", data_args.train_file),
        ("--validation_file", data_args.validation_file),
        ("--dataset_name", data_args.dataset_name),
        ("--prompt_file", data_args.prompt_file),
        ("--audio_root", data_args.audio_root),
        ("--init_trainable_from", model_args.init_trainable_from),
        ("--activation_stories_file", salmonn_args.activation_stories_file),
    ]
    return [(flag, value) for flag, value in given if value and os.path.exists(value)]


def check_output_dir(model_args, data_args, salmonn_args, training_args) -> None:
    """
    Refuses, before anything is loaded or written, an --output_dir that would write into the base model's folder or
    mix two runs: a non-empty folder needs --resume_from_checkpoint (continue the run saved there) or
    --overwrite_output_dir (replace it; then it may not hold an input of this run).
    """
    output_dir = training_args.output_dir
    out = Path(os.path.realpath(output_dir))
    base = model_args.model_name_or_path
    if os.path.isdir(base):
        base_dir = Path(os.path.realpath(base))
        if _within(out, base_dir) or _within(base_dir, out):
            relation = "is" if out == base_dir else "is inside" if _within(out, base_dir) else "holds"
            raise ValueError(
                f"--output_dir {output_dir!r} {relation} the folder of --model_name_or_path {base!r}; training would "
                "write its model and checkpoints over or next to the weights it starts from. Choose another --output_dir"
            )
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {output_dir!r} is a file, not a folder")
    entries = sorted(os.listdir(out)) if out.is_dir() else []
    if not entries:
        return
    resume = training_args.resume_from_checkpoint
    if resume is not None and salmonn_args.overwrite_output_dir:
        raise ValueError("--overwrite_output_dir starts a new run and --resume_from_checkpoint continues one; give one of them")
    if resume is not None:
        if resume in ("last", "latest") or _within(Path(os.path.realpath(resume)), out):
            return
        raise ValueError(
            f"--output_dir {output_dir!r} is not empty and --resume_from_checkpoint {resume!r} is not one of its "
            "checkpoints: resuming into it would mix two runs. Resume into an empty --output_dir"
        )
    if not salmonn_args.overwrite_output_dir:
        checkpoint = last_complete_checkpoint(str(out))
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        held = f"a run saved up to {Path(checkpoint).name}" if checkpoint else shown
        raise ValueError(
            f"--output_dir {output_dir!r} is not empty: it holds {held}. Add --resume_from_checkpoint last to continue "
            "the run saved there, --overwrite_output_dir to replace it with this run, or choose a new folder"
        )
    for flag, value in _local_inputs(model_args, data_args, salmonn_args):
        path = Path(os.path.realpath(value))
        if _within(path, out):
            raise ValueError(
                f"--output_dir {output_dir!r} {'is' if path == out else 'holds'} {flag} {value!r}; "
                "--overwrite_output_dir would replace what it holds. Choose another --output_dir"
            )


def clear_earlier_run(output_dir: str) -> None:
    """
    --overwrite_output_dir: the earlier run's checkpoint-N/ and data_order/ go first, so that `last`,
    `save_total_limit` and the id logs see this run alone; its other files are replaced as this run writes them.
    """
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path) and (re.fullmatch(r"checkpoint-\d+", name) or name == "data_order"):
            shutil.rmtree(path)
            logger.info("--overwrite_output_dir: removed %s of the earlier run", path)


def cap_dataloader_workers(training_args) -> None:
    """The recipes' 8 loader processes, cut to the CPUs this process may use (PyTorch warns on every loader otherwise)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if training_args.dataloader_num_workers > available:
        logger.info("dataloader_num_workers %d -> %d (the CPUs available to this process)", training_args.dataloader_num_workers, available)
        training_args.dataloader_num_workers = available


def setup_logging(training_args) -> None:
    import transformers

    level = training_args.get_process_log_level()
    cli_setup_logging(logging.WARNING)  # other libraries stay at warnings; ours follow --log_level
    logging.getLogger(__package__).setLevel(level)  # this module, the data checks and the trainer
    transformers.utils.logging.set_verbosity(level)


def save_adapter(trainer, model_args, training_args) -> Path:
    """The fine-tune as a PEFT adapter of the model it started from, in output_dir/adapter/."""
    from modeling_salmonn.integrations_salmonn import save_salmonn_adapter

    from .export import trainable_tensors_from_saved_folder

    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    # The saved folder holds the gathered weights (the live ones are shards under FSDP or ZeRO-3).
    state = trainable_tensors_from_saved_folder(training_args.output_dir, model)
    folder = save_salmonn_adapter(
        model, Path(training_args.output_dir) / ADAPTER_DIR, base_model=model_args.model_name_or_path, state=state
    )
    logger.info("Wrote the PEFT adapter (base model %s) to %s", model_args.model_name_or_path, folder)
    return folder


def run(model_args, data_args, salmonn_args, training_args) -> dict:
    import torch
    from transformers import AutoModel, AutoProcessor, set_seed
    from transformers.trainer_utils import IntervalStrategy

    from .collator import SalmonnDataCollator
    from .data import SalmonnTrainDataset
    from .export import TRAINABLE_EXPORT_NAME, export_from_saved_folder, load_trainable_export
    from .trainable import freeze_for_training
    from .prompts import DEFAULT_STORY_PROMPT, PromptPool
    from .trainer import DatasetEpochCallback, SalmonnTrainer, preprocess_logits_for_accuracy, token_accuracy

    from accelerate import PartialState

    setup_logging(training_args)
    check_output_dir(model_args, data_args, salmonn_args, training_args)
    if salmonn_args.overwrite_output_dir and training_args.process_index == 0 and os.path.isdir(training_args.output_dir):
        clear_earlier_run(training_args.output_dir)
    PartialState().wait_for_everyone()  # every rank has checked the folder before any rank writes to it
    cap_dataloader_workers(training_args)
    logger.info("Stage %s; training arguments %s", salmonn_args.stage, training_args)
    if training_args.max_steps > 0:
        logger.info("Training length: %d steps (--max_steps)", training_args.max_steps)
    else:
        logger.info("Training length: %g epoch(s) (--num_train_epochs)", training_args.num_train_epochs)

    resume = training_args.resume_from_checkpoint
    if resume in ("last", "latest"):
        resume = last_complete_checkpoint(training_args.output_dir)
        if resume is None:
            raise ValueError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: no checkpoint in {training_args.output_dir}")
    elif resume is not None and not os.path.isdir(resume):
        raise ValueError(f"--resume_from_checkpoint {resume!r} is not a checkpoint folder")
    training_args.resume_from_checkpoint = resume

    set_seed(training_args.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[model_args.dtype]
    load_kwargs = dict(trust_remote_code=True, revision=model_args.revision, cache_dir=model_args.cache_dir)
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, **load_kwargs)
    model = AutoModel.from_pretrained(model_args.model_name_or_path, dtype=dtype, **load_kwargs)
    for needed in ("get_audio_features", "set_lora_scaling"):
        if not hasattr(model, needed):
            raise ValueError(f"{model_args.model_name_or_path!r} is not a SALMONN model ({type(model).__name__} has no {needed})")
    if model_args.init_trainable_from:
        load_trainable_export(model, model_args.init_trainable_from)
    trainable = freeze_for_training(model)
    logger.info("Trainable parameters: %s of %s", f"{trainable:,}", f"{sum(p.numel() for p in model.parameters()):,}")

    if salmonn_args.stage == "activation":
        story_prompt = salmonn_args.activation_prompt or DEFAULT_STORY_PROMPT
        prompts = PromptPool(prompt_file=data_args.prompt_file)
        story_items = prepare_activation_items(model, processor, data_args, salmonn_args, training_args, prompts)
        # Training uses the very prompt the stories were written for.
        train_prompts = PromptPool({**prompts.pools, "audio_story_telling": [story_prompt]})
        train_dataset = SalmonnTrainDataset(story_items, train_prompts, seed=training_args.seed, name="activation stories", strict=True, verify_audio=False)
    else:
        train_prompts = PromptPool(prompt_file=data_args.prompt_file)
        train_items = load_items(data_args, "train")
        train_dataset = None
        if train_items is not None:
            train_dataset = SalmonnTrainDataset(
                _limit(train_items, data_args.max_train_samples), train_prompts, seed=training_args.seed, name="train",
                strict=data_args.strict_data, verify_audio=data_args.verify_audio,
            )

    eval_dataset = None
    eval_items = load_items(data_args, "validation") if (data_args.validation_file or data_args.validation_split_name) else None
    if eval_items is not None:
        eval_dataset = SalmonnTrainDataset(
            _limit(eval_items, data_args.max_eval_samples), train_prompts, seed=training_args.seed, name="validation",
            strict=data_args.strict_data, verify_audio=data_args.verify_audio,
        )
    elif training_args.eval_strategy != IntervalStrategy.NO:
        logger.info("No validation data: evaluation during training is off")
        training_args.eval_strategy = IntervalStrategy.NO
        training_args.do_eval = False
        training_args.load_best_model_at_end = False

    # The Trainer must not drop the collator's inputs, and DDP has no unused parameters to look for.
    training_args.remove_unused_columns = False
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False

    collator = SalmonnDataCollator(processor, max_txt_len=data_args.max_txt_len, truncate_audio=data_args.truncate_audio)
    trainer = SalmonnTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[DatasetEpochCallback(train_dataset)] if train_dataset is not None else None,
        compute_metrics=token_accuracy if (eval_dataset is not None and salmonn_args.eval_accuracy) else None,
        preprocess_logits_for_metrics=preprocess_logits_for_accuracy if (eval_dataset is not None and salmonn_args.eval_accuracy) else None,
        lr_schedule=salmonn_args.lr_schedule,
        warmup_start_lr=salmonn_args.warmup_start_lr,
        min_lr=salmonn_args.min_lr,
        decay_matrices_only=salmonn_args.decay_matrices_only,
        checkpoint_trainable_only=salmonn_args.checkpoint_trainable_only,
        record_data_order=salmonn_args.record_data_order,
    )

    metrics: dict[str, Any] = {}
    if train_dataset is not None:
        result = trainer.train(resume_from_checkpoint=resume)
        metrics.update(result.metrics)
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()  # model + processor (+ remote code) in output_dir
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        if salmonn_args.export_trainable and training_args.should_save:
            export_from_saved_folder(training_args.output_dir, model, Path(training_args.output_dir) / TRAINABLE_EXPORT_NAME)
        if salmonn_args.export_adapter and training_args.should_save:
            save_adapter(trainer, model_args, training_args)
    if eval_dataset is not None and (training_args.do_eval or training_args.eval_strategy != IntervalStrategy.NO):
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message=f"SALMONN {salmonn_args.stage} stage", tags=["salmonn", salmonn_args.stage])
    return metrics


def main(argv: list[str] | None = None) -> int:
    try:
        model_args, data_args, salmonn_args, training_args = parse_arguments(argv)
    except ValueError as err:
        print(f"salmonn-train: error: {err}", file=sys.stderr)
        return 2
    try:
        run(model_args, data_args, salmonn_args, training_args)
    except (ValueError, FileNotFoundError) as err:
        logger.debug("salmonn-train failed", exc_info=True)
        print(f"salmonn-train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
