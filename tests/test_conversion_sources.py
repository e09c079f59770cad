"""salmonn-convert from safetensors folders and from Hub ids (a local cache, offline), and where each setting comes from."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from salmonn.conversion.convert_salmonn import main as convert_main
from tests.test_conversion import _args
from tests.utils import FIXTURE_A


def _bin_to_safetensors(source, target, shards: int = 1):
    """A copy of a transformers folder with its `pytorch_model.bin` as safetensors (`shards` > 1: with an index)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("pytorch_model.bin"))
    state = torch.load(source / "pytorch_model.bin", weights_only=True, map_location="cpu")
    state = {key: value.contiguous() for key, value in state.items()}
    if shards == 1:
        save_file(state, target / "model.safetensors", metadata={"format": "pt"})
        return target
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: state[key] for key in keys[i::shards]}
        save_file(part, target / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target


def _weights(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def from_bin(tmp_path_factory):
    output = tmp_path_factory.mktemp("from-bin") / "out"
    assert convert_main(_args(output)) == 0
    return output


def _config_without_source_paths(folder) -> dict:
    """config.json without `_name_or_path` (where each part was read from, which differs on purpose here)."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "_name_or_path"}
        return value

    return strip(json.loads((folder / "config.json").read_text()))


def _assert_same_conversion(folder, reference):
    ours, theirs = _weights(folder), _weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    assert _config_without_source_paths(folder) == _config_without_source_paths(reference)


def test_safetensors_inputs_convert_like_bin_inputs(tmp_path, from_bin):
    whisper = _bin_to_safetensors(FIXTURE_A / "whisper", tmp_path / "whisper")
    llm = _bin_to_safetensors(FIXTURE_A / "llm", tmp_path / "llm", shards=2)
    assert not list(whisper.glob("*.bin")) and (llm / "model.safetensors.index.json").is_file()
    output = tmp_path / "out"
    assert convert_main(_args(output, whisper=whisper, llm=llm)) == 0
    _assert_same_conversion(output, from_bin)


def _put_in_hub_cache(cache, repo_id: str, folder, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lays `folder` out as huggingface_hub's cache does for `repo_id` at `main` (blobs are plain copies here)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_hub_ids_resolve_through_the_cache_offline(tmp_path, monkeypatch, from_bin):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # The real openai/whisper-large-v2 ships safetensors; Vicuna ships .bin shards.
    _put_in_hub_cache(cache, "openai/whisper-tiny-a", _bin_to_safetensors(FIXTURE_A / "whisper", tmp_path / "whisper"))
    _put_in_hub_cache(cache, "lmsys/vicuna-tiny-a", FIXTURE_A / "llm")
    output = tmp_path / "out"
    assert convert_main(_args(output, whisper="openai/whisper-tiny-a", llm="lmsys/vicuna-tiny-a")) == 0
    _assert_same_conversion(output, from_bin)


def test_hub_id_missing_from_the_cache_offline_is_a_clear_error(tmp_path, monkeypatch, caplog):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert convert_main(_args(tmp_path / "out", whisper="openai/whisper-not-cached")) != 0
    assert "Whisper 'openai/whisper-not-cached': not a local folder and could not be fetched from the Hub" in caplog.text
    assert not (tmp_path / "out").exists()


def _checkpoint_with_config(tmp_path, model_config: dict | None):
    checkpoint = torch.load(FIXTURE_A / "salmonn.pth", weights_only=True, map_location="cpu")
    if model_config is None:
        del checkpoint["config"]
    else:
        checkpoint["config"]["model"].update(model_config)
    path = tmp_path / "salmonn.pth"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    "source, flags, expected",
    [
        # No config in the checkpoint and no flags: the original's defaults
        ("none", {}, {"second_per_window": 0.333333, "second_stride": 0.333333, "lora_alpha": 32.0, "lora_dropout": 0.1}),
        # The checkpoint's config beats the defaults
        ("config", {}, {"second_per_window": 0.5, "second_stride": 0.4, "lora_alpha": 16.0, "lora_dropout": 0.05}),
        # Flags beat the checkpoint's config (dropout has no flag: the config's stays)
        (
            "config",
            {"second-per-window": 0.6, "second-stride": 0.2, "lora-alpha": 8, "lora-rank": 8},
            {"second_per_window": 0.6, "second_stride": 0.2, "lora_alpha": 8.0, "lora_dropout": 0.05},
        ),
    ],
)
def test_flag_then_checkpoint_config_then_default(tmp_path, source, flags, expected):
    model_config = {"second_per_window": 0.5, "second_stride": 0.4, "lora_alpha": 16, "lora_dropout": 0.05}
    checkpoint = _checkpoint_with_config(tmp_path, None if source == "none" else model_config)
    output = tmp_path / "out"
    assert convert_main(_args(output, **{"salmonn-checkpoint": checkpoint, **flags})) == 0
    config = json.loads((output / "config.json").read_text())
    assert {key: config[key] for key in expected} == expected
    # The rank always comes from the weights; the Q-Former heads from the flag (the weights cannot tell)
    assert config["lora_rank"] == 8 and config["qformer_config"]["num_attention_heads"] == 4
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(output, trust_remote_code=True)
    assert loaded.window_kernel == round(expected["second_per_window"] * 50)
    assert loaded.window_stride == round(expected["second_stride"] * 50)
