"""The model's own input checks, `logits_to_keep`, and prompts without audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.utils import randomize_lora


RATE = 16000


@pytest.fixture(scope="module")
def model_and_processor():
    from tests.utils import tiny_model_and_processor

    model, processor = tiny_model_and_processor(seed=3)
    randomize_lora(model, 3)
    return model.eval(), processor


def _audio_inputs(processor, seconds: float = 2.0):
    wave = 0.3 * np.sin(2 * np.pi * 440.0 * np.arange(int(seconds * RATE)) / RATE)
    return processor(text="USER: <Speech><SpeechHere></Speech> Describe the audio.\nASSISTANT:", audio=wave, sampling_rate=RATE)


def test_segment_count_mismatch_is_an_error(model_and_processor):
    model, processor = model_and_processor
    inputs = _audio_inputs(processor, seconds=35.0)  # two 30 s segments
    assert inputs["input_features"].shape[0] == inputs["input_values"].shape[0] == 2
    inputs["input_values"], inputs["input_values_mask"] = inputs["input_values"][:1], inputs["input_values_mask"][:1]
    with pytest.raises(ValueError, match="`input_features` has 2 segments but `input_values` has 1"):
        model(**inputs)


def test_placeholders_without_audio_are_an_error(model_and_processor):
    model, processor = model_and_processor
    inputs = _audio_inputs(processor)
    with pytest.raises(ValueError, match="`input_ids` holds audio placeholder tokens but no audio features were given"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def test_ids_and_embeddings_together_are_an_error(model_and_processor):
    model, processor = model_and_processor
    inputs = _audio_inputs(processor)
    embeds = torch.zeros(*inputs["input_ids"].shape, model.config.text_config.hidden_size)
    with pytest.raises(ValueError, match="Give exactly one of `input_ids` and `inputs_embeds`"):
        model(input_ids=inputs["input_ids"], inputs_embeds=embeds)
    with pytest.raises(ValueError, match="Give exactly one of `input_ids` and `inputs_embeds`"):
        model(attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match="Audio inputs need `input_ids` with audio placeholders and no `inputs_embeds`"):
        model.generate(**inputs, inputs_embeds=embeds, max_new_tokens=2)
    with pytest.raises(ValueError, match="Generation from audio needs `use_cache=True`"):
        model.generate(**inputs, use_cache=False, max_new_tokens=2)


def test_logits_to_keep(model_and_processor):
    model, processor = model_and_processor
    inputs = _audio_inputs(processor)
    with torch.no_grad():
        full = model(**inputs).logits
        last = model(**inputs, logits_to_keep=1).logits
        last3 = model(**inputs, logits_to_keep=3).logits
        picked = model(**inputs, logits_to_keep=torch.tensor([0, 5, 7])).logits
    length = inputs["input_ids"].shape[1]
    assert full.shape == (1, length, model.config.text_config.vocab_size)
    assert last.shape[1] == 1 and last3.shape[1] == 3 and picked.shape[1] == 3
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(last3, full[:, -3:], rtol=0, atol=1e-6)
    torch.testing.assert_close(picked, full[:, [0, 5, 7]], rtol=0, atol=1e-6)


def test_text_only_prompt_is_the_language_model_alone(model_and_processor):
    model, processor = model_and_processor
    inputs = processor(text="USER: Tell me a story.\nASSISTANT:")
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert int((inputs["input_ids"] == model.config.audio_token_index).sum()) == 0
    with torch.no_grad():
        logits = model(**inputs).logits
        hidden = model.model.language_model(input_ids=inputs["input_ids"]).last_hidden_state
        assert torch.equal(logits, model.lm_head(hidden))
        ids = model.generate(**inputs, max_new_tokens=6, num_beams=1, do_sample=False, min_new_tokens=6)
        # Greedy by hand, without a cache: the same ids
        expected = inputs["input_ids"]
        for _ in range(6):
            next_id = model(input_ids=expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_id], dim=1)
    assert ids.tolist() == expected.tolist()
