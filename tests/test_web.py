"""salmonn-web: the chat prompt, the streamed answer, the CLI, and the page itself driven in headless Chromium."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from salmonn.inference.web import (
    build_conversation,
    build_demo,
    generation_kwargs,
    load_model_and_processor,
    main,
    stream_answer,
)
from tests.utils import save_tiny_checkpoint


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HAS_GRADIO = importlib.util.find_spec("gradio") is not None
HAS_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None
needs_gradio = pytest.mark.skipif(not HAS_GRADIO, reason="gradio is not installed (pip install salmonn[demo])")

# The flags every headless run uses: nothing of Chromium's own may go out to the network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]
# Characters Markdown or HTML could render differently from the raw answer.
MARKUP = set("*_`#<>[]()\\~|&!-+=")

Q1 = "Describe the audio."
Q2 = "Is there music or speech?"
SETTINGS = {"max_new_tokens": 24, "num_beams": 1, "lora_scaling": 1.5}


@pytest.fixture(scope="module")
def checkpoint():
    with tempfile.TemporaryDirectory(prefix="salmonn-web-") as tmp:
        yield save_tiny_checkpoint(Path(tmp) / "tiny")  # LoRA randomised: its scaling changes the answer


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model, processor = load_model_and_processor(str(checkpoint), dtype="float32", device="cpu")
    return model, processor


@pytest.fixture(scope="module")
def wav_path():
    import soundfile

    with tempfile.TemporaryDirectory(prefix="salmonn-web-audio-") as tmp:
        rate = 16000
        t = np.arange(int(1.5 * rate)) / rate
        path = Path(tmp) / "tone.wav"
        soundfile.write(str(path), 0.3 * np.sin(2 * np.pi * 440.0 * t) * (1 + t), rate)
        yield path


def reference_answer(model, processor, prompt: str, audio: Path | None, lora_scaling: float, **kwargs) -> str:
    """What plain `model.generate` answers for `prompt` (greedy unless told), decoded as the page does."""
    previous = model.set_lora_scaling(lora_scaling)
    try:
        inputs = processor(text=prompt, audio=None if audio is None else str(audio))
        with torch.no_grad():
            ids = model.generate(**inputs, do_sample=False, **kwargs)
    finally:
        model.set_lora_scaling(previous)
    return processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


# -- the model side ---------------------------------------------------------------------------------------------


def test_conversation_is_vicuna_with_audio_in_first_turn(tiny):
    _, processor = tiny
    history = [
        {"role": "user", "content": " Describe the audio. "},
        # Gradio hands the Chatbot's messages back with normalised content items.
        {"role": "assistant", "content": [{"type": "text", "text": "A pure tone plays."}]},
    ]
    conversation = build_conversation(history, "Is there music? ", with_audio=True)
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "USER: <Speech><SpeechHere></Speech> Describe the audio.\nASSISTANT: A pure tone plays.</s>"
        "USER: Is there music?\nASSISTANT:"
    )
    first = build_conversation([], "Describe the audio.", with_audio=True)
    assert processor.apply_chat_template(first, add_generation_prompt=True, tokenize=False) == processor.format_prompt(
        "Describe the audio."
    )
    text_only = build_conversation([], "hello", with_audio=False)
    assert (
        processor.apply_chat_template(text_only, add_generation_prompt=True, tokenize=False)
        == "USER: hello\nASSISTANT:"
    )


def test_streamed_answer_equals_generate(loaded, wav_path):
    model, processor = loaded
    default_scaling = model.lora_scaling
    kwargs = generation_kwargs(max_new_tokens=24, num_beams=1)
    updates = list(stream_answer(model, processor, Q1, audio=str(wav_path), generation_kwargs=kwargs, lora_scaling=0.5))
    expected = reference_answer(
        model, processor, processor.format_prompt(Q1), wav_path, 0.5, max_new_tokens=24, num_beams=1
    )
    assert updates[-1].done and updates[-1].text == expected
    assert updates[-1].new_tokens == 24  # a random model does not stop early
    assert len(updates) > 5, "greedy answers must stream in pieces"
    # (No prefix check: byte-fallback pieces decode differently alone than in the final text, which is exact.)
    assert all(not u.done and u.text for u in updates[:-1])
    assert model.lora_scaling == default_scaling, "the request's LoRA scaling must not outlive it"
    # The scaling really reaches the model: the default one gives another answer here.
    assert expected != reference_answer(
        model, processor, processor.format_prompt(Q1), wav_path, default_scaling, max_new_tokens=24, num_beams=1
    )

    # Beam search cannot stream: one final update, equal to generate with the same beams.
    beams = list(
        stream_answer(
            model,
            processor,
            Q1,
            audio=str(wav_path),
            generation_kwargs=generation_kwargs(max_new_tokens=8, num_beams=3),
        )
    )
    assert len(beams) == 1
    assert beams[0].text == reference_answer(
        model, processor, processor.format_prompt(Q1), wav_path, default_scaling, max_new_tokens=8, num_beams=3
    )


def test_stream_answer_bad_input(loaded, tmp_path):
    model, processor = loaded
    # Raised by the call itself, before any generation (the page keeps the question and history as they were).
    with pytest.raises(ValueError, match="question is empty"):
        stream_answer(model, processor, "   ")
    with pytest.raises(ValueError, match="LoRA scaling"):
        stream_answer(model, processor, "hi", lora_scaling=-1.0)
    bad = tmp_path / "not_audio.wav"
    bad.write_text("not a wav")
    with pytest.raises(ValueError, match="not_audio.wav"):
        stream_answer(model, processor, "hi", audio=str(bad))
    for bad_kwargs in (
        {"max_new_tokens": 0},
        {"num_beams": 0},
        {"do_sample": True, "temperature": 0.0},
        {"do_sample": True, "top_p": 1.5},
    ):
        with pytest.raises(ValueError):
            generation_kwargs(**bad_kwargs)
    assert "temperature" not in generation_kwargs(do_sample=False)
    assert generation_kwargs(do_sample=True, temperature=0.7, top_p=0.5)["top_p"] == 0.5


def test_closing_the_stream_stops_generation(loaded, wav_path):
    """The Stop button closes the answer's generator: generate must end early, leaving the model usable."""
    model, processor = loaded
    steps = []
    hook = model.lm_head.register_forward_hook(lambda *args: steps.append(1))
    try:
        # min_new_tokens: without the stop, this generation would surely run all 1000 steps.
        kwargs = {**generation_kwargs(max_new_tokens=1000, num_beams=1), "min_new_tokens": 1000}
        updates = stream_answer(model, processor, Q1, audio=str(wav_path), generation_kwargs=kwargs)
        first = next(updates)
        updates.close()  # returns once the generation thread has ended
    finally:
        hook.remove()
    assert not first.done
    assert 1 <= len(steps) < 500, f"generation went on for {len(steps)} steps after the stream was closed"
    quick = list(
        stream_answer(
            model,
            processor,
            Q1,
            audio=str(wav_path),
            generation_kwargs=generation_kwargs(max_new_tokens=4, num_beams=1),
        )
    )
    assert quick[-1].new_tokens == 4


# -- the CLI ----------------------------------------------------------------------------------------------------


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model_name_or_path", "--model", "--host", "--port", "--share", "--dtype", "--device"):
        assert flag in out
    assert "127.0.0.1" in out


def test_bad_arguments_exit_non_zero(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path), "--dtype", "float8"])
    assert exit_info.value.code == 2
    assert "--dtype" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([])  # --model is required
    assert exit_info.value.code == 2


def test_missing_gradio_says_what_to_install(monkeypatch, tiny, caplog):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    model, processor = tiny
    with pytest.raises(ImportError, match=r"pip install salmonn\[demo\]"):
        build_demo(model, processor)
    assert main(["--model", "unused"]) == 2
    assert "pip install salmonn[demo]" in caplog.text


@needs_gradio
def test_main_loads_and_launches_as_told(checkpoint, monkeypatch, tmp_path, caplog):
    import gradio

    launched = {}

    def fake_launch(self, **kwargs):
        launched.update(kwargs, blocks=self)
        return None, "", ""

    monkeypatch.setattr(gradio.Blocks, "launch", fake_launch)
    assert main(["--model", str(checkpoint), "--port", "8123", "--device", "cpu"]) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 8123 and launched["share"] is False
    assert isinstance(launched["blocks"], gradio.Blocks)
    assert os.environ.get("GRADIO_ANALYTICS_ENABLED") == "False"

    launched.clear()
    assert (
        main(["--model", str(checkpoint), "--host", "0.0.0.0", "--share", "--dtype", "bfloat16", "--device", "cpu"])
        == 0
    )
    assert launched["server_name"] == "0.0.0.0" and launched["share"] is True and launched["server_port"] is None

    launched.clear()
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "Cannot load --model" in caplog.text
    caplog.clear()
    assert main(["--model", str(checkpoint), "--device", "gpu"]) == 2
    assert "--device gpu): device: 'gpu' is not a torch device" in caplog.text
    assert not launched


# -- the page in a browser -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bot_messages(page) -> list[tuple[str, str]]:
    """(exact text from the accessible label, rendered text) of each answer in the Chatbot."""
    prefix = "bot's message: "
    out = []
    for element in page.locator("#chat [data-testid=bot]").all():
        label = element.get_attribute("aria-label") or ""
        assert label.startswith(prefix)
        out.append((label[len(prefix) :], element.inner_text()))
    return out


def wait_for_answer(page, count: int, timeout_ms: int = 60000) -> None:
    """Until the page shows `count` answers and the final status line of the latest one."""
    page.wait_for_function(
        """(count) => {
            const status = document.querySelector('#status');
            return document.querySelectorAll('#chat [data-testid=bot]').length === count
                && status !== null && status.innerText.includes('new tokens in');
        }""",
        arg=count,
        timeout=timeout_ms,
    )


def check_shown(page, expected: list[str]) -> None:
    shown = bot_messages(page)
    assert [exact for exact, _ in shown] == expected
    for (_, rendered), answer in zip(shown, expected, strict=True):
        if not MARKUP & set(answer):  # plain text must also be what the reader sees
            assert " ".join(rendered.split()) == " ".join(answer.split())


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium chromium-driver)")
@pytest.mark.skipif(not HAS_PLAYWRIGHT, reason="playwright is not installed (pip install playwright)")
@needs_gradio
def test_page_answers_like_generate(loaded, wav_path, tmp_path):
    """Upload, settings, two questions in one conversation: each answer on the page equals model.generate's."""
    from playwright.sync_api import sync_playwright

    model, processor = loaded
    default_scaling = model.lora_scaling
    scaling = SETTINGS["lora_scaling"]
    answer_1 = reference_answer(
        model,
        processor,
        processor.format_prompt(Q1),
        wav_path,
        scaling,
        max_new_tokens=SETTINGS["max_new_tokens"],
        num_beams=1,
    )
    prompt_2 = f"USER: <Speech><SpeechHere></Speech> {Q1}\nASSISTANT: {answer_1}</s>USER: {Q2}\nASSISTANT:"
    answer_2 = reference_answer(
        model, processor, prompt_2, wav_path, scaling, max_new_tokens=SETTINGS["max_new_tokens"], num_beams=1
    )
    # What the page would show had it dropped the LoRA scaling or the history: the checks below tell these apart.
    assert answer_1 != reference_answer(
        model,
        processor,
        processor.format_prompt(Q1),
        wav_path,
        default_scaling,
        max_new_tokens=SETTINGS["max_new_tokens"],
    )
    assert answer_2 != reference_answer(
        model, processor, processor.format_prompt(Q2), wav_path, scaling, max_new_tokens=SETTINGS["max_new_tokens"]
    )

    demo = build_demo(model, processor, model_name="tiny test model")
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/"
    demo.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    outside_requests = []
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),  # a fresh user data dir
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 1000},
            )
            try:
                page = context.new_page()
                page.on(
                    "request",
                    lambda r: (
                        None if r.url.startswith((base_url, "blob:", "data:")) else outside_requests.append(r.url)
                    ),
                )
                page.goto(base_url)
                page.wait_for_selector("#audio-input input[type=file]", state="attached")

                with page.expect_response(lambda r: "/upload" in r.url and r.ok):
                    page.set_input_files("#audio-input input[type=file]", str(wav_path))
                page.wait_for_selector("#audio-input audio[src]", state="attached")
                for elem_id, name in (
                    ("max-new-tokens", "max_new_tokens"),
                    ("num-beams", "num_beams"),
                    ("lora-scaling", "lora_scaling"),
                ):
                    box = page.locator(f"#{elem_id} input[type=number]")
                    box.fill(str(SETTINGS[name]))
                    box.press("Enter")
                    assert float(page.locator(f"#{elem_id} input[type=range]").input_value()) == SETTINGS[name]

                page.fill("#question textarea", Q1)
                page.click("#submit")
                wait_for_answer(page, 1)
                check_shown(page, [answer_1])
                assert page.input_value("#question textarea") == ""
                assert f"{SETTINGS['max_new_tokens']} new tokens in" in page.inner_text("#status")

                page.fill("#question textarea", Q2)  # a follow-up: same audio, the first turn as history
                page.press("#question textarea", "Enter")
                wait_for_answer(page, 2)
                check_shown(page, [answer_1, answer_2])

                screenshots = Path(os.environ.get("SALMONN_TEST_ARTIFACTS", tmp_path))
                screenshots.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshots / "salmonn_web_answer.png"), full_page=True)

                page.click("#clear")
                page.wait_for_function("document.querySelectorAll('#chat [data-testid=bot]').length === 0")
            finally:
                context.close()
    finally:
        demo.close()
    assert model.lora_scaling == default_scaling
    assert outside_requests == [], f"the page reached outside the app: {outside_requests}"
