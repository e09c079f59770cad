"""
Audio for every SALMONN tool: files are read by the feature extractor's one reader (`decode_audio_file`, which the
processor uses too: header checked first, then decoded, reduced to channel 0 and resampled in blocks, so memory
follows the result and not rate x channels x duration), clips are resampled with soxr like the processor does, and
`expand_wav` clips are joined the original's way. Inference, training and evaluation all read audio through here.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np


TARGET_SAMPLING_RATE = 16000
# The original puts 0.1 s of silence (1600 samples at 16 kHz) between the clips of `expand_wav`.
EXPAND_SILENCE_SECONDS = 0.1


def read_audio(source: str | os.PathLike | bytes, name: str | None = None) -> tuple[np.ndarray, int]:
    """A file (or a file's encoded bytes) as float64 at its own rate; channel 0 of multi-channel audio, as the original."""
    from modeling_salmonn.feature_extraction_salmonn import decode_audio_file

    if name is None:
        name = "<bytes>" if isinstance(source, bytes) else os.fspath(source)
    return decode_audio_file(source, name)


def resample(audio: np.ndarray, rate: int, target: int = TARGET_SAMPLING_RATE) -> np.ndarray:
    if rate == target:
        return audio
    import soxr

    return np.asarray(soxr.resample(audio, rate, target, quality="HQ"), dtype=np.float64)


def load_mono_16k(
    source: str | os.PathLike | bytes,
    name: str = "audio",
    check_duration: Callable[[float, str], None] | None = None,
    first_seconds: float | None = None,
) -> np.ndarray:
    """
    A file as float64 mono at 16 kHz: channel 0 resampled with soxr "HQ" (the samples `resample` gives), for files
    whose size nobody controls (salmonn-infer's inputs, salmonn-web's uploads, salmonn-eval's items). The header's
    length goes to `check_duration(seconds, name)` before decoding; with `first_seconds` only that much is read.
    """
    from modeling_salmonn.feature_extraction_salmonn import decode_audio_file

    return decode_audio_file(
        source, name, first_seconds=first_seconds, check_duration=check_duration, sampling_rate=TARGET_SAMPLING_RATE
    )[0]


def join_with_silence(parts: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, int]:
    """`expand_wav`: clips at 16 kHz one after the other with 0.1 s of silence between them."""
    gap = np.zeros(int(round(EXPAND_SILENCE_SECONDS * TARGET_SAMPLING_RATE)), dtype=np.float64)
    pieces: list[np.ndarray] = []
    for k, (audio, rate) in enumerate(parts):
        if k:
            pieces.append(gap)
        pieces.append(resample(np.asarray(audio, dtype=np.float64), rate))
    return np.concatenate(pieces), TARGET_SAMPLING_RATE


def read_upload(feature_extractor, source: str | os.PathLike | bytes, name: str, truncation: bool = False) -> np.ndarray:
    """
    A file for `feature_extractor` as its `read_audio_file` reads it, with its limits: the header's length checked
    against its `max_audio_seconds`, or with `truncation` only its first `chunk_length` seconds (and 1 s of
    resampling margin) read. This package's reader is used, not the extractor's, which may be the remote code of
    an older checkpoint.
    """
    if truncation:
        return load_mono_16k(source, name, first_seconds=feature_extractor.chunk_length + 1)
    return load_mono_16k(source, name, check_duration=feature_extractor.check_duration)
