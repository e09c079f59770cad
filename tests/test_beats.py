"""BEATs: parity with the original through the converter, padding, attention backends, training switches, errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import soundfile
import torch
from safetensors.torch import load_file

from salmonn.conversion import convert_beats as convert_beats_module
from salmonn.conversion.beats import ORIGINAL_BEATS_DEFAULTS, load_original_beats
from salmonn.conversion.convert_beats import main as convert_main
from salmonn.conversion.io_utils import atomic_output_dir
from modeling_salmonn import modeling_beats
from modeling_salmonn.configuration_salmonn import BeatsConfig
from modeling_salmonn.modeling_beats import BeatsModel


FIXTURE = Path(__file__).resolve().parent / "fixtures" / "original_tiny_a"
BEATS_PT = FIXTURE / "beats.pt"
CLIPS = ["gunshots", "duck", "music", "synth_short", "synth_long"]
# Patches the original produced for each clip (golden.json `beats_tokens`).
GOLDEN_PATCHES = {"gunshots": 192, "duck": 144, "music": 192, "synth_short": 48, "synth_long": 1496}


def tiny_beats_config(**overrides) -> BeatsConfig:
    values = dict(
        encoder_layers=2,
        encoder_embed_dim=32,
        encoder_ffn_embed_dim=48,
        encoder_attention_heads=4,
        embed_dim=24,
        conv_pos=8,
        conv_pos_groups=4,
        num_buckets=32,
        max_distance=64,
    )
    values.update(overrides)
    return BeatsConfig(**values)


def randomized(model: BeatsModel, seed: int = 0) -> BeatsModel:
    """Random weights large enough that the bias table, the gates and every norm matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("layer_norm.weight", "grep_a")):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("original0"):
                param.copy_(0.5 + noise.abs())
            elif param.dim() == 1:
                param.copy_(0.1 * noise)
            else:
                fan_in = param[0].numel() if name != "encoder.relative_attention_bias.weight" else 1
                param.copy_(noise / fan_in**0.5)
    return model.eval()


def read_clip(name: str):
    data, rate = soundfile.read(str(FIXTURE / "audio" / f"{name}.wav"))  # float64, as the original reads it
    return data, rate


@pytest.fixture(scope="module")
def feature_extractor():
    from modeling_salmonn.feature_extraction_salmonn import SalmonnFeatureExtractor

    return SalmonnFeatureExtractor()


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory) -> Path:
    """The fixture checkpoint converted by the CLI over an earlier output (so `--overwrite` is exercised too)."""
    output = tmp_path_factory.mktemp("beats") / "beats-hf"
    output.mkdir()
    (output / "config.json").write_text("{}")  # an earlier conversion's folder holds its config.json
    (output / "stale.txt").write_text("from an earlier conversion")
    assert convert_main(["--beats", str(BEATS_PT), "--output", str(output), "--overwrite"]) == 0
    assert not (output / "stale.txt").exists() and json.loads((output / "config.json").read_text())["auto_map"]
    return output


@pytest.fixture(scope="module")
def remote_model(converted_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(converted_dir, trust_remote_code=True)
    return model.eval()


# --------------------------------------------------------------------------------------------- parity


def test_converted_folder_layout(converted_dir):
    files = sorted(path.name for path in converted_dir.iterdir())
    assert files == ["config.json", "configuration_salmonn.py", "model.safetensors", "modeling_beats.py"]
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_salmonn.BeatsConfig",
        "AutoModel": "modeling_beats.BeatsModel",
    }
    assert config["model_type"] == "salmonn_beats"
    assert config["max_distance"] == 800 and config["embed_dim"] == 36 and config["encoder_layerdrop"] == 0.05
    keys = set(load_file(str(converted_dir / "model.safetensors")))
    assert "encoder.relative_attention_bias.weight" in keys
    assert "encoder.pos_conv_embed.conv.parametrizations.weight.original0" in keys
    assert not any("predictor" in key or "layers.1.self_attn.relative_attention_bias" in key for key in keys)
    assert keys == set(BeatsModel(BeatsConfig.from_pretrained(converted_dir)).state_dict())


def test_remote_code_is_what_loaded(remote_model):
    assert type(remote_model).__name__ == "BeatsModel"
    assert type(remote_model).__module__.startswith("transformers_modules.")
    assert type(remote_model) is not BeatsModel


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", CLIPS)
def test_parity_with_original_beats_features(converted_dir, feature_extractor, name, attn_implementation):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(converted_dir, trust_remote_code=True, attn_implementation=attn_implementation)
    model.eval()
    assert model.config._attn_implementation == attn_implementation
    audio, rate = read_clip(name)
    inputs = feature_extractor(audio, sampling_rate=rate, truncation=True)  # the original cuts to 30 s
    with torch.no_grad():
        output = model(inputs["input_values"], attention_mask=inputs["input_values_mask"]).last_hidden_state
    golden = load_file(str(FIXTURE / "golden" / f"{name}.safetensors"))["beats_features"]
    assert output.shape == golden.shape == (1, GOLDEN_PATCHES[name], 40)
    # Measured: at most 2.4e-6 (eager) and 4.3e-6 (sdpa) on these clips.
    assert (output - golden).abs().max().item() < 1e-3
    assert (output - golden).abs().max().item() < 2e-5


def test_loads_every_weight(converted_dir):
    model, info = BeatsModel.from_pretrained(converted_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    checkpoint = torch.load(BEATS_PT, weights_only=True)["model"]
    state = model.state_dict()
    assert torch.equal(state["encoder.relative_attention_bias.weight"],
                       checkpoint["encoder.layers.1.self_attn.relative_attention_bias.weight"])
    assert torch.equal(state["encoder.pos_conv_embed.conv.parametrizations.weight.original0"],
                       checkpoint["encoder.pos_conv.0.weight_g"])
    assert torch.equal(state["encoder.pos_conv_embed.conv.parametrizations.weight.original1"],
                       checkpoint["encoder.pos_conv.0.weight_v"])
    # The weight-normed kernel the model uses is g * v / ||v|| (norm over all but the kernel axis).
    g, v = checkpoint["encoder.pos_conv.0.weight_g"], checkpoint["encoder.pos_conv.0.weight_v"]
    expected = g * v / v.norm(dim=(0, 1), keepdim=True)
    torch.testing.assert_close(model.encoder.pos_conv_embed.conv.weight, expected)


# --------------------------------------------------------------------------------------------- padding


def test_patch_attention_mask_is_time_major():
    model = BeatsModel(tiny_beats_config())
    mask = torch.zeros(2, 70, dtype=torch.long)
    mask[0, :70] = 1  # 4 whole 16-frame blocks (6 frames left over)
    mask[1, :40] = 1  # blocks 0 and 1 whole, block 2 partly real -> padding
    patches = model.get_patch_attention_mask(mask)
    assert patches.dtype == torch.long and patches.shape == (2, 4 * 8)
    assert patches[0].tolist() == [1] * 32
    assert patches[1].tolist() == [1] * 16 + [0] * 16


def test_batch_equals_single_on_fixture(remote_model, feature_extractor):
    names = ["gunshots", "synth_short"]
    audios = [read_clip(name)[0] for name in names]
    batch = feature_extractor(audios, sampling_rate=16000, truncation=True)
    patch_mask = remote_model.get_patch_attention_mask(batch["input_values_mask"])
    assert patch_mask.sum(-1).tolist() == [192, 48]
    with torch.no_grad():
        batched = remote_model(batch["input_values"], attention_mask=batch["input_values_mask"]).last_hidden_state
        for row, name in enumerate(names):
            alone = feature_extractor(audios[row], sampling_rate=16000, truncation=True)
            single = remote_model(alone["input_values"]).last_hidden_state[0]
            assert single.shape[0] == patch_mask[row].sum()
            assert (batched[row, : single.shape[0]] - single).abs().max().item() < 1e-5
            golden = load_file(str(FIXTURE / "golden" / f"{name}.safetensors"))["beats_features"][0]
            assert (batched[row, : single.shape[0]] - golden).abs().max().item() < 2e-5
        # Without the mask the short row sees the padding, as in the original batch path.
        unmasked = remote_model(batch["input_values"]).last_hidden_state
    assert (unmasked[1, :48] - batched[1, :48]).abs().max().item() > 1e-2


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"layer_norm_first": True, "deep_norm": False, "gru_rel_pos": False, "embed_dim": 32}],
    ids=["deep_norm_post_ln", "pre_ln_no_gate"],
)
def test_batch_equals_single_random(overrides, attn_implementation):
    config = tiny_beats_config(**overrides)
    config._attn_implementation = attn_implementation
    model = randomized(BeatsModel(config))
    generator = torch.Generator().manual_seed(1)
    lengths = [100, 61, 37]  # 6, 3 and 2 whole blocks; the last two end with a partial block
    fbank = torch.randn(len(lengths), max(lengths), 128, generator=generator)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        fbank[row, length:] = 0.0
    with torch.no_grad():
        batched = model(fbank, attention_mask=mask).last_hidden_state
        assert model.get_patch_attention_mask(mask).sum(-1).tolist() == [48, 24, 16]
        for row, length in enumerate(lengths):
            single = model(fbank[row : row + 1, :length]).last_hidden_state[0]
            assert single.shape == (length // 16 * 8, 32)
            assert (batched[row, : single.shape[0]] - single).abs().max().item() < 1e-5
            assert torch.isfinite(batched[row]).all()


def test_all_real_mask_equals_no_mask():
    model = randomized(BeatsModel(tiny_beats_config()))
    fbank = torch.randn(2, 64, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(fbank).last_hidden_state
        masked = model(fbank, attention_mask=torch.ones(2, 64, dtype=torch.long)).last_hidden_state
    assert torch.equal(plain, masked)


def test_fully_padded_row_stays_finite():
    model = randomized(BeatsModel(tiny_beats_config()))
    fbank = torch.randn(2, 48, 128, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1] = 0
    with torch.no_grad():
        output = model(fbank, attention_mask=mask).last_hidden_state
        alone = model(fbank[:1]).last_hidden_state
    assert torch.isfinite(output).all()
    assert (output[0] - alone[0]).abs().max().item() < 1e-5


# --------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"gru_rel_pos": False},
        {"relative_position_embedding": False},
        {"layer_norm_first": True, "deep_norm": False},
    ],
    ids=["gated_bias", "plain_bias", "no_bias", "pre_ln"],
)
def test_eager_and_sdpa_agree(overrides, padded):
    model = randomized(BeatsModel(tiny_beats_config(**overrides)))
    fbank = torch.randn(2, 80, 128, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 80, dtype=torch.long)
    if padded:
        mask[1, 50:] = 0
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        assert model.encoder.layers[0].self_attn.config._attn_implementation == implementation
        with torch.no_grad():
            outputs[implementation] = model(fbank, attention_mask=mask).last_hidden_state
    valid = model.get_patch_attention_mask(mask).bool()
    assert (outputs["eager"] - outputs["sdpa"])[valid].abs().max().item() < 1e-5


def test_attn_implementation_is_respected(converted_dir, monkeypatch):
    calls = []
    original = modeling_beats.eager_attention_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_beats, "eager_attention_forward", counting)
    fbank = torch.randn(1, 32, 128)
    for implementation, expected_calls in (("sdpa", 0), ("eager", 2)):
        calls.clear()
        model = BeatsModel.from_pretrained(converted_dir, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            model(fbank)
        assert len(calls) == expected_calls
    with pytest.raises(ValueError, match="Flash Attention"):
        BeatsModel.from_pretrained(converted_dir, attn_implementation="flash_attention_2")


def test_relative_position_buckets_match_the_t5_rule():
    offsets = torch.tensor([-1000, -800, -200, -80, -79, -1, 0, 1, 79, 80, 81, 200, 799, 800, 5000])
    buckets = modeling_beats.relative_position_bucket(offsets, num_buckets=320, max_distance=800)
    # Negative offsets use buckets 0..159, positive ones 160..319; |d| < 80 is exact, beyond it
    # 80 + floor(log10(|d| / 80) * 80) capped at 159 (e.g. |d| = 200 -> 80 + floor(31.8) = 111).
    assert buckets.tolist() == [159, 159, 111, 80, 79, 1, 0, 161, 239, 240, 240, 271, 319, 319, 319]


# --------------------------------------------------------------------------------------------- training switches


def test_layerdrop_only_in_training():
    model = randomized(BeatsModel(tiny_beats_config(encoder_layerdrop=1.0)))
    fbank = torch.randn(1, 48, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        evaluated = model(fbank, output_hidden_states=True)
        reference = randomized(BeatsModel(tiny_beats_config(encoder_layerdrop=0.0)))(fbank).last_hidden_state
        model.train()
        trained = model(fbank, output_hidden_states=True)
    assert torch.equal(evaluated.last_hidden_state, reference)
    assert len(evaluated.hidden_states) == 3
    # Every layer dropped: the output is the encoder input (after the positional convolution and layer norm).
    assert torch.equal(trained.last_hidden_state, evaluated.hidden_states[0])


def test_layer_wise_gradient_decay_scales_only_gradients():
    fbank = torch.randn(1, 48, 128, generator=torch.Generator().manual_seed(6))
    grads, outputs = [], []
    for ratio in (1.0, 0.5):
        model = randomized(BeatsModel(tiny_beats_config(layer_wise_gradient_decay_ratio=ratio)))
        model.zero_grad()
        output = model(fbank).last_hidden_state
        output.square().sum().backward()
        outputs.append(output.detach())
        grads.append(model.layer_norm.weight.grad.clone())
    assert torch.equal(outputs[0], outputs[1])
    # Two layers, each scaling the gradient that flows below it by 0.5.
    torch.testing.assert_close(grads[1], grads[0] * 0.25)


def test_gradient_checkpointing_gives_the_same_gradients():
    fbank = torch.randn(2, 48, 128, generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1, 30:] = 0
    grads = []
    for checkpointing in (False, True):
        model = randomized(BeatsModel(tiny_beats_config()))
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.encoder.layers[0].gradient_checkpointing
        model(fbank, attention_mask=mask).last_hidden_state.sum().backward()
        grads.append({name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert "encoder.relative_attention_bias.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_bad_inputs_raise():
    model = BeatsModel(tiny_beats_config())
    with pytest.raises(ValueError, match="input_values"):
        model(torch.zeros(40, 128))
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        model(torch.zeros(1, 10, 128))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 32, 128), attention_mask=torch.ones(1, 31))
    with pytest.raises(ValueError, match="deep_norm"):
        BeatsModel(tiny_beats_config(layer_norm_first=True, deep_norm=True))
    with pytest.raises(ValueError, match="activation_fn"):
        BeatsModel(tiny_beats_config(activation_fn="glu"))


def test_fresh_initialisation():
    model = BeatsModel(tiny_beats_config())
    parametrization = model.encoder.pos_conv_embed.conv.parametrizations.weight
    # Weight norm starts as the identity reparametrisation: g = ||v||, so the kernel equals v.
    torch.testing.assert_close(model.encoder.pos_conv_embed.conv.weight, parametrization.original1)
    assert torch.equal(model.encoder.layers[1].self_attn.grep_a, torch.ones(1, 4, 1, 1))
    assert model.post_extract_proj is not None
    assert BeatsModel(tiny_beats_config(embed_dim=32)).post_extract_proj is None
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 32, 128)).last_hidden_state).all()


def test_return_tuple_and_hidden_states():
    model = BeatsModel(tiny_beats_config())
    fbank = torch.randn(1, 32, 128)
    with torch.no_grad():
        output = model(fbank, return_dict=False, output_hidden_states=True)
    assert isinstance(output, tuple) and output[0].shape == (1, 16, 32) and len(output[1]) == 3


# --------------------------------------------------------------------------------------------- conversion errors


def _fixture_checkpoint() -> dict:
    return torch.load(BEATS_PT, weights_only=True)


def _save(path: Path, checkpoint) -> Path:
    torch.save(checkpoint, path)
    return path


_CODE_RUNS = []


def _record_code_run():
    _CODE_RUNS.append(1)


class _NotAllowed:
    """Any class outside torch's weights-only allow-list makes the pickle need code to load."""

    def __reduce__(self):
        return (_record_code_run, ())


def test_load_original_beats_maps_every_key():
    config, state_dict = load_original_beats(BEATS_PT)
    assert config.encoder_embed_dim == 40 and config.max_distance == 800 and config.deep_norm
    assert set(state_dict) == set(BeatsModel(config).state_dict())
    assert "encoder.pos_conv_embed.conv.parametrizations.weight.original1" in state_dict


def test_cfg_defaults_are_the_original_ones(tmp_path):
    checkpoint = _fixture_checkpoint()
    for key in ("max_distance", "layer_wise_gradient_decay_ratio", "dropout"):
        del checkpoint["cfg"][key]
    config, _ = load_original_beats(_save(tmp_path / "beats.pt", checkpoint))
    assert config.max_distance == ORIGINAL_BEATS_DEFAULTS["max_distance"] == 1280
    assert config.layer_wise_gradient_decay_ratio == 1.0 and config.dropout == 0.1


def test_parametrized_weight_norm_names_are_accepted(tmp_path):
    checkpoint = _fixture_checkpoint()
    weights = checkpoint["model"]
    weights["encoder.pos_conv.0.parametrizations.weight.original0"] = weights.pop("encoder.pos_conv.0.weight_g")
    weights["encoder.pos_conv.0.parametrizations.weight.original1"] = weights.pop("encoder.pos_conv.0.weight_v")
    _, converted = load_original_beats(_save(tmp_path / "beats.pt", checkpoint))
    _, reference = load_original_beats(BEATS_PT)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[key], reference[key]) for key in reference)


def _edit(checkpoint: dict, case: str) -> dict:
    weights = checkpoint["model"]
    if case == "unknown key":
        weights["encoder.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    elif case == "missing key":
        del weights["encoder.layers.1.fc1.bias"]
    elif case == "mismatched shape":
        weights["encoder.layers.0.fc1.weight"] = torch.zeros(71, 40)
    elif case == "missing cfg":
        del checkpoint["cfg"]
    elif case == "unequal shared bias":
        weights["encoder.layers.1.self_attn.relative_attention_bias.weight"] = (
            weights["encoder.layers.1.self_attn.relative_attention_bias.weight"] + 1.0
        )
    elif case == "code in pickle":
        checkpoint["label_dict"] = _NotAllowed()
    elif case == "not a dict":
        return [checkpoint]
    return checkpoint


@pytest.mark.parametrize(
    "case,message",
    [
        ("unknown key", r"unknown keys \['encoder\.layers\.0\.self_attn\.extra\.weight'\]"),
        ("missing key", r"missing keys \['encoder\.layers\.1\.fc1\.bias'\]"),
        ("mismatched shape", r"shapes \[encoder\.layers\.0\.fc1\.weight: checkpoint \(71, 40\), model \(72, 40\)\]"),
        ("missing cfg", r"missing entries \['cfg'\]"),
        ("unequal shared bias", r"'encoder\.layers\.1\.self_attn\.relative_attention_bias\.weight' differs"),
        ("code in pickle", r"needs arbitrary code to unpickle"),
        ("not a dict", r"expected a dict with `cfg` and `model`"),
    ],
)
def test_load_errors_name_file_and_problem(tmp_path, case, message):
    path = _save(tmp_path / "broken_beats.pt", _edit(_fixture_checkpoint(), case))
    with pytest.raises(ValueError, match=message) as error:
        load_original_beats(path)
    assert str(path) in str(error.value)


def test_garbage_file_is_a_value_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_original_beats(path)


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_code_pickle_never_runs(tmp_path, writer):
    path = tmp_path / "evil.pt"
    payload = {"cfg": {}, "model": {}, "x": _NotAllowed()}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    _CODE_RUNS.clear()
    with pytest.raises(ValueError, match="evil.pt"):
        load_original_beats(path)
    assert not _CODE_RUNS


# --------------------------------------------------------------------------------------------- CLI and output


def test_cli_failure_leaves_nothing(tmp_path, capsys):
    broken = _save(tmp_path / "broken_beats.pt", _edit(_fixture_checkpoint(), "missing key"))
    output = tmp_path / "out" / "beats-hf"
    assert convert_main(["--beats", str(broken), "--output", str(output)]) != 0
    stderr = capsys.readouterr().err
    assert "broken_beats.pt" in stderr and "encoder.layers.1.fc1.bias" in stderr
    assert not output.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_failure_during_verification_leaves_nothing(tmp_path, capsys, monkeypatch):
    def failing(folder, model):
        assert (folder / "model.safetensors").is_file()  # written, but not moved into place
        raise RuntimeError(f"the converted folder {folder} failed on purpose")

    monkeypatch.setattr(convert_beats_module, "verify_folder", failing)
    output = tmp_path / "beats-hf"
    assert convert_main(["--beats", str(BEATS_PT), "--output", str(output)]) != 0
    assert "failed on purpose" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_existing_output(converted_dir, capsys):
    before = {path.name: path.read_bytes() for path in converted_dir.iterdir()}
    assert convert_main(["--beats", str(BEATS_PT), "--output", str(converted_dir)]) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in converted_dir.iterdir()} == before
    assert sorted(path.name for path in converted_dir.parent.iterdir()) == ["beats-hf"]


def test_cli_missing_file_and_bad_dtype(tmp_path, capsys):
    assert convert_main(["--beats", str(tmp_path / "nope.pt"), "--output", str(tmp_path / "out")]) != 0
    assert "nope.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--beats", str(BEATS_PT), "--output", str(tmp_path / "out"), "--dtype", "int8"])
    assert exit_info.value.code != 0
    assert not (tmp_path / "out").exists()


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--beats", "--output", "--overwrite", "--dtype"):
        assert flag in text
    assert "bfloat16" in text and "float16" in text


def test_cli_bfloat16(tmp_path):
    output = tmp_path / "beats-bf16"
    assert convert_main(["--beats", str(BEATS_PT), "--output", str(output), "--dtype", "bfloat16"]) == 0
    weights = load_file(str(output / "model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"


def test_atomic_output_dir(tmp_path):
    target = tmp_path / "result"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(target) as work:
            (work / "partial.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    with atomic_output_dir(target) as work:
        assert work.parent == tmp_path and work != target and not target.exists()
        (work / "config.json").write_text("first")
        (work / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"

    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic_output_dir(target):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(target, overwrite=True) as work:
            (work / "b.txt").write_text("second")
            raise RuntimeError("boom")
    assert sorted(path.name for path in target.iterdir()) == ["a.txt", "config.json"]

    with atomic_output_dir(target, overwrite=True) as work:
        (work / "b.txt").write_text("second")
    assert sorted(path.name for path in target.iterdir()) == ["b.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["result"]

    # Without config.json, "result" is no earlier output (as "b.txt" alone shows): refused before anything is written.
    with pytest.raises(FileExistsError) as error:
        with atomic_output_dir(target, overwrite=True):
            raise AssertionError("the block must not run")
    assert str(error.value) == (
        f"Output folder {target} holds b.txt but no config.json, so it is not an earlier output of this command and "
        "--overwrite does not replace it; remove it or choose another folder"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["result"]
    assert (target / "b.txt").read_text() == "second"
    target.joinpath("b.txt").unlink()
    with atomic_output_dir(target, overwrite=True) as work:  # an empty folder holds nothing to lose
        (work / "c.txt").write_text("third")
    assert sorted(path.name for path in target.iterdir()) == ["c.txt"]

    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="not a folder"):
        with atomic_output_dir(tmp_path / "file", overwrite=True):
            pass


@pytest.mark.parametrize("gru_rel_pos", [True, False])
def test_attention_bias_is_the_gated_position_bias_plus_key_padding_exactly(gru_rel_pos):
    # The bias is built in one pass (addcmul) over a contiguous position bias; it must equal the plain formula
    # bit for bit, with and without padded keys, whatever the layout of the position bias.
    config = BeatsConfig(encoder_embed_dim=64, encoder_attention_heads=4, gru_rel_pos=gru_rel_pos)
    attention = modeling_beats.BeatsAttention(config).eval()
    torch.manual_seed(0)
    query = torch.randn(2, 4, 9, 16)
    position_bias = torch.randn(9, 9, 4).permute(2, 0, 1)  # strided, as an embedding lookup gives it
    padding = torch.tensor([[False] * 9, [False] * 6 + [True] * 3])
    key_padding_bias = torch.zeros(2, 9).masked_fill(padding, float("-inf"))[:, None, None, :]
    if gru_rel_pos:
        gates = attention.grep_linear(query).view(2, 4, 9, 2, 4).sum(-1)
        gate_a, gate_b = torch.sigmoid(gates).chunk(2, dim=-1)
        expected = (gate_a * (gate_b * attention.grep_a - 1.0) + 2.0) * position_bias.unsqueeze(0)
    else:
        expected = position_bias.unsqueeze(0).expand(2, -1, -1, -1)
    with torch.no_grad():
        assert torch.equal(attention._attention_bias(query, position_bias, None).expand(2, -1, -1, -1), expected)
        assert torch.equal(attention._attention_bias(query, position_bias.contiguous(), key_padding_bias), expected + key_padding_bias)
        assert torch.equal(attention._attention_bias(query, None, key_padding_bias), key_padding_bias)
