"""Writing the converters' outputs: folders appear complete or not at all, and weights stream shard by shard."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

# Written into every temporary folder (with the writer's process id) and removed just before the rename, so that a
# rerun can recognise, and delete, the leftovers of a killed run and nothing else.
MARKER = ".salmonn-incomplete"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """
    Deletes the `.NAME.tmp-*` folders next to `output_dir` that carry the marker of a writer that is gone. (A
    `.NAME.old-*` folder is never deleted: after a kill at the wrong moment it may be the only copy of the old output.)
    """
    removed = []
    for folder in output_dir.parent.glob(f".{output_dir.name}.tmp-*"):
        marker = folder / MARKER
        if not folder.is_dir() or folder.is_symlink() or not marker.is_file():
            continue
        try:
            pid = int(marker.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and _alive(pid):
            continue  # another conversion is writing it right now
        logger.warning("Removing %s, left by an interrupted run (process %d)", folder, pid)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """
    Refuses an output folder that may not be replaced as a whole. `overwrite` replaces only an empty folder or an
    earlier output of these commands (every one of them, a model folder, holds a `config.json`): anything else may be a
    user's own folder, whose files the replacement would delete.

    Raises:
        FileExistsError: naming the folder and what it holds.
    """
    output_dir = Path(output_dir).expanduser().absolute()
    if not (output_dir.exists() or output_dir.is_symlink()):
        return
    if not output_dir.is_dir() or output_dir.is_symlink():
        raise FileExistsError(f"Output path {output_dir} exists and is not a folder; refusing to replace it")
    if not overwrite:
        raise FileExistsError(f"Output folder {output_dir} already exists; pass --overwrite to replace it")
    names = sorted(path.name for path in output_dir.iterdir())
    if names and "config.json" not in names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise FileExistsError(
            f"Output folder {output_dir} holds {shown} but no config.json, so it is not an earlier output of this "
            "command and --overwrite does not replace it; remove it or choose another folder"
        )


@contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """
    Yields an empty temporary folder next to `output_dir`; when the block completes without error the folder is
    renamed to `output_dir`, otherwise it is removed. An existing `output_dir` is refused unless `overwrite` and
    `check_output_dir` allows it, in which case it is replaced only once the new one is complete.

    Raises:
        FileExistsError: see `check_output_dir`; checked before anything is written and again before the rename.
    """
    output_dir = Path(output_dir).expanduser().absolute()
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    (tmp_dir / MARKER).write_text(str(os.getpid()))
    # mkdtemp creates a private (0700) folder; the result should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)
    try:
        yield tmp_dir
        (tmp_dir / MARKER).unlink()
        # Writers such as safetensors may also create private files; give everything the usual permissions.
        for root, dirs, files in os.walk(tmp_dir):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~umask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)
        if output_dir.exists() or output_dir.is_symlink():
            check_output_dir(output_dir, overwrite)  # it may have appeared or changed while the new one was written
            # Move the old folder aside first so that a failed rename never loses both versions.
            old_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            old_dir.rmdir()
            os.rename(output_dir, old_dir)
            try:
                os.rename(tmp_dir, output_dir)
            except BaseException:
                os.rename(old_dir, output_dir)
                raise
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.rename(tmp_dir, output_dir)
        logger.info("Wrote %s", output_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)


def check_output_not_input(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], flag: str = "--output") -> None:
    """
    Refuses an output folder that is, holds or lies inside one of `inputs` (a mapping of flag to path; Hub ids and
    `None` are skipped): writing it, and above all replacing it with --overwrite, would destroy the command's own inputs.

    Raises:
        ValueError: naming the output, the input and its flag.
    """
    # realpath, unlike Path.resolve, leaves a symlink loop for the input's own reader to report.
    output_path = Path(os.path.realpath(Path(output).expanduser()))
    for name, source in inputs.items():
        if source is None:
            continue
        source_path = Path(source).expanduser()
        if not os.path.lexists(source_path):
            continue  # a Hub id, or a missing file that its own reader reports
        source_path = Path(os.path.realpath(source_path))
        if source_path == output_path or output_path in source_path.parents:
            relation = "is" if source_path == output_path else "holds"
            raise ValueError(
                f"{flag} {output} {relation} the input {name} {source}: the output folder must not be or hold an "
                "input (it is replaced as a whole); choose another output folder"
            )
        if source_path in output_path.parents:
            raise ValueError(
                f"{flag} {output} lies inside the input {name} {source}: the output folder must be outside every "
                "input; choose another output folder"
            )


__all__ = ["atomic_output_dir", "check_output_dir", "check_output_not_input", "remove_stale_temporaries"]


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--max-shard-size {text!r}: expected a size such as 5GB or 500MB")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    size = int(float(match.group(1)) * units[(match.group(2) or "").upper()])
    if size < 1:
        raise ValueError(f"--max-shard-size {text!r}: must be positive (0 would write one file per tensor)")
    return size


# safetensors names of torch dtypes, for the streaming writer below.
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def write_safetensors_streaming(path: Path, items: list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]]) -> None:
    """
    Writes a safetensors file one tensor at a time. `safetensors.torch.save_file` needs every tensor of the shard in
    memory at once (and serialises a copy), which would double the peak memory of a 13B conversion; the format is a
    length-prefixed JSON header followed by the raw bytes, so streaming it is simple.
    """
    header, offset = {}, 0
    for key, shape, dtype, _ in items:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for key, shape, dtype, make in items:
            tensor = make()
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise RuntimeError(f"{key}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor


class ShardWriter:
    """
    Plans tensors into safetensors shards of at most `max_bytes` and writes each shard by streaming its tensors.
    Tensors are produced lazily at write time from their (memory-mapped) sources, so memory holds at most one output
    shard's worth of source pages plus one converted tensor.
    """

    def __init__(self, folder: Path | None, max_bytes: int):
        # folder=None records names and shapes only (dry run).
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]] = []
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.total_bytes = 0

    def add(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, make: Callable[[], torch.Tensor]) -> None:
        if key in self.shapes:
            raise ValueError(f"Tensor {key} was produced twice")
        shape = tuple(int(n) for n in shape)
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.append((key, shape, dtype, make))
        self.pending_bytes += size
        self.total_bytes += size
        self.shapes[key] = (shape, dtype)

    def flush(self) -> None:
        """Writes the planned tensors (they keep their sources alive until then)."""
        if not self.pending:
            return
        path = Path(f"shard-{len(self.files):05d}.tmp")
        if self.folder is not None:
            path = self.folder / path
            write_safetensors_streaming(path, self.pending)
        self.files.append((path, [key for key, *_ in self.pending]))
        self.pending, self.pending_bytes = [], 0

    def finish(self) -> list[Path]:
        self.flush()
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (path, keys), name in zip(self.files, names):
            path.rename(self.folder / name)
            weight_map.update({key: name for key in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [self.folder / name for name in names]
