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
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    # mkdtemp creates a private (0700) folder; the result should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)
    try:
        yield tmp_dir
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


__all__ = ["atomic_output_dir"]
