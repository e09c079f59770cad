"""A mid-size random SALMONN for the benchmarks: Whisper-base-sized encoder, BEATs base, Q-Former 768, ~220 M LLaMA."""

from __future__ import annotations

import numpy as np
import torch

from salmonn.inference.tiny import build_tiny_tokenizer
from modeling_salmonn import SalmonnConfig, SalmonnFeatureExtractor, SalmonnForConditionalGeneration, SalmonnProcessor


MIDSIZE_VOCAB = 32001  # Vicuna's 32000 pieces + [PAD]
MIDSIZE_AUDIO_TOKEN = "<audio_midsize>"


def midsize_tokenizer():
    """The tiny SentencePiece tokenizer grown to a LLaMA-sized vocabulary, with the audio placeholder past it."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([f"<filler{i}>" for i in range(MIDSIZE_VOCAB - len(tokenizer))])
    tokenizer.add_special_tokens({"additional_special_tokens": [MIDSIZE_AUDIO_TOKEN]})
    return tokenizer


def midsize_config(pad_token_id: int, audio_token_index: int, **overrides) -> SalmonnConfig:
    kwargs = dict(
        # openai/whisper-base encoder sizes.
        whisper_config=dict(
            model_type="whisper",
            d_model=512,
            encoder_layers=6,
            encoder_attention_heads=8,
            encoder_ffn_dim=2048,
            decoder_layers=1,
            decoder_attention_heads=8,
            decoder_ffn_dim=2048,
            num_mel_bins=80,
        ),
        beats_config=dict(),  # BeatsConfig's defaults are BEATs base (12 x 768)
        qformer_config=dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=2),
        text_config=dict(
            model_type="llama",
            vocab_size=MIDSIZE_VOCAB,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=12,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=4096,
            pad_token_id=pad_token_id,
            bos_token_id=1,
            eos_token_id=2,
        ),
        audio_token_index=audio_token_index,
    )
    kwargs.update(overrides)
    return SalmonnConfig(**kwargs)


def build_midsize(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random mid-size SALMONN and its processor. The LoRA matrices get weights so that LoRA does work."""
    tokenizer = midsize_tokenizer()
    config = midsize_config(tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(MIDSIZE_AUDIO_TOKEN))
    torch.manual_seed(seed)
    model = SalmonnForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model = cast_like_from_pretrained(model, dtype).eval()
    processor = SalmonnProcessor(
        SalmonnFeatureExtractor(),
        tokenizer,
        audio_token=MIDSIZE_AUDIO_TOKEN,
        audio_tokens_per_segment=config.audio_tokens_per_segment,
    )
    return model, processor


def cast_like_from_pretrained(model, dtype: torch.dtype, keep_float32: bool = True):
    """`model.to(dtype)`, keeping `_keep_in_fp32_modules_strict` in float32 for half dtypes as `from_pretrained` does."""
    model = model.to(dtype)
    if keep_float32 and dtype in (torch.float16, torch.bfloat16):
        kept = set(model._keep_in_fp32_modules_strict or ())
        for name, param in model.named_parameters():
            if kept & set(name.split(".")):
                param.data = param.data.float()
    return model


def parameter_counts(model) -> dict[str, float]:
    """Millions of parameters per part."""
    parts = {
        "whisper": model.model.speech_encoder,
        "beats": model.model.beats,
        "qformer+proj": [model.model.speech_qformer, model.model.speech_llama_proj],
        "llm": [model.model.language_model, model.lm_head],
    }
    counts = {}
    for name, modules in parts.items():
        modules = modules if isinstance(modules, list) else [modules]
        counts[name] = sum(p.numel() for m in modules for p in m.parameters()) / 1e6
    return counts


def synthetic_clip(seconds: float, seed: int, sampling_rate: int = 16000) -> np.ndarray:
    """A chirp plus noise: something non-trivial for the encoders."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    f0, f1 = rng.uniform(200, 800), rng.uniform(1000, 4000)
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * max(seconds, 1e-3)))
    return (0.3 * np.sin(phase) + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)
