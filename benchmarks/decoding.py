"""Decoding speed of SALMONN against the stock `LlamaForCausalLM` under it, in one run on one machine.

For SALMONN eager, SALMONN with a static cache + compile, and a stock LLaMA of the same text config (random weights
from config; speed does not depend on them): ms per new token at each batch size, host reads per decoding step,
kernel launches per step (CUDA only), bytes of weights per token against the copy bandwidth measured in the same run,
and the default decode (4 beams, 200 tokens) of a 30 s clip. Also the launch-bound proxy of issue 18: tiny widths,
32 layers, 1 thread, greedy, SALMONN and LLaMA timed in turns, best of 3.

    python benchmarks/decoding.py --size tiny              # CPU: float32, compile forced (CompileConfig)
    python benchmarks/decoding.py --size 7b                # on a GPU: bfloat16, Whisper-large-v2 + BEATs + Vicuna-7B shapes

Per-token figures are differences between a long and a short decode of the same prompt, so prompt encoding and
prefill cancel out.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser


logger = logging.getLogger(__name__)

HOST_READS = ("__bool__", "item", "tolist", "__int__", "__float__")


@dataclass
class DecodingArguments:
    size: Literal["tiny", "mid", "7b", "13b"] = field(default="tiny", metadata={"help": "Model size (random weights)."})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8], metadata={"help": "Batch sizes for ms per token."})
    new_tokens: int = field(default=32, metadata={"help": "Tokens per timed decode (the short one has 4)."})
    repeats: int = field(default=3, metadata={"help": "Timed runs of each measurement, in turns; the best counts."})
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto", metadata={"help": "auto: bfloat16 on a GPU, float32 on the CPU."}
    )
    compile: bool = field(default=True, metadata={"help": "Also time static cache + compile (--no-compile skips)."})
    compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend of the compiled runs."})
    default_decode: bool = field(default=True, metadata={"help": "Time the default 4-beam 200-token decode of a 30 s clip."})
    merge_error: bool = field(
        default=True, metadata={"help": "Measure what merging LoRA changes in the logits (this model; fixture A in float32)."}
    )
    proxy: bool = field(default=True, metadata={"help": "Run the CPU launch-bound proxy (--no-proxy skips)."})
    proxy_layers: int = field(default=32, metadata={"help": "Layers of the proxy's tiny-width LLaMA."})
    proxy_tokens: int = field(default=48, metadata={"help": "Greedy tokens of each proxy decode."})
    proxy_repeats: int = field(default=3, metadata={"help": "Timed turns of the proxy (best of); more on a busy machine."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights and the clip."})


def _sibling(name: str):
    """A module of benchmarks/, also when this file runs as a script (with benchmarks/ as sys.path[0])."""
    import importlib

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"benchmarks.{name}")


def paper_config_overrides(size: str) -> dict:
    """Whisper-large-v2 encoder, BEATs base, the paper's Q-Former and Vicuna-7B/13B shapes."""
    hidden, layers, heads, intermediate = {"7b": (4096, 32, 32, 11008), "13b": (5120, 40, 40, 13824)}[size]
    return dict(
        whisper_config=dict(
            model_type="whisper", d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
            decoder_layers=1, decoder_attention_heads=20, decoder_ffn_dim=5120, num_mel_bins=80,
        ),
        text_overrides=dict(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            intermediate_size=intermediate,
        ),
    )


def build_model(size: str, dtype, device, seed: int, num_hidden_layers: int | None = None):
    """SALMONN of `size` with random weights (LoRA B non-zero, so that LoRA does work), and its processor."""
    import torch

    from modeling_salmonn import SalmonnFeatureExtractor, SalmonnForConditionalGeneration, SalmonnProcessor

    midsize = _sibling("midsize")
    if size == "tiny":
        from salmonn.inference.tiny import build_tiny_tokenizer, tiny_config
        from modeling_salmonn.processing_salmonn import AUDIO_TOKEN

        tokenizer, audio_token = build_tiny_tokenizer(), AUDIO_TOKEN
        config = tiny_config(tokenizer.pad_token_id + 1, tokenizer.convert_tokens_to_ids(AUDIO_TOKEN), tokenizer.pad_token_id)
    else:
        tokenizer, audio_token = midsize.midsize_tokenizer(), midsize.MIDSIZE_AUDIO_TOKEN
        ids = (tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(audio_token))
        config = midsize.midsize_config(*ids)
        if size in ("7b", "13b"):
            overrides = paper_config_overrides(size)
            text = {k: v for k, v in config.text_config.to_dict().items() if k != "head_dim"}  # derived from the sizes
            text.update(overrides.pop("text_overrides"))
            config = midsize.midsize_config(*ids, text_config=text, **overrides)
    if num_hidden_layers is not None:
        config.text_config.num_hidden_layers = num_hidden_layers
    torch.manual_seed(seed)
    with torch.device(device):
        model = SalmonnForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn_like(param) * 0.02)
    model = midsize.cast_like_from_pretrained(model, dtype).eval()
    processor = SalmonnProcessor(
        SalmonnFeatureExtractor(), tokenizer, audio_token=audio_token, audio_tokens_per_segment=config.audio_tokens_per_segment
    )
    return model, processor


def build_stock_llama(model):
    """A stock `LlamaForCausalLM` of SALMONN's text config, with its language model's base weights (LoRA left out)."""
    import torch
    from transformers import LlamaForCausalLM

    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    with torch.device(device):
        llama = LlamaForCausalLM(model.config.text_config)
    state = {
        key.replace(".base_layer.", "."): value
        for key, value in model.model.language_model.state_dict().items()
        if ".lora_" not in key
    }
    llama.model.load_state_dict(state)
    llama.lm_head.load_state_dict(model.lm_head.state_dict())
    return llama.to(dtype).eval()


@contextlib.contextmanager
def count_host_reads():
    """Counts Python-level reads of tensor values into the host (`bool(t)`, `t.item()`, `t.tolist()`, `int(t)`, ...)."""
    import torch

    counter = [0]
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(original):
        def read(self, *args, **kwargs):
            counter[0] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def decode_kwargs(new_tokens: int, num_beams: int = 1, static: bool = False, compile_config=None) -> dict:
    """Exactly `new_tokens` tokens per row (random weights could stop early); the static cache + compile on request."""
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "num_beams": num_beams, "do_sample": False}
    if static:
        kwargs.update(cache_implementation="static", compile_config=compile_config)
    return kwargs


def compile_config_for(device, backend: str):
    """transformers compiles a static-cache `generate` on accelerators by itself; elsewhere it is forced here."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, backend=backend)
    config._compile_all_devices = device.type == "cpu"
    return config


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, inputs: dict, kwargs: dict) -> float:
    import torch

    device = next(model.parameters()).device
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, **kwargs)
    synchronize(device)
    return time.perf_counter() - start


def per_step(measure, new_tokens: int, short: int = 4) -> float:
    """A long decode minus a short one, per extra token: what one decoding step costs."""
    return (measure(new_tokens) - measure(short)) / (new_tokens - short)


def host_reads_per_step(model, inputs: dict, kwargs_for) -> float:
    import torch

    def reads(new_tokens: int) -> float:
        with count_host_reads() as counter, torch.inference_mode():
            model.generate(**inputs, **kwargs_for(new_tokens))
        return counter[0]

    return per_step(reads, 12)


def kernel_launches_per_step(model, inputs: dict, kwargs_for) -> float | None:
    """CUDA kernel and graph launches per decoding step (torch.profiler); None off CUDA."""
    import torch

    if next(model.parameters()).device.type != "cuda":
        return None

    def launches(new_tokens: int) -> float:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
            with torch.inference_mode():
                model.generate(**inputs, **kwargs_for(new_tokens))
            torch.cuda.synchronize()
        names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
        return sum(event.count for event in prof.key_averages() if event.key in names)

    return per_step(launches, 12)


def copy_bandwidth(device) -> float:
    """Bytes per second a large on-device copy moves (read + write), best of 5."""
    import torch

    numel = (1 << 28 if device.type == "cuda" else 1 << 25)  # 1 GiB / 128 MiB of float32
    source = torch.ones(numel, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / best


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decoding step reads: the decoder layers, final norm and head (one embedding row aside)."""
    language_model = model.model.language_model if hasattr(model.model, "language_model") else model.model
    parts = [language_model.layers, language_model.norm, model.lm_head]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def clip_inputs(model, processor, seconds: float, batch_size: int, seed: int) -> dict:
    from salmonn.inference.engine import build_inputs, prepare_item

    clip = _sibling("midsize").synthetic_clip(seconds, seed)
    items = [{"audio": clip, "sampling_rate": 16000, "prompt": "Describe the audio."}] * batch_size
    return dict(build_inputs(model, processor, [prepare_item(processor, item) for item in items]))


def llama_inputs(salmonn_inputs: dict, vocab_size: int, seed: int) -> dict:
    """Random in-vocabulary ids of SALMONN's prompt shape (audio placeholders included)."""
    import torch

    ids = salmonn_inputs["input_ids"]
    generator = torch.Generator().manual_seed(seed)
    random_ids = torch.randint(3, vocab_size, ids.shape, generator=generator).to(ids.device)
    return {"input_ids": random_ids, "attention_mask": salmonn_inputs["attention_mask"]}


def median_step(times: list[float]) -> float:
    """The median time between tokens after the first new one (`times[0]` is the prompt): robust to a busy spell."""
    steps = sorted(b - a for a, b in zip(times[2:], times[3:]))
    return steps[len(steps) // 2]


def measure_speed(runs: dict, new_tokens: int, repeats: int) -> dict[str, float]:
    """
    ms per new token of each run (greedy): the median time between tokens, best of `repeats` decodes. The runs are
    timed in turns, so that a busy spell hits one turn, not one model.
    """
    import torch

    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, (model, inputs, kwargs_for) in runs.items():
            streamer = _sibling("inference").TimingStreamer()
            with torch.inference_mode():
                model.generate(**inputs, **kwargs_for(new_tokens), streamer=streamer)
            best[name] = min(best[name], 1000 * median_step(streamer.times))
    return best


def merge_difference(model, inputs: dict) -> tuple[float, float]:
    """Largest difference of the prompt logits with SALMONN's LoRA merged (as `generate` runs it) and live, absolute
    and relative to the largest logit."""
    import torch

    with torch.inference_mode():
        live = model(**inputs).logits.float()
        with model.merged_lora():
            merged = model(**inputs).logits.float()
    difference = float((merged - live).abs().max())
    return difference, difference / float(live.abs().max())


def fixture_a_merge_difference() -> tuple[float, float]:
    """`merge_difference` on fixture A (the original code's tiny checkpoint, converted here) and its gunshots clip."""
    import tempfile

    import soundfile
    from transformers import AutoModel, AutoProcessor

    from salmonn.conversion.convert_salmonn import main as convert_main
    from tests.utils import FIXTURE_A, fixture_a_convert_args, fixture_golden

    golden = fixture_golden()
    with tempfile.TemporaryDirectory() as tmp:
        if convert_main(fixture_a_convert_args(Path(tmp) / "converted")) != 0:
            raise RuntimeError("salmonn-convert failed on fixture A")
        model = AutoModel.from_pretrained(Path(tmp) / "converted", trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(Path(tmp) / "converted", trust_remote_code=True)
    wav, rate = soundfile.read(str(FIXTURE_A / golden["inputs"]["gunshots"]["wav"]))
    inputs = processor(text=golden["prompt"], audio=wav, sampling_rate=rate, truncation=True)
    return merge_difference(model, inputs)


def launch_bound_proxy(args: DecodingArguments) -> tuple[float, float]:
    """Tiny widths, `proxy_layers` layers, 1 thread, greedy `proxy_tokens` tokens: SALMONN and LLaMA ms/token, best of
    `proxy_repeats` turns."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, processor = build_model("tiny", torch.float32, torch.device("cpu"), args.seed, args.proxy_layers)
        llama = build_stock_llama(model)
        inputs = clip_inputs(model, processor, 2.0, 1, args.seed)
        runs = {
            "salmonn": (model, inputs, lambda n: decode_kwargs(n)),
            "llama": (llama, llama_inputs(inputs, model.config.text_config.vocab_size, args.seed), lambda n: decode_kwargs(n)),
        }
        for model_, inputs_, kwargs_for in runs.values():  # warm-up
            timed_generate(model_, inputs_, kwargs_for(4))
        best = measure_speed(runs, args.proxy_tokens, args.proxy_repeats)
    finally:
        torch.set_num_threads(threads)
    return best["salmonn"], best["llama"]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(DecodingArguments).parse_args_into_dataclasses(args=argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"size {args.size}, {str(dtype).removeprefix('torch.')}, {machine}, torch {torch.__version__}", flush=True)

    model, processor = build_model(args.size, dtype, device, args.seed)
    llama = build_stock_llama(model)
    compile_config = compile_config_for(device, args.compile_backend)
    bandwidth = copy_bandwidth(device)
    weights = weight_bytes_per_token(model)
    floor_ms = 1000 * weights / bandwidth
    print(
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; LLM weights read per token {weights / 1e6:.3f} MB "
        f"-> {floor_ms:.3f} ms per token at that bandwidth",
        flush=True,
    )
    for batch_size in args.batch_sizes:
        inputs = clip_inputs(model, processor, 10.0, batch_size, args.seed)
        runs = {
            "SALMONN eager": (model, inputs, lambda n: decode_kwargs(n)),
            "stock LlamaForCausalLM": (
                llama, llama_inputs(inputs, model.config.text_config.vocab_size, args.seed), lambda n: decode_kwargs(n)
            ),
        }
        if args.compile:
            runs["SALMONN static cache + compile"] = (
                model, inputs, lambda n: decode_kwargs(n, static=True, compile_config=compile_config)
            )
        for name, (model_, inputs_, kwargs_for) in runs.items():  # warm-up (compiles)
            start = time.perf_counter()
            timed_generate(model_, inputs_, kwargs_for(4))
            timed_generate(model_, inputs_, kwargs_for(args.new_tokens))
            logger.info(f"{name}: warm-up {time.perf_counter() - start:.1f} s")
        best = measure_speed(runs, args.new_tokens, args.repeats)
        for name, (model_, inputs_, kwargs_for) in runs.items():
            reads = host_reads_per_step(model_, inputs_, kwargs_for)
            launches = kernel_launches_per_step(model_, inputs_, kwargs_for)
            launches_text = "n/a (CPU)" if launches is None else f"{launches:.0f}"
            print(
                f"batch {batch_size} | {name}: {best[name]:.3f} ms per new token | host reads per step {reads:.2f} | "
                f"kernel launches per step {launches_text} | {100 * floor_ms / best[name]:.1f}% of the copy bandwidth",
                flush=True,
            )
    if args.default_decode:
        inputs = clip_inputs(model, processor, 30.0, 1, args.seed)
        modes = {"eager": {}}
        if args.compile:
            # transformers 5.24 compiles the steps of greedy and sampled decoding, not beam search's: static cache only.
            modes["static cache"] = {"cache_implementation": "static", "compile_config": compile_config}
        for name, extra in modes.items():
            kwargs = {"max_new_tokens": 200, "min_new_tokens": 200, **extra}  # the default decode: 4 beams
            timed_generate(model, inputs, kwargs)  # warm-up
            seconds = min(timed_generate(model, inputs, kwargs) for _ in range(args.repeats))
            print(f"default decode (4 beams, 200 tokens) of a 30 s clip, SALMONN {name}: {seconds:.2f} s", flush=True)
    if args.merge_error:
        inputs = clip_inputs(model, processor, 10.0, 1, args.seed)
        measured = {f"{args.size} ({str(dtype).removeprefix('torch.')})": merge_difference(model, inputs)}
        if (Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "original_tiny_a").is_dir():
            measured["fixture A (float32)"] = fixture_a_merge_difference()
        for name, (absolute, relative) in measured.items():
            print(
                f"LoRA merged vs live, prompt logits of {name}: max difference {absolute:.2e} "
                f"({relative:.2e} of the largest logit)",
                flush=True,
            )
    if args.proxy:
        salmonn_ms, llama_ms = launch_bound_proxy(args)
        print(
            f"launch-bound proxy ({args.proxy_layers} layers, tiny widths, 1 thread, {args.proxy_tokens} tokens): "
            f"SALMONN {salmonn_ms:.3f} ms/token, stock LLaMA {llama_ms:.3f} ms/token, ratio {salmonn_ms / llama_ms:.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
