"""salmonn-infer and salmonn-eval: the same shared options, `datasets` input, one-line errors for missing extras."""

from __future__ import annotations

import json
import sys

import numpy as np
import soundfile

from salmonn.evaluation.evaluate import EvalArguments
from salmonn.evaluation.evaluate import main as eval_main
from salmonn.inference.infer import build_parser
from salmonn.inference.infer import main as infer_main
from salmonn.inference.options import DatasetArguments
from tests.utils import save_tiny_checkpoint


SHARED = (
    "dtype", "device", "device_map", "quantize", "lora_scaling", "batch_size", "num_beams", "max_new_tokens",
    "overwrite", "progress", "dataset_name", "dataset_config_name", "split", "audio_column", "text_column",
)


def _options(parser) -> dict[str, dict]:
    options = {}
    for action in parser._actions:
        if action.dest in SHARED:
            entry = options.setdefault(action.dest, {"flags": set(), "default": action.default, "choices": action.choices})
            entry["flags"].update(action.option_strings)
    return options


def test_infer_and_eval_share_flag_names_defaults_and_choices():
    from transformers import HfArgumentParser

    infer = _options(build_parser())
    evaluate = _options(HfArgumentParser((EvalArguments, DatasetArguments)))
    assert set(infer) == set(evaluate) == set(SHARED)
    for dest in SHARED:
        assert infer[dest]["default"] == evaluate[dest]["default"], dest
        assert infer[dest]["choices"] == evaluate[dest]["choices"], dest
        # salmonn-eval keeps its old spelling --overwrite_output as an alias; everything else is spelled the same
        assert evaluate[dest]["flags"] - infer[dest]["flags"] == ({"--overwrite_output"} if dest == "overwrite" else set())
        assert infer[dest]["flags"] <= evaluate[dest]["flags"], dest
    assert infer["device"]["default"] == "auto" and list(infer["dtype"]["choices"]) == ["float32", "bfloat16", "float16"]
    assert list(infer["quantize"]["choices"]) == ["int8", "8bit", "4bit"] and infer["split"]["default"] == "test"
    assert {"--progress", "--no_progress"} <= infer["progress"]["flags"]


def test_infer_reads_a_datasets_dataset_as_it_reads_files(tmp_path):
    import datasets

    base = save_tiny_checkpoint(tmp_path / "model")
    rate = 16000
    paths = []
    for k, frequency in enumerate((300.0, 500.0)):
        paths.append(str(tmp_path / f"clip{k}.wav"))
        soundfile.write(paths[-1], 0.3 * np.sin(2 * np.pi * frequency * np.arange(rate) / rate), rate)
    dataset = datasets.Dataset.from_dict({"audio": paths, "text": ["first", "second"]}).cast_column("audio", datasets.Audio())
    dataset.save_to_disk(str(tmp_path / "ds"))
    common = ["--model", str(base), "--num_beams", "1", "--max_new_tokens", "3", "--device", "cpu", "--no_progress"]
    assert infer_main([*common, "--output", str(tmp_path / "files.jsonl"), *paths]) == 0
    assert infer_main([*common, "--output", str(tmp_path / "ds.jsonl"), "--dataset_name", str(tmp_path / "ds")]) == 0
    from_files = [json.loads(line) for line in (tmp_path / "files.jsonl").read_text().splitlines()]
    from_dataset = [json.loads(line) for line in (tmp_path / "ds.jsonl").read_text().splitlines()]
    assert [r["id"] for r in from_dataset] == [f"{tmp_path / 'ds'}[test]:0", f"{tmp_path / 'ds'}[test]:1"]
    assert [r["reference"] for r in from_dataset] == ["first", "second"]
    assert [r["answer"] for r in from_dataset] == [r["answer"] for r in from_files]


def test_missing_optional_packages_are_one_line_errors(tmp_path, monkeypatch, capsys):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"id": "a", "prompt": "p", "reference": "a b", "hypothesis": "a b"}) + "\n")
    monkeypatch.setitem(sys.modules, "jiwer", None)
    assert eval_main(["--task", "asr", "--predictions", str(predictions)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "salmonn-eval: error: the optional package 'jiwer' is not installed; run pip install 'salmonn[eval]'"

    monkeypatch.setitem(sys.modules, "datasets", None)
    assert infer_main(["--model", "m", "--dataset_name", str(tmp_path), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "salmonn-infer: error: the optional package 'datasets' is not installed; run pip install 'salmonn[train]'"
