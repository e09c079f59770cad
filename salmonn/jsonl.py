"""JSON Lines as every SALMONN tool reads and writes them: lines end at `\n` only, records are written whole."""

from __future__ import annotations

import json
from collections.abc import Iterator


def split_jsonl(text: str) -> Iterator[tuple[int, str]]:
    """
    `(line number, line)` for the non-blank lines of JSONL text. Lines end at `\n` (and a `\r` before it) only:
    `str.splitlines()` also splits on U+2028, U+0085 and other characters that `json.dumps(..., ensure_ascii=False)`
    leaves inside strings, which would cut valid records in two.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


def dumps_record(record: dict) -> str:
    """
    One record as a JSON line (without its `\n`), readable text where possible. A string that cannot be encoded as
    UTF-8 (a lone surrogate, which JSON allows) is written with `\\u` escapes instead of failing.
    """
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record, ensure_ascii=True)
    return line
