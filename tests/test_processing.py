"""The chat template's audio: a rate that is given is honoured, a missing one is warned about, as in `processor(...)`."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.utils import tiny_model_and_processor


RATE = 44100
# A 5 s tone at 44.1 kHz: 498 BEATs frames once resampled to 16 kHz, 1376 when taken as 16 kHz (13.8 s).
SECONDS = 5
FRAMES_AT_16K, FRAMES_MISREAD = 498, 1376


@pytest.fixture(scope="module")
def processor():
    return tiny_model_and_processor(seed=0)[1]


def _tone() -> np.ndarray:
    t = np.arange(RATE * SECONDS) / RATE
    return 0.3 * np.sin(2 * np.pi * 440 * t)


def _chat(processor, audio, **kwargs):
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "Describe."}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs)


def _assert_same_inputs(got, want):
    assert sorted(got.keys()) == sorted(want.keys())
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _reference(processor):
    return processor(text=processor.format_prompt("Describe."), audio=_tone(), sampling_rate=RATE)


def test_chat_audio_dict_with_its_rate_is_resampled(processor, caplog):
    want = _reference(processor)
    assert want["input_values"].shape[1] == FRAMES_AT_16K
    with caplog.at_level(logging.WARNING):
        got = _chat(processor, {"array": _tone(), "sampling_rate": RATE})
    _assert_same_inputs(got, want)
    assert "sampling_rate" not in caplog.text


def test_chat_bare_array_takes_sampling_rate_or_warns(processor, caplog):
    _assert_same_inputs(_chat(processor, _tone(), sampling_rate=RATE), _reference(processor))
    _assert_same_inputs(_chat(processor, torch.tensor(_tone()), processor_kwargs={"sampling_rate": RATE}), _reference(processor))
    with caplog.at_level(logging.WARNING):
        misread = _chat(processor, _tone())
    assert misread["input_values"].shape[1] == FRAMES_MISREAD
    assert "No sampling_rate given for conversation audio 0; assuming 16000 Hz" in caplog.text
    assert '{"array": waveform, "sampling_rate": rate}' in caplog.text


def test_chat_datasets_audio_values_are_read_at_their_rate(processor, tmp_path):
    path = tmp_path / "tone.wav"
    sf.write(path, _tone(), RATE, subtype="FLOAT")
    want = _reference(processor)
    _assert_same_inputs(_chat(processor, {"path": str(path), "array": _tone(), "sampling_rate": RATE}), want)
    _assert_same_inputs(_chat(processor, {"path": str(path)}), want)
    _assert_same_inputs(_chat(processor, {"path": None, "bytes": path.read_bytes()}), want)
    _assert_same_inputs(_chat(processor, str(path)), want)


def test_chat_audio_dict_without_a_rate_is_refused(processor):
    with pytest.raises(ValueError, match=r"conversation audio 0: an audio dict with 'array' needs its 'sampling_rate'"):
        _chat(processor, {"array": _tone()})
    with pytest.raises(ValueError, match=r"conversation audio 0: an audio dict needs 'array' and 'sampling_rate', or 'path' / 'bytes'.*\['waveform'\]"):
        _chat(processor, {"waveform": _tone()})


def test_chat_template_leaves_the_conversation_unchanged(processor):
    audio = {"array": _tone(), "sampling_rate": RATE}
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "Describe."}]}]
    processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert conversation[0]["content"][0]["audio"] is audio and audio["array"].shape == (RATE * SECONDS,)


def test_decoded_answers_start_with_their_first_word(processor):
    # The any-to-any pipeline decodes the prompt and prompt + answer, and keeps what follows the decoded prompt.
    prompt_ids = processor.tokenizer("USER: hi\nASSISTANT:")["input_ids"]
    full_ids = processor.tokenizer("USER: hi\nASSISTANT: A rising tone")["input_ids"]
    assert processor.tokenizer.decode(full_ids, skip_special_tokens=True).endswith("ASSISTANT: A rising tone")
    (prompt,) = processor.post_process_image_text_to_text(torch.tensor([prompt_ids]))
    full = processor.post_process_image_text_to_text(torch.tensor(full_ids))  # one sequence gives one string
    assert full.startswith(prompt) and full[len(prompt):] == "A rising tone"
    assert processor.post_process_image_text_to_text(torch.tensor(processor.tokenizer(" A rising tone")["input_ids"])) == "A rising tone"
