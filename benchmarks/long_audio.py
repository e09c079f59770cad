"""Cost of long audio per 30 s segment: features, encoders + Q-Former, and the LLM prefill, for 30 s, 2 min and 10 min.

Audio longer than 30 s is cut into consecutive 30 s segments, each encoded like a clip of its own (88 audio tokens
per segment with the default windows), so the audio cost per segment should stay flat as the input grows; only the
LLM prefill grows faster than linearly (attention over 88 tokens per segment), and stays small next to the encoders.

    python benchmarks/long_audio.py                      # mid-size random model (see benchmarks/midsize.py)
    python benchmarks/long_audio.py --size tiny --durations 30 120 600
"""

from __future__ import annotations

import logging
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser


logger = logging.getLogger(__name__)


@dataclass
class LongAudioArguments:
    durations: list[float] = field(default_factory=lambda: [30.0, 120.0, 600.0], metadata={"help": "Input lengths in seconds."})
    size: Literal["mid", "tiny"] = field(default="mid", metadata={"help": "mid: the benchmarks' mid-size model; tiny: the test model."})
    repeats: int = field(default=1, metadata={"help": "Each timing is the best of this many runs."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights and audio."})
    row: bool = field(
        default=False, metadata={"help": "Internal: measure the one duration in this process and print its row only."}
    )


def _best(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def _peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM on Linux, else ru_maxrss), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(LongAudioArguments).parse_args_into_dataclasses(args=argv)
    if any(d <= 0 for d in args.durations) or args.repeats < 1:
        raise SystemExit("--durations must be positive and --repeats at least 1")
    if not args.row:
        # Each row in a fresh process, so that its peak RSS is its own (a process's peak only ever grows).
        print(f"model: {args.size}; each row measured in a fresh process (peak RSS: model and that input)", flush=True)
        print(f"{'input':>8} {'segments':>8} {'tokens':>7} {'features/seg':>13} {'encode/seg':>11} {'prefill/seg':>12} {'total/seg':>10} {'peak RSS':>9}", flush=True)
        common = ["--size", args.size, "--repeats", str(args.repeats), "--seed", str(args.seed), "--row", "true"]
        if args.threads:
            common += ["--threads", str(args.threads)]
        for seconds in args.durations:
            result = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--durations", str(seconds), *common],
                capture_output=True, text=True, check=False,
            )
            if result.returncode != 0:
                raise SystemExit(f"the {seconds} s row failed:\n{result.stderr}")
            print(result.stdout, end="", flush=True)
        return 0

    import torch

    try:
        from benchmarks.midsize import build_midsize, synthetic_clip
    except ImportError:  # run as a script: benchmarks/ is sys.path[0]
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks.midsize import build_midsize, synthetic_clip
    from salmonn.inference.tiny import build_tiny_model_and_processor

    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = build_midsize(seed=args.seed) if args.size == "mid" else build_tiny_model_and_processor(seed=args.seed)
    prompt = processor.format_prompt("Describe the audio.")

    # Warm-up on a short clip.
    warm = processor(text=prompt, audio=synthetic_clip(2.0, args.seed), sampling_rate=16000)
    with torch.inference_mode():
        model(**warm, logits_to_keep=1)

    for seconds in args.durations:
        audio = synthetic_clip(seconds, args.seed + int(seconds))
        t_features, inputs = _best(lambda: processor(text=prompt, audio=audio, sampling_rate=16000), args.repeats)
        segments = inputs["input_features"].shape[0]
        tokens = int((inputs["input_ids"] == model.config.audio_token_index).sum())
        with torch.inference_mode():
            t_encode, embeds = _best(
                lambda: model.model.embed_inputs(
                    inputs["input_ids"], inputs["input_features"], inputs["input_values"], inputs["input_values_mask"]
                )[0],
                args.repeats,
            )
            t_prefill, _ = _best(
                lambda: model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], logits_to_keep=1), args.repeats
            )
        total = t_features + t_encode + t_prefill
        label = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
        print(
            f"{label:>8} {segments:>8} {tokens:>7} {t_features / segments:>12.2f}s {t_encode / segments:>10.2f}s "
            f"{t_prefill / segments:>11.3f}s {total / segments:>9.2f}s {_peak_rss_mib():>7.0f}Mi",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
