"""
Audio for every SALMONN tool: files are read by the feature extractor's one reader (`decode_audio_file`, which the
processor uses too), clips are resampled with soxr like the processor does, and `expand_wav` clips are joined the
original's way. Inference, training and evaluation all read audio through here.

`load_mono_16k` is the reader for files whose size nobody controls (salmonn-infer's inputs, salmonn-web's uploads):
a compressed file can hold hours of many-channel audio at a high rate in a few megabytes, so the header is checked
first and the file is decoded, reduced to channel 0 and resampled in blocks; memory then follows the 16 kHz mono
result, not rate x channels x duration.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable

import numpy as np


TARGET_SAMPLING_RATE = 16000
# The original puts 0.1 s of silence (1600 samples at 16 kHz) between the clips of `expand_wav`.
EXPAND_SILENCE_SECONDS = 0.1
# Frames decoded at a time by `load_mono_16k` (x channels x 8 bytes: 4 MiB for 8 channels).
BLOCK_FRAMES = 65536
# Header values beyond any real recording (libsndfile itself accepts rates up to 655350 and 1024 channels), and
# the most samples (frames x channels) one file may make the reader decode: 10 min of 8 channels at 384 kHz.
MAX_SAMPLING_RATE = 384000
MAX_CHANNELS = 64
MAX_DECODED_SAMPLES = 600 * 8 * MAX_SAMPLING_RATE
# Formats whose header gives the exact length (MP3's and Ogg's can be estimates): fewer frames than announced is a cut.
_EXACT_LENGTH_FORMATS = ("WAV", "WAVEX", "RF64", "W64", "AIFF", "AU", "CAF", "FLAC")
# libsndfile's note on a WAV whose data chunk claims more bytes than the file holds: "data : 264600 (should be 132278)".
_CUT_DATA_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Data sizes that writers of streams put in a header they cannot go back to (length unknown): not a cut file.
_UNKNOWN_DATA_SIZES = (0, 0xFFFFFFFF)


def read_audio(source: str | os.PathLike | bytes, name: str | None = None) -> tuple[np.ndarray, int]:
    """A file (or a file's encoded bytes) as float64 at its own rate; channel 0 of multi-channel audio, as the original."""
    from modeling_salmonn.feature_extraction_salmonn import decode_audio_file

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


def _check_header(sound, label: str, name: str) -> None:
    """Refuses what no block size can bound: absurd rates or channel counts, and a WAV cut short."""
    if not 0 < sound.samplerate <= MAX_SAMPLING_RATE:
        raise ValueError(
            f"{name}: audio file {label!r} declares a sampling rate of {sound.samplerate} Hz; expected 1 to "
            f"{MAX_SAMPLING_RATE} Hz"
        )
    if not 0 < sound.channels <= MAX_CHANNELS:
        raise ValueError(f"{name}: audio file {label!r} declares {sound.channels} channels; expected 1 to {MAX_CHANNELS}")
    cut = _CUT_DATA_CHUNK.search(sound.extra_info or "")
    if cut is not None:
        declared, present = int(cut.group(1)), int(cut.group(2))
        if declared not in _UNKNOWN_DATA_SIZES and declared > present:
            raise ValueError(
                f"{name}: audio file {label!r} is cut short: its header announces {declared} bytes of audio but the "
                f"file holds {present}; it is not answered from the part that is there (copy or download it again)"
            )


def load_mono_16k(
    source: str | os.PathLike | bytes,
    name: str = "audio",
    check_duration: Callable[[float, str], None] | None = None,
    first_seconds: float | None = None,
) -> np.ndarray:
    """
    An audio file as float64 mono at 16 kHz: channel 0 (as the original), resampled with soxr "HQ" exactly as
    `resample` does, but decoded `BLOCK_FRAMES` at a time and resampled as a stream, so that the peak memory is the
    result's size plus one block. The header is checked before anything is decoded (`check_duration(seconds, name)`
    for the length, sane rate and channel count, a WAV data chunk not cut short); with `first_seconds` only that much
    is read. Every problem is a `ValueError` naming `name` and the file.
    """
    import soundfile
    import soxr

    if isinstance(source, bytes):
        label, opened = "<bytes>", lambda: io.BytesIO(source)
    else:
        from modeling_salmonn.feature_extraction_salmonn import check_audio_path

        check_audio_path(source, name)
        label, opened = os.fspath(source), lambda: os.fspath(source)
    try:
        with soundfile.SoundFile(opened()) as sound:
            _check_header(sound, label, name)
            if check_duration is not None:
                check_duration(sound.frames / sound.samplerate, f"{name} ({label!r})")
            wanted = sound.frames if first_seconds is None else min(sound.frames, int(np.ceil(first_seconds * sound.samplerate)))
            if wanted * sound.channels > MAX_DECODED_SAMPLES:
                raise ValueError(
                    f"{name}: audio file {label!r} would decode to {wanted * sound.channels} samples ({wanted} frames x "
                    f"{sound.channels} channels at {sound.samplerate} Hz); the limit is {MAX_DECODED_SAMPLES} (10 min of "
                    "8 channels at 384 kHz): convert it to mono 16 kHz first"
                )
            exact_length = sound.format in _EXACT_LENGTH_FORMATS
            stream = None
            if sound.samplerate != TARGET_SAMPLING_RATE:
                stream = soxr.ResampleStream(sound.samplerate, TARGET_SAMPLING_RATE, 1, dtype="float64", quality="HQ")
            pieces: list[np.ndarray] = []
            read = 0
            while read < wanted:
                block = sound.read(min(BLOCK_FRAMES, wanted - read), dtype="float64", always_2d=True)
                if len(block) == 0:
                    break
                read += len(block)
                channel = np.ascontiguousarray(block[:, 0])
                pieces.append(channel if stream is None else stream.resample_chunk(channel, last=False))
            if stream is not None:
                pieces.append(stream.resample_chunk(np.zeros(0, dtype=np.float64), last=True))
    except ValueError:
        raise
    except Exception as err:  # soundfile raises its own error types for corrupt files
        raise ValueError(
            f"{name}: cannot decode audio file {label!r} (corrupt, or a format libsndfile does not read: use WAV, "
            f"FLAC, OGG or MP3): {err}"
        ) from err
    if read < wanted and exact_length:
        raise ValueError(
            f"{name}: audio file {label!r} is cut short: its header announces {wanted} frames but only {read} could "
            "be decoded; it is not answered from the part that is there (copy or download it again)"
        )
    if read == 0:
        raise ValueError(f"{name}: audio file {label!r} holds no samples")
    return np.concatenate(pieces)


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
    A file for `feature_extractor` as `load_mono_16k` reads it, with the extractor's limits: the header's length
    checked against its `max_audio_seconds`, or with `truncation` only its first `chunk_length` seconds (and 1 s of
    resampling margin) read, as `SalmonnFeatureExtractor.read_audio_file` does.
    """
    if truncation:
        return load_mono_16k(source, name, first_seconds=feature_extractor.chunk_length + 1)
    return load_mono_16k(source, name, check_duration=feature_extractor.check_duration)
