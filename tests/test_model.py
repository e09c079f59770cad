"""The composite model: windowing, placeholders, LoRA, trainable sizes, remote-code round trips, bad input."""

from __future__ import annotations

import ast
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from modeling_salmonn import SalmonnConfig, SalmonnForConditionalGeneration
from salmonn.training.trainable import freeze_for_training
from tests.utils import FIXTURE_A, fixture_golden, randomize_lora, run_fresh_python, save_tiny_checkpoint


def tone(seconds: float, freq: float = 440.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return 0.3 * np.sin(2 * np.pi * freq * t)


@pytest.mark.parametrize("seconds", [0.5, 1.0, 4.0, 30.0])
def test_default_windows_give_88_audio_tokens(tiny, seconds):
    model, processor = tiny
    inputs = processor(text=processor.format_prompt("Describe."), audio=tone(seconds), sampling_rate=16000)
    assert int((inputs["input_ids"] == model.config.audio_token_index).sum()) == 88
    audio_inputs = {k: inputs[k] for k in ("input_features", "input_values", "input_values_mask")}
    with torch.no_grad():
        features = model.get_audio_features(**audio_inputs).pooler_output
    assert features.shape == (1, 88, model.config.text_config.hidden_size)


@pytest.mark.parametrize(
    "second_per_window,second_stride",
    [(0.5, 0.333333), (1.0, 1.0), (0.2, 0.1), (0.333333, 0.333333)],
)
def test_window_count_and_contents_follow_unfold(second_per_window, second_stride):
    from tests.utils import tiny_model_and_processor

    model, processor = tiny_model_and_processor(second_per_window=second_per_window, second_stride=second_stride)
    kernel = round(1500 * second_per_window / 30)
    stride = round(1500 * second_stride / 30)
    expected_windows = (1500 - kernel) // stride + 1
    assert model.config.num_windows == expected_windows

    captured = {}

    def grab(module, args, kwargs):
        captured["windows"] = kwargs["encoder_hidden_states"]

    handle = model.model.speech_qformer.register_forward_pre_hook(grab, with_kwargs=True)
    inputs = processor(text=processor.format_prompt("Describe."), audio=tone(2.0), sampling_rate=16000)
    audio_inputs = {k: inputs[k] for k in ("input_features", "input_values", "input_values_mask")}
    with torch.no_grad():
        features = model.get_audio_features(**audio_inputs).pooler_output
        # The original's windows: F.unfold over [B, C, 1, T] then view/permute, written out independently here.
        m = model.model
        speech = m.ln_speech(m.speech_encoder(audio_inputs["input_features"]).last_hidden_state)
        beats = m.ln_audio(m.beats(audio_inputs["input_values"]).last_hidden_state)
        beats = torch.nn.functional.pad(beats, (0, 0, 0, speech.shape[1] - beats.shape[1]))
        x = torch.cat([speech, beats], dim=-1)
        b, t, c = x.shape
        u = torch.nn.functional.unfold(x.transpose(1, 2).unsqueeze(2), kernel_size=(1, kernel), stride=(1, stride))
        windows = u.view(b, c, kernel, -1).permute(0, 3, 2, 1).reshape(-1, kernel, c)
    handle.remove()
    assert features.shape[1] == expected_windows
    torch.testing.assert_close(captured["windows"], windows, atol=1e-6, rtol=0)


def test_prompt_tokenization_matches_original_golden_ids():
    from transformers import AutoTokenizer

    from modeling_salmonn.processing_salmonn import add_salmonn_tokens
    from modeling_salmonn import SalmonnFeatureExtractor, SalmonnProcessor

    golden = fixture_golden()
    tokenizer = add_salmonn_tokens(AutoTokenizer.from_pretrained(FIXTURE_A / "llm"))
    assert tokenizer.pad_token_id == golden["pad_id"] == 500
    processor = SalmonnProcessor(SalmonnFeatureExtractor(), tokenizer)
    assert processor.format_prompt("Please describe the audio in detail.") == golden["prompt"]
    inputs = processor(text=golden["prompt"], audio=np.zeros(16000), sampling_rate=16000, text_target=golden["target_text"])
    ids = inputs["input_ids"][0].tolist()
    before, after = golden["prompt_before_ids"], golden["prompt_after_ids"]
    audio_id = processor.audio_token_id
    assert ids[0] == golden["bos_id"]
    assert ids[1 : 1 + len(before)] == before
    assert ids[1 + len(before) : 1 + len(before) + 88] == [audio_id] * 88
    prompt_len = 1 + len(before) + 88 + len(after)
    assert prompt_len == golden["inputs"]["gunshots"]["prompt_len"]
    assert ids[1 + len(before) + 88 : prompt_len] == after
    assert ids[prompt_len:] == golden["target_ids"]
    labels = inputs["labels"][0].tolist()
    assert labels == [-100] * prompt_len + golden["target_ids"]


def test_labels_mask_prompt_audio_and_padding(tiny):
    model, processor = tiny
    prompts = [processor.format_prompt("Describe."), processor.format_prompt("What is it?")]
    inputs = processor(text=prompts, audio=[tone(1.0), tone(2.0)], sampling_rate=16000, text_target=["A tone.", "A long answer here."])
    labels, ids, mask = inputs["labels"], inputs["input_ids"], inputs["attention_mask"]
    assert (labels[ids == model.config.audio_token_index] == -100).all()
    assert (labels[mask == 0] == -100).all()
    eos = processor.tokenizer.eos_token_id
    for row in range(2):
        answer = labels[row][labels[row] != -100].tolist()
        assert answer[-1] == eos
        assert answer == processor.tokenizer(["A tone.", "A long answer here."][row] + "</s>", add_special_tokens=False)["input_ids"]
    # right padding for training: the real tokens come first
    assert mask[:, 0].all()
    out = model(**inputs)
    assert torch.isfinite(out.loss)


def test_paper_sizes_trainable_parameters():
    whisper_large_v2 = dict(model_type="whisper", d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=80)
    for hidden, layers, heads, inter, expected in [(5120, 40, 40, 13824, 33.3e6), (4096, 32, 32, 11008, 30.2e6)]:
        config = SalmonnConfig(
            whisper_config=whisper_large_v2,
            text_config=dict(model_type="llama", vocab_size=32001, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter),
            qformer_config=dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=2),
        )
        assert config.qformer_config.encoder_hidden_size == 2048
        with torch.device("meta"):
            model = SalmonnForConditionalGeneration(config)
        trainable = freeze_for_training(model)
        total = sum(p.numel() for p in model.parameters())
        assert abs(trainable - expected) / expected < 0.01, (layers, trainable)
        # the paper's 0.24% of the whole model, for 13B
        if layers == 40:
            assert 0.0020 < trainable / total < 0.0028


def test_lora_only_in_language_model(tiny):
    model, _ = tiny
    lora_names = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert lora_names and all(n.startswith("model.language_model.") for n in lora_names)
    assert len(lora_names) == 2 * model.config.text_config.num_hidden_layers


def test_train_mode_keeps_frozen_encoders_in_eval():
    from tests.utils import tiny_model_and_processor

    model, _ = tiny_model_and_processor()
    model.train()
    assert not model.model.speech_encoder.training and not model.model.beats.training
    assert model.model.speech_qformer.training and model.model.language_model.training
    model.eval()
    assert not model.model.speech_qformer.training


def test_fresh_lora_is_identity_and_scaling_changes_output(tiny):
    from tests.utils import tiny_model_and_processor

    model, processor = tiny_model_and_processor()
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert all(float(p.detach().abs().max()) == 0.0 for p in lora_b)
    randomize_lora(model)
    inputs = processor(text=processor.format_prompt("Describe."), audio=tone(1.0), sampling_rate=16000)
    with torch.no_grad():
        full = model(**inputs).logits
        assert model.lora_scaling == 4.0
        assert model.set_lora_scaling(2.0) == 4.0
        assert model.lora_scaling == 2.0
        half = model(**inputs).logits
        model.set_lora_scaling(0.0)
        none = model(**inputs).logits
        model.set_lora_scaling(4.0)
        again = model(**inputs).logits
    assert (full - half).abs().max() > 1e-3
    torch.testing.assert_close(full, again)
    # LoRA is linear in its scaling up to the nonlinearities: at least the three differ
    assert (half - none).abs().max() > 1e-3
    with pytest.raises(ValueError, match="set_lora_scaling"):
        model.set_lora_scaling(float("nan"))


def test_placeholder_count_mismatch_is_an_error(tiny):
    model, processor = tiny
    inputs = processor(text=processor.format_prompt("Describe."), audio=tone(1.0), sampling_rate=16000)
    ids = inputs["input_ids"].clone()
    ids[0, -1] = model.config.audio_token_index
    with pytest.raises(ValueError, match="audio placeholder"):
        model(**{**inputs, "input_ids": ids})


def test_bad_processor_input(tiny):
    _, processor = tiny
    prompt = processor.format_prompt("Describe.")
    with pytest.raises(ValueError, match="no <SpeechHere> marker"):
        processor(text="USER: hello\nASSISTANT:", audio=tone(1.0), sampling_rate=16000)
    with pytest.raises(ValueError, match="2 <SpeechHere> markers but 1 audios"):
        processor(text=prompt + prompt, audio=tone(1.0), sampling_rate=16000)
    with pytest.raises(ValueError, match="1 <SpeechHere> markers but 0 audios"):
        processor(text=prompt)
    with pytest.raises(ValueError, match="empty"):
        processor(text=prompt, audio=np.zeros(0), sampling_rate=16000)
    with pytest.raises(ValueError, match="NaN|finite"):
        processor(text=prompt, audio=np.full(16000, np.nan), sampling_rate=16000)
    with pytest.raises(ValueError, match="3-D|dimension"):
        processor(text=prompt, audio=np.zeros((2, 16000, 1)), sampling_rate=16000)
    with pytest.raises(ValueError, match="audio file '/nonexistent/clip.wav' does not exist"):
        processor(text=prompt, audio="/nonexistent/clip.wav")


def _assert_flat_remote_code(folder):
    py_files = sorted(p.name for p in folder.glob("*.py"))
    assert py_files == sorted(
        ["configuration_salmonn.py", "modeling_beats.py", "modeling_salmonn.py", "feature_extraction_salmonn.py", "processing_salmonn.py",
         "integrations_salmonn.py", "modelcard_salmonn.py", "generation_salmonn.py"]
    )
    assert not [p for p in folder.iterdir() if p.is_dir()]
    allowed = {"torch", "transformers", "peft", "numpy", *sys.stdlib_module_names}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # top-level imports only; optional ones live inside functions or try blocks
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed} at top level"


def test_round_trip_fresh_process_folder_and_repo_id(tmp_path):
    from tests.utils import tiny_model_and_processor

    # The model before saving is the reference: a load must give its logits, not merely those of another load.
    before, processor = tiny_model_and_processor(seed=0)
    randomize_lora(before, 0)
    before.eval()
    t = np.arange(16000 * 2) / 16000
    inputs = processor(text=processor.format_prompt("Describe the audio."), audio=0.3 * np.sin(2 * np.pi * 500 * t), sampling_rate=16000)
    with torch.no_grad():
        here = before(**inputs).logits
    folder = tmp_path / "salmonn-tiny"
    before.save_pretrained(folder)
    processor.save_pretrained(folder)
    _assert_flat_remote_code(folder)
    config = json.loads((folder / "config.json").read_text())
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoProcessor", "AutoFeatureExtractor"}

    # The same folder in a Hugging Face cache layout, loaded by repo id.
    hf_home = tmp_path / "hf"
    snapshot = hf_home / "hub" / "models--someone--salmonn-tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(folder, snapshot)
    (hf_home / "hub" / "models--someone--salmonn-tiny" / "refs").mkdir(parents=True)
    (hf_home / "hub" / "models--someone--salmonn-tiny" / "refs" / "main").write_text("a" * 40)

    code = """
        import sys, numpy as np, torch
        from transformers import AutoModel, AutoProcessor
        out = []
        for source in sys.argv[1:] or [{folder!r}, "someone/salmonn-tiny"]:
            model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            t = np.arange(16000 * 2) / 16000
            inputs = processor(text=processor.format_prompt("Describe the audio."), audio=0.3 * np.sin(2 * np.pi * 500 * t), sampling_rate=16000)
            with torch.no_grad():
                logits = model(**inputs).logits
            torch.save(logits, {out!r} + "/" + str(len(out)) + ".pt")
            out.append(source)
        print("OK", len(out))
    """.format(folder=str(folder), out=str(tmp_path))
    stdout = run_fresh_python(code, env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert "OK 2" in stdout

    for i in range(2):
        assert torch.equal(torch.load(tmp_path / f"{i}.pt", weights_only=True), here)


def test_attention_implementations_and_half_precision_load(tmp_path):
    from transformers import AutoModel, AutoProcessor

    folder = save_tiny_checkpoint(tmp_path / "tiny")
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(text=processor.format_prompt("Describe."), audio=tone(1.5), sampling_rate=16000)
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation=implementation).eval()
        with torch.no_grad():
            logits[implementation] = model(**inputs).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-4, rtol=0)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16, device_map="auto").eval()
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        half = model(**inputs).logits.float()
    # Relative L2 of the bf16 logits: 0.87% on this model (the logits span about +-0.6, so an absolute bound says little).
    assert float((half - logits["sdpa"]).norm() / logits["sdpa"].norm()) < 0.02
