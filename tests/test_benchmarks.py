"""Smoke runs of the benchmark scripts that print README numbers, on tiny settings (the inference and long-audio
scripts are smoke-tested in tests/test_inference.py)."""

from __future__ import annotations

import json
import re

import pytest


@pytest.mark.slow
def test_training_benchmark_runs_on_the_tiny_model(capsys):
    from benchmarks.training import main

    assert main(["--size", "tiny", "--steps", "1", "--warmup", "1", "--batch_size", "1", "--answer_words", "5", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["configuration"]["batch_size"] == 1 and report["configuration"]["steps"] == 1
    assert set(report["all_runs"]) == {"plain", "trainer", "plain_checkpointing"}
    plain, trainer = report["all_runs"]["plain"][0], report["all_runs"]["trainer"][0]
    assert report["samples_per_second"] == plain["samples_per_second"] > 0
    assert report["trainer_overhead"] == pytest.approx(trainer["seconds"] / plain["seconds"] - 1.0)
    for key in ("training_peak_rss_mb", "training_peak_rss_mb_gradient_checkpointing", "samples_per_second_gradient_checkpointing"):
        assert report[key] > 0, key


@pytest.mark.slow
def test_conversion_memory_benchmark_runs_on_a_small_llm(capsys):
    from benchmarks.conversion_memory import main

    main(["--total-gb", "0.02", "--shard-mb", "6"])
    out = capsys.readouterr().out

    def number(label: str) -> float:
        return float(re.search(re.escape(label) + r"\s*: ([\d.]+)", out).group(1))

    largest, peak, imports = number("largest input shard"), number("peak RSS of the converter"), number("of which imports alone")
    assert 0 < largest <= 6.5
    assert 0 < imports < peak
    # The MB figures are printed rounded to 1 MB; the ratio is computed before rounding.
    assert peak / (largest + 0.5) <= number("peak / largest shard") <= peak / (largest - 0.5)
    assert "target: <= 2x + 1 GB" in out
