"""transformers integrations: the any-to-any pipeline, quantization through from_pretrained, streaming."""

from __future__ import annotations

import numpy as np
import pytest

from tests.utils import save_tiny_checkpoint


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def _audio():
    t = np.arange(16000) / 16000
    return 0.3 * np.sin(2 * np.pi * 300 * t)


def test_any_to_any_pipeline_answers_an_audio_conversation(saved):
    from transformers import AutoModelForMultimodalLM, AutoProcessor, pipeline

    model = AutoModelForMultimodalLM.from_pretrained(saved, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    inputs = processor(text=processor.format_prompt("Describe."), audio=_audio(), sampling_rate=16000)
    ids = model.generate(**inputs, max_new_tokens=5, num_beams=1, do_sample=False)
    want = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]

    pipe = pipeline("any-to-any", model=str(saved), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": _audio()}, {"type": "text", "text": "Describe."}]}]
    out = pipe(text=messages, generate_kwargs={"max_new_tokens": 5, "num_beams": 1, "do_sample": False})
    answer = out[0]["generated_text"][-1]
    assert answer["role"] == "assistant" and answer["content"] == want and len(ids[0]) > len(inputs["input_ids"][0])


def test_audio_placeholders_without_audio_are_refused(saved):
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(saved, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    inputs = processor(text=processor.format_prompt("Describe."), audio=_audio(), sampling_rate=16000)
    with pytest.raises(ValueError, match=r"audio placeholder tokens but no audio was given.*pipeline\('any-to-any'\)"):
        model.generate(input_ids=inputs["input_ids"], max_new_tokens=2)


def test_quantization_config_quantizes_the_language_model_only_as_quantize_int8_does(saved):
    from optimum.quanto.nn import QLinear
    from transformers import AutoModel, QuantoConfig

    from salmonn.inference.engine import quantize_llm_int8

    model = AutoModel.from_pretrained(saved, trust_remote_code=True, quantization_config=QuantoConfig(weights="int8"))
    quantized = [name for name, module in model.named_modules() if isinstance(module, QLinear)]
    layers = model.config.text_config.num_hidden_layers
    assert len(quantized) == 7 * layers  # q, k, v, o, gate, up, down of every LLaMA layer
    assert all(name.startswith("model.language_model.layers.") and ".lora_" not in name for name in quantized)
    assert not isinstance(model.lm_head, QLinear)
    reference = AutoModel.from_pretrained(saved, trust_remote_code=True)
    quantize_llm_int8(reference)
    assert quantized == [name for name, module in reference.named_modules() if isinstance(module, QLinear)]


def test_bitsandbytes_config_skips_the_audio_path():
    from transformers import BitsAndBytesConfig

    from modeling_salmonn.integrations_salmonn import NOT_QUANTIZED_MODULES, quantize_language_model_only

    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["my_module"])
    quantize_language_model_only(config)
    assert config.llm_int8_skip_modules == ["my_module", *NOT_QUANTIZED_MODULES]
    assert {"model.speech_encoder", "model.beats", "model.speech_qformer", "lm_head"} <= set(NOT_QUANTIZED_MODULES)


def test_streaming_with_beams_names_the_fix(saved):
    from transformers import AutoModel, AutoProcessor, TextIteratorStreamer

    model = AutoModel.from_pretrained(saved, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    inputs = processor(text=processor.format_prompt("Describe."), audio=_audio(), sampling_rate=16000)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, timeout=60)
    with pytest.raises(ValueError, match=r"streamer` works only with num_beams=1.*num_beams=4.*num_beams=1\)"):
        model.generate(**inputs, streamer=streamer, max_new_tokens=3)
    ids = model.generate(**inputs, streamer=streamer, max_new_tokens=3, num_beams=1)
    streamed = "".join(streamer)
    assert streamed == processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
