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


# -- the demo's folder: the pipeline and the README's usage run on it ---------------------------------------------

DEMO_ANSWER = "A rising chirp sweeps upward."


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    from salmonn.inference.demo import main as demo_main

    folder = tmp_path_factory.mktemp("demo") / "salmonn-tiny"
    assert demo_main(["--save_dir", str(folder)]) == 0
    return folder


def test_demo_config_registers_every_auto_class_that_save_pretrained_writes(demo_folder):
    import json
    from pathlib import Path

    from modeling_salmonn.modelcard_salmonn import AUTO_MAP
    from salmonn.inference.demo import DEMO_MODEL_DIR

    assert json.loads((Path(DEMO_MODEL_DIR) / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert json.loads((demo_folder / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_demo_without_save_dir_names_no_folder_that_it_removes(caplog):
    import logging

    from salmonn.inference.demo import main as demo_main

    with caplog.at_level(logging.INFO, logger="salmonn.inference.demo"):
        assert demo_main(["--max_new_tokens", "3"]) == 0
    # The demo's own messages (an earlier test in the session may have left transformers' loading logs at INFO).
    text = "\n".join(record.getMessage() for record in caplog.records if record.name == "salmonn.inference.demo")
    assert "in a temporary place, removed at the end; pass --save_dir DIR to keep it" in text
    assert "/tmp" not in text and "salmonn-tiny" not in text


def test_pipeline_on_the_demo_folder_answers_and_honours_the_audio_rate(demo_folder, monkeypatch):
    from transformers import pipeline

    from salmonn.inference.demo import synthesize_clip

    pipe = pipeline("any-to-any", model=str(demo_folder), trust_remote_code=True)
    frames = []
    generate = pipe.model.generate
    monkeypatch.setattr(pipe.model, "generate", lambda **kw: frames.append(kw["input_values"].shape[1]) or generate(**kw))

    def ask(audio):
        messages = [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "Describe the audio."}]}]
        out = pipe(text=messages, generate_kwargs={"max_new_tokens": 20, "num_beams": 1})
        return out[0]["generated_text"][-1]["content"]

    # The chirp at 16 kHz and at 44.1 kHz (a dict with its rate) is the same 2 s clip: 198 BEATs frames, same answer.
    assert ask({"array": synthesize_clip(), "sampling_rate": 16000}) == DEMO_ANSWER
    assert ask({"array": synthesize_clip(sampling_rate=44100), "sampling_rate": 44100}) == DEMO_ANSWER
    assert frames == [198, 198]


def test_readme_usage_runs_on_the_demo_folder(demo_folder, tmp_path):
    import re
    from pathlib import Path

    import soundfile as sf

    from salmonn.inference.demo import synthesize_clip
    from tests.utils import run_fresh_python

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    usage = readme.split("\n## Usage\n", 1)[1].split("\n## ", 1)[0]
    snippets = re.findall(r"```python\n(.*?)```", usage, flags=re.S)
    assert snippets
    sf.write(tmp_path / "clip.wav", synthesize_clip(sampling_rate=44100), 44100)
    for snippet in snippets:
        code = f"path_or_repo_id = {str(demo_folder)!r}\n{snippet}\nprint(answer)"
        out = run_fresh_python(code, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
        assert out.strip().splitlines()[-1] in (DEMO_ANSWER, str([DEMO_ANSWER]))
