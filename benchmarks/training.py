"""
Training throughput of SALMONN on CPU for the mid-size configuration of benchmarks/midsize.py (Whisper-base
encoder, BEATs base, the 768-wide window Q-Former, a ~220 M LLaMA): samples per second and peak memory with and
without gradient checkpointing, and the overhead of `SalmonnTrainer` against a plain PyTorch loop over the same
model, optimiser, schedule and batches (target: within 10 %).

    python benchmarks/training.py                 # prints one JSON object
    python benchmarks/training.py --steps 8 --batch_size 4

Each measurement runs in its own process; memory is the resident set sampled while the steps run, over what the
model and the prepared batches already hold.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


def mid_size_model_and_processor(seed: int = 0, size: str = "mid"):
    """The shared mid-size SALMONN of the benchmarks (benchmarks/midsize.py), with fresh LoRA as training starts;
    `size="tiny"`: the test suite's tiny model (smoke runs)."""
    if size == "tiny":
        from salmonn.inference.tiny import build_tiny_model_and_processor

        return build_tiny_model_and_processor(seed=seed)
    from benchmarks.midsize import build_midsize

    model, processor = build_midsize(seed=seed)
    return model, processor


def make_batches(processor, batch_size: int, count: int, answer_words: int = 0):
    from salmonn.training.collator import SalmonnDataCollator
    from salmonn.training.prompts import PromptPool
    from salmonn.training.synthetic import SOUND_CLASSES, make_clip

    classes = [c for c in SOUND_CLASSES if c.kind != "speech"]
    pool = PromptPool()
    collator = SalmonnDataCollator(processor)
    batches = []
    start = time.perf_counter()
    for b in range(count):
        examples = []
        for i in range(batch_size):
            sound = classes[(b * batch_size + i) % len(classes)]
            # Long answers (a story of `answer_words` words) make the LLM's activations matter.
            answer = " ".join([sound.answer] * max(1, answer_words // len(sound.answer.split())))
            examples.append({"id": f"{b}-{i}", "audio": make_clip(sound, b * batch_size + i), "sampling_rate": 16000,
                             "prompt": pool.choose("audiocaption", seed=i), "answer": answer})
        batch = collator(examples)
        batch.pop("ids")
        batches.append(batch)
    return batches, (time.perf_counter() - start) / (count * batch_size)


class _Batches:
    """A dataset whose items are whole pre-collated batches (the Trainer then runs with batch size 1 + unwrap)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]


def _unwrap(features):
    return dict(features[0])


class RssSampler:
    """Peak resident memory while a block runs, sampled from /proc every few milliseconds (Linux)."""

    def __init__(self, interval: float = 0.005):
        import threading

        self.interval = interval
        self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def measure(
    mode: str, steps: int, warmup: int, batch_size: int, checkpointing: bool, answer_words: int = 0, size: str = "mid"
) -> dict:
    import torch

    from salmonn.training.trainer import SalmonnTrainer, salmonn_lr_lambda

    torch.manual_seed(0)
    model, processor = mid_size_model_and_processor(size=size)
    batches, collate_seconds = make_batches(processor, batch_size, warmup + steps, answer_words)
    lr, wd = 3e-5, 0.05
    result = {"mode": mode, "gradient_checkpointing": checkpointing, "batch_size": batch_size, "steps": steps,
              "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "parameters": sum(p.numel() for p in model.parameters()), "collate_seconds_per_sample": collate_seconds,
              "sequence_length": int(batches[0]["input_ids"].shape[1])}

    if mode == "plain":
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in params if p.ndim >= 2 and "bias" not in n], "weight_decay": wd},
            {"params": [p for n, p in params if not (p.ndim >= 2 and "bias" not in n)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=lr)
        total = warmup + steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: salmonn_lr_lambda(s, lr, 1e-6, 1e-5, 3000, total)
        )
        ends = []
        with RssSampler() as memory:
            for batch in batches:
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                ends.append(time.perf_counter())
        seconds = ends[-1] - ends[warmup - 1]
    else:
        from transformers import TrainerCallback, TrainingArguments

        class Timer(TrainerCallback):
            """End time of every optimiser step: steady-state time includes data loading, logging and callbacks."""

            def __init__(self):
                self.ends = []

            def on_step_end(self, args, state, control, **kwargs):
                self.ends.append(time.perf_counter())

        timer = Timer()
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(
                output_dir=tmp, per_device_train_batch_size=1, max_steps=warmup + steps, learning_rate=lr, weight_decay=wd,
                warmup_steps=3000, max_grad_norm=0.0, logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True,
                dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, activation_checkpointing=checkpointing,
                seed=0,
            )
            trainer = SalmonnTrainer(model=model, args=args, train_dataset=_Batches(batches), data_collator=_unwrap, callbacks=[timer])
            wall = time.perf_counter()
            with RssSampler() as memory:
                trainer.train()
            wall = time.perf_counter() - wall
        seconds = timer.ends[-1] - timer.ends[warmup - 1]
        result["trainer_wall_seconds"] = wall
    result["seconds"] = seconds
    result["samples_per_second"] = steps * batch_size / seconds
    # Memory of training itself: the peak while the steps run, over what the model and the batches already held.
    result["rss_before_training_mb"] = memory.start / 2**20
    result["training_peak_rss_mb"] = memory.peak / 2**20
    result["training_extra_memory_mb"] = (memory.peak - memory.start) / 2**20
    return result


def _run_child(mode: str, checkpointing: bool, args) -> dict:
    cmd = [sys.executable, __file__, "--_child", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch_size", str(args.batch_size), "--answer_words", str(args.answer_words), "--size", args.size] + (["--_checkpointing"] if checkpointing else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="Timed optimiser steps per configuration.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first (at least 1).")
    parser.add_argument("--batch_size", type=int, default=2, help="Clips per step.")
    parser.add_argument("--answer_words", type=int, default=150, help="Words per answer (long answers, as in stage 3).")
    parser.add_argument("--repeats", type=int, default=2, help="Alternating plain/Trainer runs; the best of each is compared.")
    parser.add_argument("--size", choices=["mid", "tiny"], default="mid", help="mid: the benchmarks' model; tiny: the test model.")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    sys.path.insert(0, str(REPO_ROOT))
    if args._child:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(measure(args._child, args.steps, args.warmup, args.batch_size, args._checkpointing, args.answer_words, args.size)))
        return 0

    runs = {"plain": [], "trainer": []}
    for _ in range(args.repeats):
        for mode in ("plain", "trainer"):
            runs[mode].append(_run_child(mode, False, args))
    checkpointed = _run_child("plain", True, args)
    best = {mode: min(results, key=lambda r: r["seconds"]) for mode, results in runs.items()}
    report = {
        "configuration": {k: best["plain"][k] for k in ("parameters", "trainable_parameters", "batch_size", "steps", "sequence_length")},
        "collate_seconds_per_sample": best["plain"]["collate_seconds_per_sample"],
        "samples_per_second": best["plain"]["samples_per_second"],
        "samples_per_second_gradient_checkpointing": checkpointed["samples_per_second"],
        "training_peak_rss_mb": best["plain"]["training_peak_rss_mb"],
        "training_extra_memory_mb": best["plain"]["training_extra_memory_mb"],
        "training_peak_rss_mb_gradient_checkpointing": checkpointed["training_peak_rss_mb"],
        "training_extra_memory_mb_gradient_checkpointing": checkpointed["training_extra_memory_mb"],
        "trainer_samples_per_second": best["trainer"]["samples_per_second"],
        "trainer_overhead": best["trainer"]["seconds"] / best["plain"]["seconds"] - 1.0,
        "trainer_overhead_target": 0.10,
        "all_runs": runs | {"plain_checkpointing": [checkpointed]},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
