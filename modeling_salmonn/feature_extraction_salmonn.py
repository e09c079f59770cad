"""SALMONN's feature extractor: Whisper log-mel spectrograms and the Kaldi fbank that BEATs reads, at 16 kHz."""

from __future__ import annotations

import errno
import functools
import io
import math
import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from transformers import WhisperFeatureExtractor
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import logging


logger = logging.get_logger(__name__)

# BEATs reads Kaldi fbank frames of 25 ms every 10 ms at 16 kHz (torchaudio.compliance.kaldi.fbank defaults).
KALDI_FRAME_LENGTH = 400
KALDI_FRAME_SHIFT = 160
KALDI_FFT_SIZE = 512  # 400 rounded up to a power of two
KALDI_PREEMPHASIS = 0.97
KALDI_LOW_FREQ = 20.0
# Kaldi floors the mel energies at the float32 epsilon whatever the compute dtype.
KALDI_LOG_FLOOR = float(np.finfo(np.float32).eps)
# Segments are fed to BEATs at this many times the [-1, 1] waveform, as in BEATs' `preprocess`.
KALDI_WAVEFORM_SCALE = 2**15
# Segments are processed this many at a time, which bounds the float64 fbank memory for long audio.
EXTRACT_CHUNK = 8
# Float audio is expected in [-1, 1]; far larger samples are a wrong scale or garbage, and from about 1e16 the
# float32 Whisper power spectrum overflows into NaN features and an empty answer.
MAX_ABS_AMPLITUDE = 1e6
# Audio files are decoded this many frames at a time (x channels x 8 bytes: 4 MiB for 8 channels).
DECODE_BLOCK_FRAMES = 65536
# Header values beyond any real recording (libsndfile itself accepts rates up to 655350 and 1024 channels), and the
# most samples (frames x channels) one file may make the reader decode: 10 min of 8 channels at 384 kHz.
MAX_SAMPLING_RATE = 384000
MAX_CHANNELS = 64
MAX_DECODED_SAMPLES = 600 * 8 * MAX_SAMPLING_RATE
# Formats whose header gives the exact length (MP3's and Ogg's can be estimates): fewer frames than announced is a cut.
_EXACT_LENGTH_FORMATS = ("WAV", "WAVEX", "RF64", "W64", "AIFF", "AU", "CAF", "FLAC")
# libsndfile's note on a WAV whose data chunk claims more bytes than the file holds: "data : 264600 (should be 132278)".
_CUT_DATA_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Data sizes that writers of streams put in a header they cannot go back to (length unknown): not a cut file.
_UNKNOWN_DATA_SIZES = (0, 0xFFFFFFFF)


# The only settings Whisper's encoder (1500 positions = 3000 frames of 30 s) and BEATs (16 x 16 patches of a 128-bin
# fbank) accept.
WHISPER_SAMPLING_RATE = 16000
WHISPER_HOP_LENGTH = 160
WHISPER_CHUNK_LENGTH = 30
WHISPER_N_FFT = 400
WHISPER_MEL_BINS = (80, 128)  # large-v2 and earlier; large-v3
BEATS_MEL_BINS = 128


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@functools.lru_cache(maxsize=8)
def _whisper_feature_extractor(
    feature_size: int, sampling_rate: int, hop_length: int, chunk_length: int, n_fft: int
) -> WhisperFeatureExtractor:
    """The Whisper log-mel of SALMONN's segments is exactly `WhisperFeatureExtractor`'s (built once per setting)."""
    return WhisperFeatureExtractor(
        feature_size=feature_size,
        sampling_rate=sampling_rate,
        hop_length=hop_length,
        chunk_length=chunk_length,
        n_fft=n_fft,
    )


@functools.lru_cache(maxsize=8)
def _kaldi_mel_banks(num_mel_bins: int, sampling_rate: int) -> torch.Tensor:
    """
    Kaldi's triangular mel filters (mel = 1127 ln(1 + f / 700), triangles in mel space from 20 Hz to Nyquist, no
    normalisation) as a float64 `[KALDI_FFT_SIZE // 2 + 1, num_mel_bins]` tensor. The weights are computed in
    float32, as Kaldi (BaseFloat) and torchaudio do, and only then widened, so that a float64 fbank uses the same
    filter values as the original.
    """
    num_fft_bins = KALDI_FFT_SIZE // 2
    nyquist = 0.5 * sampling_rate

    def to_mel(freq):
        return 1127.0 * math.log(1.0 + freq / 700.0)

    mel_low, mel_high = to_mel(KALDI_LOW_FREQ), to_mel(nyquist)
    mel_delta = (mel_high - mel_low) / (num_mel_bins + 1)
    index = torch.arange(num_mel_bins, dtype=torch.float32).unsqueeze(1)
    left = mel_low + index * mel_delta
    center = mel_low + (index + 1.0) * mel_delta
    right = mel_low + (index + 2.0) * mel_delta
    bin_freqs = (sampling_rate / KALDI_FFT_SIZE) * torch.arange(num_fft_bins, dtype=torch.float32)
    bin_mels = (1127.0 * torch.log(1.0 + bin_freqs / 700.0)).unsqueeze(0)
    rising = (bin_mels - left) / (center - left)
    falling = (right - bin_mels) / (right - center)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)  # [num_mel_bins, 256]
    # The Nyquist bin gets no weight.
    banks = torch.cat([banks, torch.zeros(num_mel_bins, 1)], dim=1)
    return banks.to(torch.float64).T.contiguous()


def _kaldi_povey_window(device: torch.device) -> torch.Tensor:
    """Kaldi's default "povey" window: a symmetric Hann window to the power 0.85 (float64)."""
    return torch.hann_window(KALDI_FRAME_LENGTH, periodic=False, dtype=torch.float64, device=device).pow(0.85)


def kaldi_num_frames(num_samples: int) -> int:
    """Fbank frames that fit completely in `num_samples` samples (Kaldi's `snip_edges=True`)."""
    if num_samples < KALDI_FRAME_LENGTH:
        return 0
    return 1 + (num_samples - KALDI_FRAME_LENGTH) // KALDI_FRAME_SHIFT


def why_missing(path: str | os.PathLike) -> str:
    """Why `os.path.exists(path)` is false: a symlink loop and a broken symlink are not "does not exist"."""
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return "is a symlink loop (it resolves to itself)"
        return f"is a broken symlink (to {os.readlink(path)!r}, which does not exist)"
    return "does not exist"


def check_audio_path(path: str | os.PathLike, name: str) -> None:
    """Says why `path` cannot be an audio file (missing, a folder, a device, empty), naming the audio."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{name}: audio file {path!r} {why_missing(path)}")
    if os.path.isdir(path):
        raise ValueError(f"{name}: {path!r} is a folder, not an audio file")
    if not os.path.isfile(path):
        raise ValueError(f"{name}: {path!r} is not a regular file (a device, pipe or socket), not an audio file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{name}: audio file {path!r} is empty (0 bytes)")


def _check_header(sound, label: str, name: str) -> None:
    """Refuses what no block size can bound: absurd rates or channel counts, and a WAV whose data chunk is cut short."""
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


def _frames_to_decode(sound, label: str, name: str, first_seconds: float | None, check_duration) -> int:
    """The frames the header allows decoding (all, or the first `first_seconds`), checked before any is decoded."""
    _check_header(sound, label, name)
    if check_duration is not None:
        check_duration(sound.frames / sound.samplerate, f"{name} ({label!r})")
    frames = sound.frames
    if first_seconds is not None:
        frames = min(frames, int(math.ceil(first_seconds * sound.samplerate)))
    if frames * sound.channels > MAX_DECODED_SAMPLES:
        raise ValueError(
            f"{name}: audio file {label!r} would decode to {frames * sound.channels} samples ({frames} frames x "
            f"{sound.channels} channels at {sound.samplerate} Hz); the limit is {MAX_DECODED_SAMPLES} (10 min of "
            "8 channels at 384 kHz): convert it to mono 16 kHz first"
        )
    return frames


def _channel_0_blocks(sound, frames: int):
    """Channel 0 of the next `frames` frames (fewer where the file ends first), `DECODE_BLOCK_FRAMES` at a time."""
    for start in range(0, frames, DECODE_BLOCK_FRAMES):
        block = sound.read(min(DECODE_BLOCK_FRAMES, frames - start), dtype="float64", always_2d=True)
        if len(block) == 0:
            return
        yield np.ascontiguousarray(block[:, 0])


def _decode_channel_0(sound, frames: int, stream) -> tuple[np.ndarray, int]:
    """
    Channel 0 of `frames` frames, resampled by `stream` (a soxr "HQ" `ResampleStream`, which gives exactly the
    samples of `soxr.resample` on the whole signal) or at the file's rate (`None`), and the frames actually decoded.
    At the file's rate the result is filled in place, so the peak memory is the result plus one block either way.
    """
    decoded = 0
    if stream is None:
        audio = np.empty(frames, dtype=np.float64)
        for block in _channel_0_blocks(sound, frames):
            audio[decoded : decoded + len(block)] = block
            decoded += len(block)
        return audio[:decoded], decoded
    pieces = []
    for block in _channel_0_blocks(sound, frames):
        pieces.append(stream.resample_chunk(block))
        decoded += len(block)
    pieces.append(stream.resample_chunk(np.zeros(0, dtype=np.float64), last=True))
    return np.concatenate(pieces), decoded


def decode_audio_file(
    source: str | os.PathLike | bytes,
    name: str = "audio",
    first_seconds: float | None = None,
    check_duration=None,
    sampling_rate: int | None = None,
) -> tuple[np.ndarray, int]:
    """
    The package's one audio-file reader (soundfile): channel 0 (as the original SALMONN reads files) as float64,
    resampled to `sampling_rate` (soxr "HQ") or at the file's own rate (`None`), and that rate. A compressed file can
    hold hours of many-channel audio at a high rate in a few megabytes, so the header is checked before anything is
    decoded (a sane rate and channel count, a WAV data chunk not cut short, `check_duration(seconds, name)` on its
    length, at most `MAX_DECODED_SAMPLES` frames x channels) and the file is decoded in blocks: memory follows the
    result, not rate x channels x duration. With `first_seconds` only that much is read. `source` is a path or the
    encoded bytes of a file; every problem is a `ValueError` naming `name` and the file.
    """
    import soundfile
    import soxr

    if isinstance(source, bytes):
        label, opened = "<bytes>", io.BytesIO(source)
    else:
        check_audio_path(source, name)
        label, opened = os.fspath(source), os.fspath(source)

    def undecodable(err: Exception) -> ValueError:  # soundfile raises its own error types for corrupt files
        return ValueError(
            f"{name}: cannot decode audio file {label!r} (corrupt, or a format libsndfile does not read: use WAV, "
            f"FLAC, OGG or MP3): {err}"
        )

    try:
        sound = soundfile.SoundFile(opened)
    except Exception as err:
        raise undecodable(err) from err
    with sound:
        frames = _frames_to_decode(sound, label, name, first_seconds, check_duration)
        rate = sound.samplerate if sampling_rate is None else sampling_rate
        stream = None
        if rate != sound.samplerate:
            stream = soxr.ResampleStream(sound.samplerate, rate, 1, dtype="float64", quality="HQ")
        try:
            audio, decoded = _decode_channel_0(sound, frames, stream)
        except Exception as err:
            raise undecodable(err) from err
        exact_length = sound.format in _EXACT_LENGTH_FORMATS
    if decoded < frames and exact_length:
        raise ValueError(
            f"{name}: audio file {label!r} is cut short: its header announces {frames} frames but only {decoded} could "
            "be decoded; it is not answered from the part that is there (copy or download it again)"
        )
    if decoded == 0:
        raise ValueError(f"{name}: audio file {label!r} holds no samples")
    return audio, rate


def check_audio_inputs(
    input_features: torch.Tensor, input_values: torch.Tensor, input_values_mask: torch.Tensor | None, num_mel_bins: int
) -> None:
    """
    What the encoders cannot check themselves, once per prompt: tensors with data (not on the meta device), the mel
    bins this model reads, finite values (a NaN would give an empty answer without a word) and a real frame in every
    segment. Errors name the input and what is expected.
    """
    inputs = {"input_features": input_features, "input_values": input_values, "input_values_mask": input_values_mask}
    for key, tensor in inputs.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            raise ValueError(f"input `{key}` is on the meta device (a tensor without data); pass the processor's output")
    for key, tensor, bins, setting in (
        ("input_features", input_features, num_mel_bins, "feature_size"),
        ("input_values", input_values, BEATS_MEL_BINS, "beats_num_mel_bins"),
    ):
        axis = 1 if key == "input_features" else -1
        if tensor.ndim != 3 or tensor.shape[axis] != bins:
            raise ValueError(
                f"`{key}` has shape {tuple(tensor.shape)}, but this model reads {bins} mel bins per frame: the processor's "
                f"`{setting}` must be {bins}"
            )
        finite = torch.isfinite(tensor).flatten(1).all(-1)
        if not bool(finite.all()):
            rows = torch.nonzero(~finite).flatten().tolist()
            raise ValueError(f"`{key}` holds NaN or inf values in segment row(s) {rows[:10]}; the features must be finite")
    if input_values_mask is not None:
        empty = torch.nonzero(input_values_mask.sum(-1) == 0).flatten().tolist()
        if empty:
            raise ValueError(
                f"`input_values_mask` row {empty[0]} marks no audio frame (rows without audio: {empty[:10]}); every "
                "segment needs at least one real frame, as the processor marks them"
            )


class SalmonnFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Turns audio into SALMONN's two encoder inputs. Every audio is cut into 30 s segments (or, with
    `truncation=True`, only its first 30 s is kept, as in the original code); each segment gives

    - `input_features` `[80, 3000]`: the Whisper log-mel spectrogram of the segment zero-padded to 30 s, exactly
      what `WhisperFeatureExtractor(feature_size=80)` computes;
    - `input_values` `[T, 128]`: the normalised Kaldi fbank that BEATs reads (`torchaudio.compliance.kaldi.fbank`
      of the waveform times 2**15 with 128 mel bins, then `(fbank - fbank_mean) / (2 * fbank_std)`), computed in
      float64 like the original (which feeds soundfile's float64 waveform) and returned as float32;
      `T = 1 + (samples - 400) // 160`. Segments of a batch are zero-padded to the longest one and
      `input_values_mask` marks the real frames.

    Audio is validated (finite, non-empty, mono or `[samples, channels]`), integer PCM is scaled to [-1, 1],
    multichannel audio keeps channel 0 (as the original does) and other sampling rates are resampled to 16 kHz.
    Segments shorter than `min_seconds` are zero-padded to it (the original's 1 s minimum).

    Args:
        feature_size (`int`): Whisper mel bins (80 for Whisper large-v2, 128 for large-v3).
        sampling_rate (`int`): rate the encoders expect; only 16000 is meaningful for Whisper and BEATs.
        hop_length (`int`): Whisper STFT hop.
        chunk_length (`int`): segment length in seconds (Whisper's 30 s context).
        n_fft (`int`): Whisper STFT size.
        padding_value (`float`): waveform padding value (silence).
        beats_num_mel_bins (`int`): mel bins of the BEATs fbank.
        fbank_mean, fbank_std (`float`): BEATs fbank normalisation constants.
        min_seconds (`float`): shorter segments are zero-padded to this length.
        max_audio_seconds (`float`, *optional*): longest audio accepted without truncation (`None`: no limit).
    """

    model_input_names = ["input_features", "input_values", "input_values_mask"]

    def __init__(
        self,
        feature_size: int = 80,
        sampling_rate: int = 16000,
        hop_length: int = 160,
        chunk_length: int = 30,
        n_fft: int = 400,
        padding_value: float = 0.0,
        beats_num_mel_bins: int = 128,
        fbank_mean: float = 15.41663,
        fbank_std: float = 6.55582,
        min_seconds: float = 1.0,
        max_audio_seconds: float | None = 600.0,
        **kwargs,
    ):
        name = self.__class__.__name__
        # Checked before the parent builds its mel filters, which fail deep in numpy on a float size such as 80.0.
        for key, value in (
            ("sampling_rate", sampling_rate), ("hop_length", hop_length), ("chunk_length", chunk_length), ("n_fft", n_fft),
            ("feature_size", feature_size), ("beats_num_mel_bins", beats_num_mel_bins),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: `{key}` must be a positive integer, got {value!r}")
        # Whisper's encoder reads exactly 3000 frames of 30 s (its 1500 positions) and BEATs' patches tile 128 mel bins
        # of a 16 kHz fbank: another value fails deep inside an encoder, or first allocates segments of any length.
        for key, value, expected in (
            ("sampling_rate", sampling_rate, (WHISPER_SAMPLING_RATE,)),
            ("hop_length", hop_length, (WHISPER_HOP_LENGTH,)),
            ("chunk_length", chunk_length, (WHISPER_CHUNK_LENGTH,)),
            ("n_fft", n_fft, (WHISPER_N_FFT,)),
            ("feature_size", feature_size, WHISPER_MEL_BINS),
            ("beats_num_mel_bins", beats_num_mel_bins, (BEATS_MEL_BINS,)),
        ):
            if value not in expected:
                want = " or ".join(str(v) for v in expected)
                raise ValueError(f"{name}: `{key}` must be {want} (what Whisper and BEATs read), got {value!r}")
        kwargs.setdefault("return_attention_mask", False)
        super().__init__(
            feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs
        )
        for key, value in (("fbank_mean", fbank_mean), ("fbank_std", fbank_std)):
            if not _is_finite_number(value) or (key == "fbank_std" and value <= 0):
                kind = "a positive finite number" if key == "fbank_std" else "a finite number"
                raise ValueError(f"{name}: `{key}` must be {kind} (BEATs fbank normalisation), got {value!r}")
        if not _is_finite_number(min_seconds) or not 0 <= min_seconds <= chunk_length:
            raise ValueError(f"{name}: `min_seconds` must be a number of seconds from 0 to {chunk_length}, got {min_seconds!r}")
        if max_audio_seconds is not None and (not _is_finite_number(max_audio_seconds) or max_audio_seconds <= 0):
            raise ValueError(
                f"{name}: `max_audio_seconds` must be a positive number of seconds or null (no limit), got {max_audio_seconds!r}"
            )
        self.hop_length = hop_length
        self.chunk_length = chunk_length
        self.n_fft = n_fft
        self.beats_num_mel_bins = beats_num_mel_bins
        self.fbank_mean = fbank_mean
        self.fbank_std = fbank_std
        self.min_seconds = min_seconds
        self.max_audio_seconds = max_audio_seconds

    @property
    def n_samples(self) -> int:
        """Samples in one segment (30 s)."""
        return self.chunk_length * self.sampling_rate

    @property
    def nb_max_frames(self) -> int:
        """Whisper frames of one segment (3000)."""
        return self.n_samples // self.hop_length

    # ------------------------------------------------------------------ validation and segmentation

    def _as_mono_float64(self, audio, name: str) -> np.ndarray:
        if isinstance(audio, torch.Tensor):
            audio = audio.detach().cpu()
            if audio.is_floating_point() and audio.dtype not in (torch.float32, torch.float64):
                audio = audio.to(torch.float32)  # bfloat16 has no numpy dtype
            audio = audio.numpy()
        elif isinstance(audio, (list, tuple)):
            try:
                audio = np.asarray(audio)
            except ValueError as err:
                raise ValueError(f"{name}: cannot turn the given list into an array of samples: {err}") from err
        if not isinstance(audio, np.ndarray):
            raise ValueError(
                f"{name}: expected a numpy array, a torch tensor or a list of samples, got {type(audio).__name__}"
            )

        if audio.size == 0:
            raise ValueError(f"{name}: the audio is empty (shape {tuple(audio.shape)})")
        if audio.ndim == 2:
            # More columns than rows reads as [channels, samples], unless the columns could be channels: a clip of a
            # few frames ([1, 2]: one stereo frame) is [samples, channels] as documented.
            if audio.shape[1] > audio.shape[0] and audio.shape[1] > MAX_CHANNELS:
                raise ValueError(
                    f"{name}: 2-D audio must be [samples, channels], got shape {tuple(audio.shape)}, which has more "
                    "columns than rows and is probably [channels, samples]; transpose it (or pass a batch as a "
                    "list of 1-D arrays)"
                )
            audio = audio[:, 0]  # channel 0, like the original loader (not a downmix)
        elif audio.ndim != 1:
            raise ValueError(
                f"{name}: expected 1-D audio or a 2-D [samples, channels] array, got {audio.ndim} dimensions "
                f"(shape {tuple(audio.shape)})"
            )

        kind, bits = audio.dtype.kind, 8 * audio.dtype.itemsize
        if kind in "iu" and bits > 32:
            raise ValueError(
                f"{name}: integer samples must be 8, 16 or 32-bit PCM, got dtype {audio.dtype}; pass float samples "
                "in [-1, 1] or int16/int32 PCM"
            )
        if kind == "i":  # signed PCM: full scale is 2**(bits - 1)
            audio = audio.astype(np.float64) / float(2 ** (bits - 1))
        elif kind == "u":  # unsigned PCM (e.g. 8-bit WAV): centred on 2**(bits - 1)
            audio = (audio.astype(np.float64) - float(2 ** (bits - 1))) / float(2 ** (bits - 1))
        elif kind == "f":
            audio = np.ascontiguousarray(audio, dtype=np.float64)
        else:
            raise ValueError(f"{name}: expected float or integer PCM samples, got dtype {audio.dtype}")

        finite = np.isfinite(audio)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(
                f"{name}: the audio contains {bad.size} non-finite sample(s) (NaN or inf), the first at index "
                f"{bad[0]}"
            )
        peak = float(np.abs(audio).max())
        if peak > MAX_ABS_AMPLITUDE:
            raise ValueError(
                f"{name}: the audio's largest sample is {peak:.3g}; float samples must lie in [-1, 1] (at most "
                f"{MAX_ABS_AMPLITUDE:.0e} is accepted), so this audio is scaled wrongly or is not audio"
            )
        return audio

    def check_duration(self, seconds: float, name: str) -> None:
        """Refuses audio longer than `max_audio_seconds`; file readers call it with the header's length, before decoding."""
        if self.max_audio_seconds is not None and seconds > self.max_audio_seconds:
            raise ValueError(
                f"{name}: the audio is {seconds:.2f} s long, longer than max_audio_seconds={self.max_audio_seconds} "
                f"s; pass truncation=True to keep only its first {self.chunk_length} s or raise max_audio_seconds"
            )

    def _resample(self, audio: np.ndarray, sampling_rate: int, name: str) -> np.ndarray:
        # soxr: a small maintained library, the one transformers' own `load_audio` and librosa (by default,
        # "soxr_hq") resample with; "HQ" therefore gives the same samples as `librosa.load(path, sr=16000)`.
        # torchaudio is not installable next to recent CPU torch builds and librosa is a heavy dependency.
        try:
            import soxr
        except ImportError as err:
            raise ImportError(
                f"{name} is sampled at {sampling_rate} Hz and must be resampled to {self.sampling_rate} Hz, which "
                "needs the `soxr` package: pip install soxr (or resample the audio to 16 kHz yourself)"
            ) from err
        return np.asarray(soxr.resample(audio, sampling_rate, self.sampling_rate, quality="HQ"), dtype=np.float64)

    def read_audio_file(
        self, source: str | os.PathLike | bytes, name: str = "audio", truncation: bool = False
    ) -> tuple[np.ndarray, int]:
        """
        An audio file as channel 0 at `sampling_rate` and that rate (see `decode_audio_file`, which decodes and
        resamples it in blocks): its header's length is checked against `max_audio_seconds` first, and with
        `truncation` only the first 30 s (plus the resampling margin) are read. The samples are those that
        `prepare_audio` makes of the whole decoded file.
        """
        if truncation:
            return decode_audio_file(source, name, first_seconds=self.chunk_length + 1, sampling_rate=self.sampling_rate)
        return decode_audio_file(source, name, check_duration=self.check_duration, sampling_rate=self.sampling_rate)

    def prepare_audio(
        self,
        audio,
        sampling_rate: int | None = None,
        truncation: bool = False,
        name: str = "audio",
    ) -> np.ndarray:
        """
        Validates one audio and returns it as the float64 16 kHz mono waveform that `to_segments` cuts: what a
        batch tool checks item by item before it hands the audio to the processor.

        Args:
            audio: a 1-D waveform or a `[samples, channels]` array (numpy, torch or list); float in [-1, 1] or
                integer PCM.
            sampling_rate: rate of `audio`; `None` assumes 16 kHz (with a warning).
            truncation: keep only the first 30 s (the original's behaviour) instead of refusing audio longer than
                `max_audio_seconds`.
            name: how errors refer to this audio.
        """
        if sampling_rate is None:
            logger.warning(
                f"No sampling_rate given for {name}; assuming {self.sampling_rate} Hz. Pass `sampling_rate` to "
                "avoid silent errors."
            )
            sampling_rate = self.sampling_rate
        if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name}: sampling_rate must be a number of Hz, got {sampling_rate!r}")
        if not (sampling_rate > 0 and float(sampling_rate).is_integer()):
            raise ValueError(f"{name}: sampling_rate must be a positive whole number of Hz, got {sampling_rate!r}")
        sampling_rate = int(sampling_rate)

        audio = self._as_mono_float64(audio, name)
        if truncation:
            # Resampling only needs the first 30 s plus a margin for the resampling filter.
            audio = audio[: int(math.ceil((self.chunk_length + 1) * sampling_rate))]
        else:
            self.check_duration(audio.shape[0] / sampling_rate, name)
        if sampling_rate != self.sampling_rate:
            audio = self._resample(audio, sampling_rate, name)
        return audio[: self.n_samples] if truncation else audio

    def to_segments(
        self,
        audio,
        sampling_rate: int | None = None,
        truncation: bool = False,
        name: str = "audio",
    ) -> list[np.ndarray]:
        """
        Validates one audio (see `prepare_audio`) and cuts it into the float64 16 kHz segments of at most 30 s that
        `extract` turns into features; segments shorter than `min_seconds` are zero-padded to it.
        """
        audio = self.prepare_audio(audio, sampling_rate=sampling_rate, truncation=truncation, name=name)
        segments = [audio[start : start + self.n_samples] for start in range(0, audio.shape[0], self.n_samples)]
        min_samples = int(round(self.min_seconds * self.sampling_rate))
        return [
            np.pad(segment, (0, min_samples - segment.shape[0])) if segment.shape[0] < min_samples else segment
            for segment in segments
        ]

    # ------------------------------------------------------------------ features

    def _whisper_log_mel(self, waveforms: list[torch.Tensor], device: str | torch.device) -> torch.Tensor:
        """Segments (float64, at most 30 s) -> `[S, feature_size, nb_max_frames]`: zero-padded to 30 s, float32."""
        whisper = _whisper_feature_extractor(
            self.feature_size, self.sampling_rate, self.hop_length, self.chunk_length, self.n_fft
        )
        waveforms = [wave.to(torch.float32).numpy() for wave in waveforms]
        features = whisper(waveforms, sampling_rate=self.sampling_rate, return_tensors="pt", device=str(device))
        return features["input_features"]

    def _beats_fbank(self, waveforms: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
        """
        `[S, L]` float64 waveforms in [-1, 1] -> `[S, T, beats_num_mel_bins]` normalised Kaldi fbank (float64);
        frames at or past `num_frames[s]` (those reaching into the batch padding) are set to 0.
        """
        frames = (waveforms * KALDI_WAVEFORM_SCALE).unfold(-1, KALDI_FRAME_LENGTH, KALDI_FRAME_SHIFT)
        frames = frames - frames.mean(dim=-1, keepdim=True)  # remove the DC offset of each frame
        # Pre-emphasis x[j] - 0.97 x[j - 1]; Kaldi's first sample uses itself as its predecessor.
        emphasised = torch.empty_like(frames)
        emphasised[..., 1:] = frames[..., 1:] - KALDI_PREEMPHASIS * frames[..., :-1]
        emphasised[..., 0] = frames[..., 0] - KALDI_PREEMPHASIS * frames[..., 0]
        emphasised *= _kaldi_povey_window(frames.device)
        spectrum = torch.view_as_real(torch.fft.rfft(emphasised, n=KALDI_FFT_SIZE))
        power = spectrum.square().sum(dim=-1)  # |X|^2
        banks = _kaldi_mel_banks(self.beats_num_mel_bins, self.sampling_rate).to(frames.device)
        fbank = torch.clamp(power @ banks, min=KALDI_LOG_FLOOR).log()
        fbank = (fbank - self.fbank_mean) / (2 * self.fbank_std)
        real = torch.arange(fbank.shape[1], device=fbank.device).unsqueeze(0) < num_frames.unsqueeze(1)
        return fbank * real.unsqueeze(-1)

    def extract(
        self,
        segments: Sequence[np.ndarray],
        return_tensors: str | None = "pt",
        device: str | torch.device = "cpu",
    ) -> BatchFeature:
        """
        Features of 16 kHz segments from `to_segments` (each at most 30 s), in order.

        Args:
            segments: 1-D float waveforms at 16 kHz.
            return_tensors: "pt" for torch tensors, "np" or `None` for numpy arrays.
            device: where to compute (results come back on the CPU).

        Returns:
            `BatchFeature` with `input_features` `[S, feature_size, 3000]` float32, `input_values`
            `[S, T_max, beats_num_mel_bins]` float32 and `input_values_mask` `[S, T_max]` int64 (1 = real frame).
        """
        if isinstance(segments, (np.ndarray, torch.Tensor)) or not isinstance(segments, Sequence):
            raise ValueError("extract expects a list of 1-D segments (see `to_segments`)")
        if len(segments) == 0:
            raise ValueError("extract got no segments")
        waves = []
        for i, segment in enumerate(segments):
            segment = torch.as_tensor(np.asarray(segment) if not isinstance(segment, torch.Tensor) else segment)
            if segment.ndim != 1 or not segment.is_floating_point():
                raise ValueError(
                    f"segments[{i}]: expected a 1-D float waveform, got shape {tuple(segment.shape)} "
                    f"and dtype {segment.dtype}; use `to_segments` to prepare audio"
                )
            if not KALDI_FRAME_LENGTH <= segment.shape[0] <= self.n_samples:
                raise ValueError(
                    f"segments[{i}]: has {segment.shape[0]} samples; a segment must have between "
                    f"{KALDI_FRAME_LENGTH} and {self.n_samples} samples (use `to_segments`)"
                )
            waves.append(segment.detach().to("cpu", torch.float64))

        lengths = torch.tensor([w.shape[0] for w in waves])
        num_frames = torch.tensor([kaldi_num_frames(int(n)) for n in lengths])
        max_frames = int(num_frames.max())
        max_samples = KALDI_FRAME_LENGTH + (max_frames - 1) * KALDI_FRAME_SHIFT

        features, fbanks = [], []
        with torch.no_grad():
            for start in range(0, len(waves), EXTRACT_CHUNK):
                chunk = waves[start : start + EXTRACT_CHUNK]
                beats_in = torch.zeros(len(chunk), max_samples, dtype=torch.float64)
                for row, wave in enumerate(chunk):
                    keep = min(wave.shape[0], max_samples)
                    beats_in[row, :keep] = wave[:keep]
                features.append(self._whisper_log_mel(chunk, device))
                chunk_frames = num_frames[start : start + EXTRACT_CHUNK].to(device)
                fbanks.append(self._beats_fbank(beats_in.to(device), chunk_frames).to(torch.float32).cpu())

        mask = (torch.arange(max_frames).unsqueeze(0) < num_frames.unsqueeze(1)).long()
        data = {
            "input_features": torch.cat(features),
            "input_values": torch.cat(fbanks),
            "input_values_mask": mask,
        }
        if return_tensors != "pt":
            if return_tensors not in (None, "np"):
                raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(
        self,
        raw_speech,
        sampling_rate: int | None = None,
        truncation: bool = False,
        return_tensors: str | None = "pt",
        device: str | torch.device = "cpu",
        **kwargs,
    ) -> BatchFeature:
        """
        Features of one audio (an array or tensor, 1-D or `[samples, channels]`) or of a list of audios; an audio
        longer than 30 s contributes several consecutive segments (rows) unless `truncation=True`.
        """
        if kwargs:
            raise ValueError(f"{self.__class__.__name__}.__call__ got unexpected arguments: {sorted(kwargs)}")
        is_batch = isinstance(raw_speech, (list, tuple)) and any(
            isinstance(item, (np.ndarray, torch.Tensor, list, tuple)) for item in raw_speech
        )
        audios = list(raw_speech) if is_batch else [raw_speech]
        segments = []
        for i, audio in enumerate(audios):
            segments.extend(
                self.to_segments(audio, sampling_rate=sampling_rate, truncation=truncation, name=f"audio[{i}]")
            )
        return self.extract(segments, return_tensors=return_tensors, device=device)


__all__ = ["SalmonnFeatureExtractor", "check_audio_inputs", "check_audio_path", "decode_audio_file", "why_missing"]
