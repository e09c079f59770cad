"""The shipped demo model (inference/demo_model/) is trained: it answers the demo's clip and clips it never saw."""

from __future__ import annotations

import pytest

from tests.utils import REPO_ROOT


DEMO_DIR = REPO_ROOT / "inference" / "demo_model"


def _measured_accuracy(folder, seed: int) -> tuple[float, list[tuple[str, str]]]:
    """Greedy answers of the model in `folder` on 4 fresh clips per class (seeds the build never used)."""
    from transformers import AutoModel, AutoProcessor

    from salmonn.training.build_demo_model import greedy_answers
    from salmonn.training.synthetic import SOUND_CLASSES, make_clip

    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    cases = [(c, make_clip(c, seed + k)) for c in SOUND_CLASSES for k in range(4)]
    answers = greedy_answers(model, processor, [clip for _, clip in cases], "Describe the audio.")
    wrong = [(c.name, answer) for (c, _), answer in zip(cases, answers) if answer != c.answer]
    return 1 - len(wrong) / len(cases), wrong


def test_demo_model_is_small_and_answers_the_demo_clip(capsys):
    from salmonn.inference.demo import main as demo_main
    from salmonn.training.synthetic import SOUND_CLASSES

    assert (DEMO_DIR / "config.json").is_file(), "run `python -m salmonn.training.build_demo_model` to build it"
    size = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    assert size < 8 * 2**20
    chirp = next(c.answer for c in SOUND_CLASSES if c.kind == "chirp")
    assert demo_main([]) == 0
    out = capsys.readouterr().out
    assert f"Answer: {chirp}" in out


def test_demo_model_answers_unseen_clips_of_every_class(tmp_path):
    from salmonn.inference.demo import build_demo_folder

    assert build_demo_folder(tmp_path / "demo", seed=0)  # the shipped weights with this package's model code
    # 16 clips, 4 per class (speech included: espeak-ng), none of them seen in training or in the build's own check
    accuracy, wrong = _measured_accuracy(tmp_path / "demo", seed=50_000)
    assert accuracy >= 0.9, wrong


@pytest.mark.slow
def test_build_demo_model_regenerates_an_equally_good_model(tmp_path):
    from salmonn.training.build_demo_model import main as build_main

    assert build_main(["--output_dir", str(tmp_path / "demo")]) == 0
    accuracy, wrong = _measured_accuracy(tmp_path / "demo", seed=50_000)
    assert accuracy >= 0.9, wrong
