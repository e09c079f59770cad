"""
SALMONN on vLLM: the plugin that registers the model with vLLM, and the batch runner behind
`salmonn-infer --engine vllm` and `salmonn-eval --engine vllm`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

from .engine import _record, item_name, prepare_item


logger = logging.getLogger(__name__)

ARCHITECTURE = "SalmonnForConditionalGeneration"  # what converted and trained folders carry in `architectures`


def register() -> None:
    """vLLM's `vllm.general_plugins` entry point: maps SALMONN folders to `vllm_salmonn` (imported lazily)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "salmonn.inference.vllm_salmonn:SalmonnVllmForConditionalGeneration")


def load_llm(model: str, dtype: str = "float32", lora_scaling: float | None = None, **kwargs):
    """A `vllm.LLM` for a SALMONN folder; `lora_scaling` is the paper's test-time LoRA discount."""
    from vllm import LLM

    hf_overrides = {} if lora_scaling is None else {"lora_scaling": float(lora_scaling)}
    return LLM(model=model, trust_remote_code=True, dtype=dtype, hf_overrides=hf_overrides, **kwargs)


def load_llm_and_processor(args, generation_kwargs: dict):
    """`salmonn-infer/-eval --engine vllm`: the LLM, the folder's processor and the sampling settings of the flags."""
    from transformers import AutoProcessor

    if getattr(args, "stream", False) or getattr(args, "quantize", None) or getattr(args, "device_map", None):
        raise ValueError("--engine vllm does not take --stream, --quantize or --device-map")
    generation_kwargs = dict(generation_kwargs)
    generation_kwargs.setdefault("num_beams", 1)  # vLLM has no beam search for audio prompts: greedy by default
    sampling_params = sampling_params_from(generation_kwargs, seed=getattr(args, "seed", 0))
    processor = AutoProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    llm = load_llm(args.model_name_or_path, dtype=args.dtype, lora_scaling=args.lora_scaling)
    return llm, processor, sampling_params


def sampling_params_from(generation_kwargs: dict | None, seed: int = 0):
    """vLLM sampling settings for the CLIs' generation options (greedy unless `do_sample`; no beam search)."""
    from vllm import SamplingParams

    kwargs = dict(generation_kwargs or {})
    if kwargs.pop("num_beams", 1) != 1:
        raise ValueError("--engine vllm decodes greedily or samples; beam search (--num-beams > 1) needs --engine transformers")
    max_tokens = kwargs.pop("max_new_tokens", 200)
    if kwargs.pop("do_sample", False):
        return SamplingParams(
            max_tokens=max_tokens, temperature=kwargs.pop("temperature", 1.0), top_p=kwargs.pop("top_p", 1.0), seed=seed
        )
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def _answer(processor, output) -> str:
    """The answer decoded by the processor from the token ids, as `engine.run_items` decodes `generate`'s."""
    return processor.decode(output.outputs[0].token_ids, skip_special_tokens=True).strip()


def run_items_vllm(llm, processor, items: Iterable[dict], sampling_params, progress: bool = True) -> Iterator[dict]:
    """
    Answers `items` (`{"id", "audio", "prompt"}`) with vLLM and yields one record per item in order, like
    `engine.run_items`: `{"id", "audio", "prompt", "answer", "seconds"}` or `{..., "error"}`. Items are read and
    checked by `engine.prepare_item` (the same errors); vLLM schedules all valid ones together, and a request it
    refuses fails alone.
    """
    records, requests = [], []
    for index, item in enumerate(items):
        record = _record(item) if isinstance(item, dict) else {"id": None, "audio": None, "prompt": None}
        try:
            prepared = prepare_item(processor, item, index)
        except ValueError as err:
            logger.warning("%s", err)
            record["error"] = str(err)
            records.append(record)
            continue
        rate = processor.feature_extractor.sampling_rate
        audio = [(waveform, rate) for waveform in prepared.waveforms]
        requests.append((record, item_name(item, index), {"prompt": prepared.prompt_text, "multi_modal_data": {"audio": audio}}))
        records.append(record)

    start = time.perf_counter()
    try:
        outputs = llm.generate([request for _, _, request in requests], sampling_params, use_tqdm=progress)
        answers = [_answer(processor, output) for output in outputs]
    except ValueError as err:
        logger.warning("vLLM refused the batch (%s); submitting its items one by one", err)
        answers = []
        for record, name, request in requests:
            try:
                answers.append(_answer(processor, llm.generate([request], sampling_params, use_tqdm=False)[0]))
            except ValueError as item_err:
                answers.append(ValueError(f"{name}: {item_err}"))
    seconds = (time.perf_counter() - start) / max(len(requests), 1)
    for (record, _, _), answer in zip(requests, answers):
        if isinstance(answer, ValueError):
            record["error"] = str(answer)
        else:
            record.update(answer=answer, seconds=round(seconds, 4))
    yield from records


__all__ = ["ARCHITECTURE", "load_llm", "load_llm_and_processor", "register", "run_items_vllm", "sampling_params_from"]
