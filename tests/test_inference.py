"""Inference beyond the original: batching, long audio, several audios, chat, streaming, precision, quantization, CLI."""

from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import pytest
import soundfile
import torch

from salmonn.audio_hash import audio_hash
from salmonn.inference import engine
from salmonn.inference.infer import main as infer_main
from tests.utils import FIXTURE_A, fixture_a_convert_args, fixture_golden, randomize_lora, read_wav, save_tiny_checkpoint, tiny_model_and_processor


AUDIO_KEYS = ("input_features", "input_values", "input_values_mask")
RATE = 16000


def clip(seconds: float, freq: float, seed: int, rate: int = RATE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return 0.3 * np.sin(2 * np.pi * freq * t) + 0.1 * rng.standard_normal(t.shape)


@pytest.fixture(scope="module")
def sharp():
    """A tiny model with working LoRA and sharper logits, so that inputs change the decoded ids."""
    model, processor = tiny_model_and_processor(seed=0)
    randomize_lora(model, 0)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
        model.model.speech_llama_proj.weight.mul_(4.0)
    return model.eval(), processor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "salmonn-tiny")


# Mixed lengths: under the 1 s minimum, short, longer than 30 s (two segments), medium.
MIXED = [(0.5, 300.0), (2.0, 440.0), (35.0, 880.0), (4.0, 1200.0)]
PROMPTS = ["Describe the audio.", "What do you hear?", "Transcribe the speech.", "Is there music or speech?"]


def _audio_features(model, inputs):
    with torch.no_grad():
        return model.get_audio_features(**{k: inputs[k] for k in AUDIO_KEYS}).pooler_output


# ------------------------------------------------------------------------------------------------ batching


def test_padded_batch_encodes_every_clip_as_if_alone(sharp):
    model, processor = sharp
    clips = [clip(s, f, i) for i, (s, f) in enumerate(MIXED)]
    batch = processor(text=[processor.format_prompt(p) for p in PROMPTS], audio=clips, sampling_rate=RATE)
    assert batch["input_features"].shape[0] == 5  # the 35 s clip gives two segments
    features = _audio_features(model, batch)
    singles = torch.cat([_audio_features(model, processor(text=processor.format_prompt(p), audio=c, sampling_rate=RATE)) for p, c in zip(PROMPTS, clips)])
    torch.testing.assert_close(features, singles, atol=2e-5, rtol=0)
    # Without the frame mask the zero padding leaks into BEATs, as in the original: the short clips change.
    leaked = _audio_features(model, {**batch, "input_values_mask": None})
    assert float((leaked[0] - singles[0]).abs().max()) > 1e-3


@pytest.mark.parametrize("num_beams", [1, 2])
def test_batch_generate_equals_one_by_one(sharp, num_beams):
    model, processor = sharp
    clips = [clip(s, f, i) for i, (s, f) in enumerate(MIXED)]
    texts = [processor.format_prompt(p) for p in PROMPTS]
    batch = processor(text=texts, audio=clips, sampling_rate=RATE)
    # Left padding for generation: every row ends with its last prompt token.
    mask = batch["attention_mask"]
    assert bool((mask[:, -1] == 1).all()) and bool((mask[:, 0] == 0).any())
    kwargs = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(**batch, **kwargs)
    width = batch["input_ids"].shape[1]
    batch_ids = out.sequences[:, width:]
    rows = []
    for i, (text, audio) in enumerate(zip(texts, clips)):
        single = processor(text=text, audio=audio, sampling_rate=RATE)
        with torch.no_grad():
            alone = model.generate(**single, **kwargs)
        ids = alone.sequences[0, single["input_ids"].shape[1] :]
        rows.append(ids.tolist())
        assert batch_ids[i, : len(ids)].tolist() == ids.tolist(), f"row {i}"
        assert bool((batch_ids[i, len(ids) :] == model.config.text_config.pad_token_id).all())
        if num_beams == 1:
            for step, (b, s) in enumerate(zip(out.scores, alone.scores)):
                torch.testing.assert_close(b[i], s[0], atol=1e-4, rtol=0, msg=f"row {i} step {step}")
        else:
            torch.testing.assert_close(out.sequences_scores[i], alone.sequences_scores[0], atol=1e-4, rtol=0)
    assert len({tuple(r) for r in rows}) > 1, "every clip gave the same answer: the test would not see a mix-up"


def test_generate_encodes_each_segment_once_for_all_beams(sharp, monkeypatch):
    model, processor = sharp
    clips = [clip(2.0, 440.0, 0), clip(65.0, 880.0, 1), clip(1.0, 300.0, 2)]  # 1, 3 and 1 segments
    texts = [processor.format_prompt("Describe.")] * 3
    batch = processor(text=texts, audio=clips, sampling_rate=RATE)
    encoded = []
    encode = model.model.speech_encoder.forward
    monkeypatch.setattr(model.model.speech_encoder, "forward", lambda features, **kw: encoded.append(features.shape[0]) or encode(features, **kw))
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        out = model.generate(**batch, **kwargs)
    assert encoded == [1] * 5 and out.shape[0] == 6  # 5 segments, each encoded once (alone, on the CPU)
    # Each prompt's returned beams are those of the prompt alone: its own segments stayed together.
    width = batch["input_ids"].shape[1]
    for i, (text, audio) in enumerate(zip(texts, clips)):
        single = processor(text=text, audio=audio, sampling_rate=RATE)
        with torch.no_grad():
            alone = model.generate(**single, **kwargs)[:, single["input_ids"].shape[1] :]
        rows = out[2 * i : 2 * i + 2, width : width + alone.shape[1]]
        assert rows.tolist() == alone.tolist(), f"prompt {i}"
    # `inputs=`, generate's own name for the ids, works too.
    rest = {k: v for k, v in batch.items() if k != "input_ids"}
    with torch.no_grad():
        assert model.generate(inputs=batch["input_ids"], **rest, **kwargs).tolist() == out.tolist()
    with pytest.raises(ValueError, match="use_cache=True"):
        model.generate(**batch, use_cache=False, max_new_tokens=2)


def test_segments_are_encoded_in_bounded_chunks_with_the_same_result(sharp, monkeypatch):
    import modeling_salmonn.modeling_salmonn as modeling

    model, processor = sharp
    clips = [clip(95.0, 440.0, 0), clip(3.0, 880.0, 1), clip(4.5, 300.0, 2)]  # 30+30+30+5 s, 3 s, 4.5 s
    batch = processor(text=[processor.format_prompt("Describe.")] * 3, audio=clips, sampling_rate=RATE)
    whisper_rows, beats_calls = [], []
    whisper, beats = model.model.speech_encoder.forward, model.model.beats.forward
    monkeypatch.setattr(model.model.speech_encoder, "forward", lambda x, **kw: whisper_rows.append(x.shape[0]) or whisper(x, **kw))
    monkeypatch.setattr(model.model.beats, "forward", lambda x, **kw: beats_calls.append((x.shape[1], kw["attention_mask"].sum(-1).tolist())) or beats(x, **kw))
    # On the CPU every segment is encoded alone, BEATs without any padding.
    whole = _audio_features(model, batch)
    frames = batch["input_values_mask"].sum(-1).tolist()
    assert whisper_rows == [1] * 6
    assert sorted(beats_calls) == sorted((n, [n]) for n in frames)
    whisper_rows.clear(), beats_calls.clear()
    monkeypatch.setattr(modeling, "CPU_AUDIO_SEGMENTS_PER_CHUNK", 2)  # as on an accelerator, with chunks of 2
    chunked = _audio_features(model, batch)
    torch.testing.assert_close(chunked, whole, atol=2e-5, rtol=0)
    assert whisper_rows == [2, 2, 2]
    # BEATs gets segments of similar length together (at most 2 here), cut to the longest of them: the 5 s tail
    # and the 4.5 s clip share a call; the 3 s clip is not padded to 5 s.
    assert sorted(n for _, lengths in beats_calls for n in lengths) == sorted(frames)
    assert all(width == max(lengths) and len(lengths) <= 2 and min(lengths) >= 0.75 * width for width, lengths in beats_calls)
    assert len(beats_calls) == 4 and sorted(len(lengths) for _, lengths in beats_calls) == [1, 1, 2, 2]


def test_generate_answers_and_run_items_match_one_by_one(sharp):
    model, processor = sharp
    items = [
        {"id": str(i), "audio": clip(s, f, i), "sampling_rate": RATE, "prompt": p}
        for i, ((s, f), p) in enumerate(zip([(0.5, 300.0), (2.0, 440.0), (1.0, 880.0), (3.0, 1200.0)], PROMPTS))
    ]
    # Beam search through the engine, which encodes the audio once and lets the beams share it.
    kwargs = {"max_new_tokens": 5, "num_beams": 2}
    alone = [engine.generate_answers(model, processor, [item], kwargs)[0] for item in items]
    assert engine.generate_answers(model, processor, items, kwargs) == alone
    records = list(engine.run_items(model, processor, items, batch_size=3, generation_kwargs=kwargs, done_ids={"1"}, progress=False))
    assert [r["id"] for r in records] == ["0", "2", "3"]
    assert [r["answer"] for r in records] == [alone[0], alone[2], alone[3]]
    assert all(r["seconds"] > 0 and r["audio"] == "<ndarray>" for r in records)


# ------------------------------------------------------------------------------------------------ long audio


def test_long_audio_segments_are_encoded_like_clips_of_their_own(sharp):
    model, processor = sharp
    long = clip(75.0, 500.0, 7)
    inputs = processor(text=processor.format_prompt("Describe."), audio=long, sampling_rate=RATE)
    placeholder = (inputs["input_ids"][0] == model.config.audio_token_index).nonzero().flatten()
    assert placeholder.numel() == 3 * 88
    assert bool((placeholder.diff() == 1).all()), "the segments' tokens must sit together at the clip's position"
    features = _audio_features(model, inputs)
    assert features.shape[0] == 3
    for k, (start, stop) in enumerate([(0, 30), (30, 60), (60, 75)]):
        piece = processor(text=processor.format_prompt("Describe."), audio=long[start * RATE : stop * RATE], sampling_rate=RATE)
        torch.testing.assert_close(features[k], _audio_features(model, piece)[0], atol=1e-5, rtol=0)
    # The prompt of the first 30 s alone is the long clip's prompt with one segment's placeholders.
    first = processor(text=processor.format_prompt("Describe."), audio=long[: 30 * RATE], sampling_rate=RATE)
    ids = inputs["input_ids"][0].tolist()
    del ids[placeholder[88] : placeholder[-1] + 1]
    assert ids == first["input_ids"][0].tolist()


def test_audio_over_the_limit_is_a_clear_error(sharp, checkpoint):
    from transformers import AutoProcessor

    limited = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True, max_audio_seconds=60)
    assert len(limited(text=limited.format_prompt("x"), audio=np.zeros(60 * RATE), sampling_rate=RATE)["input_features"]) == 2
    with pytest.raises(ValueError, match=r"audio\[0\].*61\.00 s.*max_audio_seconds=60"):
        limited(text=limited.format_prompt("x"), audio=np.zeros(61 * RATE), sampling_rate=RATE)
    _, processor = sharp
    with pytest.raises(ValueError, match=r"audio\[0\].*601\.00 s.*max_audio_seconds=600"):
        processor(text=processor.format_prompt("Describe."), audio=np.zeros(601 * RATE), sampling_rate=RATE)
    item = {"id": "long", "audio": np.zeros(601 * RATE), "sampling_rate": RATE, "prompt": "Describe."}
    with pytest.raises(ValueError, match="item 'long'.*max_audio_seconds"):
        engine.prepare_item(processor, item)


# ------------------------------------------------------------------------------------------------ prompts


def test_several_audios_in_one_prompt_take_the_next_audio_each(sharp):
    model, processor = sharp
    a, b = clip(2.0, 440.0, 1), clip(31.0, 900.0, 2)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}, {"type": "audio"}, {"type": "text", "text": "Compare them."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt == "USER: <Speech><SpeechHere></Speech> <Speech><SpeechHere></Speech> Compare them.\nASSISTANT:"
    inputs = processor(text=prompt, audio=[a, b], sampling_rate=RATE)
    assert int((inputs["input_ids"] == model.config.audio_token_index).sum()) == 3 * 88
    with torch.no_grad():
        embeds, _ = model.model.embed_inputs(inputs["input_ids"], *(inputs[k] for k in AUDIO_KEYS))
    where = (inputs["input_ids"][0] == model.config.audio_token_index).nonzero().flatten()
    expected = torch.cat(
        [_audio_features(model, processor(text=processor.format_prompt("x"), audio=x, sampling_rate=RATE)).flatten(0, 1) for x in (a, b)]
    )
    torch.testing.assert_close(embeds[0, where], expected, atol=2e-5, rtol=0)
    # Text between the two audios: "</Speech> <Speech>" separates the blocks.
    assert bool((where[88:].min() - where[:88].max()) > 1)

    answers = engine.generate_answers(
        model, processor, [{"audio": [a, b], "sampling_rate": RATE, "prompt": "Compare them."}], {"max_new_tokens": 3, "num_beams": 1}
    )
    assert len(answers) == 1


@pytest.mark.parametrize(
    "prompt,audios,message",
    [
        ("<Speech><SpeechHere></Speech> and <SpeechHere>?", 1, r"item 'x': the prompt has 2 <SpeechHere> marker\(s\) but the item has 1"),
        ("<Speech><SpeechHere></Speech> Describe.", 2, r"item 'x': the prompt has 1 <SpeechHere> marker\(s\) but the item has 2"),
        ("   ", 1, "item 'x': the prompt is empty"),
    ],
)
def test_prompt_marker_mismatch_names_the_item(sharp, prompt, audios, message):
    _, processor = sharp
    item = {"id": "x", "audio": [clip(1.0, 440.0, 0)] * audios, "sampling_rate": RATE, "prompt": prompt}
    with pytest.raises(ValueError, match=message):
        engine.prepare_item(processor, item)


def test_prompt_with_marker_is_wrapped_as_the_original_cli_does(sharp):
    _, processor = sharp
    original_form = engine.build_prompt(processor, "<Speech><SpeechHere></Speech> Please describe the audio.", 1, "x")
    assert original_form == engine.build_prompt(processor, "Please describe the audio.", 1, "x")
    assert original_form == "USER: <Speech><SpeechHere></Speech> Please describe the audio.\nASSISTANT:"


def test_multi_turn_chat_template(sharp):
    model, processor = sharp
    conversation = [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Describe the audio."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A short beep."}]},
        {"role": "user", "content": [{"type": "text", "text": "Is it loud?"}]},
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "USER: <Speech><SpeechHere></Speech> Describe the audio.\nASSISTANT: A short beep.</s>USER: Is it loud?\nASSISTANT:"
    )
    inputs = processor(text=prompt, audio=clip(2.0, 440.0, 0), sampling_rate=RATE)
    ids = inputs["input_ids"][0].tolist()
    eos = processor.tokenizer.eos_token_id
    assert ids.count(eos) == 1 and ids.index(eos) > ids.index(model.config.audio_token_index)
    assert ids[-1] != eos  # the generation prompt ends with "ASSISTANT:"
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, num_beams=1)
    assert out.shape[1] > len(ids) and out[0, : len(ids)].tolist() == ids


# ------------------------------------------------------------------------------------------------ streaming


def test_text_iterator_streamer_yields_the_answer_piece_by_piece(sharp):
    model, processor = sharp
    item = {"audio": clip(2.0, 440.0, 0), "sampling_rate": RATE, "prompt": "Describe the audio."}
    # Keep the random model off byte pieces, so that the answer has words the streamer can release one by one.
    kwargs = {"max_new_tokens": 12, "suppress_tokens": list(range(3, 259)) + [processor.tokenizer.eos_token_id]}
    pieces = list(engine.stream_answer(model, processor, item, kwargs))
    answer = engine.generate_answers(model, processor, [item], {**kwargs, "num_beams": 1})[0]
    assert sum(bool(p) for p in pieces) >= 3
    assert "".join(pieces).strip() == answer and " " in answer
    with pytest.raises(ValueError, match="num_beams=1"):
        list(engine.stream_answer(model, processor, item, {"num_beams": 2}))


# ------------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_load_and_generate_on_cpu(checkpoint, dtype):
    model32, processor = engine.load_model_and_processor(str(checkpoint))
    model, _ = engine.load_model_and_processor(str(checkpoint), dtype=dtype)
    assert model.lm_head.weight.dtype == engine.DTYPES[dtype]
    assert model.model.language_model.layers[0].self_attn.q_proj.base_layer.weight.dtype == engine.DTYPES[dtype]
    assert model.model.speech_encoder.conv1.weight.dtype == model.model.beats.patch_embedding.weight.dtype == engine.DTYPES[dtype]
    # The window-level Q-Former and the parts around it stay float32 (`_keep_in_fp32_modules_strict`).
    kept = [model.model.ln_speech.weight, model.model.ln_audio.weight, model.model.speech_query_tokens,
            model.model.speech_qformer.layernorm.weight, model.model.speech_llama_proj.weight]
    assert all(p.dtype == torch.float32 for p in kept)
    item = {"audio": clip(3.0, 440.0, 0), "sampling_rate": RATE, "prompt": "Describe the audio."}
    prepared = [engine.prepare_item(processor, item)]
    inputs32 = engine.build_inputs(model32, processor, prepared)
    inputs = engine.build_inputs(model, processor, prepared)
    assert inputs["input_features"].dtype == torch.float32  # the processor's; the model casts for each encoder
    with torch.no_grad():
        reference = model32.get_audio_features(**{k: inputs32[k] for k in AUDIO_KEYS}).pooler_output
        half = model.get_audio_features(**{k: inputs[k] for k in AUDIO_KEYS}).pooler_output.float()
    # README: bf16 audio tokens within 0.31% (relative L2) of float32; here 0.12% (bf16) and 0.0005% (fp16).
    assert float((half - reference).norm() / reference.norm()) < 2 * 0.0031
    answers = engine.generate_answers(model, processor, [item, item], {"max_new_tokens": 4, "num_beams": 2})
    assert len(answers) == 2 and answers[0] == answers[1]


def test_device_map_auto_loads_and_matches_float32(checkpoint):
    model, processor = engine.load_model_and_processor(str(checkpoint))
    mapped, _ = engine.load_model_and_processor(str(checkpoint), device_map="auto")
    item = {"audio": clip(2.0, 440.0, 0), "sampling_rate": RATE, "prompt": "Describe the audio."}
    kwargs = {"max_new_tokens": 5, "num_beams": 1}
    assert engine.generate_answers(mapped, processor, [item], kwargs) == engine.generate_answers(model, processor, [item], kwargs)


def test_quanto_int8_quantizes_the_language_model_only(checkpoint):
    pytest.importorskip("optimum.quanto")
    from optimum.quanto.nn import QLinear

    model32, processor = engine.load_model_and_processor(str(checkpoint))
    model, _ = engine.load_model_and_processor(str(checkpoint), quantize="int8", lora_scaling=2.0)
    quantized = {name for name, module in model.named_modules() if isinstance(module, QLinear)}
    layers = model.config.text_config.num_hidden_layers
    assert len(quantized) == layers * 7  # q, k, v, o, gate, up, down per decoder layer
    assert all(name.startswith("model.language_model.layers.") for name in quantized)
    assert not any(".lora_" in name for name in quantized)
    assert "model.language_model.layers.0.self_attn.q_proj.base_layer" in quantized
    assert model.lora_scaling == 2.0
    # The LLM computes in bfloat16 (quanto's int8 kernel); the encoders and the Q-Former path stay float32.
    assert model.lm_head.weight.dtype == model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.speech_encoder.conv1.weight.dtype == model.model.speech_qformer.layernorm.weight.dtype == torch.float32
    assert model.model.speech_llama_proj.weight.dtype == torch.float32
    model32.set_lora_scaling(2.0)
    item = {"audio": clip(2.0, 440.0, 0), "sampling_rate": RATE, "prompt": "Describe the audio."}
    inputs = engine.build_inputs(model, processor, [engine.prepare_item(processor, item)])
    with torch.no_grad():
        logits = model(**inputs).logits.float()
        reference = model32(**inputs).logits
    # README: int8 prompt logits within 2.7% relative error of float32 (mid-size model); here 1.0%.
    assert 0 < float((logits - reference).norm() / reference.norm()) < 0.027
    assert len(engine.generate_answers(model, processor, [item], {"max_new_tokens": 3, "num_beams": 1})) == 1


def test_bitsandbytes_targets_the_language_model_only(sharp):
    from torch import nn
    from transformers.quantizers.quantizers_utils import should_convert_module

    model, _ = sharp
    config = engine.bitsandbytes_config("4bit", torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_compute_dtype == torch.bfloat16
    converted = {
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, config.llm_int8_skip_modules)
    }
    layers = model.config.text_config.num_hidden_layers
    assert len(converted) == layers * 7
    assert all(name.startswith("model.language_model.layers.") and ".lora_" not in name for name in converted)
    assert engine.bitsandbytes_config("8bit", torch.float16).load_in_8bit


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
@pytest.mark.parametrize("quantize", ["8bit", "4bit"])
def test_bitsandbytes_without_cuda_is_a_clear_error(checkpoint, quantize):
    with pytest.raises(ValueError, match="needs a CUDA GPU.*quantize='int8'"):
        engine.load_model_and_processor(str(checkpoint), quantize=quantize)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"dtype": "float64"}, "dtype: expected one of"),
        ({"quantize": "int4"}, "quantize: expected one of"),
        ({"device": "tpu9"}, "device: 'tpu9' is not a torch device"),
        ({"lora_scaling": -1.0}, "lora_scaling"),
    ],
)
def test_bad_load_arguments(checkpoint, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.load_model_and_processor(str(checkpoint), **kwargs)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_items_become_error_records_and_the_rest_is_answered(sharp, tmp_path):
    model, processor = sharp
    pcm = np.round(clip(2.0, 440.0, 3) * 32767).astype(np.int16)
    base = pcm / 32768.0  # exactly what int16 input scales to
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" * 8)
    text = tmp_path / "notes.txt"
    text.write_text("not audio")
    stereo_file = tmp_path / "stereo.wav"
    soundfile.write(stereo_file, np.stack([base, -base[::-1]], axis=1), RATE, subtype="DOUBLE")
    items = [
        {"id": "float", "audio": base, "sampling_rate": RATE},
        {"id": "int16", "audio": pcm, "sampling_rate": RATE},
        {"id": "stereo", "audio": np.stack([base, np.zeros_like(base)], axis=1), "sampling_rate": RATE},
        {"id": "stereo-file", "audio": str(stereo_file)},
        {"id": "8k", "audio": clip(2.0, 440.0, 3, rate=8000), "sampling_rate": 8000},
        {"id": "44k", "audio": clip(2.0, 440.0, 3, rate=44100), "sampling_rate": 44100},
        {"id": "nan", "audio": np.where(np.arange(base.size) == 5, np.nan, base), "sampling_rate": RATE},
        {"id": "inf", "audio": np.where(np.arange(base.size) == 9, np.inf, base), "sampling_rate": RATE},
        {"id": "empty-array", "audio": np.zeros(0), "sampling_rate": RATE},
        {"id": "empty-file", "audio": str(empty)},
        {"id": "corrupt", "audio": str(corrupt)},
        {"id": "unsupported", "audio": str(text)},
        {"id": "missing", "audio": str(tmp_path / "missing.wav")},
        {"id": "no-rate", "audio": base},
        {"id": "too-long", "audio": np.zeros(601 * RATE), "sampling_rate": RATE},
        {"id": "markers", "audio": base, "sampling_rate": RATE, "prompt": "<SpeechHere> vs <SpeechHere>"},
    ]
    for item in items:
        item.setdefault("prompt", "Describe the audio.")
    records = {r["id"]: r for r in engine.run_items(model, processor, items, batch_size=4, generation_kwargs={"max_new_tokens": 4, "num_beams": 1}, progress=False)}
    assert list(records) == [item["id"] for item in items]
    expected_errors = {
        "nan": "item 'nan'.*non-finite",
        "inf": "item 'inf'.*non-finite",
        "empty-array": "item 'empty-array'.*empty",
        "empty-file": "item 'empty-file'.*empty \\(0 bytes\\)",
        "corrupt": "item 'corrupt'.*cannot decode",
        "unsupported": "item 'unsupported'.*cannot decode",
        "missing": "item 'missing'.*does not exist",
        "no-rate": "item 'no-rate'.*sampling_rate",
        "too-long": "item 'too-long'.*max_audio_seconds",
        "markers": "item 'markers'.*2 <SpeechHere> marker",
    }
    for key, pattern in expected_errors.items():
        assert "answer" not in records[key] and re.search(pattern, records[key]["error"]), (key, records[key])
    answered = {k: r["answer"] for k, r in records.items() if k not in expected_errors}
    assert set(answered) == {"float", "int16", "stereo", "stereo-file", "8k", "44k"}
    # int16 is scaled to [-1, 1] and stereo keeps channel 0: the same features, hence the same answer.
    assert answered["int16"] == answered["stereo"] == answered["stereo-file"] == answered["float"]
    # Resampled input is encoded like 16 kHz input of the same sound.
    resampled = engine.prepare_item(processor, items[5]).waveforms[0]
    assert resampled.shape == (2 * RATE,)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def audio_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    (root / "clips" / "sub").mkdir(parents=True)
    soundfile.write(root / "clips" / "a.wav", clip(1.5, 440.0, 0), RATE)
    soundfile.write(root / "clips" / "sub" / "b.flac", clip(2.0, 660.0, 1, rate=44100), 44100)
    (root / "clips" / "empty.wav").write_bytes(b"")
    (root / "clips" / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" * 8)
    (root / "clips" / "readme.txt").write_text("not audio, and not picked from a folder")
    soundfile.write(root / "c.wav", clip(3.0, 880.0, 2), RATE)
    with (root / "manifest.jsonl").open("w") as f:
        f.write(json.dumps({"audio": "clips/a.wav", "prompt": "What do you hear?", "id": "m1"}) + "\n")
        f.write(json.dumps({"audio": str(FIXTURE_A / "audio" / "duck.wav")}) + "\n")
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "audio", "prompt"])
        writer.writeheader()
        writer.writerow({"id": "c1", "audio": "c.wav", "prompt": "Transcribe the speech."})
        writer.writerow({"id": "c2", "audio": "c.wav", "prompt": ""})
    return root


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


FAST = ["--max-new-tokens", "4", "--num-beams", "1", "--no-progress", "--device", "cpu"]


def test_cli_folder_glob_manifests_to_stdout(checkpoint, audio_tree, capsys):
    root = audio_tree
    code = infer_main(
        ["--model", str(checkpoint), str(root / "clips"), str(root / "*.wav"), str(root / "manifest.jsonl"),
         str(root / "manifest.csv"), "--batch-size", "3", "--prompt", "Describe the audio.", "--max-audio-seconds", "2.5", *FAST]
    )
    assert code == 1  # items failed
    records = _lines(capsys.readouterr().out)
    ids = [r["id"] for r in records]
    clips = root / "clips"
    assert ids == [
        str(clips / "a.wav"), str(clips / "corrupt.wav"), str(clips / "empty.wav"), str(clips / "sub" / "b.flac"),
        str(root / "c.wav"), "m1", str(FIXTURE_A / "audio" / "duck.wav"), "c1", "c2",
    ]
    by_id = {r["id"]: r for r in records}
    assert "cannot decode" in by_id[str(clips / "corrupt.wav")]["error"]
    assert "empty (0 bytes)" in by_id[str(clips / "empty.wav")]["error"]
    assert by_id["m1"]["prompt"] == "What do you hear?" and by_id["m1"]["audio"] == str(root / "clips" / "a.wav")
    assert by_id["c1"]["prompt"] == "Transcribe the speech." and by_id["c2"]["prompt"] == "Describe the audio."
    # c.wav is 3 s, over --max-audio-seconds 2.5.
    assert "max_audio_seconds=2.5" in by_id["c1"]["error"] and "max_audio_seconds=2.5" in by_id[str(root / "c.wav")]["error"]
    for r in records:
        assert set(r) in ({"id", "audio", "prompt", "answer", "seconds", "model", "settings", "audio_hash"}, {"id", "audio", "prompt", "error", "model", "settings", "audio_hash"})
        assert r["model"] == str(checkpoint)
        assert r["settings"] == {"generation": {"num_beams": 1, "max_new_tokens": 4}, "lora_scaling": None, "engine": "transformers"}
    # The CLI's batched answer equals the engine's answer for the item alone.
    model, processor = engine.load_model_and_processor(str(checkpoint))
    alone = engine.generate_answers(model, processor, [{"audio": str(clips / "a.wav"), "prompt": "What do you hear?"}], {"max_new_tokens": 4, "num_beams": 1})
    assert by_id["m1"]["answer"] == alone[0]


def test_cli_resumes_after_an_interruption(checkpoint, audio_tree, tmp_path, monkeypatch):
    root = audio_tree
    output = tmp_path / "out" / "results.jsonl"
    argv = ["--model", str(checkpoint), str(root / "clips"), str(root / "manifest.csv"), "--output", str(output), "--batch-size", "2", *FAST]

    real = engine._generate
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_generate", interrupted)
    assert infer_main(argv) == 130
    first = output.read_text()
    done = _lines(first)
    # The first batch (a.wav and b.flac, the two error items between them) is written whole before the interruption.
    assert [r["id"] for r in done] == [str(root / "clips" / n) for n in ("a.wav", "corrupt.wav", "empty.wav", "sub/b.flac")]
    # A cut-off line, as a kill during a write could leave, is dropped on resumption.
    with output.open("a") as f:
        f.write('{"id": "half')
    monkeypatch.setattr(engine, "_generate", real)
    assert infer_main(argv) == 1  # the two broken files fail again
    final = output.read_text()
    assert final.startswith(first)
    ids = [r["id"] for r in _lines(final)]
    broken = [str(root / "clips" / n) for n in ("corrupt.wav", "empty.wav")]
    first_ids = [str(root / "clips" / n) for n in ("a.wav", "corrupt.wav", "empty.wav", "sub/b.flac")]
    # The failed items are retried (their new error records appended), the answered ones are not.
    assert ids == first_ids + broken + ["c1", "c2"]
    # Only the failed items are tried on a third run; --overwrite starts afresh.
    assert infer_main(argv) == 1 and [r["id"] for r in _lines(output.read_text())] == ids + broken
    assert infer_main(argv + ["--overwrite"]) == 1
    assert [r["id"] for r in _lines(output.read_text())] == first_ids + ["c1", "c2"]


def test_cli_resume_answers_again_an_audio_file_replaced_under_the_same_name(checkpoint, tmp_path, caplog):
    """QA issue 19: the answer to a replaced file was kept on resume; it is answered again, unchanged ones skipped."""
    clips = tmp_path / "clips"
    clips.mkdir()
    soundfile.write(clips / "a.wav", clip(1.0, 440.0, 0), RATE)
    soundfile.write(clips / "b.wav", clip(1.0, 660.0, 1), RATE)
    output = tmp_path / "out.jsonl"
    argv = ["--model", str(checkpoint), str(clips), "--output", str(output), *FAST]
    assert infer_main(argv) == 0
    first = _lines(output.read_text())
    assert [r["audio_hash"] for r in first] == [audio_hash([str(clips / n)]) for n in ("a.wav", "b.wav")]
    assert infer_main(argv) == 0 and _lines(output.read_text()) == first  # unchanged: nothing answered again

    stat = (clips / "a.wav").stat()
    soundfile.write(clips / "a.wav", clip(1.0, 220.0, 2), RATE)  # same name, size and time, other content
    os.utime(clips / "a.wav", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    caplog.clear()
    assert infer_main(argv) == 0
    records = _lines(output.read_text())
    assert [r["id"] for r in records] == [str(clips / "a.wav"), str(clips / "b.wav"), str(clips / "a.wav")]
    assert records[2]["audio_hash"] == audio_hash([str(clips / "a.wav")]) != first[0]["audio_hash"]
    assert "1 answered items have other audio content now (the file was replaced)" in caplog.text

    # Records of earlier versions carry no hash: they are kept as they were kept then.
    output.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "audio_hash"}) + "\n" for r in records))
    soundfile.write(clips / "b.wav", clip(1.0, 330.0, 3), RATE)
    before = output.read_text()
    assert infer_main(argv) == 0 and output.read_text() == before


def test_cli_stream_single_item(checkpoint, audio_tree, tmp_path, capsys):
    output = tmp_path / "stream.jsonl"
    code = infer_main(["--model", str(checkpoint), "--stream", str(audio_tree / "c.wav"), "--output", str(output), "--max-new-tokens", "6", "--no-progress", "--device", "cpu"])
    assert code == 0
    streamed = capsys.readouterr().out
    (record,) = _lines(output.read_text())
    assert streamed.strip() == record["answer"] and record["seconds"] > 0
    assert infer_main(["--model", str(checkpoint), "--stream", str(audio_tree / "clips"), *FAST]) == 2
    assert infer_main(["--model", str(checkpoint), "--stream", str(audio_tree / "c.wav"), "--num-beams", "2"]) == 2


@pytest.mark.parametrize(
    "argv,message",
    [
        (["does-not-exist.wav"], "no such file or folder"),
        (["nomatch-*.wav"], "the glob matches no file"),
        ([], "no INPUT given"),
        (["--batch-size", "0", "x.wav"], "--batch_size must be at least 1"),
        (["--output", "a.jsonl", "--output_dir", "b", "x.wav"], "give --output_dir (a folder) or --output (a file), not both"),
        (["--output_dir", "manifest.csv", "x.wav"], "--output_dir 'manifest.csv' is a file, not a folder"),
    ],
)
def test_cli_bad_arguments_exit_with_a_clear_error(checkpoint, tmp_path, monkeypatch, caplog, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "manifest.csv").write_text("audio\nx.wav\n")
    assert infer_main(["--model", str(checkpoint), *argv]) == 2
    assert message in caplog.text


def test_cli_bad_manifest_names_file_and_line(checkpoint, tmp_path, caplog):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"audio": "a.wav"}\n{"prompt": "no audio"}\n')
    assert infer_main(["--model", str(checkpoint), str(manifest)]) == 2
    assert f"manifest {str(manifest)!r} line 2: needs an 'audio' (or 'path') file, got None" in caplog.text


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer_main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--model_name_or_path", "--model", "--prompt", "--output_dir", "--output", "--overwrite_output_dir",
                 "--overwrite", "--test_file", "--batch_size", "--batch-size", "--dtype", "--model_dtype", "--device",
                 "--device_map", "--quantize", "--lora_scaling", "--num_beams", "--max_new_tokens", "--do_sample",
                 "--temperature", "--top_p", "--stream", "--seed", "--disable_tqdm", "--no_progress", "--no-progress",
                 "--max_audio_seconds", "--eval_split_name", "--split", "--audio_column_name", "--text_column_name",
                 "INPUT", "manifest"]:
        assert flag in text, flag


# ------------------------------------------------------------------------------------------------ fixture A


def test_batch_equals_single_on_converted_fixture_a(tmp_path):
    """gunshots, synth_short and duck in one greedy batch give each clip's own ids, and the original's."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoProcessor

    from salmonn.conversion.convert_salmonn import main as convert_main

    output = tmp_path / "salmonn-tiny-a"
    assert convert_main(
        fixture_a_convert_args(output)
    ) == 0
    model = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    golden = fixture_golden()
    pad_rows = load_file(FIXTURE_A / "golden" / "llm_pad_rows.safetensors")
    with torch.no_grad():
        model.get_input_embeddings().weight[golden["pad_id"]] = pad_rows["embed_tokens_rows"][0]
        model.lm_head.weight[golden["pad_id"]] = pad_rows["lm_head_rows"][0]

    names = ["gunshots", "synth_short", "duck"]
    waves = [read_wav(FIXTURE_A / golden["inputs"][n]["wav"]) for n in names]
    assert len({rate for _, rate in waves}) == 1
    batch = processor(text=[golden["prompt"]] * 3, audio=[w for w, _ in waves], sampling_rate=waves[0][1])
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=20, num_beams=1, do_sample=False)
    new = ids[:, batch["input_ids"].shape[1] :]
    for row, (name, (wave, rate)) in enumerate(zip(names, waves)):
        single = processor(text=golden["prompt"], audio=wave, sampling_rate=rate)
        with torch.no_grad():
            alone = model.generate(**single, max_new_tokens=20, num_beams=1, do_sample=False)[0, single["input_ids"].shape[1] :]
        expected = golden["inputs"][name]["generated_ids"][1:]  # the original's ids after its dummy BOS
        assert alone.tolist() == expected, name
        assert new[row, : len(expected)].tolist() == expected, name
        assert bool((new[row, len(expected) :] == golden["pad_id"]).all()), name


# ------------------------------------------------------------------------------------------------ benchmarks


@pytest.mark.slow
def test_benchmark_scripts_run_on_the_tiny_model(capsys):
    from benchmarks.inference import main as inference_benchmark
    from benchmarks.long_audio import main as long_audio_benchmark

    assert inference_benchmark(["--size", "tiny", "--clips", "2", "--batch-sizes", "1", "2", "--new-tokens", "3",
                                "--ttft-runs", "1", "--repeats", "1", "--no-gpu"]) == 0
    out = capsys.readouterr().out
    assert "batch 2: speed-up over one-by-one" in out and "[cpu int8 LLM] LLM weights" in out and "tokens/s" in out
    assert "even free decoding would give a batch speed-up of at most" in out
    assert "(Q-Former, LayerNorms and projection in float32): relative error" in out
    assert re.search(r"audio encoding of 2 clips at batch 2 \(the whole batch's generate\): padded [\d.]+ s \([\d.]+ s\), "
                     r"grouped by 8 [\d.]+ s \([\d.]+ s\), alone [\d.]+ s \([\d.]+ s\)", out)
    assert long_audio_benchmark(["--size", "tiny", "--durations", "30", "65"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().endswith("Mi")]
    assert [(r[2], r[3]) for r in rows] == [("1", "88"), ("3", "264")]
