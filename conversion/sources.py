"""Reading the parts of the original release: the SALMONN `.pth`, Whisper and the LLM (local folders or Hub ids)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from modeling_salmonn.feature_extraction_salmonn import why_missing


logger = logging.getLogger(__name__)


def load_torch_file(path: Path, what: str) -> object:
    """`torch.load` with `weights_only=True`; every failure becomes a `ValueError` that names the file."""
    if not path.exists():
        raise ValueError(f"{what} {path} {why_missing(path)}")
    if not path.is_file():
        raise ValueError(f"{what} {path}: no such file")
    refuse_raw_pickle(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as err:
        if "Unsupported operand" in str(err):
            # Not a pickle at all (random bytes, another format): say so instead of blaming code execution.
            raise ValueError(f"{what} {path} is not a torch checkpoint (not a zip or pickle file torch can read)") from err
        raise ValueError(
            f"{what} {path} cannot be loaded safely: it needs code execution to unpickle, which is refused "
            f"(torch.load weights_only=True). Detail: {str(err).splitlines()[0]}"
        ) from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{what} {path} is not a readable torch checkpoint: {err}") from err
    except Exception as err:  # random bytes make the unpickler fail in arbitrary ways (IndexError, KeyError, ...)
        raise ValueError(f"{what} {path} is not a torch checkpoint ({type(err).__name__}: {err})") from err


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


# torch.save's legacy (non-zip) format starts with a pickled magic number; any other pickle stream is a plain pickle.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def refuse_raw_pickle(path: Path, what: str) -> None:
    """
    Names a pickle stream (PROTO opcode 0x80 and protocol 2-5) that is neither a zip nor torch's legacy format for
    what it is before `torch.load` reads it (which would call it "not a pickle" or "needs code execution").
    """
    with open(path, "rb") as handle:
        head = handle.read(len(_LEGACY_TORCH_MAGIC))
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and head != _LEGACY_TORCH_MAGIC and not _is_zip(path):
        raise ValueError(
            f"{what} {path} is a raw Python pickle (as pickle.dump writes), not a torch.save checkpoint: only "
            "torch.save zip checkpoints are read, with torch.load(weights_only=True)"
        )


def load_salmonn_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Returns the `model` state dict of an original SALMONN checkpoint and the `model` section of its `config`."""
    path = Path(path)
    checkpoint = load_torch_file(path, "SALMONN checkpoint")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not a SALMONN checkpoint: expected a dict with a `model` state dict, as the original runner "
            f"saves it (found {found})"
        )
    state = checkpoint["model"]
    if not any(key.startswith("speech_Qformer.") for key in state):
        raise ValueError(
            f"{path} is not a SALMONN checkpoint: its `model` has no `speech_Qformer.*` keys "
            f"(first keys: {sorted(state)[:5]})"
        )
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: `model` entries that are not tensors: {bad[:10]}")
    config = checkpoint.get("config") or {}
    model_config = config.get("model", {}) if isinstance(config, dict) else {}
    return state, model_config if isinstance(model_config, dict) else {}


def resolve_folder(source: str, what: str, allow_patterns: list[str]) -> Path:
    """A local folder, or a Hub repo id fetched (or found in the cache when offline) with huggingface_hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise ValueError(f"{what} folder {path} is not readable")
        return path
    if path.exists():
        raise ValueError(f"{what} {path} must be a folder or a Hub repo id, not a file")
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise ValueError(f"{what} {source!r}: no such folder, and not a Hub repo id of the form 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=allow_patterns))
    except Exception as err:
        raise ValueError(f"{what} {source!r}: not a local folder and could not be fetched from the Hub: {err}") from err


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ValueError(f"{what}: {path} is missing") from err
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{what}: cannot read {path}: {err}") from err


def weight_files(folder: Path, what: str) -> list[Path]:
    """The weight files of a transformers folder, in index order: safetensors preferred, then `.bin`."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json(index, what)["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
            missing = [name for name in files if not (folder / name).is_file()]
            if missing:
                raise ValueError(f"{what} {folder}: {index_name} lists missing shards {missing}")
            return [folder / name for name in files]
        if (folder / single_name).is_file():
            return [folder / single_name]
    raise ValueError(f"{what} {folder}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) found")


def iter_tensors(path: Path, what: str, keep: re.Pattern | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one weight file, one at a time where the format allows (safetensors, zip-format `.bin` via mmap)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    if keep is None or keep.search(key):
                        yield key, handle.get_tensor(key)
        except Exception as err:
            if isinstance(err, ValueError) and str(err).startswith(what):
                raise
            raise ValueError(f"{what} {path}: cannot read safetensors file: {err}") from err
        return
    state = load_torch_file(path, what)
    if not isinstance(state, dict):
        raise ValueError(f"{what} {path}: expected a state dict, got {type(state).__name__}")
    for key in list(state):
        value = state.pop(key)
        if keep is None or keep.search(key):
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{what} {path}: entry {key!r} is not a tensor")
            yield key, value


__all__ = ["iter_tensors", "load_salmonn_checkpoint", "load_torch_file", "read_json", "refuse_raw_pickle", "resolve_folder", "weight_files"]
