"""salmonn-demo: the whole path on a built-in tiny SALMONN, with no downloads.

It builds (or takes the shipped trained) tiny model, saves it as a Hub-style folder, loads it back through
`AutoModel` / `AutoProcessor` with `trust_remote_code=True` and answers a question about an audio clip.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import HfArgumentParser

from salmonn.cli import setup_logging
from salmonn.inference.options import DEFAULT_PROMPT


logger = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"


@dataclass
class DemoArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--model"],
            "help": "A converted or trained SALMONN folder or Hub id. Default: the built-in tiny model.",
        },
    )
    audio: str | None = field(default=None, metadata={"help": "An audio file to ask about. Default: a synthesised clip."})
    prompt: str = field(
        default=DEFAULT_PROMPT, metadata={"help": "The question about the audio (salmonn-infer's default too)."}
    )
    max_new_tokens: int = field(default=30, metadata={"help": "Longest answer in tokens."})
    num_beams: int = field(default=1, metadata={"help": "Beam width (the release's default is 4)."})
    save_dir: str | None = field(
        default=None,
        metadata={"help": "Where the tiny model's Hub-style folder is written and kept. Default: a temporary folder, removed at the end."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random tiny model (used when no trained demo model ships)."})


def synthesize_clip(seconds: float = 2.0, sampling_rate: int = 16000) -> np.ndarray:
    """A rising chirp from 300 Hz to 3 kHz: something to ask about without any audio file."""
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    f0, f1 = 300.0, 3000.0
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    return (0.4 * np.sin(phase)).astype(np.float32)


def build_demo_folder(save_dir: Path, seed: int) -> bool:
    """Writes the tiny model into `save_dir`; returns whether its weights are trained."""
    if (DEMO_MODEL_DIR / "config.json").is_file():
        import shutil

        from modeling_salmonn.modelcard_salmonn import copy_remote_code

        # The shipped folder holds weights, config and processor files; the code comes from this package, so the
        # demo never runs stale copies of the model files.
        shutil.copytree(DEMO_MODEL_DIR, save_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.py"))
        copy_remote_code(save_dir)
        return True
    else:
        from .tiny import build_tiny_model_and_processor

        model, processor = build_tiny_model_and_processor(seed=seed)
        model.save_pretrained(save_dir)
        processor.save_pretrained(save_dir)
        return False


def check_save_dir(save_dir: Path) -> None:
    """`--save_dir` is written over: it must be new, empty, or a folder an earlier salmonn-demo saved (never a user's)."""
    if save_dir.exists() and not save_dir.is_dir():
        raise ValueError(f"--save_dir {str(save_dir)!r} is a file, not a folder")
    if save_dir.is_dir() and any(save_dir.iterdir()) and not (save_dir / "demo_build.json").is_file():
        raise ValueError(
            f"--save_dir {str(save_dir)!r} is not empty and was not written by salmonn-demo; its files would be "
            "replaced: give a new or empty folder"
        )


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    (args,) = HfArgumentParser(DemoArguments, allow_abbrev=False).parse_args_into_dataclasses(args=argv)
    if args.save_dir and args.model_name_or_path is None:
        try:
            check_save_dir(Path(args.save_dir))
        except ValueError as err:
            logger.error("%s", err)
            return 2

    from transformers import AutoModel, AutoProcessor

    from .engine import generate_answers

    with tempfile.TemporaryDirectory() as tmp:
        trained = True
        model_path = args.model_name_or_path
        if model_path is None:
            folder = Path(args.save_dir) if args.save_dir else Path(tmp) / "salmonn-tiny"
            trained = build_demo_folder(folder, args.seed)
            model_path = str(folder)
            if args.save_dir:
                logger.info("Saved the built-in tiny SALMONN as a Hub-style folder: %s", folder)
            else:
                logger.info(
                    "Saved the built-in tiny SALMONN as a Hub-style folder in a temporary place, removed at the end; "
                    "pass --save_dir DIR to keep it"
                )

        model = AutoModel.from_pretrained(model_path, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)

        if args.audio:
            item = {"audio": args.audio, "prompt": args.prompt}
            audio_name = args.audio
        else:
            item = {"audio": synthesize_clip(), "sampling_rate": 16000, "prompt": args.prompt}
            audio_name = "a synthesised 2 s rising chirp (300 Hz to 3 kHz)"
        try:
            (answer,) = generate_answers(
                model, processor, [item], {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
            )
        except ValueError as err:  # an unreadable or unusable --audio
            logger.error("--audio %s: %s", args.audio, err)
            return 2

    print(f"Model:  {args.model_name_or_path or 'built-in tiny SALMONN'}")
    print(f"Audio:  {audio_name}")
    print(f"Prompt: {args.prompt}")
    print(f"Answer: {answer}")
    if not trained:
        print(
            "Note: the built-in model's weights are random, so this answer is noise. It shows that the whole path "
            "runs (features, encoders, Q-Former, LLM, generate, remote-code save and load). Pass --model with a "
            "converted or trained SALMONN folder or Hub id for real answers."
        )
    elif args.model_name_or_path is None:
        print(
            "Note: the built-in model is a few-MB SALMONN trained only on synthetic tones, noise and chirps; pass "
            "--model with a converted release (see README) for real answers."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
