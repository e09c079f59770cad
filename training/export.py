"""
The small trainable-only export of a SALMONN run (Q-Former with its query, `ln_speech`, `ln_audio`,
`speech_llama_proj`, LoRA) and applying it to a converted base folder.

    python -m salmonn.training.export --model_name_or_path converted/ --export run/salmonn_trainable.safetensors --output_dir merged/
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from salmonn.cli import setup_logging

from .trainable import is_trainable_parameter, trainable_state_dict


logger = logging.getLogger(__name__)

TRAINABLE_EXPORT_NAME = "salmonn_trainable.safetensors"


def _trainable_keys(model) -> set[str]:
    return {k for k in model.state_dict() if is_trainable_parameter(k)}


def save_trainable_export(model, path: str | os.PathLike, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """
    Writes `trainable_state_dict(model)` (or the given `tensors`) as safetensors, atomically, with the LoRA settings
    as metadata.
    """
    path = Path(path)
    if tensors is None:
        tensors = trainable_state_dict(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if not tensors:
        raise ValueError("The model has no trainable tensors to export")
    return _write_export(tensors, model.config, path)


def trainable_tensors_from_saved_folder(folder: str | os.PathLike, model) -> dict[str, torch.Tensor]:
    """
    The trainable tensors read back from a folder written by `save_pretrained`: under FSDP or DeepSpeed ZeRO-3 the
    live parameters are shards, while the saved folder holds the gathered full weights.
    """
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as handle:
            for key in handle.keys():
                if is_trainable_parameter(key):
                    tensors[key] = handle.get_tensor(key)
    return tensors


def export_from_saved_folder(folder: str | os.PathLike, model, path: str | os.PathLike) -> Path:
    """The export, from the saved folder's full weights (see `trainable_tensors_from_saved_folder`)."""
    return save_trainable_export(model, path, trainable_tensors_from_saved_folder(folder, model))


def _write_export(tensors: dict[str, torch.Tensor], config, path: Path) -> Path:
    from safetensors.torch import save_file

    metadata = {
        "format": "pt",
        "salmonn_trainable_export": "1",
        "lora_rank": str(config.lora_rank),
        "lora_alpha": str(config.lora_alpha),
        "num_query_tokens": str(config.num_query_tokens),
        "second_per_window": str(config.second_per_window),
        "second_stride": str(config.second_stride),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("Wrote %d trainable tensors (%.2f MB) to %s", len(tensors), path.stat().st_size / 2**20, path)
    return path


def load_trainable_export(model, path: str | os.PathLike) -> list[str]:
    """
    Copies an export into `model` in place. Every key must be a trainable tensor of the model with the same shape,
    and every trainable tensor must be in the export, so that a partial or mismatched file cannot load silently.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Trainable export {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:
        raise ValueError(f"Cannot read trainable export {str(path)!r}: {err}") from err
    if metadata.get("salmonn_trainable_export") != "1":
        raise ValueError(f"{str(path)!r} is not a SALMONN trainable export (no `salmonn_trainable_export` metadata)")

    expected = _trainable_keys(model)
    unexpected = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    if unexpected or missing:
        raise ValueError(
            f"Trainable export {str(path)!r} does not fit this model: {len(unexpected)} unexpected keys "
            f"{unexpected[:3]}, {len(missing)} missing keys {missing[:3]}"
        )
    state = model.state_dict()
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise ValueError(
                f"Trainable export {str(path)!r}: {key} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(state[key].shape)} (a different lora_rank or model size?)"
            )
    if "lora_alpha" in metadata and float(metadata["lora_alpha"]) != float(model.config.lora_alpha):
        logger.warning(
            "The export was trained with lora_alpha %s but the model uses %s; the LoRA scaling differs",
            metadata["lora_alpha"],
            model.config.lora_alpha,
        )
    with torch.no_grad():
        for key, tensor in tensors.items():
            state[key].copy_(tensor.to(dtype=state[key].dtype))
    logger.info("Loaded %d trainable tensors from %s", len(tensors), path)
    return sorted(tensors)


def check_export_output(base_model: str, export: str, output_dir: str) -> None:
    """The output folder is written whole and replaces what was there: it may not be or hold one of the inputs."""
    out = Path(os.path.realpath(output_dir))
    for flag, value in (("--model_name_or_path", base_model), ("--export", export)):
        if not os.path.exists(value):
            continue
        path = Path(os.path.realpath(value))
        if path == out or out in path.parents:
            raise ValueError(
                f"--output_dir {output_dir!r} {'is' if path == out else 'holds'} the input {flag} {value!r}; writing "
                "the merged model there would replace it. Choose another --output_dir"
            )


def apply_export(base_model: str, export: str, output_dir: str, overwrite: bool = False, dtype: str = "auto") -> Path:
    """A converted base folder (or Hub id) plus an export -> a complete folder for `AutoModel` / `AutoProcessor`."""
    from transformers import AutoModel, AutoProcessor

    from salmonn.conversion.io_utils import atomic_output_dir, check_output_dir

    check_export_output(base_model, export, output_dir)
    check_output_dir(output_dir, overwrite)  # before the model is loaded; again when the folder is moved into place

    model = AutoModel.from_pretrained(base_model, trust_remote_code=True, dtype=dtype)
    processor = AutoProcessor.from_pretrained(base_model, trust_remote_code=True)
    load_trainable_export(model, export)
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (Path(tmp) / "salmonn_export_source.json").write_text(
            json.dumps({"base_model": str(base_model), "export": str(Path(export).resolve())}, indent=2), encoding="utf-8"
        )
    return Path(output_dir)


@dataclass
class ExportArguments:
    model_name_or_path: str = field(
        metadata={"help": "Converted SALMONN folder or Hub id that the export is applied to.", "aliases": ["--base_model"]}
    )
    export: str = field(metadata={"help": f"The trainable-only export ({TRAINABLE_EXPORT_NAME} of a training run)."})
    output_dir: str = field(metadata={"help": "Where the complete model folder is written (not a folder of an input)."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace --output_dir if empty or an earlier output (it holds config.json); never another folder.",
            "aliases": ["--overwrite"],
        },
    )
    dtype: str = field(default="auto", metadata={"help": "dtype the base model is loaded (and saved) in."})


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    setup_logging()
    parser = HfArgumentParser(
        ExportArguments,
        prog="python -m salmonn.training.export",
        allow_abbrev=False,
        description=f"Applies a {TRAINABLE_EXPORT_NAME} export to a converted SALMONN folder and writes the complete model.",
    )
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        path = apply_export(args.model_name_or_path, args.export, args.output_dir, overwrite=args.overwrite_output_dir, dtype=args.dtype)
    except (ValueError, FileExistsError) as err:
        logger.error("%s", err)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
