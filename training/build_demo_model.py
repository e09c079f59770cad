"""
Builds the trained tiny SALMONN that `salmonn-demo` uses by default (`inference/demo_model/`), with the same
recipe and `salmonn-train` path as a real run, on synthetic clips (tones, chirps, noise, and spoken words when
espeak-ng is installed).

SALMONN starts from pretrained encoders and a pretrained LLM; a tiny model has none, so the base is made to stand in
for them first: the randomly initialised Whisper and BEATs encoders get weights at a larger scale (at the usual 0.02
their outputs hardly depend on the input), and the tiny LLM is trained on text alone: conversations in SALMONN's
prompt layout whose audio slot holds a word ("tone", "noise", ...) and whose answer describes it, so that, like
Vicuna, it can read what it is given and write a sentence about it. Then SALMONN training proper runs with everything
of the base frozen, exactly as on a converted release: only the Q-Former path and LoRA learn to present the audio to
the LLM so that it gives the right answer.

    python -m training.build_demo_model                      # regenerates inference/demo_model/
    python -m training.build_demo_model --output_dir /tmp/demo --max_steps 200
"""

from __future__ import annotations

import json
import logging
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from salmonn.cli import setup_logging


logger = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "inference" / "demo_model"
# The demo asks this about its synthesised chirp; the pool also has other wordings so that the model follows none.
DEMO_PROMPTS = {
    "audiocaption": [
        "<Speech><SpeechHere></Speech> Describe the audio.",
        "<Speech><SpeechHere></Speech> What do you hear in this recording?",
        "<Speech><SpeechHere></Speech> Please describe the audio in detail.",
        "<Speech><SpeechHere></Speech> What is this sound?",
    ]
}


def sharpen_encoders(model, std: float = 0.2, seed: int = 0) -> None:
    """Redraws the weight matrices of the (random) Whisper and BEATs encoders at scale `std`; positions are kept."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (model.model.speech_encoder, model.model.beats):
            for name, param in module.named_parameters():
                if param.ndim >= 2 and "embed_positions" not in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)


def pretrain_language_model(
    model, sequences: list[list[int]], pad_token_id: int, steps: int = 150, lr: float = 3e-3, batch_size: int = 16, seed: int = 0
) -> float:
    """
    Trains the LLM's own weights (not LoRA) on token sequences alone, standing in for a pretrained LLM; returns the
    last loss. The model's trainable set is restored afterwards.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    llm_params = [
        p for n, p in model.named_parameters() if (n.startswith("model.language_model.") or n.startswith("lm_head.")) and ".lora_" not in n
    ]
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad = False
    for p in llm_params:
        p.requires_grad = True
    optimizer = torch.optim.AdamW(llm_params, lr=lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    loss_value = float("nan")
    try:
        for _ in range(steps):
            batch = [sequences[rng.randrange(len(sequences))] for _ in range(batch_size)]
            longest = max(map(len, batch))
            ids = torch.tensor([s + [pad_token_id] * (longest - len(s)) for s in batch])
            mask = (torch.arange(longest)[None] < torch.tensor([len(s) for s in batch])[:, None]).long()
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
    finally:
        for p in model.parameters():
            p.requires_grad = saved[id(p)]
        model.train(was_training)
    return loss_value


def text_corpus(
    tokenizer, cues: dict[str, str], prompts: dict[str, list[str]], repeats: int = 6, filler: str = "hum", seed: int = 0
) -> list[list[int]]:
    """
    Text-only conversations in the exact token layout of SALMONN's prompts, where the audio slot holds words instead
    of audio: a few `cues` (word -> answer) among many `filler` words, as a short clip sits among the silent windows of
    its 30 s segment: `[BOS] USER: <Speech> hum tone tone tone hum hum ... </Speech> Describe the audio.
    ASSISTANT: A pure tone plays steadily.</s>`. Like a real LLM, the base then reads what sits between the speech
    tags and describes it; SALMONN training has to make the audio look like such words.
    """
    rng = random.Random(seed)
    instructions = [p.split("</Speech>", 1)[-1] for pool in prompts.values() for p in pool]

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    sequences = []
    for cue, answer in cues.items():
        for instruction in instructions:
            for _ in range(repeats):
                words = [filler] * rng.randint(0, 2) + [cue] * rng.randint(2, 8) + [filler] * rng.randint(10, 40)
                sequences.append(
                    [tokenizer.bos_token_id] + ids("USER: <Speech>") + ids(" ".join(words))
                    + ids("</Speech>" + instruction + "\nASSISTANT:") + ids(answer + tokenizer.eos_token)
                )
    return sequences


def build_tiny_base(
    output_dir: str | Path, cues: dict[str, str], prompts: dict[str, list[str]] = DEMO_PROMPTS, seed: int = 0,
    encoder_std: float = 0.2, lm_steps: int = 200, dropout: float | None = None,
) -> Path:
    """
    A tiny SALMONN folder with stand-in pretrained encoders and LLM, and fresh LoRA / Q-Former, ready for training.
    `dropout` replaces the Q-Former's and LoRA's dropout (0.1 in the release).
    """
    from salmonn.inference.tiny import build_tiny_model_and_processor

    overrides = {}
    if dropout is not None:
        overrides = {
            "qformer_config": dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
                                   hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout),
            "lora_dropout": dropout,
        }
    model, processor = build_tiny_model_and_processor(seed=seed, **overrides)
    sharpen_encoders(model, encoder_std, seed)
    corpus = text_corpus(processor.tokenizer, cues, prompts, seed=seed)
    loss = pretrain_language_model(model, corpus, processor.tokenizer.pad_token_id, steps=lm_steps, seed=seed)
    logger.info("Text-only pretraining of the tiny LLM: final loss %.3f", loss)
    model.eval()
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def greedy_answers(model, processor, clips: list[np.ndarray], instruction: str, max_new_tokens: int = 20) -> list[str]:
    from .activation import generate_answers

    prompt = "<Speech><SpeechHere></Speech> " + instruction
    return generate_answers(
        model, processor, [(clip, 16000) for clip in clips], prompt, batch_size=8,
        generation_kwargs={"max_new_tokens": max_new_tokens, "num_beams": 1, "do_sample": False}, progress=False,
    )


def train_on_synthetic_audio(
    work_dir: str | Path, classes, clips_per_class: int = 32, max_steps: int = 450, learning_rate: float = 5e-3,
    seed: int = 0, prompts: dict[str, list[str]] = DEMO_PROMPTS, batch_size: int = 8, extra_args: list[str] | None = None,
) -> dict:
    """
    Builds the stand-in base in `work_dir/base`, writes synthetic clips to `work_dir/data` and trains with
    `salmonn-train` (the stage-1 recipe, scaled to a few hundred CPU steps) into `work_dir/run`.
    Returns the folders and the logged losses.
    """
    from .synthetic import write_dataset
    from .train import main as train_main

    work_dir = Path(work_dir)
    base = build_tiny_base(work_dir / "base", {c.cue: c.answer for c in classes}, prompts, seed=seed)
    manifest = write_dataset(work_dir / "data", clips_per_class, classes, seed=seed)
    prompt_file = work_dir / "prompts.json"
    prompt_file.write_text(json.dumps(prompts), encoding="utf-8")
    run_dir = work_dir / "run"
    code = train_main([
        "--stage", "pretrain",
        "--model_name_or_path", str(base),
        "--train_file", str(manifest),
        "--prompt_file", str(prompt_file),
        "--output_dir", str(run_dir),
        "--max_steps", str(max_steps),
        "--learning_rate", str(learning_rate),
        "--warmup_steps", str(max(1, max_steps // 15)),
        "--warmup_start_lr", str(learning_rate / 100),
        "--min_lr", str(learning_rate / 10),
        "--per_device_train_batch_size", str(batch_size),
        "--save_strategy", "no",
        "--logging_steps", "5",
        "--logging_first_step", "true",
        "--dataloader_num_workers", "1",
        "--seed", str(seed),
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        *(extra_args or []),
    ])
    if code != 0:
        raise RuntimeError(f"salmonn-train failed with exit code {code}")
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return {"base": base, "run": run_dir, "manifest": manifest, "losses": losses}


def held_out_accuracy(model, processor, classes, clips_per_class: int = 4, seed: int = 10_000) -> tuple[float, list]:
    """Greedy answers to "Describe the audio." on clips never trained on; exact-match accuracy."""
    from .synthetic import make_clip

    held_out = [(c, make_clip(c, seed + k)) for c in classes for k in range(clips_per_class)]
    predicted = greedy_answers(model, processor, [clip for _, clip in held_out], "Describe the audio.")
    results = [(c.name, p, p == c.answer) for (c, _), p in zip(held_out, predicted)]
    return float(np.mean([ok for _, _, ok in results])), results


@dataclass
class BuildArguments:
    output_dir: str = field(default=str(DEMO_MODEL_DIR), metadata={"help": "Where the demo model folder is written."})
    clips_per_class: int = field(default=32, metadata={"help": "Synthetic training clips per sound class."})
    max_steps: int = field(default=450, metadata={"help": "SALMONN training steps."})
    learning_rate: float = field(default=5e-3, metadata={"help": "Peak learning rate of SALMONN training."})
    seed: int = field(default=0, metadata={"help": "Seed of the base model, the clips and training."})
    speech: bool = field(default=True, metadata={"help": "Also train the spoken-word class (needs espeak-ng)."})
    overwrite: bool = field(
        default=True,
        metadata={"help": "Replace output_dir if empty or an earlier output (it holds config.json); never another folder."},
    )


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModel, AutoProcessor, HfArgumentParser

    from salmonn.conversion.io_utils import atomic_output_dir, check_output_dir
    from salmonn.inference.demo import synthesize_clip

    from .synthetic import available_classes, espeak_available

    setup_logging()
    (args,) = HfArgumentParser(BuildArguments, allow_abbrev=False).parse_args_into_dataclasses(args=argv)
    if args.speech and not espeak_available():
        logger.error("The spoken-word class needs espeak-ng (apt-get install -y espeak-ng); or pass --speech false")
        return 2
    try:
        check_output_dir(args.output_dir, args.overwrite)  # before training; again when the folder is moved into place
    except FileExistsError as err:
        logger.error("%s", err)
        return 2
    classes = available_classes(include_speech=args.speech)

    with tempfile.TemporaryDirectory(prefix="salmonn-demo-build-") as tmp:
        result = train_on_synthetic_audio(
            tmp, classes, clips_per_class=args.clips_per_class, max_steps=args.max_steps, learning_rate=args.learning_rate,
            seed=args.seed, extra_args=["--export_trainable", "false"],
        )
        model = AutoModel.from_pretrained(result["run"], trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(result["run"], trust_remote_code=True)
        demo_answer = greedy_answers(model, processor, [synthesize_clip()], "Describe the audio.")[0]
        chirp_answer = next(c.answer for c in classes if c.kind == "chirp")
        accuracy, _ = held_out_accuracy(model, processor, classes)
        losses = result["losses"]
        logger.info("Loss %.3f -> %.3f; demo clip answer %r (expected %r); held-out accuracy %.2f",
                    losses[0], losses[-1], demo_answer, chirp_answer, accuracy)
        if demo_answer != chirp_answer:
            logger.error("The trained model does not answer the demo clip correctly; nothing written")
            return 1

        with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as out:
            model.save_pretrained(out)
            processor.save_pretrained(out)
            (Path(out) / "demo_build.json").write_text(
                json.dumps(
                    {"classes": [c.name for c in classes], "answers": [c.answer for c in classes],
                     "held_out_accuracy": accuracy, "first_loss": losses[0], "last_loss": losses[-1],
                     "demo_answer": demo_answer,
                     "arguments": {k: v for k, v in vars(args).items() if k != "output_dir"}},
                    indent=2,
                ),
                encoding="utf-8",
            )
    size = sum(f.stat().st_size for f in Path(args.output_dir).rglob("*") if f.is_file())
    print(f"Wrote {args.output_dir} ({size / 2**20:.2f} MB); demo answer: {demo_answer!r}; held-out accuracy {accuracy:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
