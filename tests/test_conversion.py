"""salmonn-convert: outputs, options, bad input, and a dry run on the exact 13B / 7B key layout."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from salmonn.conversion.convert_salmonn import main as convert_main
from tests.utils import FIXTURE_A


def _args(output, **overrides):
    values = {
        "salmonn-checkpoint": FIXTURE_A / "salmonn.pth",
        "whisper": FIXTURE_A / "whisper",
        "beats": FIXTURE_A / "beats.pt",
        "llm": FIXTURE_A / "llm",
        "output": output,
        "qformer-num-attention-heads": 4,
        "verify": "structure",
    }
    values.update(overrides)
    argv = []
    for key, value in values.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def _logits(folder, lora_scaling=None):
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    t = np.arange(16000 * 2) / 16000
    inputs = processor(text=processor.format_prompt("Describe."), audio=0.3 * np.sin(2 * np.pi * 300 * t), sampling_rate=16000)
    with torch.no_grad():
        return model(**inputs).logits


def test_output_folder_contents_and_card(tmp_path):
    out = tmp_path / "out"
    assert convert_main(_args(out, verify="full")) == 0
    names = _leftovers(out)
    for required in ("config.json", "generation_config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md", "chat_template.jinja", "modeling_salmonn.py"):
        assert required in names
    assert _leftovers(tmp_path) == ["out"]  # no temporary folder left behind
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    metadata = card.data.to_dict()
    # The LLM's path names v1.1 (LLaMA 1 terms); local paths are never guessed into Hub base models.
    assert metadata["license"] == "other" and metadata["license_name"] == "llama-license"
    assert metadata["license_link"] == "https://huggingface.co/lmsys/vicuna-13b-v1.1"
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "audio-text-to-text"
    assert {"custom_code", "salmonn"} <= set(metadata["tags"]) and "base_model" not in metadata
    assert "set_lora_scaling" in card.text and "Citation" in card.text and "converted from the original release" in card.text
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["num_beams"] == 4 and generation["max_new_tokens"] == 200 and generation["eos_token_id"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["audio_token_index"] == 501 and config["text_config"]["vocab_size"] == 501


def test_shards_dtype_and_merged_lora(tmp_path):
    reference = tmp_path / "ref"
    assert convert_main(_args(reference)) == 0
    sharded = tmp_path / "sharded"
    assert convert_main(_args(sharded, **{"max-shard-size": "200KB"})) == 0
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    torch.testing.assert_close(_logits(sharded), _logits(reference), atol=0, rtol=0)

    half = tmp_path / "half"
    assert convert_main(_args(half, dtype="bfloat16")) == 0
    from safetensors import safe_open

    with safe_open(str(half / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("lm_head.weight").dtype == torch.bfloat16

    merged = tmp_path / "merged"
    assert convert_main(_args(merged, **{"merge-lora": True})) == 0
    assert json.loads((merged / "config.json").read_text())["lora_rank"] == 0
    torch.testing.assert_close(_logits(merged), _logits(reference), atol=1e-4, rtol=0)


def test_existing_output_is_refused_and_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier conversion's folder holds its config.json
    (out / "stale.txt").write_text("x")
    assert convert_main(_args(out)) == 1
    assert _leftovers(out) == ["config.json", "stale.txt"]
    assert convert_main(_args(out, overwrite=True)) == 0
    assert "stale.txt" not in _leftovers(out) and "auto_map" in json.loads((out / "config.json").read_text())


def _modified_checkpoint(tmp_path, edit):
    checkpoint = torch.load(FIXTURE_A / "salmonn.pth", weights_only=True)
    edit(checkpoint)
    path = tmp_path / "edited.pth"
    torch.save(checkpoint, path)
    return path


class _NeedsCode:
    pass


@pytest.mark.parametrize(
    "case,message",
    [
        ("not_salmonn", "is not a SALMONN checkpoint"),
        ("pickle_code", "needs code execution"),
        ("missing_key", "missing tensor for model.speech_llama_proj.weight"),
        ("extra_key", "not part of SALMONN"),
        ("wrong_beats", "differs from"),
        ("beats_cfg", "beats.pt: checkpoint does not match the BEATs model of its `cfg`: mismatched shapes [encoder.layer_norm.bias: checkpoint (40,), model (48,)"),
        ("llm_hidden", "speech_llama_proj.weight has shape"),
        ("unreadable", "no such folder"),
        ("lora_rank_flag", "--lora-rank 4 disagrees"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_nothing(tmp_path, caplog, case, message):
    out = tmp_path / "out"
    overrides = {}
    if case == "not_salmonn":
        overrides["salmonn-checkpoint"] = FIXTURE_A / "beats.pt"
    elif case == "pickle_code":
        path = tmp_path / "evil.pth"
        torch.save({"model": _NeedsCode()}, path)
        overrides["salmonn-checkpoint"] = path
    elif case == "missing_key":
        overrides["salmonn-checkpoint"] = _modified_checkpoint(tmp_path, lambda c: c["model"].pop("speech_llama_proj.weight"))
    elif case == "extra_key":
        overrides["salmonn-checkpoint"] = _modified_checkpoint(tmp_path, lambda c: c["model"].__setitem__("decoder.extra.weight", torch.zeros(2)))
    elif case == "wrong_beats":
        def edit(c):
            key = "beats.encoder.layers.1.self_attn.relative_attention_bias.weight"
            c["model"][key] = c["model"][key] + 1.0
        overrides["salmonn-checkpoint"] = _modified_checkpoint(tmp_path, edit)
    elif case == "beats_cfg":
        beats = torch.load(FIXTURE_A / "beats.pt", weights_only=True)
        beats["cfg"]["encoder_embed_dim"] = 48
        path = tmp_path / "beats.pt"
        torch.save(beats, path)
        overrides["beats"] = path
    elif case == "llm_hidden":
        llm = tmp_path / "llm"
        shutil.copytree(FIXTURE_A / "llm", llm)
        config = json.loads((llm / "config.json").read_text())
        config.update(hidden_size=32, intermediate_size=64)
        (llm / "config.json").write_text(json.dumps(config))
        overrides["llm"] = llm
    elif case == "unreadable":
        overrides["whisper"] = tmp_path / "no-such-whisper"
    elif case == "lora_rank_flag":
        overrides["lora-rank"] = 4
    with caplog.at_level(logging.ERROR):
        assert convert_main(_args(out, **overrides)) == 1
    assert message in caplog.text
    assert _leftovers(tmp_path) == sorted(p.name for p in tmp_path.iterdir() if p.name != "out") and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    import salmonn.conversion.convert_salmonn as convert

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "verify_folder", explode)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_main(_args(out))
    assert list(tmp_path.iterdir()) == []


# -- full-size dry run: the exact key layout and shapes of the release, on the meta device ----------------------


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _write_meta_release(root, hidden, layers, heads, intermediate):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, WhisperConfig, WhisperForConditionalGeneration

    from modeling_salmonn import BeatsConfig, BeatsModel

    # salmonn.pth, exactly as the original runner saves it (section 5.2 of the reference)
    q, w = "speech_Qformer.bert.", 768
    model = {"speech_query_tokens": _meta(1, 1, w), q + "embeddings.position_ids": _meta(1, 512, dtype=torch.int64)}
    model.update({q + "embeddings.LayerNorm.weight": _meta(w), q + "embeddings.LayerNorm.bias": _meta(w)})
    for i in range(2):
        p = f"{q}encoder.layer.{i}."
        for part, width in (("attention", w), ("crossattention", 2048)):
            for proj in ("query", "key", "value"):
                model[f"{p}{part}.self.{proj}.weight"] = _meta(w, w if proj == "query" else width)
                model[f"{p}{part}.self.{proj}.bias"] = _meta(w)
            model[f"{p}{part}.output.dense.weight"], model[f"{p}{part}.output.dense.bias"] = _meta(w, w), _meta(w)
            model[f"{p}{part}.output.LayerNorm.weight"], model[f"{p}{part}.output.LayerNorm.bias"] = _meta(w), _meta(w)
        model[f"{p}intermediate_query.dense.weight"], model[f"{p}intermediate_query.dense.bias"] = _meta(3072, w), _meta(3072)
        model[f"{p}output_query.dense.weight"], model[f"{p}output_query.dense.bias"] = _meta(w, 3072), _meta(w)
        model[f"{p}output_query.LayerNorm.weight"], model[f"{p}output_query.LayerNorm.bias"] = _meta(w), _meta(w)
    model.update({"speech_llama_proj.weight": _meta(hidden, w), "speech_llama_proj.bias": _meta(hidden)})
    model.update({"ln_speech.weight": _meta(1280), "ln_speech.bias": _meta(1280), "ln_audio.weight": _meta(w), "ln_audio.bias": _meta(w)})
    for i in range(layers):
        p = f"llama_model.base_model.model.model.layers.{i}.self_attn."
        for proj in ("q_proj", "v_proj"):
            model[f"{p}{proj}.lora_A.default.weight"] = _meta(8, hidden)
            model[f"{p}{proj}.lora_B.default.weight"] = _meta(hidden, 8)
        model[f"{p}rotary_emb.inv_freq"] = _meta(hidden // heads // 2)
    for i in range(1, 12):
        model[f"beats.encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = _meta(320, 12)
    torch.save({"model": model, "optimizer": {}, "config": {"model": {"lora_alpha": 32}}, "scaler": None, "epoch": 0}, root / "salmonn.pth")

    # Whisper large-v2 (the Hub folder holds WhisperForConditionalGeneration with keys model.*)
    whisper_dir = root / "whisper"
    whisper_config = WhisperConfig(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                                   decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120, num_mel_bins=80, vocab_size=51865)
    whisper_config.save_pretrained(whisper_dir)
    with torch.device("meta"):
        whisper = WhisperForConditionalGeneration(whisper_config)
    torch.save({k: v for k, v in whisper.state_dict().items() if not k.startswith("proj_out")}, whisper_dir / "pytorch_model.bin")

    # BEATs iter3+ AS2M fine-tuned, in the original format: weight-norm g/v names, the shared table once per layer
    cfg = dict(BeatsConfig().to_dict())
    cfg = {k: cfg[k] for k in ("input_patch_size", "embed_dim", "conv_bias", "encoder_layers", "encoder_embed_dim",
                               "encoder_ffn_embed_dim", "encoder_attention_heads", "activation_fn", "deep_norm",
                               "conv_pos", "conv_pos_groups", "relative_position_embedding", "num_buckets",
                               "max_distance", "gru_rel_pos", "layer_norm_first", "finetuned_model", "predictor_class")}
    with torch.device("meta"):
        beats = BeatsModel(BeatsConfig(**cfg)).state_dict()
    original = {}
    for key, tensor in beats.items():
        key = key.replace("encoder.pos_conv_embed.conv.parametrizations.weight.original0", "encoder.pos_conv.0.weight_g")
        key = key.replace("encoder.pos_conv_embed.conv.parametrizations.weight.original1", "encoder.pos_conv.0.weight_v")
        key = key.replace("encoder.pos_conv_embed.conv.bias", "encoder.pos_conv.0.bias")
        if key == "encoder.relative_attention_bias.weight":
            for i in range(12):
                original[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = tensor
            continue
        original[key] = tensor
    original.update({"predictor.weight": _meta(527, 768), "predictor.bias": _meta(527)})
    torch.save({"cfg": cfg, "model": original, "label_dict": {}}, root / "beats.pt")

    # Vicuna: LlamaForCausalLM in three .bin shards with the 4.28 inv_freq buffers, and a 32000-token tokenizer
    llm_dir = root / "llm"
    llm_config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=heads, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    llm_config.save_pretrained(llm_dir)
    with torch.device("meta"):
        state = LlamaForCausalLM(llm_config).state_dict()
    for i in range(layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = _meta(hidden // heads // 2)
    keys = list(state)
    shards = [keys[: len(keys) // 3], keys[len(keys) // 3 : 2 * len(keys) // 3], keys[2 * len(keys) // 3 :]]
    weight_map = {}
    for n, shard_keys in enumerate(shards):
        name = f"pytorch_model-{n + 1:05d}-of-00003.bin"
        torch.save({k: state[k] for k in shard_keys}, llm_dir / name)
        weight_map.update({k: name for k in shard_keys})
    (llm_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"piece{i}": i for i in range(3, 32000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(llm_dir)


@pytest.mark.parametrize("size,hidden,layers,heads,intermediate", [("13B", 5120, 40, 40, 13824), ("7B", 4096, 32, 32, 11008)])
def test_full_size_dry_run_maps_every_release_key(tmp_path, caplog, size, hidden, layers, heads, intermediate):
    _write_meta_release(tmp_path, hidden, layers, heads, intermediate)
    argv = [
        "--salmonn-checkpoint", str(tmp_path / "salmonn.pth"), "--whisper", str(tmp_path / "whisper"),
        "--beats", str(tmp_path / "beats.pt"), "--llm", str(tmp_path / "llm"), "--output", str(tmp_path / "out"),
        "--dry-run", "--dtype", "float16",
    ]
    with caplog.at_level(logging.INFO):
        assert convert_main(argv) == 0
    assert not (tmp_path / "out").exists()
    text = caplog.text
    assert f"Q-Former 768 x 2 layers (12 heads), LLM hidden {hidden} x {layers} layers, vocab 32001" in text
    assert "windows 17/17 frames -> 88 audio tokens per 30 s, LoRA rank 8 alpha 32" in text
    assert f"Dropped {layers} tensor(s)" in text and "Dropped 11 tensor(s)" in text
    assert "map onto the SALMONN model" in text


def test_push_to_hub_uploads_the_finished_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, private))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "out"
    assert convert_main(_args(out, **{"push-to-hub": "someone/salmonn-tiny", "private": True})) == 0
    assert calls[0] == ("create_repo", "someone/salmonn-tiny", True)
    assert calls[1][0] == "upload_folder" and "config.json" in calls[1][2] and "README.md" in calls[1][2]
