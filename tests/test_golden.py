"""
The golden tensors of fixture A that the parity tests do not reach: the Q-Former output, the prompt embeddings, the
padded training batch, the converter's `[PAD]` row and the fixture's component sizes.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from salmonn.conversion.convert_salmonn import main as convert_main
from salmonn.training.collator import SalmonnDataCollator
from salmonn.training.data import SalmonnTrainDataset, load_manifest
from salmonn.training.prompts import PromptPool
from tests.utils import FIXTURE_A, fixture_a_convert_args, fixture_golden, read_wav


GOLDEN = fixture_golden()
INPUTS = sorted(GOLDEN["inputs"])
AUDIO_KEYS = ("input_features", "input_values", "input_values_mask")
PROMPT_BEFORE = 1 + len(GOLDEN["prompt_before_ids"])  # bos + the prompt ids before the audio embeddings


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    output = tmp_path_factory.mktemp("golden") / "salmonn-tiny-a"
    code = convert_main(fixture_a_convert_args(output))
    assert code == 0
    return output


def _load(directory):
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(directory, trust_remote_code=True).eval()
    return model, AutoProcessor.from_pretrained(directory, trust_remote_code=True)


@pytest.fixture(scope="module")
def converted(converted_dir):
    """The converted model with the `[PAD]` rows the original drew at random (so that logit column 500 matches)."""
    model, processor = _load(converted_dir)
    pad_rows = load_file(FIXTURE_A / "golden" / "llm_pad_rows.safetensors")
    with torch.no_grad():
        model.get_input_embeddings().weight[GOLDEN["pad_id"]] = pad_rows["embed_tokens_rows"][0]
        model.lm_head.weight[GOLDEN["pad_id"]] = pad_rows["lm_head_rows"][0]
    return model, processor


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def _capture(model, inputs) -> dict[str, torch.Tensor]:
    """Runs a forward pass and keeps the Q-Former output and the embeddings the language model receives."""
    seen = {}

    def keep_qformer(module, args, output):
        seen["qformer_out"] = output.last_hidden_state

    def keep_embeds(module, args, kwargs):
        seen["inputs_embeds"] = kwargs["inputs_embeds"]

    hooks = [
        model.model.speech_qformer.register_forward_hook(keep_qformer),
        model.model.language_model.register_forward_pre_hook(keep_embeds, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            seen["logits"] = model(**inputs).logits
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("name", INPUTS)
def test_qformer_output_and_prompt_embeddings_match_original(converted, name):
    model, processor = converted
    gold = load_file(FIXTURE_A / "golden" / f"{name}.safetensors")
    wav, rate = read_wav(FIXTURE_A / GOLDEN["inputs"][name]["wav"])
    inputs = processor(text=GOLDEN["prompt"], audio=wav, sampling_rate=rate, truncation=True)
    inputs["input_features"] = gold["spectrogram"]
    seen = _capture(model, inputs)
    # One query token per window: the original's [windows, 1, hidden] is the port's [windows, num_query_tokens, hidden].
    assert _max_diff(seen["qformer_out"], gold["qformer_out"]) < 1e-4
    assert _max_diff(seen["inputs_embeds"], gold["prompt_inputs_embeds"]) < 1e-4
    # The text rows are plain embedding lookups: equal, not close.
    text_rows = torch.ones(gold["prompt_inputs_embeds"].shape[1], dtype=torch.bool)
    text_rows[PROMPT_BEFORE : PROMPT_BEFORE + model.config.num_windows] = False
    assert torch.equal(seen["inputs_embeds"][0, text_rows], gold["prompt_inputs_embeds"][0, text_rows])


def test_padded_training_batch_matches_original(converted):
    """
    The original's collater batch of `annotations.json` (gunshots 4 s, synth_short 1 s), built here by the training
    data path. Labels and attention mask are compared whole. Row 0 (the longer clip) is compared whole. Row 1 is
    not: the original lets BEATs see the padding of the shorter clip (README of the fixture), which changes its audio
    embeddings and every logit from the audio on; the port encodes it as if alone. What row 1 shares with the
    original is its text: the embeddings outside the audio rows and the logits before the audio. The batch loss mixes
    both rows, so it is not comparable either (the single-clip losses are checked in test_parity.py).
    """
    model, processor = converted
    gold = load_file(FIXTURE_A / "golden" / "batch.safetensors")
    items = load_manifest(FIXTURE_A / "annotations.json")
    dataset = SalmonnTrainDataset(items, PromptPool(prompt_file=FIXTURE_A / "prompts.json"))
    batch = SalmonnDataCollator(processor)([dataset[0], dataset[1]])
    assert batch["ids"] == [str(FIXTURE_A / path) for path in GOLDEN["batch"]["ids"]]
    assert torch.equal(batch["labels"], gold["forward_labels"])
    assert torch.equal(batch["attention_mask"], gold["forward_attention_mask"])
    for row, name in enumerate(("gunshots", "synth_short")):
        # The batch's spectrograms are the single clips' ones (README: equal); use the original's log-mel.
        spectrogram = load_file(FIXTURE_A / "golden" / f"{name}.safetensors")["spectrogram"]
        batch["input_features"][row] = spectrogram[0]
    inputs = {k: v for k, v in batch.items() if k not in ("ids", "labels")}
    seen = _capture(model, inputs)

    assert _max_diff(seen["logits"][0], gold["forward_logits"][0]) < 1e-4
    prompt_len = gold["prompt_inputs_embeds"].shape[1]
    assert _max_diff(seen["inputs_embeds"][0, :prompt_len], gold["prompt_inputs_embeds"][0]) < 1e-4
    audio = slice(PROMPT_BEFORE, PROMPT_BEFORE + model.config.num_windows)
    assert torch.equal(seen["inputs_embeds"][1, : audio.start], gold["prompt_inputs_embeds"][1, : audio.start])
    assert torch.equal(seen["inputs_embeds"][1, audio.stop : prompt_len], gold["prompt_inputs_embeds"][1, audio.stop :])
    assert _max_diff(seen["logits"][1, : audio.start], gold["forward_logits"][1, : audio.start]) < 1e-4
    # And the quirk is real: from the audio on, the original's row 1 is far from the port's.
    assert _max_diff(seen["inputs_embeds"][1, audio], gold["prompt_inputs_embeds"][1, audio]) > 0.1


def test_converter_pad_row_is_the_mean_row(converted_dir):
    """The original draws `[PAD]` at random on every load; the converter writes the mean of the LLM's rows."""
    model, _ = _load(converted_dir)
    llm = torch.load(FIXTURE_A / "llm" / "pytorch_model.bin", weights_only=True, map_location="cpu")
    pad_id = GOLDEN["pad_id"]
    for ours, key in (
        (model.get_input_embeddings().weight, "model.embed_tokens.weight"),
        (model.lm_head.weight, "lm_head.weight"),
    ):
        original = llm[key]
        assert ours.shape[0] == pad_id + 1 == original.shape[0] + 1
        assert torch.equal(ours[:pad_id], original)
        torch.testing.assert_close(ours[pad_id], original.mean(dim=0), rtol=0, atol=1e-7)
        assert _max_diff(ours[pad_id], original[0]) > 1e-3  # not a copy of a neighbour row


def test_converted_sizes_match_fixture_components(converted):
    model, _ = converted
    components = GOLDEN["components"]
    config = model.config
    whisper = config.whisper_config
    for key, value in components["whisper"].items():
        assert getattr(whisper, key) == value, key
    beats = config.beats_config
    for key, value in components["beats_cfg"].items():
        assert getattr(beats, key) == value, key
    qformer, expected = config.qformer_config, components["qformer"]
    assert qformer.hidden_size == expected["hidden_size"]
    assert qformer.num_attention_heads == expected["num_attention_heads"]
    assert qformer.intermediate_size == expected["intermediate_size"]
    assert qformer.num_hidden_layers == expected["num_hidden_layers_used"]
    assert qformer.encoder_hidden_size == expected["encoder_width"]
    assert qformer.layer_norm_eps == expected["layer_norm_eps"]
    assert qformer.hidden_act == expected["hidden_act"]
    assert qformer.cross_attention_frequency == expected["cross_attention_freq"]
    assert config.num_query_tokens == expected["num_query_token"]
    text, expected = config.text_config, components["llm"]
    assert text.vocab_size == expected["vocab_size_after_pad"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps"):
        assert getattr(text, key) == expected[key], key
    window = components["window"]
    assert config.second_per_window == window["second_per_window"]
    assert config.second_stride == window["second_stride"]
    assert (config.window_kernel, config.window_stride, config.num_windows) == (
        window["kernel"], window["stride"], window["n_windows"]
    )
    lora = components["lora"]
    assert (config.lora_rank, config.lora_alpha, list(config.lora_target_modules)) == (
        lora["r"], lora["alpha"], lora["target_modules"]
    )
    assert model.lora_scaling == lora["scaling"]


def test_batched_greedy_ids_of_the_longer_clip_match_original(converted):
    """The original's batched greedy decoding of the same two clips; row 1 differs for the BEATs padding quirk."""
    model, processor = converted
    gold = load_file(FIXTURE_A / "golden" / "batch.safetensors")
    audios = [read_wav(FIXTURE_A / GOLDEN["inputs"][name]["wav"])[0] for name in ("gunshots", "synth_short")]
    inputs = processor(text=[GOLDEN["prompt"]] * 2, audio=audios, sampling_rate=16000, truncation=True)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=20, num_beams=1, do_sample=False)
    expected = gold["generated_ids"][0, 1:].tolist()  # without the original's dummy BOS
    assert expected == GOLDEN["batch"]["generated_ids"][0][1:]
    # The port does not stop row 1 when row 0 ends (the original's batch quirk): row 0 is padded after its </s>.
    new = ids[0, inputs["input_ids"].shape[1] :].tolist()
    assert new[: len(expected)] == expected
    assert set(new[len(expected) :]) <= {GOLDEN["pad_id"]}
