"""salmonn-web: a Gradio chat about an audio clip, with streamed answers and the decoding settings at hand.

Upload or record an audio, ask about it, and keep asking: the conversation is sent to the model in SALMONN's
Vicuna form (`processor.apply_chat_template`), with the audio in the first user turn. Changing the audio starts a
new conversation. The page never needs the internet; `--share` (off by default) is the only option that does.

    salmonn-web --model path/to/salmonn            # http://127.0.0.1:7860
    python -m salmonn.inference.web --model ... --device cuda --dtype bfloat16 --port 9527
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser

from salmonn.audio import TARGET_SAMPLING_RATE, read_upload
from salmonn.cli import setup_logging

from .engine import DTYPES, StreamUpdate, check_lora_scaling, load_model_and_processor, lora_scaled, stream_generate


logger = logging.getLogger(__name__)

# One generation at a time per process: the LoRA scaling is a property of the shared model, set per request.
_GENERATE_LOCK = threading.Lock()


@dataclass
class WebArguments:
    model_name_or_path: str = field(
        metadata={
            "aliases": ["--model"],
            "help": "A converted or trained SALMONN folder or Hub id (loaded with trust_remote_code).",
        }
    )
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "Address to listen on. The default serves this machine only; 0.0.0.0 serves the network."},
    )
    port: int | None = field(
        default=None,
        metadata={"help": "Port to listen on. Default: the first free port from 7860 (or GRADIO_SERVER_PORT)."},
    )
    share: bool = field(
        default=False,
        metadata={"help": "Also publish the page through a public gradio.live link (reaches the internet)."},
    )
    dtype: str = field(default="float32", metadata={"help": "Weights' dtype.", "choices": list(DTYPES)})
    device: str = field(
        default="auto", metadata={"help": "Torch device (cpu, cuda, cuda:1, ...). auto: cuda when available."}
    )
    max_file_size: str = field(
        default="50mb",
        metadata={"help": "Largest upload accepted (gradio's form: 20mb, 1gb, ...); larger uploads are refused."},
    )


def _import_gradio():
    """Gradio is an optional dependency (the `demo` extra) and must stay offline: no analytics, no version check."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as err:
        raise ImportError(
            "salmonn-web needs Gradio, which is not installed: run `pip install salmonn[demo]` "
            "(or `pip install gradio`)."
        ) from err
    return gradio


# -- model side (no Gradio) ------------------------------------------------------------------------------------


def message_text(content: Any) -> str:
    """The text of a chat message whether it is a string or a list of content items (Gradio's normalised form)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(message_text(item) for item in content)
    return ""


def build_conversation(history: Sequence[dict], question: str, with_audio: bool) -> list[dict]:
    """
    The conversation for `processor.apply_chat_template`: the earlier turns (`{"role", "content"}` messages, as
    the Chatbot holds them) and the new question. The audio goes with the first user turn only.
    """
    conversation: list[dict] = []
    for message in history:
        role = message.get("role")
        if role not in ("user", "assistant"):
            continue
        conversation.append({"role": role, "content": message_text(message.get("content")).strip()})
    conversation.append({"role": "user", "content": question.strip()})
    if with_audio:
        first = conversation[0]  # always a user turn: the Chatbot starts with the user's question
        first["content"] = [{"type": "audio"}, {"type": "text", "text": first["content"]}]
    return conversation


def generation_kwargs(
    max_new_tokens: int = 200,
    num_beams: int = 4,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 0.9,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
) -> dict:
    """`generate` keyword arguments from the page's settings (sampling knobs only when sampling)."""
    kwargs = {
        "max_new_tokens": int(max_new_tokens),
        "num_beams": int(num_beams),
        "do_sample": bool(do_sample),
        "repetition_penalty": float(repetition_penalty),
        "length_penalty": float(length_penalty),
    }
    if kwargs["max_new_tokens"] < 1 or kwargs["num_beams"] < 1:
        raise ValueError(f"max_new_tokens and num_beams must be at least 1, got {max_new_tokens} and {num_beams}")
    if do_sample:
        if not temperature > 0 or not 0 < top_p <= 1:
            raise ValueError(f"Sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        kwargs.update(temperature=float(temperature), top_p=float(top_p))
    return kwargs


def stream_answer(
    model,
    processor,
    question: str,
    audio: str | None = None,
    history: Sequence[dict] = (),
    generation_kwargs: dict | None = None,
    lora_scaling: float | None = None,
    seed: int | None = None,
) -> Iterator[StreamUpdate]:
    """
    Answers `question` about `audio` (a file path, decoded in bounded blocks: an upload's few megabytes can hold
    hours of many-channel audio) after `history`, yielding the answer as it grows (see
    `engine.stream_generate`; beam search cannot stream, then the answer comes whole). `lora_scaling` applies to
    this answer only. Bad input (empty question, unreadable audio, bad settings) raises `ValueError` here, before
    anything is generated.
    """
    if not question or not question.strip():
        raise ValueError("The question is empty: type what you want to know about the audio")
    check_lora_scaling(lora_scaling)
    conversation = build_conversation(history, question, with_audio=audio is not None)
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    waveform = None if audio is None else read_upload(processor.feature_extractor, audio, "audio[0]")
    inputs = processor(text=prompt, audio=waveform, sampling_rate=TARGET_SAMPLING_RATE).to(model.device)
    return _one_at_a_time(model, processor, inputs, generation_kwargs, lora_scaling, seed)


def _one_at_a_time(model, processor, inputs, generation_kwargs, lora_scaling, seed) -> Iterator[StreamUpdate]:
    import torch

    with _GENERATE_LOCK, lora_scaled(model, lora_scaling):
        if seed is not None:
            torch.manual_seed(int(seed))
        yield from stream_generate(model, processor, inputs, generation_kwargs)


def web_error_message(err: Exception, audio: str | None) -> str:
    """
    The error as a web user should read it: the server's temporary upload path becomes the file's own name, and
    advice meant for Python callers (`truncation=True`) becomes advice for the page.
    """
    message = str(err)
    if audio:
        message = message.replace(repr(str(audio)), repr(os.path.basename(audio))).replace(str(audio), os.path.basename(audio))
    message = re.sub(
        r"pass truncation=True to keep only its first (\S+) s or raise max_audio_seconds",
        r"upload a shorter clip (cut it to its first \1 s, for example)",
        message,
    )
    return message


def build_demo(model, processor, model_name: str | None = None):
    """The Gradio page for `model` and `processor` (not launched: call `.launch()` on the returned Blocks)."""
    gr = _import_gradio()

    defaults = model.generation_config
    default_scaling = model.lora_scaling
    title = f"SALMONN{f' · {model_name}' if model_name else ''}"

    def respond(
        audio,
        question,
        history,
        max_new_tokens,
        num_beams,
        do_sample,
        temperature,
        top_p,
        repetition_penalty,
        length_penalty,
        lora_scaling,
        seed,
    ):
        question = (question or "").strip()
        if not question:
            raise gr.Error("Type a question about the audio first.")
        history = list(history or [])
        try:
            kwargs = generation_kwargs(
                max_new_tokens, num_beams, do_sample, temperature, top_p, repetition_penalty, length_penalty
            )
            updates = stream_answer(
                model,
                processor,
                question,
                audio=audio,
                history=history,
                generation_kwargs=kwargs,
                lora_scaling=float(lora_scaling),
                seed=int(seed) if do_sample and seed is not None else None,
            )
            chat = history + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
            yield chat, "", "Generating…"
            for update in updates:
                chat[-1] = {"role": "assistant", "content": update.text}
                if update.done:
                    rate = update.new_tokens / update.seconds if update.seconds > 0 else 0.0
                    status = f"{update.new_tokens} new tokens in {update.seconds:.2f} s ({rate:.1f} tokens/s)"
                    yield chat, "", status
                else:
                    yield chat, "", "Generating…"
        except ValueError as err:  # bad audio file, bad settings: shown on the page, the server goes on
            raise gr.Error(web_error_message(err, audio)) from err

    def new_conversation():
        return [], ""

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"## {title}\nUpload or record an audio clip, then ask about it. Follow-up questions continue the "
            "conversation about the same clip; a new clip starts a new conversation."
        )
        with gr.Row():
            with gr.Column(scale=2):
                # No "share" buttons: they post to the Hugging Face Hub.
                audio = gr.Audio(
                    sources=["upload", "microphone"],
                    type="filepath",
                    label="Audio",
                    buttons=["download"],
                    elem_id="audio-input",
                )
                with gr.Accordion("Decoding settings", open=True):
                    max_new_tokens = gr.Slider(
                        1,
                        1024,
                        value=defaults.max_new_tokens or 200,
                        step=1,
                        label="Max new tokens",
                        elem_id="max-new-tokens",
                    )
                    num_beams = gr.Slider(
                        1,
                        10,
                        value=defaults.num_beams or 1,
                        step=1,
                        label="Beams",
                        info="1 streams the answer token by token; beam search shows it when complete.",
                        elem_id="num-beams",
                    )
                    lora_scaling = gr.Slider(
                        0.0,
                        max(8.0, 2 * default_scaling),
                        value=default_scaling,
                        step=0.1,
                        label="LoRA scaling",
                        info=f"Trained value {default_scaling:g}; lower it to follow the instruction more than the "
                        "training tasks (the paper's activation discount).",
                        elem_id="lora-scaling",
                    )
                    repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty")
                    length_penalty = gr.Slider(0.0, 2.0, value=1.0, step=0.1, label="Length penalty (beam search)")
                    do_sample = gr.Checkbox(
                        value=bool(defaults.do_sample), label="Sample (instead of greedy / beam search)"
                    )
                    temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature (sampling)")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p (sampling)")
                    seed = gr.Number(value=0, precision=0, label="Seed (sampling)")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Conversation",
                    height=480,
                    buttons=["copy", "copy_all"],
                    feedback_options=None,
                    elem_id="chat",
                )
                question = gr.Textbox(
                    label="Question",
                    placeholder="What do you hear in this recording? (Enter sends)",
                    lines=1,
                    max_lines=6,
                    elem_id="question",
                )
                with gr.Row():
                    submit = gr.Button("Ask", variant="primary", elem_id="submit")
                    stop = gr.Button("Stop", elem_id="stop")
                    clear = gr.Button("New conversation", elem_id="clear")
                status = gr.Markdown("", elem_id="status")

        inputs = [
            audio,
            question,
            chatbot,
            max_new_tokens,
            num_beams,
            do_sample,
            temperature,
            top_p,
            repetition_penalty,
            length_penalty,
            lora_scaling,
            seed,
        ]
        outputs = [chatbot, question, status]
        ask_click = submit.click(respond, inputs, outputs, api_name="ask")
        ask_enter = question.submit(respond, inputs, outputs, api_visibility="private")
        stop.click(None, cancels=[ask_click, ask_enter]).then(lambda: "Stopped.", None, status, queue=False)
        clear.click(new_conversation, None, [chatbot, status], queue=False, cancels=[ask_click, ask_enter])
        # The model sees the audio in the first user turn: another audio means another conversation.
        audio.change(new_conversation, None, [chatbot, status], queue=False)
    return demo


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = HfArgumentParser(WebArguments, allow_abbrev=False)
    (args,) = parser.parse_args_into_dataclasses(args=argv)

    try:
        _import_gradio()
    except ImportError as err:
        logger.error("%s", err)
        return 2
    try:
        model, processor = load_model_and_processor(args.model_name_or_path, dtype=args.dtype, device=args.device)
    except (OSError, ValueError) as err:
        logger.error("Cannot load --model_name_or_path %s (--dtype %s, --device %s): %s", args.model_name_or_path, args.dtype, args.device, err)
        return 2
    logger.info("Loaded %s on %s (%s)", args.model_name_or_path, model.device, model.dtype)

    demo = build_demo(model, processor, model_name=args.model_name_or_path)
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        inbrowser=False,
        show_error=True,
        max_file_size=args.max_file_size,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
