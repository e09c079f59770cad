"""Batched inference speed on a mid-size random SALMONN: clips/s per batch size, time to first token, tokens/s.

The model has a Whisper-base-sized encoder, BEATs base, a 768-wide Q-Former and a ~220 M parameter LLaMA with a
32001-token vocabulary (random weights; speed does not depend on them). Every clip gets exactly `--new-tokens`
greedy tokens (`min_new_tokens` = `max_new_tokens`), so all batch sizes do the same work. Clips are 2-10 s long,
each padded batch is encoded row by row as if alone (see tests/test_inference.py).

    python benchmarks/inference.py                       # CPU float32, then int8 (optimum-quanto) LLM weights
    python benchmarks/inference.py --batch-sizes 1 8 --new-tokens 16 --no-int8

With a GPU the same measurements are repeated in bfloat16 on it.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser


logger = logging.getLogger(__name__)


@dataclass
class BenchmarkArguments:
    size: Literal["mid", "tiny"] = field(default="mid", metadata={"help": "mid: the mid-size model above; tiny: the test model (smoke runs)."})
    clips: int = field(default=8, metadata={"help": "Number of clips (at least the largest batch size)."})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 8], metadata={"help": "Batch sizes to time."})
    new_tokens: int = field(default=32, metadata={"help": "Tokens generated per clip (exactly this many)."})
    ttft_runs: int = field(default=8, metadata={"help": "Clips timed alone for time to first token and tokens/s."})
    repeats: int = field(
        default=3, metadata={"help": "Rounds over the batch sizes; each timing is the best round (shared machines are noisy)."}
    )
    int8: bool = field(default=True, metadata={"help": "Also measure optimum-quanto int8 LLM weights on the CPU (--no-int8 skips)."})
    gpu: bool = field(default=True, metadata={"help": "Also measure bfloat16 on a CUDA GPU when there is one (--no-gpu skips)."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights and clips."})


def _import_midsize():
    try:
        import benchmarks.midsize as midsize
    except ImportError:  # run as a script: benchmarks/ is sys.path[0]
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import benchmarks.midsize as midsize
    return midsize


def rss_mib() -> float:
    """Resident memory of this process (Linux), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def tensor_bytes(tensor) -> int:
    """Storage of a tensor, including quantized tensors made of several inner tensors (optimum-quanto)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def llm_weight_mib(model) -> float:
    """Weights of the language model's decoder layers and embeddings plus `lm_head`, MiB."""
    modules = [model.model.language_model, model.lm_head]
    total = sum(tensor_bytes(p) for m in modules for p in m.parameters())
    total += sum(tensor_bytes(b) for m in modules for b in m.buffers())
    return total / 2**20


class TimingStreamer:
    """Records when the prompt and each new token come out of `generate`."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generation_kwargs(new_tokens: int) -> dict:
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "num_beams": 1, "do_sample": False}


def time_batches(model, processor, items, batch_size: int, new_tokens: int, repeats: int = 1) -> tuple[float, float]:
    """Best wall and CPU seconds to answer all items `batch_size` at a time (features, encoders, prefill, decoding)."""
    from salmonn.inference.engine import generate_answers

    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(items), batch_size):
            generate_answers(model, processor, items[i : i + batch_size], generation_kwargs(new_tokens))
        best = min(best, (time.perf_counter() - start, time.process_time() - cpu))
    return best


def time_to_first_token(model, processor, items, new_tokens: int, repeats: int = 1) -> tuple[float, float]:
    """Time to first token (from raw audio) and decoding tokens/s, one clip at a time: means over clips of the best runs."""
    import torch

    from salmonn.inference.engine import build_inputs, prepare_item

    ttfts, rates = [], []
    for item in items:
        best_ttft, best_rate = float("inf"), 0.0
        for _ in range(repeats):
            streamer = TimingStreamer()
            start = time.perf_counter()
            inputs = build_inputs(model, processor, [prepare_item(processor, item)])
            with torch.inference_mode():
                model.generate(**inputs, **generation_kwargs(new_tokens), streamer=streamer)
            first, last = streamer.times[1], streamer.times[-1]  # times[0] is the prompt
            best_ttft = min(best_ttft, first - start)
            best_rate = max(best_rate, (len(streamer.times) - 2) / (last - first))
        ttfts.append(best_ttft)
        rates.append(best_rate)
    return sum(ttfts) / len(ttfts), sum(rates) / len(rates)


def run_suite(name: str, model, processor, items, args: BenchmarkArguments, batch_sizes: list[int]) -> dict:
    # Warm-up: first calls allocate and pick kernels.
    time_batches(model, processor, items[:1], 1, 2)
    # Rounds over all batch sizes, best run of each: a busy spell of a shared machine then hits one round, not one size.
    best = {batch_size: (float("inf"), float("inf")) for batch_size in batch_sizes}
    for _ in range(args.repeats):
        for batch_size in batch_sizes:
            best[batch_size] = min(best[batch_size], time_batches(model, processor, items, batch_size, args.new_tokens))
    results, cpu_rates = {}, {}
    for batch_size in batch_sizes:
        wall, cpu = best[batch_size]
        results[batch_size], cpu_rates[batch_size] = len(items) / wall, len(items) / cpu
        print(
            f"[{name}] batch {batch_size}: {len(items)} clips in {wall:.1f} s (CPU time {cpu:.1f} s) -> "
            f"{results[batch_size]:.3f} clips/s",
            flush=True,
        )
    base = results.get(1)
    if base:
        for batch_size in batch_sizes[1:]:
            print(
                f"[{name}] batch {batch_size}: speed-up over one-by-one {results[batch_size] / base:.2f}x "
                f"(in CPU time: {cpu_rates[batch_size] / cpu_rates[1]:.2f}x)",
                flush=True,
            )
    ttft, rate = time_to_first_token(model, processor, items[: args.ttft_runs], args.new_tokens, args.repeats)
    print(f"[{name}] time to first token (batch 1, from raw audio to the first new token): {ttft:.2f} s", flush=True)
    print(f"[{name}] decoding speed (batch 1, after the first token): {rate:.2f} tokens/s", flush=True)
    if base:
        # Features, encoders and prefill are compute-bound: a batch does the same arithmetic per clip. Only the
        # memory-bound decoding steps get cheaper per clip, so the speed-up cannot exceed this ratio.
        per_clip = 1.0 / base
        print(
            f"[{name}] bound: {ttft:.2f} s of the {per_clip:.2f} s per clip at batch 1 is audio encoding and prefill; "
            f"even free decoding would give a batch speed-up of at most {per_clip / ttft:.2f}x",
            flush=True,
        )
    return {"clips_per_s": results, "ttft": ttft, "tokens_per_s": rate}


def grouping_profile(name: str, model, processor, items, new_tokens: int) -> None:
    """
    How one batch of all `items` encodes its audio, timed three ways: every clip padded to the longest (no mask),
    segments of similar length in batches of up to 8 (what an accelerator does), and each segment alone, cut to its
    own length (what the CPU does); the audio encoding, and the whole batch's `generate`.
    """
    import torch

    import modeling_salmonn.modeling_salmonn as modeling
    from salmonn.inference.engine import build_inputs, prepare_item

    inputs = build_inputs(model, processor, [prepare_item(processor, item) for item in items])
    without_mask = {k: v for k, v in inputs.items() if k != "input_values_mask"}
    audio_keys = ("input_features", "input_values", "input_values_mask")
    per_chunk = {"padded": modeling.AUDIO_SEGMENTS_PER_CHUNK, "grouped by 8": modeling.AUDIO_SEGMENTS_PER_CHUNK, "alone": 1}
    seconds = {}
    cpu_default = modeling.CPU_AUDIO_SEGMENTS_PER_CHUNK
    try:
        with torch.inference_mode():
            for label, batch in (("padded", without_mask), ("grouped by 8", inputs), ("alone", inputs)):
                modeling.CPU_AUDIO_SEGMENTS_PER_CHUNK = per_chunk[label]
                start = time.perf_counter()
                model.get_audio_features(**{k: batch[k] for k in audio_keys if k in batch})
                encoded = time.perf_counter()
                model.generate(**batch, **generation_kwargs(new_tokens))
                seconds[label] = (encoded - start, time.perf_counter() - encoded)
    finally:
        modeling.CPU_AUDIO_SEGMENTS_PER_CHUNK = cpu_default
    print(
        f"[{name}] audio encoding of {len(items)} clips at batch {len(items)} (the whole batch's generate): "
        + ", ".join(f"{label} {encode:.1f} s ({whole:.1f} s)" for label, (encode, whole) in seconds.items()),
        flush=True,
    )


def release_free_memory() -> None:
    """Returns freed heap memory to the system (glibc), so that RSS shows what is really still in use."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def logits_error(model, reference_logits, inputs) -> tuple[float, float]:
    """Relative L2 error of the prompt logits against float32, and the share of positions with the same argmax."""
    import torch

    with torch.inference_mode():
        logits = model(**inputs).logits.float()
    error = float((logits - reference_logits).norm() / reference_logits.norm())
    agree = float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean())
    return error, agree


def half_precision_errors(model, inputs, cast) -> None:
    """Relative error of the audio tokens in bfloat16 against float32, with and without the float32 Q-Former path."""
    import copy

    import torch

    audio = {k: inputs[k] for k in ("input_features", "input_values", "input_values_mask")}
    with torch.inference_mode():
        reference = model.get_audio_features(**audio).pooler_output
        for keep in (True, False):
            half = cast(copy.deepcopy(model), torch.bfloat16, keep_float32=keep)
            tokens = half.get_audio_features(**audio).pooler_output.float()
            error = float((tokens - reference).norm() / reference.norm())
            where = "Q-Former, LayerNorms and projection in float32" if keep else "everything in bfloat16"
            print(f"[cpu bfloat16] audio tokens vs float32 ({where}): relative error {100 * error:.2f}%", flush=True)
            del half
    release_free_memory()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    if args.clips < max(args.batch_sizes) or min(args.batch_sizes) < 1:
        raise SystemExit(f"--clips ({args.clips}) must be at least the largest batch size, and batch sizes positive")

    import torch

    midsize = _import_midsize()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [2.0 + 8.0 * ((i * 5) % args.clips) / max(args.clips - 1, 1) for i in range(args.clips)]
    items = [
        {"audio": midsize.synthetic_clip(seconds, args.seed + i), "sampling_rate": 16000, "prompt": "Describe the audio."}
        for i, seconds in enumerate(lengths)
    ]

    if args.size == "mid":
        model, processor = midsize.build_midsize(seed=args.seed)
    else:
        from salmonn.inference.tiny import build_tiny_model_and_processor

        model, processor = build_tiny_model_and_processor(seed=args.seed)
    counts = midsize.parameter_counts(model)
    print(
        "model: " + ", ".join(f"{k} {v:.1f} M" for k, v in counts.items())
        + f"; clips {', '.join(f'{s:.1f}' for s in lengths)} s; {args.new_tokens} new tokens each; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads",
        flush=True,
    )
    run_suite("cpu float32", model, processor, items, args, args.batch_sizes)
    grouping_profile("cpu float32", model, processor, items[: max(args.batch_sizes)], args.new_tokens)
    # Two clips, the probe of the precision comparisons below.
    from salmonn.inference.engine import build_inputs, prepare_item, quantize_llm_int8

    probe = build_inputs(model, processor, [prepare_item(processor, item) for item in items[:2]])
    half_precision_errors(model, probe, midsize.cast_like_from_pretrained)

    if args.int8:
        with torch.inference_mode():
            reference = model(**probe).logits.float()
        release_free_memory()
        before_mib, before_rss = llm_weight_mib(model), rss_mib()
        quantize_llm_int8(model)
        release_free_memory()
        after_mib, after_rss = llm_weight_mib(model), rss_mib()
        error, agree = logits_error(model, reference, probe)
        print(
            f"[cpu int8 LLM] LLM weights {before_mib:.0f} MiB -> {after_mib:.0f} MiB (decoder linears int8; embeddings and "
            f"lm_head bfloat16); process RSS {before_rss:.0f} MiB -> {after_rss:.0f} MiB; prompt logits vs float32: "
            f"relative error {error:.4f}, same argmax at {100 * agree:.1f}% of positions",
            flush=True,
        )
        run_suite("cpu int8 LLM", model, processor, items, args, [1, max(args.batch_sizes)])

    if args.gpu and torch.cuda.is_available():
        del model
        release_free_memory()
        if args.size == "mid":
            model, processor = midsize.build_midsize(seed=args.seed, dtype=torch.bfloat16)
        else:
            model, processor = build_tiny_model_and_processor(seed=args.seed)
            midsize.cast_like_from_pretrained(model, torch.bfloat16)
        model.to("cuda")
        print(f"GPU: {torch.cuda.get_device_name()}", flush=True)
        run_suite("cuda bfloat16", model, processor, items, args, args.batch_sizes)
    elif args.gpu:
        print("no CUDA GPU here: the bfloat16 GPU run is skipped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
