"""Helpers shared by the converters: outputs appear complete or not at all."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


@contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """
    Yields an empty temporary folder next to `output_dir`; when the block completes without error the folder is
    renamed to `output_dir`, otherwise it is removed. An existing `output_dir` is refused unless `overwrite`, in which
    case it is replaced only once the new one is complete.

    Raises:
        FileExistsError: `output_dir` exists and `overwrite` is false, or it exists and is not a folder.
    """
    output_dir = Path(output_dir).expanduser().absolute()
    if output_dir.exists() or output_dir.is_symlink():
        if not output_dir.is_dir() or output_dir.is_symlink():
            raise FileExistsError(f"Output path {output_dir} exists and is not a folder; refusing to replace it")
        if not overwrite:
            raise FileExistsError(f"Output folder {output_dir} already exists; pass --overwrite to replace it")
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
        if output_dir.exists():
            if not overwrite:
                raise FileExistsError(f"Output folder {output_dir} appeared while it was being written; not replaced")
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


__all__ = ["atomic_output_dir", "remove_stale_temporaries"]
