"""salmonn-infer's output file: a JSONL log it alone writes, resumable after any interruption and locked while in use."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path


logger = logging.getLogger(__name__)


_RECORD_PREFIX = b'{"id": '


def _is_own_record(record) -> bool:
    """salmonn-infer's records: a JSON object with an id and either an answer or an error."""
    return isinstance(record, dict) and "id" in record and ("answer" in record or "error" in record)


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def read_done_ids(path: Path) -> set[str]:
    """
    Ids already in an output file. The whole file is checked first: a file that is not salmonn-infer's own output
    (every line a record with an id and an answer or error) is refused untouched. Only then is a last line cut off
    by an interruption (no newline, the start of a record that does not parse) removed so that appending goes on cleanly.
    """
    if not path.exists():
        return set()
    if path.is_dir():
        raise ValueError(f"--output {str(path)!r} is a folder; give the path of a .jsonl file")
    data = path.read_bytes()
    cut = len(data)
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if not data[cut:].startswith(_RECORD_PREFIX) or _parses(data[cut:]):
            raise ValueError(
                f"--output {str(path)!r} was not written by salmonn-infer (its last line is not a record); it is left "
                "unchanged: use another file, or --overwrite to replace it"
            )
    done = set()
    try:
        text = data[:cut].decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--output {str(path)!r} is not a salmonn-infer output (not UTF-8 text); it is left unchanged") from err
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not _is_own_record(record):
            raise ValueError(
                f"--output {str(path)!r} line {number} is not a salmonn-infer record (a JSON object with 'id' and "
                "'answer' or 'error'); the file is left unchanged: use another file, or --overwrite to replace it"
            )
        done.add(str(record["id"]))
    if cut < len(data):
        logger.warning("%s: dropping an incomplete last line left by an interrupted run", path)
        with path.open("r+b") as f:
            f.truncate(cut)
    return done


def lock_output(path: Path):
    """
    Takes an exclusive lock on `path` (created if missing, its content untouched) for the rest of the run, so that
    two runs never answer the same items into one file; the lock goes when the process ends. Returns the open file.
    """
    import fcntl

    if path.is_dir():
        raise ValueError(f"--output {str(path)!r} is a folder; give the path of a .jsonl file")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.close()
        raise ValueError(
            f"--output {str(path)!r} is in use by another salmonn-infer run; wait for it to finish or use another file"
        ) from err
    return handle


class JsonlWriter:
    """Appends one whole JSON line per record and flushes it, so an interruption loses nothing already written."""

    def __init__(self, path: Path | None, overwrite: bool = False):
        self.path = path
        if path is None:
            self.stream = sys.stdout
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.stream = path.open("w" if overwrite else "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()
        if self.path is not None:
            os.fsync(self.stream.fileno())

    def close(self) -> None:
        if self.path is not None:
            self.stream.close()


# ------------------------------------------------------------------------------------------------ main
