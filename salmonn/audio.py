"""
Audio for every SALMONN tool: files are read by the feature extractor's one reader (`decode_audio_file`, which the
processor uses too), clips are resampled with soxr like the processor does, and `expand_wav` clips are joined the
original's way. Inference, training and evaluation all read audio through here.
"""

from __future__ import annotations

import os

import numpy as np

from modeling_salmonn.feature_extraction_salmonn import decode_audio_file


TARGET_SAMPLING_RATE = 16000
# The original puts 0.1 s of silence (1600 samples at 16 kHz) between the clips of `expand_wav`.
EXPAND_SILENCE_SECONDS = 0.1


def read_audio(source: str | os.PathLike | bytes, name: str | None = None) -> tuple[np.ndarray, int]:
    """A file (or a file's encoded bytes) as float64 at its own rate; channel 0 of multi-channel audio, as the original."""
    if name is None:
        name = "<bytes>" if isinstance(source, bytes) else os.fspath(source)
    data, rate = decode_audio_file(source, name)
    if data.ndim == 2:
        data = data[:, 0]
    return np.ascontiguousarray(data), rate


def resample(audio: np.ndarray, rate: int, target: int = TARGET_SAMPLING_RATE) -> np.ndarray:
    if rate == target:
        return audio
    import soxr

    return np.asarray(soxr.resample(audio, rate, target, quality="HQ"), dtype=np.float64)


def join_with_silence(parts: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, int]:
    """`expand_wav`: clips at 16 kHz one after the other with 0.1 s of silence between them."""
    gap = np.zeros(int(round(EXPAND_SILENCE_SECONDS * TARGET_SAMPLING_RATE)), dtype=np.float64)
    pieces: list[np.ndarray] = []
    for k, (audio, rate) in enumerate(parts):
        if k:
            pieces.append(gap)
        pieces.append(resample(np.asarray(audio, dtype=np.float64), rate))
    return np.concatenate(pieces), TARGET_SAMPLING_RATE
