"""Decoding at the hardware limit (DESIGN.md section 8): cached steps without host reads, the static cache compiled
whole with the eager ids, and SALMONN's LoRA merged while generating without touching what is saved."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import CompileConfig

from benchmarks.decoding import build_stock_llama, decode_kwargs, host_reads_per_step, llama_inputs
from modeling_salmonn.integrations_salmonn import MERGED_WEIGHT_NAME, MergedLoraLinear, save_salmonn_adapter
from tests.test_parity import _inputs, converted  # noqa: F401  (module fixture: the converted fixture A)
from tests.utils import FIXTURE_A, fixture_golden, randomize_lora, tiny_model_and_processor


GOLDEN_BEAM = json.loads((FIXTURE_A / "golden_beam.json").read_text())


@pytest.fixture()
def tiny_lora():
    """The tiny model with LoRA weights that change its output, and a 3 s prompt."""
    model, processor = tiny_model_and_processor(seed=0)
    randomize_lora(model, seed=0)
    audio = (0.1 * np.random.default_rng(0).standard_normal(48000)).astype(np.float32)
    inputs = processor(text=processor.format_prompt("Describe the audio."), audio=audio, sampling_rate=16000)
    return model.eval(), processor, inputs


def recording_backend() -> tuple:
    """A torch.compile backend that runs the captured graph as is (fast to compile), and the list of its graphs. A
    function, not an object: `CompileConfig` deep-copies its fields, which keeps functions but would copy a counter."""
    graphs = []

    def backend(graph_module, example_inputs, **kwargs):
        graphs.append(graph_module)
        return graph_module.forward

    return backend, graphs


def forced_compile(backend) -> CompileConfig:
    """What transformers does on a GPU for a static cache, forced on the CPU, with the whole step as one graph."""
    config = CompileConfig(fullgraph=True, backend=backend)
    config._compile_all_devices = True
    return config


def _lora_layers(model):
    return [m for m in model.model.language_model.modules() if hasattr(m, "lora_A")]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# -- cached steps ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_beams", [1, 4])
def test_a_cached_step_reads_the_host_no_more_than_a_stock_llama(tiny_lora, num_beams):
    model, _, inputs = tiny_lora
    llama = build_stock_llama(model)
    salmonn = host_reads_per_step(model, inputs, lambda n: decode_kwargs(n, num_beams=num_beams))
    stock = host_reads_per_step(
        llama, llama_inputs(inputs, model.config.text_config.vocab_size, 0), lambda n: decode_kwargs(n, num_beams=num_beams)
    )
    # The one read is transformers' own "are all rows finished" check; SALMONN's checks ran once, on the prompt.
    assert salmonn == stock == 1.0


def test_prompt_ids_are_still_checked_once_per_generate(tiny_lora):
    model, processor, _ = tiny_lora
    vocab = model.get_input_embeddings().num_embeddings
    # A one-token prompt's prefill is a cached step (generate creates the cache first): generate checks it itself.
    with pytest.raises(ValueError, match=rf"`input_ids` holds id {vocab + 5}, outside the language model's vocabulary of {vocab}"):
        model.generate(input_ids=torch.tensor([[vocab + 5]]), max_new_tokens=2, num_beams=1)
    with pytest.raises(ValueError, match=rf"`input_ids` holds id {vocab + 5}, outside the language model's vocabulary"):
        model(input_ids=torch.tensor([[1, vocab + 5]]))


def test_static_cache_compiled_whole_gives_the_eager_ids(tiny_lora):
    model, _, inputs = tiny_lora
    kwargs = decode_kwargs(12)
    eager = model.generate(**inputs, **kwargs)
    backend, graphs = recording_backend()
    compiled = model.generate(**inputs, **kwargs, cache_implementation="static", compile_config=forced_compile(backend))
    assert len(graphs) == 1  # fullgraph=True: the decoding step is one graph, without breaks (a break would raise)
    assert torch.equal(compiled, eager)
    # A second call, with another LoRA scaling, reuses the graph (the merged weights are refreshed in place).
    model.set_lora_scaling(2.0)
    eager_half = model.generate(**inputs, **kwargs)
    compiled_half = model.generate(**inputs, **kwargs, cache_implementation="static", compile_config=forced_compile(backend))
    assert len(graphs) == 1 and torch.equal(compiled_half, eager_half) and not torch.equal(eager_half, eager)


def test_beam_search_with_a_static_cache_gives_the_eager_ids(tiny_lora):
    model, _, inputs = tiny_lora
    kwargs = decode_kwargs(12, num_beams=4)
    backend, graphs = recording_backend()
    static = model.generate(**inputs, **kwargs, cache_implementation="static", compile_config=forced_compile(backend))
    assert torch.equal(static, model.generate(**inputs, **kwargs))
    assert graphs == []  # transformers 5.24 compiles the steps of greedy and sampling only, not beam search's


def test_fixture_a_static_cache_compiled_gives_the_golden_decodes(converted):  # noqa: F811
    model, processor = converted
    golden = fixture_golden()
    backend, graphs = recording_backend()
    static = {"cache_implementation": "static", "compile_config": forced_compile(backend)}
    inputs = _inputs(processor, "gunshots")
    greedy = model.generate(**inputs, max_new_tokens=20, num_beams=1, do_sample=False, **static)
    assert greedy[0, inputs["input_ids"].shape[1] :].tolist() == golden["inputs"]["gunshots"]["generated_ids"][1:]
    # The default decode (4 beams, 200 new tokens), at both LoRA scalings of the golden file.
    for case, scaling in (("gunshots", 4.0), ("gunshots@lora2", 2.0)):
        previous = model.set_lora_scaling(scaling)
        try:
            ids = model.generate(**inputs, **static)
        finally:
            model.set_lora_scaling(previous)
        expected = GOLDEN_BEAM["inputs"][case]["generated_ids_with_dummy_bos"][1:]
        assert ids[0, inputs["input_ids"].shape[1] :].tolist() == expected, case
    assert len(graphs) >= 1


# -- LoRA merged while generating ----------------------------------------------------------------------------


def test_merged_lora_is_the_live_lora_to_float32_rounding(tiny_lora):
    model, _, inputs = tiny_lora
    with torch.no_grad():
        live = model(**inputs).logits
        with model.merged_lora() as merged:
            assert merged == len(_lora_layers(model)) == 2 * model.config.text_config.num_hidden_layers
            assert all(type(layer) is MergedLoraLinear for layer in _lora_layers(model))
            fast = model(**inputs).logits
    assert all(type(layer) is not MergedLoraLinear for layer in _lora_layers(model))
    assert 0 < float((fast - live).abs().max()) < 1e-5


def test_generate_leaves_the_state_dict_saved_folders_and_adapter_byte_identical(tiny_lora, tmp_path):
    model, _, inputs = tiny_lora
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "before")
    save_salmonn_adapter(model, tmp_path / "adapter_before", base_model="base")
    model.generate(**inputs, **decode_kwargs(4))
    assert all(MERGED_WEIGHT_NAME in layer._buffers for layer in _lora_layers(model))  # kept for the next generate
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path / "after")
    save_salmonn_adapter(model, tmp_path / "adapter_after", base_model="base")
    assert _digest(tmp_path / "after") == _digest(tmp_path / "before")
    assert _digest(tmp_path / "adapter_after") == _digest(tmp_path / "adapter_before")


def test_merged_weights_follow_the_scaling_and_weight_updates(tiny_lora):
    model, _, inputs = tiny_lora
    kwargs = decode_kwargs(8)

    def live_ids():
        with torch.no_grad():
            ids = inputs["input_ids"]
            embeds, _ = model.model.embed_inputs(ids, inputs["input_features"], inputs["input_values"], inputs["input_values_mask"])
            out = []
            for _ in range(8):  # greedy by hand, without a cache and with live LoRA
                token = model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits[:, -1].argmax(-1)
                out.append(int(token))
                embeds = torch.cat([embeds, model.get_input_embeddings()(token)[:, None]], dim=1)
            return out

    def generated():
        return model.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1] :].tolist()

    assert generated() == live_ids()
    model.set_lora_scaling(1.0)
    assert generated() == live_ids()
    with torch.no_grad():
        model.model.language_model.layers[0].self_attn.q_proj.lora_B["default"].weight.mul_(-3.0)
    assert generated() == live_ids()


def test_generate_in_and_out_of_inference_mode(tiny_lora):
    model, _, inputs = tiny_lora
    with torch.inference_mode():
        first = model.generate(**inputs, **decode_kwargs(4))
    # The merged weights made under inference mode are refreshed in place by a call outside it.
    assert torch.equal(model.generate(**inputs, **decode_kwargs(4)), first)


def test_training_frees_the_merged_weights_and_merges_nothing(tiny_lora):
    model, _, inputs = tiny_lora
    model.generate(**inputs, **decode_kwargs(2))
    model.train()
    assert not any(MERGED_WEIGHT_NAME in layer._buffers for layer in _lora_layers(model))
    with model.merged_lora() as merged:
        assert merged == 0


def test_a_users_adapter_keeps_its_layers_live(tiny_lora):
    model, _, inputs = tiny_lora
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj"), adapter_name="mine")
    with torch.no_grad():
        for layer in _lora_layers(model):
            if "mine" in layer.lora_B:
                layer.lora_B["mine"].weight.fill_(0.05)
    peft_model.eval()
    with model.merged_lora() as merged:
        # v_proj holds SALMONN's adapter alone and is merged; q_proj holds the user's too and stays live.
        assert merged == model.config.text_config.num_hidden_layers
        q_proj = model.model.language_model.layers[0].self_attn.q_proj
        assert type(q_proj) is not MergedLoraLinear and q_proj.active_adapters == ["default", "mine"]
    with torch.no_grad():
        live = model(**inputs).logits
        with model.merged_lora():
            assert float((model(**inputs).logits - live).abs().max()) < 1e-5


def test_a_quantized_language_model_is_not_merged(tiny_lora):
    from salmonn.inference.engine import quantize_llm_int8

    model, _, inputs = tiny_lora
    assert quantize_llm_int8(model) > 0
    with model.merged_lora() as merged:
        assert merged == 0
    ids = model.generate(**inputs, **decode_kwargs(4))
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 4


# -- salmonn-infer / salmonn-eval -----------------------------------------------------------------------------


def test_infer_and_eval_static_cache_option(tmp_path, monkeypatch, capsys):
    import soundfile
    from transformers import HfArgumentParser

    from salmonn.evaluation.evaluate import EvalArguments
    from salmonn.inference import engine
    from salmonn.inference.infer import build_parser
    from salmonn.inference.infer import main as infer_main
    from salmonn.inference.options import DatasetArguments, RunArguments
    from tests.utils import save_tiny_checkpoint

    for parser in (build_parser(), HfArgumentParser((RunArguments, EvalArguments, DatasetArguments))):
        (action,) = [a for a in parser._actions if a.dest == "static_cache"]
        assert action.default == "auto" and list(action.choices) == ["auto", "on", "off"]

    checkpoint = save_tiny_checkpoint(tmp_path / "model")
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, 0.3 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000), 16000)
    loaded, original = [], engine.load_model_and_processor

    def load(*args, **kwargs):
        model, processor = original(*args, **kwargs)
        loaded.append(model)
        return model, processor

    monkeypatch.setattr(engine, "load_model_and_processor", load)
    answers = {}
    for mode in ("auto", "on", "off"):
        args = ["--model", str(checkpoint), str(wav), "--max-new-tokens", "6", "--no-progress", "--device", "cpu"]
        assert infer_main([*args, "--static_cache", mode]) == 0
        answers[mode] = json.loads(capsys.readouterr().out)["answer"]
    # On the CPU "auto" is off; "on" decodes with the static cache (4 beams, as the default) and answers the same.
    assert [m.generation_config.cache_implementation for m in loaded] == [None, "static", None]
    assert answers["on"] == answers["off"] == answers["auto"] != ""
    with pytest.raises(ValueError, match=r"static_cache: expected one of \['auto', 'on', 'off'\], got 'yes'"):
        engine.load_model_and_processor(str(checkpoint), static_cache="yes")
