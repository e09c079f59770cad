"""salmonn-infer's output file: a JSONL log it alone writes, resumable after any interruption and locked while in use."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path

from salmonn.jsonl import dumps_record, split_jsonl


logger = logging.getLogger(__name__)


_RECORD_PREFIX = b'{"id": '
# What a record carries so that a resumed run can tell whether it was made by the same run (see `check_resumable`).
RUN_KEYS = ("model", "settings")


class OutputWriteError(ValueError):
    """The output file could not be written (a full disk, a quota, a removed drive): the run stops with one message."""


def _is_own_record(record) -> bool:
    """salmonn-infer's records: a JSON object with an id and either an answer or an error."""
    return isinstance(record, dict) and "id" in record and ("answer" in record or "error" in record)


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def check_output_path(path: Path) -> None:
    """
    Refuses an output that is not a regular file before it is opened: a folder, or a pipe, FIFO, socket or device
    (opening a FIFO waits forever for a reader, `/dev/zero` never ends when read back).
    """
    if path.is_dir():
        raise ValueError(f"--output {str(path)!r} is a folder; give the path of a .jsonl file")
    if path.exists() and not path.is_file():
        raise ValueError(
            f"--output {str(path)!r} is not a regular file (a pipe, device or socket); give the path of a .jsonl file, "
            "or leave --output and --output_dir out to write the records to stdout"
        )


def read_records(path: Path) -> dict[str, dict]:
    """
    The latest record of each id in an output file. The whole file is checked first: a file that is not
    salmonn-infer's own output (every line a record with an id and an answer or error) is refused untouched. Only
    then is a last line cut off by an interruption (no newline, the start of a record that does not parse) removed
    so that appending goes on cleanly.
    """
    check_output_path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    cut = len(data)
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if not data[cut:].startswith(_RECORD_PREFIX) or _parses(data[cut:]):
            raise ValueError(
                f"--output {str(path)!r} was not written by salmonn-infer (its last line is not a record); it is left "
                "unchanged: use another file, or --overwrite_output_dir to replace it"
            )
    try:
        text = data[:cut].decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--output {str(path)!r} is not a salmonn-infer output (not UTF-8 text); it is left unchanged") from err
    records = {}
    for number, line in split_jsonl(text):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not _is_own_record(record):
            raise ValueError(
                f"--output {str(path)!r} line {number} is not a salmonn-infer record (a JSON object with 'id' and "
                "'answer' or 'error'); the file is left unchanged: use another file, or --overwrite_output_dir to "
                "replace it"
            )
        records[str(record["id"])] = record
    if cut < len(data):
        logger.warning("%s: dropping an incomplete last line left by an interrupted run", path)
        with path.open("r+b") as f:
            f.truncate(cut)
    return records


def check_overwritable(path: Path, inputs: list[str]) -> None:
    """
    `--overwrite_output_dir` replaces only salmonn-infer's own output: a file that is one of the run's inputs (an
    audio file or manifest, also through a symlink or hard link) or that does not start with a salmonn-infer record
    (a WAV, notes, a manifest) is refused before anything is opened for writing.
    """
    check_output_path(path)
    if not path.exists():
        return
    target = path.stat()
    for given in inputs:
        try:
            source = os.stat(given)
        except OSError:
            continue
        if (source.st_dev, source.st_ino) == (target.st_dev, target.st_ino):
            raise ValueError(
                f"--output {str(path)!r} is the input {given!r} of this run; --overwrite_output_dir would destroy it: "
                "give another --output"
            )
    with path.open("rb") as f:
        first = f.readline(1 << 20)
    if first and not (first.startswith(_RECORD_PREFIX) and (not first.endswith(b"\n") or _is_own_record(_loads(first)))):
        raise ValueError(
            f"--output {str(path)!r} was not written by salmonn-infer (its first line is not a record); "
            "--overwrite_output_dir replaces only salmonn-infer's own output: give another --output, or remove the file "
            "yourself"
        )


def _loads(line: bytes):
    try:
        return json.loads(line)
    except ValueError:
        return None


def read_done_ids(path: Path) -> set[str]:
    """Ids answered in an output file (see `read_records`); items whose latest record is an error are not done."""
    return {key for key, record in read_records(path).items() if "answer" in record}


def check_resumable(
    path: Path, records: dict[str, dict], items: list[dict] | None, run: dict, prompt: str | None = None
) -> None:
    """
    Refuses to append to answers made by another run: every answer in the file must carry this run's `run` values
    (model, settings), an answer to one of `items` must have been given to the same audio and prompt, and with
    `prompt` (one instruction for a whole dataset) every answer must have been given to it.
    """
    way_out = "use another --output_dir, or --overwrite_output_dir to start afresh"
    for key, record in records.items():
        if "answer" not in record:
            continue
        for name in RUN_KEYS:
            if record.get(name) != run[name]:
                raise ValueError(
                    f"--output {str(path)!r} holds answers made with {name}={record.get(name)!r} (item {key!r}), not "
                    f"{run[name]!r}; mixing them would be silent: {way_out}"
                )
    if prompt is not None:
        items = [{"id": key, "prompt": prompt} for key in records]
    for item in items or ():
        record = records.get(item["id"])
        if record is None or "answer" not in record:
            continue
        for name in ("audio", "prompt"):
            if name in item and record.get(name) != item[name]:
                raise ValueError(
                    f"--output {str(path)!r}: item {item['id']!r} was answered for {name} {record.get(name)!r}, now "
                    f"{item[name]!r}; {way_out}"
                )


def lock_output(path: Path):
    """
    Takes an exclusive lock on `path` (created if missing, its content untouched) for the rest of the run, so that
    two runs never answer the same items into one file; the lock goes when the process ends. Returns the open file.
    """
    import fcntl

    check_output_path(path)
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
    """
    Appends one whole JSON line per record and syncs it, so an interruption loses nothing already written. The file
    is unbuffered: a failed write (a full disk) is reported once, as `OutputWriteError`, and nothing is retried at close.
    """

    def __init__(self, path: Path | None, overwrite: bool = False):
        self.path = path
        if path is None:
            self.stream = sys.stdout
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.stream = path.open("wb" if overwrite else "ab", buffering=0)

    def write(self, record: dict) -> None:
        line = dumps_record(record) + "\n"
        if self.path is None:
            self.stream.write(line)
            self.stream.flush()
            return
        data = line.encode("utf-8")
        try:
            while data:
                data = data[self.stream.write(data) :]
            os.fsync(self.stream.fileno())
        except OSError as err:
            reason = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "it cannot be written"
            raise OutputWriteError(
                f"--output {str(self.path)!r}: {reason} ({err.strerror or err}); the records written before are kept "
                "and a rerun of the same command resumes after them"
            ) from None

    def close(self) -> None:
        if self.path is not None:
            self.stream.close()
