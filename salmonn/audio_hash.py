"""
The identity of an item's audio content, recorded with each answer by salmonn-infer and salmonn-eval so that a
resumed run answers again an item whose audio file was replaced under the same name instead of keeping the old answer.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence


# The record key; records written before it existed do not have it and are kept as they are on resume.
AUDIO_HASH_KEY = "audio_hash"
_BLOCK = 1 << 20


def audio_hash(paths: Sequence[str]) -> str | None:
    """
    blake2b of the bytes of the audio files (several for a joined `expand_wav` item), read in 1 MiB blocks: a
    10-minute 16 kHz WAV (19 MB) takes about 20 ms once cached, a copy elsewhere hashes the same and a file
    rewritten with the same size and time does not. None when a file is not a regular file or cannot be read (its
    item fails as it is answered).
    """
    digest = hashlib.blake2b(digest_size=16)
    try:
        for path in paths:
            if not os.path.isfile(path):  # a pipe or device put in the file's place would block or never end
                return None
            with open(path, "rb") as f:
                size = 0
                while block := f.read(_BLOCK):
                    digest.update(block)
                    size += len(block)
            digest.update(size.to_bytes(8, "little"))  # where one file ends and the next begins
    except OSError:
        return None
    return f"blake2b:{digest.hexdigest()}"


class AudioHashes:
    """The audio hash of each item, computed once per run however often it is asked for."""

    def __init__(self):
        self._known: dict[tuple[str, ...], str | None] = {}

    def __call__(self, paths: Sequence[str]) -> str | None:
        key = tuple(paths)
        if key not in self._known:
            self._known[key] = audio_hash(key)
        return self._known[key]

    def changed(self, record: dict, paths: Sequence[str]) -> bool:
        """
        Whether the audio differs from the one `record` answered. A record without a hash (written before hashes
        were recorded) is taken as unchanged: it is kept as earlier versions kept it.
        """
        return AUDIO_HASH_KEY in record and record[AUDIO_HASH_KEY] != self(paths)
