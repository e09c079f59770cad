"""Tests of SalmonnFeatureExtractor: Whisper log-mel and BEATs Kaldi fbank parity, segmentation, validation, I/O."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from transformers import WhisperFeatureExtractor
from transformers.testing_utils import CaptureLogger

from modeling_salmonn import feature_extraction_salmonn
from modeling_salmonn.feature_extraction_salmonn import SalmonnFeatureExtractor
from tests.utils import FIXTURE_A as FIXTURE
from tests.utils import SPECTROGRAM_TOLERANCE_VS_4_28


FIXTURE_CLIPS = ["gunshots", "duck", "music", "synth_short", "synth_long"]
SR = 16000


@pytest.fixture(scope="module")
def fe():
    return SalmonnFeatureExtractor()


def read_clip(name):
    audio, rate = sf.read(FIXTURE / "audio" / f"{name}.wav")  # float64, as the original loader
    return audio, rate


def noise(seconds, seed=0, scale=0.1):
    return np.random.default_rng(seed).standard_normal(int(round(seconds * SR))) * scale


def reference_kaldi_mel_banks():
    """Kaldi's 128 triangular mel filters over the 257 bins of a 512-point FFT, from the definition (float64)."""
    fft_size, n_mels = 512, 128

    def mel(freq):
        return 1127.0 * np.log(1.0 + freq / 700.0)

    low, high = mel(20.0), mel(8000.0)
    delta = (high - low) / (n_mels + 1)
    bin_mels = mel(np.arange(fft_size // 2) * SR / fft_size)
    banks = np.zeros((n_mels, fft_size // 2 + 1))  # the Nyquist bin keeps weight 0
    for m in range(n_mels):
        left, center, right = low + m * delta, low + (m + 1) * delta, low + (m + 2) * delta
        for k, bin_mel in enumerate(bin_mels):
            if left < bin_mel <= center:
                banks[m, k] = (bin_mel - left) / (center - left)
            elif center < bin_mel < right:
                banks[m, k] = (right - bin_mel) / (right - center)
    return banks


def kaldi_fbank_reference(wave, banks):
    """Normalised BEATs input computed frame by frame from the Kaldi definition (numpy, float64)."""
    x = np.asarray(wave, dtype=np.float64) * 32768.0
    frame_length, shift, fft_size = 400, 160, 512
    povey = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame_length) / (frame_length - 1))) ** 0.85
    rows = []
    for t in range(1 + (len(x) - frame_length) // shift):
        frame = x[t * shift : t * shift + frame_length]
        frame = frame - frame.mean()
        emphasised = np.empty_like(frame)
        emphasised[0] = frame[0] - 0.97 * frame[0]
        emphasised[1:] = frame[1:] - 0.97 * frame[:-1]
        padded = np.zeros(fft_size)
        padded[:frame_length] = emphasised * povey
        power = np.abs(np.fft.rfft(padded)) ** 2
        rows.append(np.log(np.maximum(banks @ power, np.finfo(np.float32).eps)))
    return (np.array(rows) - 15.41663) / (2 * 6.55582)


# ---------------------------------------------------------------------------------------------- Whisper log-mel


@pytest.mark.parametrize("name", FIXTURE_CLIPS)
def test_spectrogram_matches_golden_and_whisper(fe, name):
    audio, rate = read_clip(name)
    segments = fe.to_segments(audio, sampling_rate=rate, truncation=True)
    assert len(segments) == 1
    features = fe.extract(segments)["input_features"]
    assert features.shape == (1, 80, 3000) and features.dtype == torch.float32

    golden = load_file(FIXTURE / "golden" / f"{name}.safetensors")["spectrogram"]
    assert (features - golden).abs().max().item() < SPECTROGRAM_TOLERANCE_VS_4_28  # transformers 4.28's numpy path

    whisper = WhisperFeatureExtractor(feature_size=80)(segments[0], sampling_rate=SR, return_tensors="pt")
    assert (features - whisper["input_features"]).abs().max().item() < 1e-5


def test_spectrogram_batch_matches_whisper_per_item(fe):
    clips = [noise(2.0, seed=1), noise(30.0, seed=2, scale=0.3), noise(0.7, seed=3, scale=0.01)]
    segments = [s for clip in clips for s in fe.to_segments(clip, sampling_rate=SR)]
    features = fe.extract(segments)["input_features"]
    whisper = WhisperFeatureExtractor(feature_size=80)
    for row, segment in enumerate(segments):
        expected = whisper(segment, sampling_rate=SR, return_tensors="pt")["input_features"][0]
        assert (features[row] - expected).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------- BEATs fbank


@pytest.mark.parametrize("name", ["synth_short", "gunshots", "duck"])
def test_fbank_matches_kaldi_reference(fe, name):
    audio, rate = read_clip(name)
    (segment,) = fe.to_segments(audio, sampling_rate=rate, truncation=True)
    out = fe.extract([segment])
    frames = 1 + (segment.shape[0] - 400) // 160
    assert out["input_values"].shape == (1, frames, 128)
    assert out["input_values"].dtype == torch.float32
    assert out["input_values_mask"].tolist() == [[1] * frames]
    fbank = out["input_values"][0].numpy()

    # Same filters: framing, DC removal, pre-emphasis, window, FFT and log agree to float32 output rounding.
    our_banks = feature_extraction_salmonn._kaldi_mel_banks(128, SR).numpy().T
    assert np.abs(fbank - kaldi_fbank_reference(segment, our_banks)).max() < 1e-6
    # Exact float64 filters: the float32 filter weights (as in Kaldi and torchaudio) move the result by < 5e-5.
    assert np.abs(fbank - kaldi_fbank_reference(segment, reference_kaldi_mel_banks())).max() < 1e-4


def test_kaldi_filters_match_definition():
    banks = feature_extraction_salmonn._kaldi_mel_banks(128, SR)
    assert banks.shape == (257, 128) and banks.dtype == torch.float64
    assert not banks[-1].any()  # Nyquist bin
    # computed in float32 like torchaudio's get_mel_banks (the original's); weights differ by ~1.4e-5
    assert np.abs(banks.numpy().T - reference_kaldi_mel_banks()).max() < 5e-5


def test_fbank_through_beats_port_matches_golden_beats_features(fe):
    # End to end against the original (torchaudio) fbank: the fixture's BEATs output of each clip. Kaldi's float32
    # filter weights matter here: float64 filters would give up to ~3.6e-5.
    from salmonn.conversion.beats import load_original_beats
    from modeling_salmonn.modeling_beats import BeatsModel

    config, state_dict = load_original_beats(FIXTURE / "beats.pt")
    model = BeatsModel(config).eval()
    model.load_state_dict(state_dict, strict=True)
    for name in FIXTURE_CLIPS:
        audio, rate = read_clip(name)
        inputs = fe(audio, sampling_rate=rate, truncation=True)
        with torch.no_grad():
            hidden = model(inputs["input_values"], attention_mask=inputs["input_values_mask"]).last_hidden_state
        golden = load_file(FIXTURE / "golden" / f"{name}.safetensors")["beats_features"]
        assert hidden.shape == golden.shape
        # 4.3e-6 on one CPU, 1.06e-5 on another: float32 kernels round differently (see SPECTROGRAM_TOLERANCE_VS_4_28)
        assert (hidden - golden).abs().max().item() < 2e-5, name


def test_fbank_frame_counts_match_kaldi_snip_edges(fe):
    # 1 + (n - 400) // 160 frames; BEATs tokens per the fixture README: 48, 144, 192, 1496
    for name, frames in [("synth_short", 98), ("duck", 298), ("gunshots", 398), ("synth_long", 2998)]:
        audio, rate = read_clip(name)
        out = fe(audio, sampling_rate=rate, truncation=True)
        assert out["input_values"].shape[1] == frames
        assert 8 * (frames // 16) == {98: 48, 298: 144, 398: 192, 2998: 1496}[frames]


def test_reference_filters_match_transformers_kaldi_mel_bank():
    import warnings

    from transformers.audio_utils import mel_filter_bank

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Kaldi's lowest filters are empty at 512 points; harmless
        expected = mel_filter_bank(
            num_frequency_bins=257, num_mel_filters=128, min_frequency=20.0, max_frequency=8000.0,
            sampling_rate=SR, norm=None, mel_scale="kaldi", triangularize_in_mel_space=True,
        )
    # the test's own reference agrees with an independent implementation (both float64)
    assert np.abs(reference_kaldi_mel_banks().T - expected).max() < 1e-12


# ---------------------------------------------------------------------------------------------- batching


def test_padded_batch_row_equals_item_alone(fe):
    long_clip, short_clip = noise(4.0, seed=4), noise(1.3, seed=5, scale=0.5)
    batch = fe([long_clip, short_clip], sampling_rate=SR)
    alone = fe(short_clip, sampling_rate=SR)

    n_long, n_short = 1 + (64000 - 400) // 160, 1 + (20800 - 400) // 160
    assert batch["input_values"].shape == (2, n_long, 128)
    assert batch["input_values_mask"].dtype == torch.long
    assert batch["input_values_mask"].sum(-1).tolist() == [n_long, n_short]
    assert batch["input_values_mask"][1, :n_short].all() and not batch["input_values_mask"][1, n_short:].any()
    assert alone["input_values"].shape == (1, n_short, 128)
    assert torch.equal(batch["input_values"][1, :n_short], alone["input_values"][0])
    assert torch.all(batch["input_values"][1, n_short:] == 0)
    assert torch.equal(batch["input_features"][1], alone["input_features"][0])
    assert torch.equal(batch["input_values"][0], fe(long_clip, sampling_rate=SR)["input_values"][0])


def test_extract_of_more_segments_than_one_chunk(fe):
    segments = [noise(1.0 + 0.5 * i, seed=10 + i) for i in range(feature_extraction_salmonn.EXTRACT_CHUNK + 2)]
    out = fe.extract(segments)
    assert out["input_features"].shape == (len(segments), 80, 3000)
    frames = [1 + (len(s) - 400) // 160 for s in segments]
    assert out["input_values_mask"].sum(-1).tolist() == frames
    last = fe.extract(segments[-1:])
    assert torch.equal(out["input_values"][-1, : frames[-1]], last["input_values"][0])


# ---------------------------------------------------------------------------------------------- segmentation


def test_short_audio_padded_to_one_second(fe):
    clip = noise(0.5)
    segments = fe.to_segments(clip, sampling_rate=SR)
    assert len(segments) == 1 and segments[0].shape == (16000,) and segments[0].dtype == np.float64
    np.testing.assert_array_equal(segments[0][:8000], clip)
    assert not segments[0][8000:].any()


def test_segment_counts(fe):
    assert [s.shape[0] for s in fe.to_segments(noise(30.0), sampling_rate=SR)] == [480000]
    long_clip = noise(31.0)
    segments = fe.to_segments(long_clip, sampling_rate=SR)
    assert [s.shape[0] for s in segments] == [480000, 16000]
    np.testing.assert_array_equal(np.concatenate(segments), long_clip)
    # a 0.25 s remainder is zero-padded to 1 s
    segments = fe.to_segments(noise(30.25), sampling_rate=SR)
    assert [s.shape[0] for s in segments] == [480000, 16000] and not segments[1][4000:].any()
    truncated = fe.to_segments(long_clip, sampling_rate=SR, truncation=True)
    assert len(truncated) == 1
    np.testing.assert_array_equal(truncated[0], long_clip[:480000])

    out = fe(long_clip, sampling_rate=SR)
    assert out["input_features"].shape == (2, 80, 3000)
    assert out["input_values_mask"].sum(-1).tolist() == [2998, 98]


def test_max_audio_seconds(fe):
    small = SalmonnFeatureExtractor(max_audio_seconds=60.0)
    clip = np.zeros(61 * SR)
    with pytest.raises(ValueError, match=r"audio\[0\].*61\.00 s.*max_audio_seconds=60\.0"):
        small(clip, sampling_rate=SR)
    assert len(small.to_segments(clip, sampling_rate=SR, truncation=True)) == 1
    assert len(SalmonnFeatureExtractor(max_audio_seconds=None).to_segments(clip, sampling_rate=SR)) == 3


def test_golden_long_clip_first_segment_without_truncation(fe):
    audio, rate = read_clip("synth_long")
    segments = fe.to_segments(audio, sampling_rate=rate)
    assert [s.shape[0] for s in segments] == [480000, 16000]
    golden = load_file(FIXTURE / "golden" / "synth_long.safetensors")["spectrogram"]
    assert (fe.extract(segments[:1])["input_features"] - golden).abs().max().item() < SPECTROGRAM_TOLERANCE_VS_4_28


# ---------------------------------------------------------------------------------------------- conversion


def test_stereo_keeps_channel_zero(fe):
    stereo, rate = read_clip("synth_short")
    assert stereo.ndim == 2 and stereo.shape[1] == 2
    (segment,) = fe.to_segments(stereo, sampling_rate=rate)
    assert segment.flags.c_contiguous
    (left,) = fe.to_segments(stereo[:, 0], sampling_rate=rate)
    (right,) = fe.to_segments(stereo[:, 1], sampling_rate=rate)
    np.testing.assert_array_equal(segment, left)
    assert np.abs(segment - right).max() > 0.1
    # a torch tensor [samples, channels] works the same
    np.testing.assert_array_equal(fe.to_segments(torch.from_numpy(stereo), sampling_rate=rate)[0], left)


def test_integer_pcm_is_scaled(fe):
    as_int16, rate = sf.read(FIXTURE / "audio" / "gunshots.wav", dtype="int16")
    as_float, _ = read_clip("gunshots")
    np.testing.assert_array_equal(fe.to_segments(as_int16, sampling_rate=rate)[0], as_float)

    pcm16 = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    np.testing.assert_array_equal(fe.to_segments(pcm16, sampling_rate=SR)[0][:4], [0.0, 0.5, -1.0, 32767 / 32768])
    pcm32 = np.array([2**30, -(2**31)], dtype=np.int32)
    np.testing.assert_array_equal(fe.to_segments(pcm32, sampling_rate=SR)[0][:2], [0.5, -1.0])
    pcm8 = np.array([128, 0, 192], dtype=np.uint8)
    np.testing.assert_array_equal(fe.to_segments(pcm8, sampling_rate=SR)[0][:3], [0.0, -1.0, 0.5])


def test_float32_and_tensors_accepted(fe):
    clip = noise(1.2).astype(np.float32)
    expected = clip.astype(np.float64)
    np.testing.assert_array_equal(fe.to_segments(clip, sampling_rate=SR)[0], expected)
    np.testing.assert_array_equal(fe.to_segments(torch.from_numpy(clip), sampling_rate=SR)[0], expected)
    half = torch.from_numpy(clip).to(torch.bfloat16)
    np.testing.assert_array_equal(fe.to_segments(half, sampling_rate=SR)[0], half.double().numpy())


def dominant_frequency(wave):
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return np.argmax(spectrum) * SR / len(wave)


@pytest.mark.parametrize("rate,seconds,freq", [(8000, 2.0, 1000.0), (44100, 1.5, 3000.0)])
def test_resampling_to_16k(fe, rate, seconds, freq):
    t = np.arange(int(rate * seconds)) / rate
    sine = 0.5 * np.sin(2 * np.pi * freq * t)
    (segment,) = fe.to_segments(sine, sampling_rate=rate)
    assert segment.shape == (int(round(seconds * SR)),)
    assert abs(dominant_frequency(segment) - freq) <= SR / len(segment)
    assert abs(np.abs(segment[2000:-2000]).max() - 0.5) < 0.01


def test_stereo_resampling_uses_channel_zero(fe):
    stereo = np.stack([np.sin(np.arange(44100) * 0.05), np.zeros(44100)], axis=1) * 0.3
    (segment,) = fe.to_segments(stereo, sampling_rate=44100)
    (left,) = fe.to_segments(np.ascontiguousarray(stereo[:, 0]), sampling_rate=44100)
    assert segment.shape == (16000,)
    np.testing.assert_array_equal(segment, left)


def test_missing_sampling_rate_assumes_16k_with_warning(fe):
    clip = noise(1.0)
    with CaptureLogger(feature_extraction_salmonn.logger) as captured:
        segments = fe.to_segments(clip)
    assert "sampling_rate" in captured.out
    np.testing.assert_array_equal(segments[0], clip)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "audio,message",
    [
        (np.array([]), "empty"),
        (np.full(16000, np.nan), "non-finite"),
        (np.concatenate([np.zeros(100), [np.inf], np.zeros(100)]), "non-finite.*index 100"),
        (np.zeros((100, 2, 2)), "3 dimensions"),
        (np.zeros((2, 16000)), r"\[channels, samples\]"),
        (np.zeros(16000, dtype=np.complex64), "dtype"),
        (np.zeros(16000, dtype=bool), "dtype"),
        (np.zeros(16000, dtype=np.int64), "int64"),
    ],
)
def test_bad_audio_raises(fe, audio, message):
    with pytest.raises(ValueError, match=r"audio\[1\].*" + message):
        fe([noise(1.0), audio], sampling_rate=SR)


@pytest.mark.parametrize("rate", [0, -16000, 16000.5, "16k", True])
def test_bad_sampling_rate_raises(fe, rate):
    with pytest.raises(ValueError, match="sampling_rate"):
        fe.to_segments(noise(1.0), sampling_rate=rate, name="clip.wav")


def test_extract_rejects_bad_segments(fe):
    with pytest.raises(ValueError, match="no segments"):
        fe.extract([])
    with pytest.raises(ValueError, match=r"segments\[1\].*480001"):
        fe.extract([noise(1.0), np.zeros(480001)])
    with pytest.raises(ValueError, match=r"segments\[0\].*1-D"):
        fe.extract([np.zeros((16000, 2))])


# ---------------------------------------------------------------------------------------------- I/O


def test_save_and_load_round_trip(tmp_path):
    original = SalmonnFeatureExtractor(feature_size=128, min_seconds=0.5, max_audio_seconds=None, fbank_std=7.0)
    original.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["feature_extractor_type"] == "SalmonnFeatureExtractor"
    assert saved["feature_size"] == 128 and saved["max_audio_seconds"] is None and saved["fbank_std"] == 7.0
    assert all(isinstance(v, (int, float, str, bool, type(None))) for k, v in saved.items() if k != "auto_map")

    loaded = SalmonnFeatureExtractor.from_pretrained(tmp_path)
    assert loaded.to_dict() == original.to_dict()
    clip = noise(0.3)
    a, b = original(clip, sampling_rate=SR), loaded(clip, sampling_rate=SR)
    assert a["input_features"].shape == (1, 128, 3000)
    assert a["input_values_mask"].sum().item() == 1 + (8000 - 400) // 160  # min_seconds 0.5
    for key in SalmonnFeatureExtractor.model_input_names:
        assert torch.equal(a[key], b[key])


def test_loads_as_remote_code(tmp_path):
    from transformers import AutoFeatureExtractor

    SalmonnFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
    SalmonnFeatureExtractor(min_seconds=2.0).save_pretrained(tmp_path)
    assert (tmp_path / "feature_extraction_salmonn.py").is_file()
    remote = AutoFeatureExtractor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(remote).__name__ == "SalmonnFeatureExtractor"
    assert type(remote) is not SalmonnFeatureExtractor  # the copied file, not this package
    assert remote.min_seconds == 2.0
    clip = noise(1.5, seed=7)
    a, b = remote(clip, sampling_rate=SR), SalmonnFeatureExtractor(min_seconds=2.0)(clip, sampling_rate=SR)
    for key in SalmonnFeatureExtractor.model_input_names:
        assert torch.equal(a[key], b[key])


def test_numpy_output(fe):
    out = fe(noise(1.0), sampling_rate=SR, return_tensors="np")
    assert isinstance(out["input_features"], np.ndarray) and out["input_features"].dtype == np.float32
    assert out["input_values_mask"].dtype == np.int64


def test_remote_code_imports_only_allowed_modules():
    tree = ast.parse(Path(feature_extraction_salmonn.__file__).read_text())
    allowed = {"torch", "numpy", "transformers", "__future__", "functools", "io", "math", "os", "re", "collections", "errno"}
    for node in tree.body:  # top level only; soundfile and soxr are imported inside the reader and resampler
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots = {(node.module or "").split(".")[0]} if node.level == 0 else set()
        else:
            continue
        assert roots <= allowed, roots

