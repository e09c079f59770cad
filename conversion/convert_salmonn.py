"""
Converts the original SALMONN release into one Hub-ready transformers folder.

    salmonn-convert --salmonn-checkpoint salmonn_v1.pth --whisper openai/whisper-large-v2 \
        --beats BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt --llm lmsys/vicuna-13b-v1.1 --output salmonn-13b-hf

Every key of the `.pth` is mapped or dropped on purpose (the original's `strict=False` load ignored wrong keys), every
shape is read from the weights and checked against the other parts, the LLM is copied shard by shard, and the folder is
written under a temporary name and moved into place only when complete and verified.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser, WhisperConfig

from salmonn.conversion.beats import load_original_beats
from salmonn.conversion.io_utils import ShardWriter, atomic_output_dir, check_output_dir, check_output_not_input, parse_size
from salmonn.conversion.sources import iter_tensors, load_salmonn_checkpoint, resolve_folder, weight_files
from modeling_salmonn import SalmonnConfig, SalmonnFeatureExtractor, SalmonnForConditionalGeneration, SalmonnProcessor
from modeling_salmonn.modelcard_salmonn import AUTO_MAP, copy_remote_code, hub_id_of, license_for_llm, salmonn_model_card
from modeling_salmonn.generation_salmonn import original_generation_config
from modeling_salmonn.processing_salmonn import AUDIO_TOKEN, add_salmonn_tokens
from salmonn.cli import setup_logging


logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The release's settings (configs/config.yaml), used when neither a flag nor the checkpoint's `config` gives a value.
ORIGINAL_DEFAULTS = {"second_per_window": 0.333333, "second_stride": 0.333333, "lora_alpha": 32, "lora_dropout": 0.1}

# Original `.pth` key -> our key.
_RENAMES = [
    (re.compile(r"^speech_query_tokens$"), r"model.speech_query_tokens"),
    (re.compile(r"^speech_Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)$"), r"model.speech_qformer.layernorm.\1"),
    (
        re.compile(r"^speech_Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(.+)$"),
        r"model.speech_qformer.encoder.layer.\1.\2.attention.\3",
    ),
    (
        re.compile(
            r"^speech_Qformer\.bert\.encoder\.layer\.(\d+)\.(attention\.output|crossattention\.output|intermediate_query|output_query)\.(.+)$"
        ),
        r"model.speech_qformer.encoder.layer.\1.\2.\3",
    ),
    (re.compile(r"^(speech_llama_proj|ln_speech|ln_audio)\.(weight|bias)$"), r"model.\1.\2"),
    (
        re.compile(r"^llama_model\.base_model\.model\.model\.layers\.(\d+)\.self_attn\.(\w+)\.lora_(A|B)\.default\.weight$"),
        r"model.language_model.layers.\1.self_attn.\2.lora_\3.default.weight",
    ),
]
# Keys dropped on purpose, with the reason.
_DROPS = [
    (re.compile(r"^speech_Qformer\.bert\.embeddings\.position_ids$"), "Q-Former position-id buffer"),
    (re.compile(r"^llama_model\..*\.rotary_emb\.inv_freq$"), "rotary inv_freq buffer (recomputed by LLaMA)"),
    (
        re.compile(r"^beats\.encoder\.layers\.\d+\.self_attn\.relative_attention_bias\.weight$"),
        "shared BEATs relative position table leaked by the original runner (compared with the BEATs file)",
    ),
    (
        re.compile(
            r"^speech_Qformer\.(cls\.|bert\.embeddings\.(word_embeddings|position_embeddings)\.|bert\.encoder\.layer\.\d+\.(intermediate|output)\.)"
        ),
        "text path of the LAVIS Q-Former, unused by SALMONN",
    ),
]
_LLM_DROP = re.compile(r"\.rotary_emb\.inv_freq$")


@dataclass
class ConvertArguments:
    salmonn_checkpoint: str = field(
        metadata={"help": "The SALMONN `.pth` (salmonn_v1.pth, salmonn_7b_v0.pth)."}
    )
    whisper: str = field(metadata={"help": "Whisper folder or Hub id (openai/whisper-large-v2); only the encoder is kept."})
    beats: str = field(metadata={"help": "The BEATs `.pt` (BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt)."})
    llm: str = field(metadata={"help": "Vicuna folder or Hub id: v1.1 13B for salmonn_v1.pth, v1.5 7B for salmonn_7b_v0.pth."})
    output: str = field(metadata={"help": "Folder to write. Refused if it exists, unless --overwrite."})
    second_per_window: float | None = field(
        default=None, metadata={"help": "Window length in s (default: checkpoint config, else 0.333333)."}
    )
    second_stride: float | None = field(
        default=None, metadata={"help": "Window hop in s (default: checkpoint config, else 0.333333)."}
    )
    lora_rank: int | None = field(
        default=None, metadata={"help": "LoRA rank; must agree with the weights (default: read from them)."}
    )
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha; scaling = alpha / rank (default: checkpoint config, else 32)."}
    )
    qformer_num_attention_heads: int = field(
        default=12,
        metadata={"help": "Q-Former heads: not stored in the weights (12 in the release)."},
    )
    dtype: str = field(default="float32", metadata={"help": "Dtype of the saved weights.", "choices": sorted(DTYPES)})
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors shard, e.g. 5GB, 500MB."})
    merge_lora: bool = field(
        default=False, metadata={"help": "Merge LoRA into the LLM (fixed scaling) instead of keeping it separate."}
    )
    verify: str = field(
        default="auto",
        metadata={
            "help": "full: reload the folder and generate on a synthetic clip; structure: check every key, shape and file; "
            "auto: full when the model takes under a third of the available RAM.",
            "choices": ["auto", "full", "structure"],
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace --output if empty or an earlier output (it holds config.json); never another folder."},
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Read every input, map every key and check every shape against the model, but write nothing.",
        },
    )
    push_to_hub: str | None = field(default=None, metadata={"help": "Upload the finished folder to this Hub repo id."})
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})


def map_salmonn_keys(path: str, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our names for the `.pth` tensors; returns (mapped, leaked BEATs tables). Unknown keys are an error."""
    mapped, leaked, unknown = {}, {}, []
    dropped: dict[str, int] = {}
    for key, tensor in state.items():
        for pattern, replacement in _RENAMES:
            if pattern.match(key):
                mapped[pattern.sub(replacement, key)] = tensor
                break
        else:
            for pattern, reason in _DROPS:
                if pattern.search(key):
                    dropped[reason] = dropped.get(reason, 0) + 1
                    if key.startswith("beats."):
                        leaked[key] = tensor
                    break
            else:
                unknown.append(key)
    if unknown:
        raise ValueError(f"{path}: keys that are not part of SALMONN (a different model?): {sorted(unknown)}")
    for reason, count in dropped.items():
        logger.info("Dropped %d tensor(s) of %s: %s", count, path, reason)
    return mapped, leaked


def _qformer_layers(mapped: dict[str, torch.Tensor]) -> int:
    indices = {int(m.group(1)) for k in mapped if (m := re.match(r"model\.speech_qformer\.encoder\.layer\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _number(value, where: str) -> float:
    """A finite number from the checkpoint's own config, or an error naming the file and the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return number


def build_config(
    args: ConvertArguments,
    mapped: dict[str, torch.Tensor],
    checkpoint_config: dict,
    whisper_config: WhisperConfig,
    beats_config,
    text_config,
    vocab_size: int,
    audio_token_index: int,
    pad_token_id: int,
) -> tuple[SalmonnConfig, int]:
    """Shapes come from the weights; window and LoRA settings from flags, then the checkpoint's config, then defaults."""
    ckpt = args.salmonn_checkpoint

    def require(key: str) -> torch.Tensor:
        if key not in mapped:
            raise ValueError(f"{ckpt}: missing tensor for {key}")
        return mapped[key]

    def setting(name: str, config_name: str | None = None) -> float:
        value = getattr(args, name, None)
        if value is not None:
            return value
        value = checkpoint_config.get(config_name or name, ORIGINAL_DEFAULTS.get(name))
        return _number(value, f"{ckpt}: `config.model.{config_name or name}`")

    query = require("model.speech_query_tokens")
    hidden = query.shape[-1]
    layers = _qformer_layers(mapped)
    intermediate = require("model.speech_qformer.encoder.layer.0.intermediate_query.dense.weight").shape[0]
    if hidden % args.qformer_num_attention_heads:
        raise ValueError(
            f"--qformer-num-attention-heads {args.qformer_num_attention_heads} does not divide the Q-Former width {hidden}"
        )
    for i in range(layers):
        require(f"model.speech_qformer.encoder.layer.{i}.crossattention.attention.key.weight")
    encoder_width = require("model.speech_qformer.encoder.layer.0.crossattention.attention.key.weight").shape[1]
    beats_width = beats_config.encoder_embed_dim
    if encoder_width != whisper_config.d_model + beats_width:
        raise ValueError(
            f"{ckpt}: the Q-Former cross-attends to {encoder_width} channels, but Whisper ({args.whisper}) has "
            f"d_model {whisper_config.d_model} and BEATs ({args.beats}) {beats_width}: "
            f"{whisper_config.d_model + beats_width}. Wrong Whisper or BEATs?"
        )
    for name, width, source in (("ln_speech", whisper_config.d_model, args.whisper), ("ln_audio", beats_width, args.beats)):
        got = require(f"model.{name}.weight").shape[0]
        if got != width:
            raise ValueError(f"{ckpt}: {name}.weight has shape [{got}] but {source} gives width {width}")
    proj = require("model.speech_llama_proj.weight")
    if proj.shape != (text_config.hidden_size, hidden):
        raise ValueError(
            f"{ckpt}: speech_llama_proj.weight has shape {list(proj.shape)} but the LLM ({args.llm}) has hidden size "
            f"{text_config.hidden_size} (expected [{text_config.hidden_size}, {hidden}]). Wrong LLM (13B vs 7B)?"
        )

    lora_a = {k: v for k, v in mapped.items() if ".lora_A." in k}
    if not lora_a:
        raise ValueError(f"{ckpt}: no LoRA tensors (llama_model.base_model.model.model.layers.N.self_attn.*.lora_A.default.weight)")
    ranks = {v.shape[0] for v in lora_a.values()}
    if len(ranks) != 1:
        raise ValueError(f"{ckpt}: LoRA tensors with different ranks {sorted(ranks)}")
    rank = ranks.pop()
    if args.lora_rank is not None and args.lora_rank != rank:
        raise ValueError(f"--lora-rank {args.lora_rank} disagrees with the LoRA weights of {ckpt}, which have rank {rank}")
    targets = sorted({re.search(r"self_attn\.(\w+)\.lora_A", k).group(1) for k in lora_a})
    lora_layers = {int(re.search(r"layers\.(\d+)\.", k).group(1)) for k in lora_a}
    if lora_layers != set(range(text_config.num_hidden_layers)):
        raise ValueError(
            f"{ckpt}: LoRA covers layers {sorted(lora_layers)[:3]}..{max(lora_layers)} ({len(lora_layers)} layers) but the LLM "
            f"({args.llm}) has {text_config.num_hidden_layers} layers. Wrong LLM (13B has 40, 7B has 32)?"
        )

    text = text_config.to_dict()
    text.update(vocab_size=vocab_size, pad_token_id=pad_token_id)
    settings = {name: setting(name) for name in ("second_per_window", "second_stride", "lora_alpha", "lora_dropout")}
    try:
        config = SalmonnConfig(
            whisper_config=whisper_config.to_dict(),
            beats_config=beats_config.to_dict(),
            qformer_config=dict(
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=args.qformer_num_attention_heads,
                intermediate_size=intermediate,
            ),
            text_config=text,
            num_query_tokens=query.shape[1],
            lora_rank=0 if args.merge_lora else rank,
            lora_target_modules=targets,
            audio_token_index=audio_token_index,
            architectures=["SalmonnForConditionalGeneration"],
            dtype=args.dtype,
            **settings,
        )
    except ValueError as err:  # window settings that make no window, a negative lora_alpha, ...
        raise ValueError(
            f"The window and LoRA settings (flags, else `config.model` of {ckpt}, else the release's defaults) do not "
            f"make a valid SALMONN config: {err}"
        ) from err
    return config, rank


def _resize_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Appends rows equal to the mean row: a deterministic `[PAD]` (the original draws it at random on every load)."""
    extra = rows - tensor.shape[0]
    if extra < 0:
        raise ValueError(f"cannot shrink a {tensor.shape[0]}-row matrix to {rows} rows")
    if extra == 0:
        return tensor
    mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(extra, -1)], dim=0)


def write_weights(
    writer: ShardWriter,
    config: SalmonnConfig,
    args: ConvertArguments,
    whisper_dir: Path,
    beats_state: dict[str, torch.Tensor],
    mapped: dict[str, torch.Tensor],
    llm_dir: Path,
    lora_rank: int,
) -> None:
    dtype = DTYPES[args.dtype]

    def put(key: str, tensor: torch.Tensor, rows: int | None = None, transform: Callable | None = None) -> None:
        """Plans `tensor` (grown to `rows` rows, or transformed) in the output dtype; it is computed when written."""
        out_dtype = dtype if tensor.is_floating_point() else tensor.dtype
        shape = (rows, *tensor.shape[1:]) if rows is not None else tuple(tensor.shape)

        def make() -> torch.Tensor:
            result = _resize_rows(tensor, rows) if rows is not None else tensor
            if transform is not None:
                result = transform(result)
            return result.to(out_dtype)

        writer.add(key, shape, out_dtype, make)

    # Whisper encoder only (the decoder is not part of SALMONN).
    found = 0
    encoder_key = re.compile(r"^(?:model\.)?encoder\.")
    for path in weight_files(whisper_dir, "Whisper"):
        for key, tensor in iter_tensors(path, "Whisper", keep=encoder_key):
            put("model.speech_encoder." + encoder_key.sub("", key), tensor)
            found += 1
    if not found:
        raise ValueError(f"Whisper {args.whisper}: no encoder weights (keys model.encoder.* or encoder.*)")
    for key, tensor in beats_state.items():
        put("model.beats." + key, tensor)

    lora = {k: v for k, v in mapped.items() if ".lora_" in k}
    for key, tensor in mapped.items():
        if key not in lora or not args.merge_lora:
            put(key, tensor)

    text = config.text_config
    targets = tuple(config.lora_target_modules)
    scaling = config.lora_alpha / lora_rank
    files = weight_files(llm_dir, "LLM")
    seen_lm_head = False
    for path in tqdm(files, desc="Copying LLM shards", unit="shard"):
        for key, tensor in iter_tensors(path, "LLM"):
            if _LLM_DROP.search(key):
                continue
            if key == "lm_head.weight":
                put("lm_head.weight", tensor, rows=text.vocab_size)
                seen_lm_head = True
                continue
            if not key.startswith("model."):
                raise ValueError(f"LLM {path}: unexpected key {key} (expected model.* and lm_head.weight of LlamaForCausalLM)")
            name = "model.language_model." + key[len("model.") :]
            if key == "model.embed_tokens.weight":
                put(name, tensor, rows=text.vocab_size)
                continue
            match = re.match(r"model\.language_model\.layers\.(\d+)\.self_attn\.(\w+)\.weight$", name)
            if match and match.group(2) in targets:
                prefix = name[: -len(".weight")]
                if args.merge_lora:
                    a = lora[f"{prefix}.lora_A.default.weight"].float()
                    b = lora[f"{prefix}.lora_B.default.weight"].float()
                    put(name, tensor, transform=lambda w, a=a, b=b: (w.float() + scaling * (b @ a)).to(w.dtype))
                    continue
                else:
                    name = f"{prefix}.base_layer.weight"
            put(name, tensor)
    if not seen_lm_head:
        raise ValueError(f"LLM {args.llm}: no lm_head.weight (SALMONN's Vicuna has an untied head)")


def check_against_model(writer: ShardWriter, config: SalmonnConfig) -> None:
    with torch.device("meta"):
        state = SalmonnForConditionalGeneration(config).state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    expected_dtypes = {k: v.dtype for k, v in state.items()}
    written = {k: shape for k, (shape, _) in writer.shapes.items()}
    missing = sorted(set(expected) - set(written))
    unexpected = sorted(set(written) - set(expected))
    mismatched = [f"{k}: {written[k]} vs model {expected[k]}" for k in sorted(set(expected) & set(written)) if written[k] != expected[k]]
    # Weights must be floating point: an integer tensor where the model has a float one would be written as is.
    not_float = [
        f"{k} ({writer.shapes[k][1]})"
        for k in sorted(set(expected_dtypes) & set(written))
        if expected_dtypes[k].is_floating_point and not writer.shapes[k][1].is_floating_point
    ]
    if not_float:
        raise ValueError(
            f"Weights that must be floating point are not: {not_float[:20]}; the source checkpoint holds integer "
            "tensors where SALMONN has weights (a corrupt or foreign file)"
        )
    if missing or unexpected or mismatched:
        raise ValueError(
            "The converted weights do not match the SALMONN model built from them: "
            f"missing {missing[:20]}, unexpected {unexpected[:20]}, mismatched {mismatched[:20]}"
        )


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def verify_folder(folder: Path, mode: str, total_bytes: int) -> None:
    """Reopens every shard; with `full`, loads the folder through the Auto classes and answers a synthetic clip."""
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            list(handle.keys())
    if mode == "auto":
        mode = "full" if total_bytes * 3 < _available_ram() else "structure"
    if mode == "structure":
        logger.info("Verified keys, shapes and shards; skipped the reload run (the model needs %.1f GB)", total_bytes / 1e9)
        return
    import numpy as np
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    t = np.arange(16000 * 2) / 16000
    inputs = processor(text=processor.format_prompt("Describe the audio."), audio=0.3 * np.sin(2 * np.pi * 440 * t), sampling_rate=16000)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, num_beams=1, do_sample=False)
        logits = model(**inputs).logits
    if not torch.isfinite(logits).all() or out.shape[1] <= inputs["input_ids"].shape[1]:
        raise ValueError(f"The converted folder {folder} loads but does not produce finite logits and new tokens")
    logger.info("Verified: the folder reloads through AutoModel/AutoProcessor and generates")


def converted_model_card(config: SalmonnConfig, args: ConvertArguments):
    """The card of a converted folder, from the package's one card writer. Base models are named only when given
    as Hub ids (or read from the Hub cache), never guessed for local paths."""
    hidden = config.text_config.hidden_size
    size = "13B" if hidden == 5120 else "7B" if hidden == 4096 else "custom-size"
    base_models = [hub_id_of(source) for source in (args.salmonn_checkpoint, args.llm, args.whisper)]
    intro = (
        "\nThis folder was converted from the original release with `salmonn-convert` (the `salmonn` package) and "
        f"gives the same numbers as the original code on the same weights. Weights are stored in {args.dtype}.\n"
    )
    return salmonn_model_card(
        config,
        base_models=[name for name in base_models if name],
        license=license_for_llm(args.llm),
        title=f"SALMONN {size} (transformers)",
        intro=intro,
    )


def convert_salmonn(args: ConvertArguments) -> Path | None:
    """Runs the conversion; returns the output folder (None for a dry run). Raises ValueError on bad input, leaving no output."""
    if not args.dry_run:
        inputs = {"--salmonn-checkpoint": args.salmonn_checkpoint, "--whisper": args.whisper, "--beats": args.beats, "--llm": args.llm}
        check_output_not_input(args.output, inputs)
        check_output_dir(args.output, args.overwrite)  # again when the folder is moved into place
    max_bytes = parse_size(args.max_shard_size)
    state, checkpoint_config = load_salmonn_checkpoint(args.salmonn_checkpoint)
    mapped, leaked = map_salmonn_keys(args.salmonn_checkpoint, state)

    patterns = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]
    whisper_dir = resolve_folder(args.whisper, "Whisper", patterns)
    try:
        whisper_config = WhisperConfig.from_pretrained(whisper_dir)
    except Exception as err:
        raise ValueError(f"Whisper {args.whisper}: cannot read its config.json: {err}") from err

    beats_config, beats_state = load_original_beats(args.beats)
    table = [v for k, v in beats_state.items() if k.endswith("relative_attention_bias.weight")]
    for key, tensor in leaked.items():
        same_shape = bool(table) and tensor.shape == table[0].shape
        if not same_shape or (not tensor.is_meta and not torch.allclose(tensor.float(), table[0].float(), atol=1e-3)):
            raise ValueError(
                f"{args.salmonn_checkpoint}: its copy of the BEATs relative position table ({key}) differs from "
                f"{args.beats}: this SALMONN was trained with another BEATs checkpoint"
            )

    llm_dir = resolve_folder(args.llm, "LLM", patterns)
    try:
        text_config = AutoConfig.from_pretrained(llm_dir)
        tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    except Exception as err:
        raise ValueError(f"LLM {args.llm}: cannot read its config or tokenizer: {err}") from err
    if text_config.model_type != "llama":
        raise ValueError(f"LLM {args.llm}: expected a LLaMA model (Vicuna), got model_type {text_config.model_type!r}")
    llm_vocab = text_config.vocab_size
    tokenizer = add_salmonn_tokens(tokenizer)
    vocab_size = tokenizer.pad_token_id + 1  # the original resizes to len(tokenizer) after adding [PAD]
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    if vocab_size < llm_vocab or audio_id != vocab_size:
        raise ValueError(
            f"LLM {args.llm}: its tokenizer ({len(tokenizer)} tokens with [PAD] and {AUDIO_TOKEN}) does not extend its "
            f"vocabulary of {llm_vocab} the way SALMONN does ([PAD] = {llm_vocab})"
        )

    config, lora_rank = build_config(
        args, mapped, checkpoint_config, whisper_config, beats_config, text_config, vocab_size, audio_id, tokenizer.pad_token_id
    )
    logger.info(
        "SALMONN: Whisper d_model %d, BEATs %d, Q-Former %d x %d layers (%d heads), LLM hidden %d x %d layers, vocab %d, "
        "windows %d/%d frames -> %d audio tokens per 30 s, LoRA rank %d alpha %g on %s",
        whisper_config.d_model, beats_config.encoder_embed_dim, config.qformer_config.hidden_size,
        config.qformer_config.num_hidden_layers, config.qformer_config.num_attention_heads, text_config.hidden_size,
        text_config.num_hidden_layers, vocab_size, config.window_kernel, config.window_stride,
        config.audio_tokens_per_segment, lora_rank, config.lora_alpha, config.lora_target_modules,
    )

    if args.dry_run:
        writer = ShardWriter(None, max_bytes)
        write_weights(writer, config, args, whisper_dir, beats_state, mapped, llm_dir, lora_rank)
        check_against_model(writer, config)
        writer.flush()
        logger.info(
            "Dry run: all %d tensors (%.2f GB as %s) map onto the SALMONN model; nothing written",
            len(writer.shapes), writer.total_bytes / 1e9, args.dtype,
        )
        return None
    with atomic_output_dir(args.output, overwrite=args.overwrite) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        write_weights(writer, config, args, whisper_dir, beats_state, mapped, llm_dir, lora_rank)
        check_against_model(writer, config)
        writer.finish()
        config.auto_map = dict(AUTO_MAP)
        config.save_pretrained(tmp)
        original_generation_config(config).save_pretrained(tmp)
        copy_remote_code(tmp)
        feature_extractor = SalmonnFeatureExtractor(feature_size=whisper_config.num_mel_bins)
        SalmonnProcessor(feature_extractor, tokenizer, audio_tokens_per_segment=config.audio_tokens_per_segment).save_pretrained(tmp)
        converted_model_card(config, args).save(tmp / "README.md")
        verify_folder(tmp, args.verify, writer.total_bytes)
    output = Path(args.output)
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.push_to_hub, private=args.private, exist_ok=True)
        api.upload_folder(folder_path=str(output), repo_id=args.push_to_hub, commit_message="Upload SALMONN converted with salmonn-convert")
        logger.info("Uploaded %s to https://huggingface.co/%s", output, args.push_to_hub)
    return output


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    (args,) = HfArgumentParser(ConvertArguments, allow_abbrev=False).parse_args_into_dataclasses(args=argv)
    try:
        output = convert_salmonn(args)
    except (ValueError, FileExistsError) as err:
        logger.error("%s", err)
        return 1
    except OSError as err:  # a full disk, a read-only or vanished output location: nothing is left behind
        logger.error("Cannot write the output folder %s: %s", args.output, err.strerror or err)
        return 1
    logger.info("Done: %s", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
