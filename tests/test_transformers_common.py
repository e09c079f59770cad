"""
transformers' own common model and configuration tests (`ModelTesterMixin`, `ConfigTester`) on a tiny SALMONN.

The test files come from the source distribution of the installed transformers version, fetched with pip into
`tests/.transformers_tests/` the first time (`python tests/fetch_transformers_tests.py` does it by hand).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from unittest.mock import patch

import torch
import transformers

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from modeling_salmonn import SalmonnConfig, SalmonnForConditionalGeneration, SalmonnModel
from tests.fetch_transformers_tests import ensure_common_tests


CACHE_DIR = Path(__file__).resolve().parent / ".transformers_tests"


def _import_common_tests():
    """transformers' test mixins from the cache, or the reason they cannot be used (each test then fails with it)."""
    try:
        ensure_common_tests(CACHE_DIR)
    except (OSError, subprocess.CalledProcessError) as error:
        return None, f"transformers' common tests could not be fetched into {CACHE_DIR} ({error})"
    sys.path.insert(0, str(CACHE_DIR))
    try:
        from transformers_tests import VERSION
        from transformers_tests.test_configuration_common import ConfigTester
        from transformers_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor
    except ImportError as error:
        return None, f"transformers' common tests cannot be imported from {CACHE_DIR} ({error})"
    finally:
        sys.path.remove(str(CACHE_DIR))
    if VERSION != transformers.__version__:
        return None, f"{CACHE_DIR} holds the tests of transformers {VERSION}, but {transformers.__version__} is installed"
    return (ConfigTester, ModelTesterMixin, floats_tensor, ids_tensor), None


_COMMON, _MISSING = _import_common_tests()
if _COMMON is None:

    class ModelTesterMixin:
        """Stand-in: the test class below still collects, and its `setUp` fails with `_MISSING`."""

else:
    ConfigTester, ModelTesterMixin, floats_tensor, ids_tensor = _COMMON


class SalmonnModelTester:
    """Every part of SALMONN at toy size: 30 Whisper frames, 24 BEATs patches, 10 windows of 3 frames, LoRA."""

    def __init__(self, parent, batch_size: int = 7, seq_length: int = 16, is_training: bool = True):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        # As in transformers' own audio-LLM testers, the placeholder id lies inside the embedding table here, so
        # that `inputs_embeds` can carry the placeholders; released checkpoints keep it one past the table
        # (`test_inputs_embeds_with_placeholder_outside_table` covers that layout). Not below 5: the SDPA tests pad
        # batches with random ids below 5. The batch size is the SDPA tests' 7, so they pad no audio-less rows.
        self.audio_token_index = 7
        self.num_mel_frames = 60  # 2 * max_source_positions
        self.num_fbank_frames = 48  # 3 x 8 BEATs patches, fewer than the 30 Whisper frames
        self.audio_tokens = 10  # 30 Whisper frames / windows of 3

    def get_config(self) -> SalmonnConfig:
        return SalmonnConfig(
            whisper_config=dict(
                model_type="whisper",
                d_model=16,
                encoder_layers=2,
                encoder_attention_heads=2,
                encoder_ffn_dim=32,
                decoder_layers=1,
                decoder_attention_heads=2,
                decoder_ffn_dim=32,
                num_mel_bins=80,
                max_source_positions=30,
                max_target_positions=16,
            ),
            beats_config=dict(
                encoder_layers=2,
                encoder_embed_dim=16,
                encoder_ffn_embed_dim=32,
                encoder_attention_heads=2,
                embed_dim=8,
                conv_pos=16,
                conv_pos_groups=4,
            ),
            qformer_config=dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=2),
            text_config=dict(
                model_type="llama",
                vocab_size=self.vocab_size,
                hidden_size=self.hidden_size,
                intermediate_size=37,
                num_hidden_layers=self.num_hidden_layers,
                num_attention_heads=self.num_attention_heads,
                num_key_value_heads=2,
                max_position_embeddings=64,
                pad_token_id=1,
                bos_token_id=1,
                eos_token_id=2,
            ),
            second_per_window=3.0,
            second_stride=3.0,
            lora_rank=2,
            lora_alpha=4,
            lora_dropout=0.0,
            audio_token_index=self.audio_token_index,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 1) + 1
        input_ids[input_ids == self.audio_token_index] = self.audio_token_index + 1
        input_ids[:, 1 : 1 + self.audio_tokens] = self.audio_token_index
        attention_mask = torch.ones_like(input_ids)
        attention_mask[:, :1] = 0
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "input_features": floats_tensor([self.batch_size, 80, self.num_mel_frames]),
            "input_values": floats_tensor([self.batch_size, self.num_fbank_frames, 128]),
        }
        return config, inputs


class SalmonnModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (SalmonnModel, SalmonnForConditionalGeneration)
    # `generate` has its own tests (tests/test_model.py): transformers' `GenerationTesterMixin` lives in
    # tests/generation/, which the transformers sdist does not ship.
    all_generative_model_classes = ()
    additional_model_inputs = ["input_features", "input_values"]
    _is_composite = True
    # The mixin reads the audio hidden size from `config.hidden_size`; SALMONN's config has sub-configs only.
    # `test_get_audio_features_shapes` below checks the shapes instead.
    skip_test_audio_features_output_shape = True

    def setUp(self):
        if _MISSING:
            self.fail(f"{_MISSING}; run `python tests/fetch_transformers_tests.py`")
        self.model_tester = SalmonnModelTester(self)
        self.config_tester = ConfigTester(self, config_class=SalmonnConfig, has_text_modality=False)
        # The mixin tells base models from heads by transformers' auto-class names; a remote-code model is not in
        # them, so register SALMONN's two classes there as an in-library model would be.
        for mapping, name in ((MODEL_MAPPING_NAMES, "SalmonnModel"), (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "SalmonnForConditionalGeneration")):
            patcher = patch.dict(mapping, {"salmonn": name})
            patcher.start()
            self.addCleanup(patcher.stop)

    def _audio_features_get_expected_num_attentions(self, model_tester=None):
        # `get_audio_features` returns the Whisper encoder's attentions and hidden states.
        return self.model_tester.get_config().whisper_config.encoder_layers

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_get_audio_features_shapes(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = SalmonnForConditionalGeneration(config).eval()
        with torch.no_grad():
            outputs = model.get_audio_features(inputs["input_features"], inputs["input_values"])
        frames = config.whisper_config.max_source_positions
        width = config.whisper_config.d_model + config.beats_config.encoder_embed_dim
        self.assertEqual(tuple(outputs.last_hidden_state.shape), (self.model_tester.batch_size, frames, width))
        self.assertEqual(
            tuple(outputs.pooler_output.shape),
            (self.model_tester.batch_size, self.model_tester.audio_tokens, config.text_config.hidden_size),
        )

    def test_inputs_embeds_with_placeholder_outside_table(self):
        """The released layout: the placeholder id is one past the table, so only `input_ids` can carry audio."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config.audio_token_index = config.text_config.vocab_size
        inputs["input_ids"][:, 1 : 1 + self.model_tester.audio_tokens] = config.audio_token_index
        model = SalmonnForConditionalGeneration(config).eval()
        with torch.no_grad():
            logits = model(**inputs).logits
            embeds, _ = model.model.embed_inputs(**inputs_without(inputs, "attention_mask"))
            from_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
        torch.testing.assert_close(from_embeds, logits)
        text_embeds = model.get_input_embeddings()(inputs["input_ids"].clamp(max=config.text_config.vocab_size - 1))
        audio = inputs_without(inputs, "input_ids", "attention_mask")
        with self.assertRaisesRegex(ValueError, f"placeholder id {config.audio_token_index} lies outside the embedding table"):
            model(inputs_embeds=text_embeds, **audio)

    def test_sdpa_can_dispatch_composite_models(self):
        # The mixin's version looks for a `vision_tower`/`audio_tower`; SALMONN has three towers under other names.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        towers = ("language_model", "speech_encoder", "beats", "speech_qformer")
        for model_class in self.all_model_classes:
            with tempfile.TemporaryDirectory() as tmp:
                model_class(config).save_pretrained(tmp)
                for implementation in ("sdpa", "eager"):
                    model = model_class.from_pretrained(tmp, attn_implementation=implementation).base_model
                    self.assertEqual(model.config._attn_implementation, implementation)
                    for tower in towers:
                        self.assertEqual(getattr(model, tower).config._attn_implementation, implementation, tower)


# Mixin tests that cannot apply to SALMONN on this machine, with the reason; they are not collected (rather than
# skipped, so that a skip under CI always means a missing dependency, see tests/conftest.py).
NOT_APPLICABLE = {
    **dict.fromkeys(
        (
            "test_training_gradient_checkpointing",
            "test_training_gradient_checkpointing_use_reentrant_false",
            "test_training_gradient_checkpointing_use_reentrant_true",
        ),
        "Whisper and BEATs stay in eval mode while the model trains (`SalmonnForConditionalGeneration.train`) on "
        "purpose, so their layers never checkpoint; the mixin expects every GradientCheckpointingLayer to",
    ),
    **dict.fromkeys(
        (
            "test_can_load_with_device_context_manager",
            "test_can_load_with_global_device_set",
            "test_cpu_offload",
            "test_disk_offload_bin",
            "test_disk_offload_safetensors",
            "test_flex_attention_with_grads",
            "test_model_parallelism",
            "test_flash_attn_2_can_dispatch_composite_models",
            "test_flash_attn_3_can_dispatch_composite_models",
            "test_flash_attn_4_can_dispatch_composite_models",
            "test_kernels_can_load_without_crashing",
            "test_resize_embeddings_untied_with_deepspeed",
            "test_resize_embeddings_untied_with_deepspeed_multi_gpu",
            "test_resize_tokens_embeddings_with_deepspeed",
            "test_resize_tokens_embeddings_with_deepspeed_multi_gpu",
            # marked slow by transformers (run by `pytest -m slow`)
            "test_flash_attn_2_can_compile_with_attention_mask_None_without_graph_break",
            "test_flash_attn_2_fp32_ln",
            "test_flash_attn_2_from_config",
            "test_flash_attn_2_inference_equivalence",
            "test_flash_attn_2_inference_equivalence_right_padding",
            "test_flash_attn_3_from_config",
            "test_flash_attn_3_inference_equivalence",
            "test_flash_attn_3_inference_equivalence_right_padding",
            "test_flash_attn_4_from_config",
            "test_flash_attn_4_inference_equivalence",
            "test_flash_attn_4_inference_equivalence_right_padding",
            "test_flash_attn_kernels_inference_equivalence",
            "test_flash_attn_kernels_mps_inference_equivalence",
            "test_sdpa_can_compile_dynamic",
            "test_sdpa_can_dispatch_on_flash",
        ),
        "needs an accelerator (GPU, several GPUs, FlashAttention, Hub kernels or DeepSpeed on CUDA); CI has none. "
        "Offloading is covered on CPU by tests/test_bad_input.py (case 23)",
    ),
    **dict.fromkeys(
        (
            "test_moe_models_record_router_logits",
            "test_output_router_logits_from_config",
            "test_eager_matches_batched_and_grouped_inference_0_fp16",
            "test_eager_matches_batched_and_grouped_inference_1_fp32",
            "test_eager_matches_batched_and_grouped_inference_2_bf16",
        ),
        "for mixture-of-experts models (router logits, grouped expert matmuls); SALMONN has no experts",
    ),
    **dict.fromkeys(
        ("test_model_rope_with_partial_rotation", "test_vision_axial_rope", "test_resize_position_vector_embeddings"),
        "SALMONN has no partial or axial RoPE and no resizable position-embedding table (LLaMA's RoPE, Whisper's "
        "fixed sinusoids)",
    ),
    "test_encoder_decoder_loss_no_double_shift": "for sequence-to-sequence heads; SALMONN is a causal LM",
    "test_sliding_window_mask": "for sliding-window attention; LLaMA attends to the whole context",
    "test_sdpa_can_dispatch_non_composite_models": "SALMONN is composite: test_sdpa_can_dispatch_composite_models "
    "checks all four towers",
    "test_eager_matches_sdpa_inference_24_fp32_pad_left_output_attentions": "BEATs and the Q-Former return no "
    "attention maps through the composite model, so SDPA-vs-eager with output_attentions cannot compare them",
    "test_torch_save_load": "needs the config in transformers' own MODEL_MAPPING; a remote-code model is registered "
    "through `auto_map` instead (tests/test_model.py round-trips it through a fresh process)",
    "test_can_init_all_missing_weights": "transformers runs it only for its own prioritised models",
    "test_torch_compile_for_training": "transformers runs it only with RUN_SLOW set, for its own models",
    **dict.fromkeys(
        ("test_reverse_loading_mapping", "test_can_load_from_already_mapped_keys"),
        "for models whose checkpoints transformers renames at load (a conversion mapping); SALMONN's keys load as "
        "saved, and salmonn-convert maps the original release's keys",
    ),
}
for _name in NOT_APPLICABLE:
    setattr(SalmonnModelTest, _name, None)


def inputs_without(inputs: dict, *names: str) -> dict:
    return {k: v for k, v in inputs.items() if k not in names}
