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


def test_decoding_benchmark_runs_on_the_tiny_model(capsys):
    from benchmarks.decoding import main

    args = ["--size", "tiny", "--batch_sizes", "2", "--new_tokens", "12", "--repeats", "1", "--compile_backend", "eager",
            "--proxy_layers", "2", "--proxy_tokens", "8", "--proxy_repeats", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    runs = re.findall(r"batch (\d) \| (.+?): (-?[\d.]+) ms per new token \| host reads per step ([\d.]+) \| kernel launches per step (.+?) \|", out)
    names = ["SALMONN eager", "stock LlamaForCausalLM", "SALMONN static cache + compile"]
    assert [(batch, name) for batch, name, *_ in runs] == [("2", name) for name in names]
    # One host read per cached step for every path (transformers' own), and no kernel count off CUDA.
    assert all(reads == "1.00" and launches == "n/a (CPU)" for *_, reads, launches in runs)
    assert re.search(r"default decode \(4 beams, 200 tokens\) of a 30 s clip, SALMONN eager: [\d.]+ s", out)
    assert re.search(r"default decode \(4 beams, 200 tokens\) of a 30 s clip, SALMONN static cache: [\d.]+ s", out)
    differences = [float(d) for d in re.findall(r"LoRA merged vs live, prompt logits of .+?: max difference ([\d.e+-]+)", out)]
    assert len(differences) == 2 and all(0 < d < 1e-4 for d in differences)  # tiny and fixture A, float32
    assert re.search(r"launch-bound proxy \(2 layers, tiny widths, 1 thread, 8 tokens\): SALMONN [\d.]+ ms/token, stock LLaMA [\d.]+ ms/token, ratio [\d.]+", out)
