"""SALMONN on vLLM against `generate`, on the mid-size random SALMONN of benchmarks/midsize.py, in one run.

For 16 clips of 2 to 30 s and answers of exactly 32 and 128 tokens (greedy, end of sequence ignored) it times:
`generate` one clip at a time, `generate` in batches of 8, and vLLM with every clip submitted at once. It also
measures the per-clip work that batching cannot share (audio features + encoders + prefill: vLLM answering one
token for each clip alone), which bounds the clips/s any batching can reach, the time to first token, and decoding
tokens/s at batch 1 with the LLM weight bytes read per second as a fraction of the memory bandwidth of this machine
(a large tensor copy).

Run it in the vLLM virtualenv (README, "Serving with vLLM"):

    python benchmarks/serving.py                   # mid-size model, bfloat16 (what vLLM serves it in by default)
    python benchmarks/serving.py --dtype float32   # both engines in float32
    python benchmarks/serving.py --size tiny --clips 2 --new-tokens 4 --batch-size 2   # smoke run
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser


logger = logging.getLogger(__name__)


@dataclass
class ServingBenchmarkArguments:
    size: Literal["mid", "tiny"] = field(default="mid", metadata={"help": "mid: benchmarks/midsize.py; tiny: a smoke run."})
    clips: int = field(default=16, metadata={"help": "Clips, evenly from 2 to 30 s."})
    new_tokens: list[int] = field(default_factory=lambda: [32, 128], metadata={"help": "Answer lengths to time."})
    batch_size: int = field(default=8, metadata={"help": "Batch size of the batched `generate` run."})
    dtype: Literal["bfloat16", "float32"] = field(
        default="bfloat16",
        metadata={"help": "Of both engines. bfloat16 is what vLLM serves a float32 checkpoint in (dtype='auto'), CPU or GPU."},
    )
    output: str | None = field(default=None, metadata={"help": "Also write the numbers to this JSON file."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights and clips."})


def _import_midsize():
    try:
        import benchmarks.midsize as midsize
    except ImportError:  # run as a script: benchmarks/ is sys.path[0]
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import benchmarks.midsize as midsize
    return midsize


def build_model(size: str, seed: int, dtype):
    """The model and processor; the tiny one has 32-channel LLM heads, a size vLLM's CPU attention supports."""
    midsize = _import_midsize()
    if size == "mid":
        return midsize.build_midsize(seed=seed, dtype=dtype)
    from salmonn.inference.tiny import build_tiny_model_and_processor, build_tiny_tokenizer, tiny_text_config

    pad_id = build_tiny_tokenizer().pad_token_id
    text_config = tiny_text_config(pad_id + 1, pad_id, num_attention_heads=2)
    model, processor = build_tiny_model_and_processor(seed=seed, text_config=text_config)
    return midsize.cast_like_from_pretrained(model, dtype), processor


def memory_bandwidth(device, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (each byte read once and written once), best of `repeats`."""
    import torch

    source = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(source)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    nbytes = 2 * source.numel() * source.element_size()
    del source, target
    return nbytes / best


def decode_weight_bytes(model) -> int:
    """LLM weight bytes read per decoding step: every decoder layer, the final norm and `lm_head` (not the embeddings)."""
    language_model = model.model.language_model
    skip = {id(p) for p in language_model.get_input_embeddings().parameters()}
    params = [p for p in language_model.parameters() if id(p) not in skip] + list(model.lm_head.parameters())
    return sum(p.numel() * p.element_size() for p in params)


def time_generate(model, processor, items, batch_size: int, new_tokens: int) -> float:
    """Seconds for `generate` to answer every item, `batch_size` at a time (features and encoders included)."""
    from salmonn.inference.engine import generate_answers

    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "num_beams": 1, "do_sample": False}
    start = time.perf_counter()
    for i in range(0, len(items), batch_size):
        generate_answers(model, processor, items[i : i + batch_size], kwargs)
    return time.perf_counter() - start


def vllm_requests(processor, items) -> list[dict]:
    return [
        {"prompt": processor.format_prompt(item["prompt"]), "multi_modal_data": {"audio": (item["audio"], item["sampling_rate"])}}
        for item in items
    ]


def exact_tokens(new_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0.0)


_RUNS = iter(range(10**9))


def time_vllm(llm, requests, new_tokens: int) -> float:
    # A fresh uuid per clip and run: no cached audio embeddings from an earlier run (prefix caching is off too).
    run = next(_RUNS)
    requests = [{**r, "multi_modal_uuids": {"audio": [f"run{run}-clip{i}"]}} for i, r in enumerate(requests)]
    start = time.perf_counter()
    outputs = llm.generate(requests, exact_tokens(new_tokens), use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
    return elapsed


def record(results: dict, key: str, value: float, new_tokens: int | None = None) -> None:
    """Stores one measurement and prints it at once (a long run shows what it has so far)."""
    results[key] = value
    print(f"{key}{'' if new_tokens is None else f' ({new_tokens} tokens)'}: {value:.4g}", flush=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(ServingBenchmarkArguments).parse_args_into_dataclasses(args=argv)
    if args.clips < 1 or args.batch_size < 1 or min(args.new_tokens) < 2:
        raise SystemExit("--clips and --batch-size must be positive and every --new-tokens at least 2")

    import torch

    on_gpu = torch.cuda.is_available()
    # vLLM on the CPU: the engine in this process, a KV cache of 2 GiB, and as many threads as torch uses here (vLLM
    # would otherwise take one fewer than the cores), so that both engines get the same CPU.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not on_gpu:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    dtype_name = args.dtype
    dtype = getattr(torch, dtype_name)
    device = torch.device("cuda" if on_gpu else "cpu")

    midsize = _import_midsize()
    lengths = [2.0 + 28.0 * i / max(args.clips - 1, 1) for i in range(args.clips)]
    items = [
        {"audio": midsize.synthetic_clip(seconds, args.seed + i), "sampling_rate": 16000, "prompt": "Describe the audio."}
        for i, seconds in enumerate(lengths)
    ]
    model, processor = build_model(args.size, args.seed, dtype)
    model.to(device)
    # Every clip is at most 30 s: vLLM sizes its encoder budget for one segment per audio.
    processor.feature_extractor.max_audio_seconds = 30.0
    weight_bytes = decode_weight_bytes(model)
    bandwidth = memory_bandwidth(device)
    counts = midsize.parameter_counts(model)
    results = {
        "device": torch.cuda.get_device_name() if on_gpu else f"cpu, {torch.get_num_threads()} threads",
        "dtype": dtype_name,
        "parameters_millions": {k: round(v, 1) for k, v in counts.items()},
        "clip_seconds": [round(s, 2) for s in lengths],
        "memory_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "decode_weight_mb": round(weight_bytes / 1e6, 1),
        "answers": {},
    }
    print(f"model {results['parameters_millions']} M parameters, {dtype_name} on {results['device']}; "
          f"memory bandwidth (tensor copy) {bandwidth / 1e9:.1f} GB/s", flush=True)  # fmt: skip

    # `generate` first, in a process that has not started vLLM: after vLLM started, `generate` in the same process was
    # measured slower on this CPU, which would flatter vLLM.
    time_generate(model, processor, items[:1], 1, 2)  # warm-up
    for batch_size, name in ((1, "generate_one_by_one_s"), (args.batch_size, f"generate_batch_{args.batch_size}_s")):
        for new_tokens in args.new_tokens:
            seconds = time_generate(model, processor, items, batch_size, new_tokens)
            record(results["answers"].setdefault(new_tokens, {}), name, seconds, new_tokens)

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        from vllm import LLM

        start = time.perf_counter()
        llm = LLM(
            model=folder,
            trust_remote_code=True,
            dtype=dtype_name,
            max_model_len=2048,
            enforce_eager=not on_gpu,
            enable_prefix_caching=False,  # every run does all of its work
            mm_processor_cache_gb=0,
            **({"gpu_memory_utilization": 0.5} if on_gpu else {}),  # the `generate` model shares the GPU
        )
        record(results, "vllm_startup_s", time.perf_counter() - start)
        requests = vllm_requests(processor, items)
        llm.generate(requests[:1], exact_tokens(2), use_tqdm=False)  # warm-up
        # Work batching cannot share: features, encoders and prefill of each clip (one token, each clip alone).
        first_token = [time_vllm(llm, [request], 1) for request in requests]
        record(results, "vllm_ttft_mean_s", sum(first_token) / len(first_token))
        record(results, "unshareable_s", sum(first_token))
        for new_tokens in args.new_tokens:
            record(results["answers"][new_tokens], "vllm_s", time_vllm(llm, requests, new_tokens), new_tokens)
        # Decoding at batch 1: the longest answer minus its first token, for the median clip (best of 3 each).
        longest, median = max(args.new_tokens), requests[len(requests) // 2]
        decode_s = min(time_vllm(llm, [median], longest) for _ in range(3)) - min(time_vllm(llm, [median], 1) for _ in range(3))
        tokens_per_s = (longest - 1) / decode_s
        record(results, "vllm_decode_tokens_per_s_batch1", tokens_per_s)
        record(results, "decode_weight_bandwidth_fraction", tokens_per_s * weight_bytes / bandwidth)
        del llm
        gc.collect()

    print_table(results, args)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


def print_table(results: dict, args: ServingBenchmarkArguments) -> None:
    clips = args.clips
    bound = clips / results["unshareable_s"]
    print(f"\n| answer | generate one by one | generate batch {args.batch_size} | vLLM | vLLM / one by one | vLLM / bound |")
    print("|---|---|---|---|---|---|")
    for new_tokens, row in results["answers"].items():
        one, batch, vllm_s = row["generate_one_by_one_s"], row[f"generate_batch_{args.batch_size}_s"], row["vllm_s"]
        print(
            f"| {new_tokens} tokens | {clips / one:.3f} clips/s | {clips / batch:.3f} clips/s | {clips / vllm_s:.3f} clips/s "
            f"| {one / vllm_s:.2f}x | {100 * clips / vllm_s / bound:.0f}% |"
        )
    print(
        f"\nunshareable per-clip work (features + encoders + prefill, each clip alone): {results['unshareable_s']:.2f} s "
        f"for {clips} clips = bound {bound:.3f} clips/s; vLLM time to first token {results['vllm_ttft_mean_s']:.3f} s "
        f"(mean over clips); decoding at batch 1 {results['vllm_decode_tokens_per_s_batch1']:.1f} tokens/s = "
        f"{results['decode_weight_mb'] * results['vllm_decode_tokens_per_s_batch1'] / 1e3:.2f} GB/s of LLM weights, "
        f"{100 * results['decode_weight_bandwidth_fraction']:.0f}% of the {results['memory_bandwidth_gb_s']:.1f} GB/s "
        f"tensor-copy bandwidth; vLLM start-up {results['vllm_startup_s']:.1f} s",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
