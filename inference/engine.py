"""Batched SALMONN inference shared by `salmonn-infer`, the evaluation harness and the web demo.

`load_model_and_processor` loads a converted or trained folder (or Hub id) in the requested precision, on the
requested device, optionally with the language model quantized. `generate_answers` answers a list of items in one
batched `generate` call; `run_items` streams records over any number of items in batches, turning items whose
audio cannot be used into error records instead of stopping; `stream_answer` yields the text of one answer as it
is produced.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modeling_salmonn.integrations_salmonn import MAX_LORA_SCALING, NOT_QUANTIZED_MODULES
from salmonn.audio import TARGET_SAMPLING_RATE, read_upload


logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE_CHOICES = ("int8", "8bit", "4bit")

QUANTO_EXCLUDE = ("*lora_A*", "*lora_B*", "*lora_dropout*")
STATIC_CACHE_CHOICES = ("auto", "on", "off")


# ------------------------------------------------------------------------------------------------ loading


def resolve_device(device: str | None) -> torch.device:
    """`auto` picks CUDA when available, then MPS, then the CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a torch device (expected e.g. cpu, cuda, cuda:1, mps, auto)") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for but CUDA is not available on this machine")
    return resolved


def bitsandbytes_config(quantize: str, compute_dtype: torch.dtype):
    """`BitsAndBytesConfig` that quantizes the LLM's linear layers only (8-bit LLM.int8 or 4-bit NF4)."""
    from transformers import BitsAndBytesConfig

    skip = list(NOT_QUANTIZED_MODULES)
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    raise ValueError(f"quantize: expected '8bit' or '4bit' for bitsandbytes, got {quantize!r}")


def quantize_llm_int8(model) -> int:
    """
    Int8 weights (optimum-quanto, weight-only) for the linear layers of the language model; returns how many were
    quantized. A float32 language model first goes to bfloat16 (the LLM only, as the original runs its LLaMA in half
    precision next to float32 encoders): quanto multiplies bfloat16 activations with PyTorch's int8 weight-only
    kernel, whereas float32 activations make it dequantize every weight at every call, slower than float32 itself.
    Encoders, Q-Former and projection keep their precision; LoRA matrices, embeddings and `lm_head` are not quantized.
    """
    try:
        from optimum.quanto import freeze, qint8, quantize
        from optimum.quanto.nn import QLinear
    except ImportError as err:
        raise ValueError(
            "quantize='int8' needs optimum-quanto: pip install optimum-quanto (or pip install 'salmonn[quant]')"
        ) from err
    language_model = model.model.language_model
    if model.lm_head.weight.dtype == torch.float32:
        language_model.to(torch.bfloat16)
        model.lm_head.to(torch.bfloat16)
    quantize(language_model, weights=qint8, exclude=list(QUANTO_EXCLUDE))
    freeze(language_model)
    return sum(isinstance(m, QLinear) for m in language_model.modules())


def load_model_and_processor(
    model_name_or_path: str,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | None = None,
    quantize: str | None = None,
    lora_scaling: float | None = None,
    static_cache: str = "auto",
):
    """
    Loads a SALMONN folder or Hub id with `AutoModel` / `AutoProcessor` (`trust_remote_code=True`).

    Args:
        model_name_or_path: a converted or trained SALMONN folder, or a Hub id.
        dtype: "float32", "bfloat16" or "float16" for the whole model (the loaded weights' precision otherwise).
        device: where the model runs ("cpu", "cuda", "cuda:1", "mps" or "auto"); ignored with `device_map`.
        device_map: passed to `from_pretrained` (e.g. "auto" to spread a large model over the GPUs and the CPU).
        quantize: None; "int8" (optimum-quanto int8 weights for the LLM, which then computes in bfloat16 if it was
            float32; CPU or GPU); "8bit" or "4bit" (bitsandbytes for the LLM, CUDA only). The encoders, the Q-Former
            and the projection are never quantized.
        lora_scaling: LoRA scaling factor to set after loading (the paper's test-time discount).
        static_cache: "auto" (on when the model is on a CUDA GPU), "on" or "off": decode with a static KV cache,
            whose decoding steps transformers compiles whole on accelerators (see `use_static_cache`).
    """
    from transformers import AutoModel, AutoProcessor

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize: expected one of {list(QUANTIZE_CHOICES)} or None, got {quantize!r}")
    if static_cache not in STATIC_CACHE_CHOICES:
        raise ValueError(f"static_cache: expected one of {list(STATIC_CACHE_CHOICES)}, got {static_cache!r}")
    check_lora_scaling(lora_scaling)
    torch_dtype = DTYPES[dtype]
    target = resolve_device(device) if device_map is None else None

    kwargs = {"trust_remote_code": True, "dtype": torch_dtype}
    if quantize in ("8bit", "4bit"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"quantize={quantize!r} uses bitsandbytes, which needs a CUDA GPU; none is available. On the CPU use "
                "quantize='int8' (optimum-quanto)"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ValueError(f"quantize={quantize!r} needs bitsandbytes: pip install bitsandbytes") from err
        if target is not None and target.type != "cuda":
            raise ValueError(f"quantize={quantize!r} needs a CUDA device, got device={device!r}")
        kwargs["quantization_config"] = bitsandbytes_config(quantize, torch_dtype)
        if device_map is None:
            device_map = {"": target.index or 0}
            target = None
    if device_map is not None:
        kwargs["device_map"] = device_map

    logger.info("Loading %s (dtype %s, %s)", model_name_or_path, dtype, f"device_map={device_map}" if device_map else target)
    model = AutoModel.from_pretrained(model_name_or_path, **kwargs)
    if target is not None:
        model.to(target)
    if quantize == "int8":
        count = quantize_llm_int8(model)
        logger.info("Quantized %d linear layers of the language model to int8 weights (optimum-quanto)", count)
    if lora_scaling is not None:
        previous = model.set_lora_scaling(float(lora_scaling))
        logger.info("LoRA scaling set to %s (was %s)", lora_scaling, previous)
    model.eval()
    use_static_cache(model, static_cache)
    processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=True)
    return model, processor


def use_static_cache(model, static_cache: str = "auto") -> bool:
    """
    Makes `generate` use a static KV cache by default (`static_cache`: "on", "off", or "auto": on when the model is
    on a CUDA GPU). transformers then compiles the decoding step of greedy and sampled decoding whole on accelerators
    (the CPU is left eager: compiling costs more there than it saves); the ids are those of the dynamic cache.
    Returns whether it is on.
    """
    on = static_cache == "on" or (static_cache == "auto" and model.device.type == "cuda")
    model.generation_config.cache_implementation = "static" if on else None
    logger.info("Static KV cache %s", "on" if on else "off")
    return on


# ------------------------------------------------------------------------------------------------ items


def item_name(item: dict, index: int) -> str:
    """How errors refer to an item: its id, else its audio path, else its position."""
    if item.get("id") is not None:
        return f"item {item['id']!r}"
    if isinstance(item.get("audio"), (str, Path)):
        return f"item {str(item['audio'])!r}"
    return f"items[{index}]"


@dataclass
class PreparedItem:
    """An item whose audio is decoded, validated and resampled to 16 kHz (mono float64), with its full prompt text."""

    prompt_text: str
    waveforms: list[np.ndarray]
    truncation: bool = False


def build_prompt(processor, instruction: str, num_audios: int, name: str) -> str:
    """
    Wraps an instruction in the chat template. An instruction without `<SpeechHere>` gets one
    `<Speech><SpeechHere></Speech>` per audio in front (SALMONN's form); an instruction that already holds markers
    (as the original prompt files do) must hold exactly one per audio and is wrapped as it is.
    """
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{name}: the prompt is empty; give an instruction such as 'Describe the audio.'")
    markers = instruction.count(processor.audio_marker)
    if markers == 0:
        return processor.format_prompt(instruction, num_audios=num_audios)
    if markers != num_audios:
        raise ValueError(
            f"{name}: the prompt has {markers} {processor.audio_marker} marker(s) but the item has {num_audios} "
            "audio(s); give one marker per audio, or none to have them put in front"
        )
    return processor.apply_chat_template(
        [{"role": "user", "content": instruction.strip()}], add_generation_prompt=True, tokenize=False
    )


def prepare_item(processor, item: dict, index: int = 0, truncation: bool = False) -> PreparedItem:
    """
    Loads and validates one item; every problem is a `ValueError` that names the item. With `truncation` only the
    first 30 s of each audio are kept (the original's behaviour) instead of encoding longer audio as 30 s segments.
    """
    if not isinstance(item, dict):
        raise ValueError(f"items[{index}]: expected a dict with 'audio' and 'prompt', got {type(item).__name__}")
    name = item_name(item, index)
    if "audio" not in item or item["audio"] is None:
        raise ValueError(f"{name}: has no 'audio'")
    if "prompt" not in item:
        raise ValueError(f"{name}: has no 'prompt'")
    audios = item["audio"]
    if isinstance(audios, (list, tuple)) and audios and not isinstance(audios[0], (int, float, np.number)):
        audios = list(audios)
    else:
        audios = [audios]

    feature_extractor = processor.feature_extractor
    waveforms = []
    for k, audio in enumerate(audios):
        audio_name = name if len(audios) == 1 else f"{name} audio[{k}]"
        if isinstance(audio, (str, Path)):
            data, rate = read_upload(feature_extractor, audio, audio_name, truncation=truncation), TARGET_SAMPLING_RATE
        else:
            data, rate = audio, item.get("sampling_rate")
            if rate is None:
                raise ValueError(f"{audio_name}: an array audio needs 'sampling_rate' (Hz)")
        # Checked and resampled once here, so a bad item fails alone; the processor segments it in its batch.
        waveforms.append(feature_extractor.prepare_audio(data, sampling_rate=rate, truncation=truncation, name=audio_name))
    prompt_text = build_prompt(processor, item["prompt"], len(waveforms), name)
    return PreparedItem(prompt_text=prompt_text, waveforms=waveforms, truncation=truncation)


def build_inputs(model, processor, prepared: list[PreparedItem]):
    """One left-padded batch on the model's device (the model runs each encoder in its own dtype)."""
    texts = [p.prompt_text for p in prepared]
    audios = [w for p in prepared for w in p.waveforms]
    inputs = processor(
        text=texts,
        audio=audios or None,
        sampling_rate=processor.feature_extractor.sampling_rate,
        truncation=any(p.truncation for p in prepared),
    )
    return inputs.to(model.device)


def check_lora_scaling(value: float | None) -> float | None:
    if value is not None and (not math.isfinite(value) or not 0 <= value <= MAX_LORA_SCALING):
        raise ValueError(f"The LoRA scaling (lora_scaling) must be a number from 0 to {MAX_LORA_SCALING:g}, got {value!r}")
    return value


@contextmanager
def lora_scaled(model, value: float | None):
    """The paper's test-time LoRA discount for the duration of a block (`None`: leave the model's scaling)."""
    if check_lora_scaling(value) is None:
        yield
        return
    previous = model.set_lora_scaling(float(value))
    try:
        yield
    finally:
        model.set_lora_scaling(previous)


def _generate(model, processor, prepared: list[PreparedItem], generation_kwargs: dict | None) -> list[str]:
    generation_kwargs = dict(generation_kwargs or {})
    if generation_kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError("generation_kwargs: num_return_sequences must be 1 (one answer per item)")
    inputs = build_inputs(model, processor, prepared)
    with torch.inference_mode():
        output = model.generate(**inputs, **generation_kwargs)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def generate_answers(
    model, processor, items: list[dict], generation_kwargs: dict | None = None, truncation: bool = False
) -> list[str]:
    """
    Answers `items` in one batched `generate` call; row i of the batch gives what item i alone would give.

    Each item is `{"audio": path | array | list of them, "sampling_rate": Hz (arrays only), "prompt": instruction}`;
    the instruction is wrapped in the chat template (see `build_prompt`). `generation_kwargs` override the model's
    generation config (beam search with 4 beams and 200 new tokens by default, as the original).
    """
    if not items:
        return []
    prepared = [prepare_item(processor, item, i, truncation=truncation) for i, item in enumerate(items)]
    return _generate(model, processor, prepared, generation_kwargs)


@dataclass
class StreamUpdate:
    """One step of a streamed answer: the text so far and, on the last step, the generation's numbers."""

    text: str
    done: bool = False
    new_tokens: int = 0
    seconds: float = 0.0


def _stop_on(event: threading.Event):
    from transformers import StoppingCriteria

    class _StopOnEvent(StoppingCriteria):
        """Ends generation early once the consumer of the stream has gone (a Stop button, a closed page)."""

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return _StopOnEvent()


def stream_generate(model, processor, inputs, generation_kwargs: dict | None = None) -> Iterator[StreamUpdate]:
    """
    Runs `generate` on one prompt's `inputs` in a thread and yields the answer as it grows, then a last update
    (`done=True`) with the decoded answer, exactly as `processor.batch_decode(..., skip_special_tokens=True)` gives
    it, stripped. Beam search cannot stream: with `num_beams > 1` only the last update comes. Closing the iterator
    early ends `generate` at its next token.
    """
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    kwargs = dict(generation_kwargs or {})
    prompt_length = inputs["input_ids"].shape[1]
    stop = threading.Event()
    streamer = None
    if kwargs.get("num_beams", model.generation_config.num_beams or 1) == 1:
        streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict = {}

    def run() -> None:
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                result["ids"] = model.generate(
                    **inputs, **kwargs, streamer=streamer, stopping_criteria=StoppingCriteriaList([_stop_on(stop)])
                )
            result["seconds"] = time.perf_counter() - start
        except BaseException as err:  # handed to the caller's thread below
            result["error"] = err
            if streamer is not None:
                streamer.end()  # unblocks the iteration; `generate` only ends the streamer on success

    thread = threading.Thread(target=run, name="salmonn-generate", daemon=True)
    thread.start()
    try:
        if streamer is not None:
            text = ""
            for piece in streamer:
                text += piece
                if text.strip():
                    yield StreamUpdate(text=text.strip())
        thread.join()
    finally:
        stop.set()  # the consumer stopped listening: let `generate` end at the next token
        thread.join()
    if "error" in result:
        raise result["error"]
    new_ids = result["ids"][:, prompt_length:]
    answer = processor.batch_decode(new_ids, skip_special_tokens=True)[0].strip()
    yield StreamUpdate(text=answer, done=True, new_tokens=int(new_ids.shape[1]), seconds=result["seconds"])


def stream_answer(model, processor, item: dict, generation_kwargs: dict | None = None) -> Iterator[str]:
    """Yields the answer to one item piece by piece as `generate` produces it (greedy or sampling, no beams)."""
    generation_kwargs = dict(generation_kwargs or {})
    num_beams = generation_kwargs.setdefault("num_beams", 1)
    if num_beams != 1:
        raise ValueError(f"streaming needs num_beams=1 (transformers cannot stream beam search), got {num_beams}")
    inputs = build_inputs(model, processor, [prepare_item(processor, item)])
    sent = ""
    for update in stream_generate(model, processor, inputs, generation_kwargs):
        if not update.done and update.text.startswith(sent):
            yield update.text[len(sent) :]
            sent = update.text


# ------------------------------------------------------------------------------------------------ many items


def _record(item: dict) -> dict:
    audio = item.get("audio")
    if isinstance(audio, Path):
        audio = str(audio)
    elif not isinstance(audio, str):
        audio = None if audio is None else f"<{type(audio).__name__}>"
    return {"id": item.get("id"), "audio": audio, "prompt": item.get("prompt")}


def run_items(
    model,
    processor,
    items: Iterable[dict],
    batch_size: int = 8,
    generation_kwargs: dict | None = None,
    done_ids: set[str] | frozenset[str] = frozenset(),
    progress: bool = True,
) -> Iterator[dict]:
    """
    Answers `items` (`{"id", "audio", "prompt"}`) `batch_size` at a time and yields one record per item, in order:
    `{"id", "audio", "prompt", "answer", "seconds"}` (`seconds`: the batch's wall time shared by its items) or
    `{"id", "audio", "prompt", "error"}` when the item cannot be used (unreadable audio, bad samples, too long,
    prompt markers not matching its audios). Items whose id is in `done_ids` are skipped (resumption).
    """
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    total = len(items) if hasattr(items, "__len__") else None
    bar = tqdm(total=total, disable=not progress, unit="item", desc="salmonn", dynamic_ncols=True)
    pending: list[tuple[dict, PreparedItem | None]] = []  # records in input order, with their prepared input

    def flush() -> Iterator[dict]:
        ready = [(record, prep) for record, prep in pending if prep is not None]
        if ready:
            for (record, _), result in zip(ready, _answer_batch(model, processor, [p for _, p in ready], generation_kwargs)):
                record.update(result)
        for record, _ in pending:
            yield record
        bar.update(len(pending))
        pending.clear()

    try:
        for index, item in enumerate(items):
            record = _record(item) if isinstance(item, dict) else {"id": None, "audio": None, "prompt": None}
            if record["id"] is not None and record["id"] in done_ids:
                bar.update(1)
                continue
            try:
                prepared = prepare_item(processor, item, index)
            except ValueError as err:
                logger.warning("%s", err)
                record["error"] = str(err)
                prepared = None
            pending.append((record, prepared))
            if all(prep is None for _, prep in pending) or sum(prep is not None for _, prep in pending) >= batch_size:
                yield from flush()
        yield from flush()
    finally:
        bar.close()


def _answer_batch(model, processor, prepared: list[PreparedItem], generation_kwargs: dict | None) -> list[dict]:
    """Results of one batch; if the batch is refused as a whole, each item is retried alone so only the culprit fails."""
    start = time.perf_counter()
    try:
        answers = _generate(model, processor, prepared, generation_kwargs)
    except ValueError as err:
        if len(prepared) == 1:
            return [{"error": str(err)}]
        logger.warning("The batch failed (%s); answering its items one by one", err)
        return [result for p in prepared for result in _answer_batch(model, processor, [p], generation_kwargs)]
    seconds = (time.perf_counter() - start) / len(prepared)
    return [{"answer": answer, "seconds": round(seconds, 4)} for answer in answers]


__all__ = [
    "bitsandbytes_config",
    "build_inputs",
    "build_prompt",
    "generate_answers",
    "load_model_and_processor",
    "prepare_item",
    "quantize_llm_int8",
    "resolve_device",
    "run_items",
    "check_lora_scaling",
    "lora_scaled",
    "stream_answer",
    "stream_generate",
]
