"""PEFT beside SALMONN's LoRA, the salmonn-train adapter, and the one model-card writer on every save and push path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from modeling_salmonn.integrations_salmonn import salmonn_lora_config
from modeling_salmonn.modelcard_salmonn import REMOTE_CODE_FILES
from salmonn.training.synthetic import SOUND_CLASSES, write_dataset
from salmonn.training.train import main as train_main
from tests.utils import randomize_lora, run_fresh_python, save_tiny_checkpoint, tiny_model_and_processor


@pytest.fixture()
def tiny():
    model, processor = tiny_model_and_processor(seed=0)
    randomize_lora(model, seed=0)
    t = np.arange(16000) / 16000
    inputs = processor(text=processor.format_prompt("Describe."), audio=0.3 * np.sin(2 * np.pi * 300 * t), sampling_rate=16000)
    return model.eval(), inputs


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _salmonn_lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n and ".lora_" in n}


# -- peft ------------------------------------------------------------------------------------------------------


def test_get_peft_model_under_salmonns_adapter_name_is_refused(tiny):
    model, inputs = tiny
    before, lora = _logits(model, inputs), _salmonn_lora(model)
    with pytest.raises(ValueError, match=r"SALMONN's own trained LoRA is the adapter 'default'.*adapter_name='my_adapter'"):
        get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    after = _salmonn_lora(model)
    assert after.keys() == lora.keys() and all(torch.equal(after[k], lora[k]) for k in lora)
    assert model.lora_scaling == 4.0 and torch.equal(_logits(model, inputs), before)


def test_a_users_adapter_trains_alone_beside_salmonns_active_lora(tiny):
    model, inputs = tiny
    before = _logits(model, inputs)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|k_proj)"), adapter_name="mine")
    # A fresh adapter is an identity and SALMONN's LoRA stays on: the logits are those of the model alone.
    assert torch.equal(_logits(peft_model, inputs), before)
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    assert q_proj.active_adapters == ["default", "mine"] and q_proj.r == {"default": 8, "mine": 4}
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * model.config.text_config.num_hidden_layers  # lora_A/B of q_proj and k_proj
    assert all(".mine." in n for n in trainable)
    loss = peft_model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.audio_token_index, -100)).loss
    loss.backward()
    assert all(p.grad is None for n, p in peft_model.named_parameters() if ".default." in n or "speech_qformer" in n)
    with torch.no_grad():
        q_proj.lora_B["mine"].weight.fill_(0.1)
    assert not torch.allclose(_logits(peft_model, inputs), before)


def test_salmonns_own_layout_continues_its_trained_lora(tiny):
    model, inputs = tiny
    before, lora = _logits(model, inputs), _salmonn_lora(model)
    peft_model = get_peft_model(model, salmonn_lora_config(model))
    after = _salmonn_lora(model)
    assert all(torch.equal(after[k], lora[k]) for k in lora)  # peft re-created the layers; the values came back
    assert torch.equal(_logits(peft_model.eval(), inputs), before)
    assert all(p.requires_grad for n, p in peft_model.named_parameters() if ".lora_" in n)


# -- salmonn-train's adapter -----------------------------------------------------------------------------------


def test_training_writes_a_peft_adapter_that_is_the_fine_tuned_model(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base")
    manifest = write_dataset(tmp_path / "data", 2, [c for c in SOUND_CLASSES if c.kind != "speech"], seed=0)
    out = tmp_path / "out"
    code = train_main([
        "--stage", "pretrain", "--model_name_or_path", str(base), "--train_file", str(manifest), "--output_dir", str(out),
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--warmup_steps", "1", "--max_steps", "2",
        "--save_strategy", "no", "--dataloader_num_workers", "0", "--use_cpu", "true", "--disable_tqdm", "true",
        "--report_to", "none",
    ])
    assert code == 0
    adapter = out / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["r"] == 8 and config["lora_alpha"] == 32
    assert config["modules_to_save"] == ["ln_speech", "ln_audio", "speech_qformer", "speech_llama_proj"]
    card = (adapter / "README.md").read_text()
    assert f'AutoModel.from_pretrained("{base}"' in card and "library_name: peft" in card
    result = run_fresh_python(
        f"""
        import numpy as np, torch
        from peft import PeftModel
        from transformers import AutoModel, AutoProcessor
        processor = AutoProcessor.from_pretrained({str(base)!r}, trust_remote_code=True)
        t = np.arange(16000) / 16000
        inputs = processor(text=processor.format_prompt("Describe."), audio=0.3 * np.sin(2 * np.pi * 300 * t), sampling_rate=16000)
        tuned = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained({str(base)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            want, start = tuned(**inputs).logits, base(**inputs).logits
            got = PeftModel.from_pretrained(base, {str(adapter)!r}).eval()(**inputs).logits
        print(f"{{(got - want).abs().max().item():.3e}} {{(start - want).abs().max().item():.3e}}")
        """,
        env={"HF_HUB_OFFLINE": "1"},
    )
    adapter_error, training_change = (float(x) for x in result.split())
    assert adapter_error <= 1e-5 and training_change > 1e-2


# -- model cards and pushes ------------------------------------------------------------------------------------


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        calls.append(("create_repo", repo_id, private))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, folder_path, repo_id, **kwargs):
        files = {p.name: p.read_text() if p.name == "README.md" else None for p in Path(folder_path).iterdir()}
        calls.append(("upload_folder", repo_id, files))
        return "https://huggingface.co/commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def _card_metadata(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


@pytest.mark.parametrize("path", ["save_pretrained", "push_to_hub"])
def test_pushes_upload_every_remote_code_file_and_salmonns_card(tmp_path, fake_hub, path):
    model, _ = tiny_model_and_processor(seed=0)
    if path == "save_pretrained":
        model.save_pretrained(tmp_path / "salmonn-tiny", push_to_hub=True, repo_id="someone/salmonn-tiny", private=True)
    else:
        model.push_to_hub("someone/salmonn-tiny", private=True)
    assert fake_hub[0] == ("create_repo", "someone/salmonn-tiny", True)
    (kind, repo, files), = fake_hub[1:]
    assert kind == "upload_folder" and repo == "someone/salmonn-tiny"
    assert set(REMOTE_CODE_FILES) | {"config.json", "generation_config.json", "model.safetensors", "README.md"} <= set(files)
    metadata = _card_metadata(files["README.md"])
    assert metadata["license"] == "other" and metadata["license_name"] == "llama-license"
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "audio-text-to-text"
    assert {"salmonn", "custom_code"} <= set(metadata["tags"]) and "base_model" not in metadata  # built from a config
    assert 'AutoModel.from_pretrained("someone/salmonn-tiny"' in files["README.md"]


def test_a_saved_model_passes_on_its_sources_card(tmp_path):
    from modeling_salmonn.modelcard_salmonn import LLAMA2_TERMS, salmonn_model_card
    from transformers import AutoModel

    base = save_tiny_checkpoint(tmp_path / "base")
    card = salmonn_model_card(
        AutoModel.from_pretrained(base, trust_remote_code=True).config,
        base_models=["lmsys/vicuna-7b-v1.5", str(tmp_path), "openai/whisper-large-v2"],
        license=LLAMA2_TERMS,
    )
    card.save(base / "README.md")
    model = AutoModel.from_pretrained(base, trust_remote_code=True)
    model.save_pretrained(tmp_path / "again")
    metadata = _card_metadata((tmp_path / "again" / "README.md").read_text())
    assert metadata["license"] == "llama2" and "license_name" not in metadata
    assert metadata["base_model"] == ["lmsys/vicuna-7b-v1.5", "openai/whisper-large-v2"]  # the local path was dropped


def test_converted_card_names_hub_sources_and_the_cached_release(tmp_path):
    from types import SimpleNamespace

    from salmonn.conversion.convert_salmonn import converted_model_card

    model, _ = tiny_model_and_processor(seed=0)
    release = tmp_path / "hub" / "models--tsinghua-ee--SALMONN" / "snapshots" / "abc" / "salmonn_7b_v0.pth"
    release.parent.mkdir(parents=True)
    release.touch()
    args = SimpleNamespace(salmonn_checkpoint=str(release), llm="lmsys/vicuna-7b-v1.5", whisper="openai/whisper-large-v2", dtype="float16")
    metadata = converted_model_card(model.config, args).data.to_dict()
    assert metadata["base_model"] == ["tsinghua-ee/SALMONN", "lmsys/vicuna-7b-v1.5", "openai/whisper-large-v2"]
    assert metadata["license"] == "llama2"
    local = SimpleNamespace(salmonn_checkpoint=str(tmp_path / "x.pth"), llm=str(tmp_path), whisper="openai/whisper-large-v2", dtype="float32")
    metadata = converted_model_card(model.config, local).data.to_dict()
    assert metadata["base_model"] == ["openai/whisper-large-v2"] and metadata["license"] == "other"


def test_a_users_adapter_saves_alone_and_reloads_exactly(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoProcessor

    base = save_tiny_checkpoint(tmp_path / "base")
    peft_model = get_peft_model(
        AutoModel.from_pretrained(base, trust_remote_code=True),
        LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|k_proj)"),
        adapter_name="mine",
    )
    assert list(peft_model.peft_config.keys()) == ["mine"] and "default" in peft_model.peft_config
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".mine." in name:
                param.add_(0.05)
    processor = AutoProcessor.from_pretrained(base, trust_remote_code=True)
    t = np.arange(16000) / 16000
    inputs = processor(text=processor.format_prompt("Describe."), audio=0.3 * np.sin(2 * np.pi * 300 * t), sampling_rate=16000)
    want = _logits(peft_model.eval(), inputs)
    saved = tmp_path / "adapters"
    peft_model.save_pretrained(saved)
    # SALMONN's LoRA is part of the base model: only the user's adapter is written (peft puts it under its name).
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "mine"]
    tensors = load_file(saved / "mine" / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * 2 and all(".q_proj." in k or ".k_proj." in k for k in tensors)  # A/B, 2 layers, q/k
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config.json'"):
        PeftModel.from_pretrained(AutoModel.from_pretrained(base, trust_remote_code=True), saved)
    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(base, trust_remote_code=True), saved / "mine", adapter_name="mine")
    assert torch.equal(_logits(loaded.eval(), inputs), want)
    q_proj = loaded.base_model.model.model.language_model.layers[0].self_attn.q_proj
    assert q_proj.active_adapters == ["default", "mine"]  # SALMONN's LoRA once, then the user's
    without = _logits(AutoModel.from_pretrained(base, trust_remote_code=True).eval(), inputs)
    assert not torch.allclose(want, without)


def test_an_adapter_on_the_encoders_too_is_named_once(tiny, caplog):
    import logging

    model, _ = tiny
    with caplog.at_level(logging.WARNING):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="mine")
    assert caplog.text.count("wraps") == 1
    assert "The adapter 'mine' wraps 8 layers outside the language model (in beats, speech_encoder" in caplog.text
    assert r"target_modules=r'model\.language_model\..*\.(q_proj|v_proj)'" in caplog.text
    caplog.clear()
    other, _ = tiny_model_and_processor(seed=0)
    with caplog.at_level(logging.WARNING):
        get_peft_model(other, LoraConfig(r=4, target_modules=r"model\.language_model\..*\.(q_proj|v_proj)"), adapter_name="mine")
    assert "wraps" not in caplog.text


# -- model_card.md: the one template ---------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_ROOT / "model_card.md"


def _template_prose() -> list[str]:
    """The template's lines below its metadata that carry no placeholder: every card must hold them verbatim."""
    body = TEMPLATE.read_text().split("\n---\n", 1)[1]
    return [line for line in body.splitlines() if line.strip() and "$" not in line]


def test_a_saved_card_is_model_card_md_rendered(tmp_path, monkeypatch):
    from modeling_salmonn import modelcard_salmonn

    model, _ = tiny_model_and_processor(seed=0)
    model.save_pretrained(tmp_path / "saved")
    card = (tmp_path / "saved" / "README.md").read_text()
    prose = _template_prose()
    assert len(prose) > 20 and all(line in card for line in prose)
    assert "# SALMONN (transformers)" in card and "windows of\n0.333333 s (hop 0.333333 s)" in card
    assert "$" not in card
    metadata = _card_metadata(card)
    assert metadata["tags"] == ["salmonn", "audio", "speech", "audio-language-model", "custom_code"]
    assert metadata["pipeline_tag"] == "audio-text-to-text" and metadata["language"] == ["en"]

    # Editing the file edits every card: the writer reads the template each time.
    edited = tmp_path / "model_card.md"
    edited.write_text(
        TEMPLATE.read_text()
        .replace("- custom_code\n", "- custom_code\n- edited-tag\n")
        .replace("## Limitations", "## Limitations\n\nThis line was added to model_card.md.")
    )
    monkeypatch.setattr(modelcard_salmonn, "_card_template_candidates", lambda: [tmp_path / "missing.md", edited])
    model.save_pretrained(tmp_path / "again")
    card = (tmp_path / "again" / "README.md").read_text()
    assert "This line was added to model_card.md." in card and "edited-tag" in _card_metadata(card)["tags"]


def test_without_the_template_the_card_is_short_but_complete(tmp_path, monkeypatch):
    from modeling_salmonn import modelcard_salmonn

    monkeypatch.setattr(modelcard_salmonn, "_card_template_candidates", lambda: [tmp_path / "missing.md"])
    model, _ = tiny_model_and_processor(seed=0)
    model.save_pretrained(tmp_path / "saved")
    card = (tmp_path / "saved" / "README.md").read_text()
    metadata = _card_metadata(card)
    assert metadata["license"] == "other" and metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "audio-text-to-text" and metadata["tags"] == ["salmonn", "custom_code"]
    assert "LoRA rank 8, scaling 4" in card and 'AutoModel.from_pretrained("path/or/repo-id"' in card
    assert "## The LoRA scaling knob" not in card and "$" not in card


def test_remote_code_finds_the_template_of_the_installed_package(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base")
    out = run_fresh_python(
        f"""
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(base)!r}, trust_remote_code=True)
        print(type(model).__module__)
        model.save_pretrained({str(tmp_path / "again")!r})
        """,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert out.startswith("transformers_modules.")
    card = (tmp_path / "again" / "README.md").read_text()
    assert all(line in card for line in _template_prose())


def test_a_built_wheel_installs_the_template_as_package_data(tmp_path):
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO_ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")], check=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("salmonn-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True, timeout=600)
    assert (tmp_path / "site" / "modeling_salmonn" / "model_card.md").read_text() == TEMPLATE.read_text()
    assert not (source / "modeling_salmonn" / "model_card.md").exists()  # the build never copies into the sources
    out = run_fresh_python(
        """
        from modeling_salmonn import modelcard_salmonn
        print(modelcard_salmonn.__file__)
        print(modelcard_salmonn.card_template() == open(modelcard_salmonn.__file__[:-len("modelcard_salmonn.py")] + "model_card.md").read())
        """,
        env={"PYTHONPATH": str(tmp_path / "site")},
        cwd=tmp_path,
    )
    assert out.split() == [str(tmp_path / "site" / "modeling_salmonn" / "modelcard_salmonn.py"), "True"]
