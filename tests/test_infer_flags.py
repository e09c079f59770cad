"""salmonn-infer's decoding and loading flags reach `generate`: a spy on the loaded model, then exact answers."""

from __future__ import annotations

import json

import soundfile
import torch
from transformers import set_seed

from salmonn.inference import engine
from salmonn.inference.infer import main as infer_main
from tests.test_inference import FAST, RATE, checkpoint, clip  # noqa: F401  (module fixture: a saved tiny checkpoint)


def _spy_on_loads(monkeypatch) -> dict[str, list]:
    """Wraps `load_model_and_processor` so that every `generate` of the loaded model records what it was given."""
    calls = {"load": [], "generate": []}
    original = engine.load_model_and_processor

    def load(*args, **kwargs):
        calls["load"].append(kwargs)
        model, processor = original(*args, **kwargs)
        generate = model.generate

        def spy(*gen_args, **gen_kwargs):
            calls["generate"].append({
                "kwargs": {k: v for k, v in gen_kwargs.items() if not isinstance(v, torch.Tensor)},
                "lora_scaling": model.lora_scaling,
                "seed": torch.initial_seed(),
                "llm_dtype": model.lm_head.weight.dtype,
                "encoder_dtype": model.model.speech_encoder.conv1.weight.dtype,
                "input_features_dtype": gen_kwargs["input_features"].dtype,
                "quantized_layers": sum(type(m).__name__ == "QLinear" for m in model.model.language_model.modules()),
            })
            return generate(*gen_args, **gen_kwargs)

        model.generate = spy
        return model, processor

    monkeypatch.setattr(engine, "load_model_and_processor", load)
    return calls


def _answer(capsys) -> str:
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(records) == 1 and "answer" in records[0], records
    return records[0]["answer"]


def test_sampling_flags_seed_and_lora_scaling_reach_generate(checkpoint, tmp_path, monkeypatch, capsys):  # noqa: F811
    wav = tmp_path / "a.wav"
    soundfile.write(wav, clip(2.0, 440.0, 0), RATE)
    calls = _spy_on_loads(monkeypatch)
    sampling = ["--do-sample", "--temperature", "1.7", "--top-p", "0.95", "--lora-scaling", "2.5"]
    answers = {}
    for seed in ("11", "12"):
        code = infer_main(
            ["--model", str(checkpoint), str(wav), "--prompt", "Describe the audio.", *sampling, "--seed", seed, *FAST, "--max-new-tokens", "12"]
        )
        assert code == 0
        answers[seed] = _answer(capsys)
    for call, seed in zip(calls["generate"], (11, 12)):
        assert call["kwargs"] == {"do_sample": True, "temperature": 1.7, "top_p": 0.95, "num_beams": 1, "max_new_tokens": 12}
        assert call["lora_scaling"] == 2.5 and call["seed"] == seed
        assert call["llm_dtype"] == call["encoder_dtype"] == torch.float32 and call["quantized_layers"] == 0
    assert calls["load"][0]["lora_scaling"] == 2.5 and calls["load"][0]["dtype"] == "float32"

    # The same seed gives the same sampled ids in-process; another seed gives other ids.
    set_seed(11)
    model, processor = engine.load_model_and_processor(str(checkpoint), lora_scaling=2.5)
    again = engine.generate_answers(
        model, processor, [{"audio": str(wav), "prompt": "Describe the audio."}],
        {"do_sample": True, "temperature": 1.7, "top_p": 0.95, "num_beams": 1, "max_new_tokens": 12},
    )
    assert again == [answers["11"]]
    assert answers["11"] != answers["12"]


def test_dtype_and_quantize_reach_the_loaded_model(checkpoint, tmp_path, monkeypatch, capsys):  # noqa: F811
    wav = tmp_path / "a.wav"
    soundfile.write(wav, clip(2.0, 440.0, 0), RATE)
    calls = _spy_on_loads(monkeypatch)
    assert infer_main(["--model", str(checkpoint), str(wav), "--dtype", "bfloat16", *FAST]) == 0
    _answer(capsys)
    assert infer_main(["--model", str(checkpoint), str(wav), "--quantize", "int8", *FAST]) == 0
    _answer(capsys)
    bf16, int8 = calls["generate"]
    assert calls["load"][0]["dtype"] == "bfloat16" and calls["load"][1]["quantize"] == "int8"
    # The processor's float32 features; the model casts them for each encoder.
    assert bf16["llm_dtype"] == bf16["encoder_dtype"] == torch.bfloat16 and bf16["input_features_dtype"] == torch.float32
    assert bf16["quantized_layers"] == 0
    # int8: 7 quantized linear layers in each of the 2 decoder layers; the LLM computes in bf16, the encoders in fp32
    assert int8["quantized_layers"] == 14 and int8["llm_dtype"] == torch.bfloat16 and int8["encoder_dtype"] == torch.float32
    assert bf16["kwargs"] == int8["kwargs"] == {"num_beams": 1, "max_new_tokens": 4}
