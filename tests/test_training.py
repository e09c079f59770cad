"""salmonn-train: arguments and recipes, the schedule, the Trainer path end to end, exports, activation tuning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.utils import run_fresh_python, save_tiny_checkpoint
from salmonn.training.export import TRAINABLE_EXPORT_NAME, load_trainable_export, save_trainable_export
from salmonn.training.synthetic import SOUND_CLASSES, write_dataset
from salmonn.training.train import STAGES, build_parser, main, parse_arguments, recipe_path
from salmonn.training.trainable import freeze_for_training, is_trainable_parameter, trainable_state_dict
from salmonn.training.trainer import salmonn_lr_lambda


NON_SPEECH = [c for c in SOUND_CLASSES if c.kind != "speech"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A saved tiny checkpoint, a small synthetic data set, and one 4-step training run on them."""
    root = tmp_path_factory.mktemp("train")
    base = save_tiny_checkpoint(root / "base")
    manifest = write_dataset(root / "data", 3, NON_SPEECH, seed=0)
    out = root / "out"
    code = main(_args(base, manifest, out, "--max_steps", "4", "--save_steps", "2", "--record_data_order", "true"))
    assert code == 0
    return {"root": root, "base": base, "manifest": manifest, "out": out}


def _args(base, manifest, out, *extra, stage="pretrain"):
    return [
        "--stage", stage, "--model_name_or_path", str(base), "--train_file", str(manifest), "--output_dir", str(out),
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--warmup_steps", "1", "--dataloader_num_workers", "0",
        "--use_cpu", "true", "--disable_tqdm", "true", "--logging_steps", "1", "--report_to", "none", *extra,
    ]


# -- arguments and recipes -------------------------------------------------------------------------------------


def test_stage_recipes_hold_the_papers_settings():
    for stage in STAGES:
        recipe = yaml.safe_load(recipe_path(stage).read_text())
        assert recipe["stage"] == stage
        assert recipe["learning_rate"] == 3e-5 and recipe["min_lr"] == 1e-5 and recipe["warmup_start_lr"] == 1e-6
        assert recipe["weight_decay"] == 0.05 and recipe["decay_matrices_only"] is True and recipe["optim"] == "adamw_torch"
    for stage in ("pretrain", "instruct"):
        recipe = yaml.safe_load(recipe_path(stage).read_text())
        assert recipe["warmup_steps"] == 3000 and recipe["per_device_train_batch_size"] == 8 and recipe["max_steps"] == 90000
    activation = yaml.safe_load(recipe_path("activation").read_text())
    assert activation["max_steps"] == 12 and activation["activation_num_stories"] == 12
    assert activation["per_device_train_batch_size"] == 1 and activation["activation_lora_scaling"] == 2.0


def test_recipe_then_arguments_file_then_command_line(tmp_path):
    model_args, data_args, salmonn_args, args = parse_arguments(
        ["--stage", "instruct", "--model_name_or_path", "m", "--train_file", "t.json", "--output_dir", str(tmp_path)]
    )
    assert salmonn_args.stage == "instruct" and args.learning_rate == 3e-5 and args.warmup_steps == 3000
    assert args.weight_decay == 0.05 and args.per_device_train_batch_size == 8 and args.max_steps == 90000
    assert args.seed == 42 and args.max_grad_norm == 0.0 and data_args.max_txt_len == 300
    assert args.remove_unused_columns is False and args.ddp_find_unused_parameters is False

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"stage": "pretrain", "model_name_or_path": "m", "train_file": "t.json",
                                      "output_dir": str(tmp_path), "learning_rate": 1e-4, "seed": 7, "activation_checkpointing": True}))
    _, _, salmonn_args, args = parse_arguments([str(config), "--seed", "9"])
    assert salmonn_args.stage == "pretrain" and args.learning_rate == 1e-4 and args.seed == 9
    assert args.activation_checkpointing is True and args.warmup_steps == 3000  # the rest still from the recipe

    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"stage": "activation", "model_name_or_path": "m", "train_file": "clips.json", "output_dir": str(tmp_path)}))
    _, _, salmonn_args, args = parse_arguments([str(as_json)])
    assert args.max_steps == 12 and salmonn_args.activation_num_stories == 12

    with pytest.raises(SystemExit):
        parse_arguments(["--model_name_or_path", "m", "--train_file", "t.json", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--stage must be one of"):
        parse_arguments(["--stage", "finetune", "--model_name_or_path", "m"])


def test_training_length_comes_from_the_highest_layer_that_sets_it(tmp_path):
    base = ["--stage", "pretrain", "--model_name_or_path", "m", "--train_file", "t.json", "--output_dir", str(tmp_path)]
    _, _, _, args = parse_arguments([*base, "--num_train_epochs", "2"])
    assert args.num_train_epochs == 2 and args.max_steps == -1  # the recipe's 90,000 steps give way
    _, _, _, args = parse_arguments([*base, "--num-train-epochs=2"])
    assert args.num_train_epochs == 2 and args.max_steps == -1
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({"max_steps": 100, "num_train_epochs": 5}))
    with pytest.raises(ValueError, match="the arguments file sets both --max_steps and --num_train_epochs; give one of them"):
        parse_arguments([str(run_file), *base])
    _, _, _, args = parse_arguments([str(run_file), *base, "--num_train_epochs", "1"])
    assert args.num_train_epochs == 1 and args.max_steps == -1
    run_file.write_text(yaml.safe_dump({"num_train_epochs": 5}))
    _, _, _, args = parse_arguments([str(run_file), *base, "--max_steps", "7"])
    assert args.max_steps == 7  # the command line sets the length in steps: it wins
    _, _, _, args = parse_arguments([*base, "--max_steps", "-1", "--num_train_epochs", "3"])
    assert args.max_steps == -1 and args.num_train_epochs == 3
    with pytest.raises(ValueError, match="the command line sets both"):
        parse_arguments([*base, "--max_steps", "5", "--num_train_epochs", "3"])


def test_transformers_flag_names_and_the_old_spellings_as_aliases(tmp_path):
    base = ["--stage", "pretrain", "--model_name_or_path", "m", "--train_file", "t.json", "--output_dir", str(tmp_path)]
    new = parse_arguments([*base, "--dtype", "bfloat16", "--train_split_name", "dev", "--audio_column_name", "wav",
                           "--text_column_name", "sentence", "--overwrite_output_dir", "--disable_tqdm", "true"])
    old_base = [*base[:2], "--model", *base[3:]]  # --model, as salmonn-infer, -eval, -web and -demo take it
    old = parse_arguments([*old_base, "--model_dtype", "bfloat16", "--train_split", "dev", "--audio_column", "wav",
                           "--text_column", "sentence", "--overwrite_output_dir", "--disable_tqdm", "true"])
    assert new[0] == old[0] and new[1] == old[1] and new[2] == old[2]
    model_args, data_args, salmonn_args, args = new
    assert model_args.dtype == "bfloat16" and data_args.train_split_name == "dev" and data_args.audio_column_name == "wav"
    assert data_args.text_column_name == "sentence" and salmonn_args.overwrite_output_dir is True and args.disable_tqdm is True


def test_dataloader_workers_are_capped_to_the_available_cpus(monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    from salmonn.training.train import cap_dataloader_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    args = SimpleNamespace(dataloader_num_workers=8)
    with caplog.at_level(logging.INFO, logger="salmonn.training.train"):
        cap_dataloader_workers(args)
    assert args.dataloader_num_workers == 2
    assert caplog.messages == ["dataloader_num_workers 8 -> 2 (the CPUs available to this process)"]
    args = SimpleNamespace(dataloader_num_workers=1)
    cap_dataloader_workers(args)
    assert args.dataloader_num_workers == 1


def test_help_documents_every_flag():
    import dataclasses

    from salmonn.training.train import DataArguments, ModelArguments, SalmonnArguments

    text = build_parser().format_help()
    for cls in (ModelArguments, DataArguments, SalmonnArguments):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"--{f.name} has no help"
            assert f"--{f.name}" in text
    for flag in ("--learning_rate", "--gradient_checkpointing", "--deepspeed", "--fsdp", "--push_to_hub", "--resume_from_checkpoint"):
        assert flag in text


def test_schedule_is_the_originals_warmup_and_cosine():
    kwargs = dict(init_lr=3e-5, warmup_start_lr=1e-6, min_lr=1e-5, warmup_steps=3000, total_steps=90000)

    def lr(step):
        return 3e-5 * salmonn_lr_lambda(step, **kwargs)

    assert lr(0) == pytest.approx(1e-6)
    assert lr(1500) == pytest.approx(1e-6 + (3e-5 - 1e-6) / 2)
    assert lr(3000) == pytest.approx((3e-5 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 3000 / 90000)) + 1e-5)
    assert lr(45000) == pytest.approx(2e-5)
    assert lr(90000) == pytest.approx(1e-5)


# -- the Trainer path -------------------------------------------------------------------------------------------


def test_training_run_saves_a_complete_model_and_changes_only_trainable_weights(tiny_run):
    out, base = tiny_run["out"], tiny_run["base"]
    for name in ("config.json", "model.safetensors", "modeling_salmonn.py", "processing_salmonn.py", "tokenizer_config.json",
                 "processor_config.json", TRAINABLE_EXPORT_NAME, "checkpoint-2", "checkpoint-4"):
        assert (out / name).exists(), name
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    trainable = load_file(out / TRAINABLE_EXPORT_NAME)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(trainable)
    for prefix in ("model.speech_qformer.", "model.speech_llama_proj.", "model.ln_speech.", "model.speech_query_tokens"):
        assert any(k.startswith(prefix) for k in changed), prefix
    assert any(".lora_B." in k for k in changed)
    for key in trainable:
        assert torch.equal(trainable[key], after[key])
    frozen = [k for k in before if k not in trainable]
    assert any(k.startswith("model.speech_encoder.") for k in frozen) and any(k.startswith("model.beats.") for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # Whisper, BEATs and the LLM's base weights
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # Batches of 2 from 9 clips: every step saw 2 ids.
    steps = [json.loads(line) for line in (out / "data_order" / "rank0.jsonl").read_text().splitlines()]
    assert [len(s["ids"]) for s in steps] == [2, 2, 2, 2]


def test_trained_folder_loads_with_automodel_in_a_fresh_process(tiny_run):
    out = tiny_run["out"]
    result = run_fresh_python(
        f"""
        import torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({str(out)!r}, trust_remote_code=True)
        from safetensors.torch import load_file
        saved = load_file({str(out / "model.safetensors")!r})
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.items())
        print(type(model).__name__, type(processor).__name__, model.lora_scaling)
        """,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.split() == ["SalmonnForConditionalGeneration", "SalmonnProcessor", "4.0"]


def test_trainable_export_applies_to_the_base_folder(tiny_run, tmp_path):
    from salmonn.training.export import main as export_main

    out, base = tiny_run["out"], tiny_run["base"]
    merged = tmp_path / "merged"
    assert export_main(["--base_model", str(base), "--export", str(out / TRAINABLE_EXPORT_NAME), "--output_dir", str(merged)]) == 0
    expected, got = load_file(out / "model.safetensors"), load_file(merged / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert export_main(["--base_model", str(base), "--export", str(out / TRAINABLE_EXPORT_NAME), "--output_dir", str(merged)]) == 2


def test_export_refuses_files_that_do_not_fit(tiny, tmp_path):
    from safetensors.torch import save_file

    model, _ = tiny
    path = save_trainable_export(model, tmp_path / "t.safetensors")
    tensors = load_file(path)
    assert set(tensors) == set(trainable_state_dict(model))
    partial = dict(list(tensors.items())[:-1])
    save_file(partial, tmp_path / "partial.safetensors", metadata={"salmonn_trainable_export": "1"})
    with pytest.raises(ValueError, match="1 missing keys"):
        load_trainable_export(model, tmp_path / "partial.safetensors")
    key = next(k for k in tensors if ".lora_A." in k)
    save_file({**tensors, key: torch.zeros(3, 3)}, tmp_path / "shape.safetensors", metadata={"salmonn_trainable_export": "1"})
    with pytest.raises(ValueError, match="has shape"):
        load_trainable_export(model, tmp_path / "shape.safetensors")
    save_file(tensors, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a SALMONN trainable export"):
        load_trainable_export(model, tmp_path / "plain.safetensors")


def test_optimizer_groups_decay_matrices_only(tiny_run):
    from transformers import AutoModel, TrainingArguments

    from salmonn.training.trainer import SalmonnTrainer

    model = AutoModel.from_pretrained(tiny_run["base"], trust_remote_code=True)
    freeze_for_training(model)
    args = TrainingArguments(output_dir=str(tiny_run["root"] / "unused"), use_cpu=True, weight_decay=0.05, report_to=[])
    trainer = SalmonnTrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    plain = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | plain == trainable and not decayed & plain
    assert "model.speech_query_tokens" in decayed  # a [1, 1, H] matrix, decayed as in the original
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert "model.ln_speech.weight" in plain and "model.speech_llama_proj.bias" in plain
    assert any(".lora_A." in n for n in decayed)


def test_freeze_for_training_trains_the_audio_adapter_and_lora_only(tiny):
    model = type(tiny[0])(tiny[0].config)  # a fresh copy: the model itself freezes nothing but Whisper's sinusoids
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["model.speech_encoder.embed_positions.weight"]
    count = freeze_for_training(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = ("model.ln_speech.", "model.ln_audio.", "model.speech_query_tokens", "model.speech_qformer.", "model.speech_llama_proj.")
    expected = {n for n, _ in model.named_parameters() if n.startswith(adapter) or ".lora_A." in n or ".lora_B." in n}
    assert trainable == expected and count == sum(model.get_parameter(n).numel() for n in expected)
    assert any(n.startswith("model.speech_qformer.") for n in trainable) and any(".lora_B." in n for n in trainable)
    assert not is_trainable_parameter("model.speech_encoder.layers.0.fc1.weight")
    assert not is_trainable_parameter("model.language_model.layers.0.self_attn.q_proj.base_layer.weight")
    assert not is_trainable_parameter("lm_head.weight")
    assert set(trainable_state_dict(model)) == trainable


def test_frozen_encoders_stay_in_eval_mode_while_training(tiny):
    model, _ = tiny
    model.train()
    try:
        assert not model.model.speech_encoder.training and not model.model.beats.training
        assert model.model.speech_qformer.training and model.model.language_model.training
    finally:
        model.eval()


def test_bad_command_lines_fail_with_a_clear_message(tiny_run, tmp_path, capsys):
    bad_prompts = tmp_path / "prompts.json"
    bad_prompts.write_text(json.dumps({"audiocaption": ["Describe it."]}))
    code = main(_args(tiny_run["base"], tiny_run["manifest"], tmp_path / "o", "--max_steps", "1", "--prompt_file", str(bad_prompts)))
    assert code == 2
    assert "task 'audiocaption', prompt 0" in capsys.readouterr().err
    code = main(_args(tiny_run["base"], tmp_path / "nowhere.json", tmp_path / "o", "--max_steps", "1"))
    assert code == 2 and "nowhere.json' does not exist" in capsys.readouterr().err
    code = main(_args(tiny_run["base"], tiny_run["manifest"], tmp_path / "o", "--resume_from_checkpoint", str(tmp_path / "nope")))
    assert code == 2 and "not a checkpoint folder" in capsys.readouterr().err


def test_push_to_hub_goes_through_the_trainer(tiny_run, tmp_path, monkeypatch):
    import transformers.trainer as trainer_module

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(trainer_module, "hf_api", lambda: FakeApi())
    out = tmp_path / "pushed"
    code = main(_args(tiny_run["base"], tiny_run["manifest"], out, "--max_steps", "1", "--save_strategy", "no",
                      "--push_to_hub", "true", "--hub_model_id", "someone/salmonn-tiny"))
    assert code == 0
    assert calls[0] == ("create_repo", "someone/salmonn-tiny")
    uploads = [c for c in calls if c[0] == "upload_folder"]
    assert uploads and {"model.safetensors", "config.json", "modeling_salmonn.py", "README.md"} <= set(uploads[-1][2])
    from huggingface_hub import ModelCard

    metadata = ModelCard.load(out / "README.md").data.to_dict()  # SALMONN's card, not the Trainer's generic draft
    assert {"salmonn", "custom_code", "pretrain"} <= set(metadata["tags"]) and metadata["pipeline_tag"] == "audio-text-to-text"
    assert metadata["license"] == "other" and metadata["library_name"] == "transformers"


def test_activation_stage_writes_stories_with_discounted_lora_then_trains_on_them(tiny_run, tmp_path):
    from transformers import AutoModel, AutoProcessor

    from salmonn.training.activation import STORIES_FILE, generate_answers
    from salmonn.audio import read_audio
    from salmonn.training.data import load_manifest
    from salmonn.training.prompts import DEFAULT_STORY_PROMPT

    base, manifest = tiny_run["base"], tiny_run["manifest"]
    out = tmp_path / "act"
    code = main(_args(base, manifest, out, "--activation_num_stories", "2", "--max_steps", "2", "--activation_max_new_tokens", "6",
                      "--activation_num_beams", "1", "--per_device_train_batch_size", "1", stage="activation"))
    assert code == 0
    stories = json.loads((out / STORIES_FILE).read_text())["annotation"]
    items = load_manifest(manifest)
    assert [s["path"] for s in stories] == [it["path"] for it in items[:2]]

    model = AutoModel.from_pretrained(base, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(base, trust_remote_code=True)
    audios = [read_audio(it["path"]) for it in items[:2]]
    kwargs = {"max_new_tokens": 6, "num_beams": 1, "do_sample": False}
    expected = generate_answers(model, processor, audios, DEFAULT_STORY_PROMPT, lora_scaling=2.0, generation_kwargs=kwargs)
    assert [s["text"] for s in stories] == expected
    assert model.lora_scaling == 4.0  # restored after generating

    trained = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert trained.lora_scaling == 4.0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    before, after = trainable_state_dict(model), trainable_state_dict(trained)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_story_generation_runs_at_the_discounted_scaling_and_restores_it(tiny, monkeypatch):
    import numpy as np

    from salmonn.training.activation import generate_answers

    model, processor = tiny
    seen = []
    original = model.generate

    def spy(**kwargs):
        seen.append((model.lora_scaling, model.training))
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    model.train()
    answers = generate_answers(model, processor, [(np.zeros(16000), 16000)] * 3, "<SpeechHere> Tell a story.", lora_scaling=2.0,
                               batch_size=2, generation_kwargs={"max_new_tokens": 2, "num_beams": 1}, progress=False)
    assert len(answers) == 3 and seen == [(2.0, False), (2.0, False)]
    assert model.lora_scaling == 4.0 and model.training  # both restored
    model.eval()
    with pytest.raises(ValueError, match="story prompt"):
        generate_answers(model, processor, [(np.zeros(16000), 16000)], "Tell a story.")


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    """Checkpointed layers are recomputed with the same dropout masks, so the gradients do not change."""
    import numpy as np

    from salmonn.training.collator import SalmonnDataCollator

    model, processor = tiny
    batch = SalmonnDataCollator(processor)(
        [{"id": str(i), "audio": np.sin(np.arange(16000) * (0.05 + 0.02 * i)), "sampling_rate": 16000,
          "prompt": "<Speech><SpeechHere></Speech> Describe the audio.", "answer": "A pure tone plays steadily."} for i in range(2)]
    )
    batch.pop("ids")
    grads = []
    try:
        for checkpointing in (False, True):
            if checkpointing:
                model.activation_checkpointing_enable()
            model.train()
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            model(**batch).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        assert any("LlamaDecoderLayer" in type(m).__name__ for m in layers)
    finally:
        model.activation_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        model.eval()
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_saved_dataset_folder_with_bf16_checkpointing_and_accumulation(tiny_run, tmp_path):
    """A `datasets` folder as --train_file, under bf16 autocast, gradient checkpointing and gradient accumulation."""
    datasets = pytest.importorskip("datasets")
    from salmonn.training.data import load_manifest

    items = load_manifest(tiny_run["manifest"])
    ds = datasets.Dataset.from_dict({"audio": [it["path"] for it in items], "text": [it["text"] for it in items],
                                     "task": [it["task"] for it in items]}).cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    code = main(_args(tiny_run["base"], tmp_path / "ds", out, "--max_steps", "1", "--save_strategy", "no", "--bf16", "true",
                      "--activation_checkpointing", "true", "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "1"))
    assert code == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and state["log_history"][0]["epoch"] == pytest.approx(2 / len(items))
    before, after = load_file(tiny_run["base"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in load_file(out / TRAINABLE_EXPORT_NAME))
