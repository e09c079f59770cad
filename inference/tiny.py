"""A tiny SALMONN built locally (no downloads): the demo's default, and the tests' model."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from modeling_salmonn import SalmonnConfig, SalmonnFeatureExtractor, SalmonnForConditionalGeneration, SalmonnProcessor
from modeling_salmonn.processing_salmonn import AUDIO_TOKEN, add_salmonn_tokens


logger = logging.getLogger(__name__)

# Text the tiny SentencePiece model is trained on: the words of the demo's prompts and answers.
_CORPUS = """\
USER: ASSISTANT: Speech Describe the audio. What do you hear in this recording?
Please describe the audio in detail. Transcribe the speech. Is there music or speech?
A pure tone plays steadily. A rising chirp sweeps upward. White noise hisses in the background.
Someone is speaking. A short beep. Silence with a faint hum. A bird sings near the water.
The sound is a low note. The sound is a high note. The sound is noise. The pitch goes up.
yes no one two three four five six seven eight nine ten hello world cat dog tone noise chirp
"""


def build_tiny_tokenizer(vocab_size: int = 400):
    """A LLaMA-style SentencePiece BPE tokenizer (byte fallback, digit splitting) plus `[PAD]` and `<audio>`."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(_CORPUS * 4, encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(Path(tmp) / "tokenizer"),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": True,
        }
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    return add_salmonn_tokens(tokenizer)


def tiny_text_config(vocab_size: int, pad_token_id: int, num_attention_heads: int = 4) -> dict:
    """
    The tiny LLaMA. vLLM's CPU attention only supports some head sizes (32 is the smallest): models served there take
    `num_attention_heads=2` (heads of 32 channels instead of 16).
    """
    return dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=2048,
        pad_token_id=pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_config(vocab_size: int, audio_token_index: int, pad_token_id: int, **overrides) -> SalmonnConfig:
    """Every dimension small, every mechanism of the real model present (windows, LoRA, gated BEATs bias)."""
    kwargs = dict(
        whisper_config=dict(
            model_type="whisper",
            d_model=32,
            encoder_layers=2,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_layers=1,
            decoder_attention_heads=2,
            decoder_ffn_dim=64,
            num_mel_bins=80,
            max_target_positions=16,
        ),
        beats_config=dict(
            encoder_layers=2,
            encoder_embed_dim=24,
            encoder_ffn_embed_dim=48,
            encoder_attention_heads=2,
            embed_dim=16,
            conv_pos=16,
            conv_pos_groups=4,
        ),
        qformer_config=dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2),
        text_config=tiny_text_config(vocab_size, pad_token_id),
        audio_token_index=audio_token_index,
    )
    kwargs.update(overrides)
    return SalmonnConfig(**kwargs)


def build_tiny_model_and_processor(seed: int = 0, **config_overrides):
    """A randomly initialised tiny SALMONN with a matching processor."""
    import torch

    tokenizer = build_tiny_tokenizer()
    pad_id = tokenizer.pad_token_id
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    config = tiny_config(vocab_size=pad_id + 1, audio_token_index=audio_id, pad_token_id=pad_id, **config_overrides)
    torch.manual_seed(seed)
    model = SalmonnForConditionalGeneration(config).eval()
    processor = SalmonnProcessor(
        SalmonnFeatureExtractor(), tokenizer, audio_tokens_per_segment=config.audio_tokens_per_segment
    )
    return model, processor
