"""Parity with the original code on fixture A: converted with salmonn-convert, loaded through the Auto classes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from salmonn.conversion.convert_salmonn import main as convert_main
from tests.utils import FIXTURE_A, SPECTROGRAM_TOLERANCE_VS_4_28, fixture_a_convert_args, fixture_golden, read_wav


GOLDEN = fixture_golden()
INPUTS = sorted(GOLDEN["inputs"])
AUDIO_KEYS = ("input_features", "input_values", "input_values_mask")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from transformers import AutoModel, AutoProcessor

    output = tmp_path_factory.mktemp("conversion") / "salmonn-tiny-a"
    code = convert_main(fixture_a_convert_args(output))
    assert code == 0
    model = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules")
    # The original draws the [PAD] rows at random on every load; the fixture recorded the ones it drew.
    pad_rows = load_file(FIXTURE_A / "golden" / "llm_pad_rows.safetensors")
    pad_id = GOLDEN["pad_id"]
    with torch.no_grad():
        model.get_input_embeddings().weight[pad_id] = pad_rows["embed_tokens_rows"][0]
        model.lm_head.weight[pad_id] = pad_rows["lm_head_rows"][0]
    return model, processor


def _inputs(processor, name, **kwargs):
    info = GOLDEN["inputs"][name]
    wav, rate = read_wav(FIXTURE_A / info["wav"])
    # truncation=True: the original cuts audio at 30 s (ours would otherwise add a second segment)
    return processor(text=GOLDEN["prompt"], audio=wav, sampling_rate=rate, truncation=True, **kwargs)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def test_converted_config_matches_fixture(converted):
    model, processor = converted
    config = model.config
    assert config.text_config.vocab_size == GOLDEN["vocab_size_after_pad"] == 501
    assert config.audio_token_index == 501 and processor.audio_token_id == 501
    assert config.window_kernel == 17 and config.window_stride == 17 and config.num_windows == 88
    assert config.lora_rank == 8 and model.lora_scaling == GOLDEN["lora_scaling"][0] == 4.0
    assert config.beats_config.max_distance == 800 and config.beats_config.deep_norm
    # Every size of the fixture's components is compared in tests/test_golden.py.
    assert model.generation_config.num_beams == 4 and model.generation_config.max_new_tokens == 200


@pytest.mark.parametrize("name", INPUTS)
def test_parity_from_wav(converted, name):
    model, processor = converted
    gold = load_file(FIXTURE_A / "golden" / f"{name}.safetensors")
    inputs = _inputs(processor, name)
    prompt_len = GOLDEN["inputs"][name]["prompt_len"]
    assert inputs["input_ids"].shape[1] == prompt_len
    assert _max_diff(inputs["input_features"], gold["spectrogram"]) < SPECTROGRAM_TOLERANCE_VS_4_28
    with torch.no_grad():
        speech_embeds = model.get_audio_features(**{k: inputs[k] for k in AUDIO_KEYS}).pooler_output
        logits = model(**inputs).logits
    assert _max_diff(speech_embeds, gold["speech_embeds"]) < 1e-3
    assert _max_diff(logits, gold["forward_logits"][:, :prompt_len]) < 1e-3


@pytest.mark.parametrize("name", INPUTS)
def test_parity_from_stored_spectrogram_and_teacher_forcing(converted, name):
    model, processor = converted
    gold = load_file(FIXTURE_A / "golden" / f"{name}.safetensors")
    inputs = _inputs(processor, name, text_target=GOLDEN["target_text"])
    inputs["input_features"] = gold["spectrogram"]
    assert torch.equal(inputs["labels"], gold["forward_labels"])
    with torch.no_grad():
        speech_embeds = model.get_audio_features(**{k: inputs[k] for k in AUDIO_KEYS}).pooler_output
        out = model(**inputs)
    assert _max_diff(speech_embeds, gold["speech_embeds"]) < 1e-4
    assert _max_diff(out.logits, gold["forward_logits"]) < 1e-4
    assert abs(float(out.loss) - float(gold["forward_loss"])) < 1e-4
    assert abs(float(out.loss) - GOLDEN["inputs"][name]["forward_loss"]) < 1e-4


@pytest.mark.parametrize("name", INPUTS)
def test_parity_greedy_ids(converted, name):
    model, processor = converted
    gold = load_file(FIXTURE_A / "golden" / f"{name}.safetensors")
    inputs = _inputs(processor, name)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=20, num_beams=1, do_sample=False)
    new = ids[0, inputs["input_ids"].shape[1] :].tolist()
    # The original's ids start with the dummy BOS that transformers 4.28 put before inputs_embeds.
    assert new == gold["generated_ids"][0, 1:].tolist() == GOLDEN["inputs"][name]["generated_ids"][1:]


def test_parity_lora_scaling_halved(converted):
    model, processor = converted
    gold = load_file(FIXTURE_A / "golden" / "gunshots.safetensors")
    inputs = _inputs(processor, "gunshots")
    previous = model.set_lora_scaling(2.0)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            ids = model.generate(**inputs, max_new_tokens=20, num_beams=1, do_sample=False)
    finally:
        model.set_lora_scaling(previous)
    assert previous == 4.0
    assert _max_diff(logits, gold["prompt_logits_lora_half"]) < 1e-3
    assert ids[0, inputs["input_ids"].shape[1] :].tolist() == gold["generated_ids_lora_half"][0, 1:].tolist()


def test_whisper_branch_on_stored_spectrogram(converted):
    model, _ = converted
    gold = load_file(FIXTURE_A / "golden" / "gunshots.safetensors")
    with torch.no_grad():
        out = model.model.speech_encoder(gold["spectrogram"]).last_hidden_state
    assert _max_diff(out, gold["whisper_encoder_out"]) < 1e-4
