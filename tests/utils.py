"""Shared helpers of the test suite: fixture paths, tiny models, fresh-process runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np


REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_A = REPO_ROOT / "tests" / "fixtures" / "original_tiny_a"
# Our log-mel equals today's WhisperFeatureExtractor exactly; both run torch's float32 STFT, whose rounding depends on
# the CPU's kernels: against the stored transformers 4.28 spectrograms they differ by 4.3e-5 on one machine and 1.06e-4
# (synth_long) on another. The contract's bound is on what the model computes from them (1e-3 from wav).
SPECTROGRAM_TOLERANCE_VS_4_28 = 2e-4


def fixture_golden() -> dict:
    return json.loads((FIXTURE_A / "golden.json").read_text())


def fixture_a_convert_args(output: Path, *extra: str) -> list[str]:
    """salmonn-convert's arguments for fixture A (its Q-Former has 4 heads, which the weights cannot tell)."""
    return [
        "--salmonn-checkpoint", str(FIXTURE_A / "salmonn.pth"),
        "--whisper", str(FIXTURE_A / "whisper"),
        "--beats", str(FIXTURE_A / "beats.pt"),
        "--llm", str(FIXTURE_A / "llm"),
        "--output", str(output),
        "--qformer-num-attention-heads", "4",
        *extra,
    ]


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    import soundfile

    data, rate = soundfile.read(str(path))  # float64, as the original reads it
    return data, rate


def tiny_model_and_processor(seed: int = 0, **config_overrides):
    from salmonn.inference.tiny import build_tiny_model_and_processor

    return build_tiny_model_and_processor(seed=seed, **config_overrides)


def randomize_lora(model, seed: int = 0) -> None:
    """Fresh LoRA is an identity; give it weights so that LoRA (and its scaling) changes the output."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def save_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    model, processor = tiny_model_and_processor(seed=seed)
    randomize_lora(model, seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return Path(directory)


def run_fresh_python(code: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 300) -> str:
    """Runs `code` in a new interpreter that cannot import the project (so remote code is what loads)."""
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=str(cwd or Path("/")),
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"fresh process failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout
