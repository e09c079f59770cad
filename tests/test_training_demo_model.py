"""The shipped demo model (inference/demo_model/) is trained: it answers the demo's synthesised clip correctly."""

from __future__ import annotations

import json

import pytest

from tests.utils import REPO_ROOT


DEMO_DIR = REPO_ROOT / "inference" / "demo_model"


def test_demo_model_is_small_and_answers_the_demo_clip(capsys):
    from salmonn.inference.demo import main as demo_main
    from salmonn.training.synthetic import SOUND_CLASSES

    assert (DEMO_DIR / "config.json").is_file(), "run `python -m training.build_demo_model` to build it"
    size = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    assert size < 8 * 2**20
    build = json.loads((DEMO_DIR / "demo_build.json").read_text())
    chirp = next(c.answer for c in SOUND_CLASSES if c.kind == "chirp")
    assert build["demo_answer"] == chirp and build["held_out_accuracy"] >= 0.9

    assert demo_main([]) == 0
    out = capsys.readouterr().out
    assert f"Answer: {chirp}" in out


@pytest.mark.slow
def test_build_demo_model_regenerates_an_equally_good_model(tmp_path):
    from salmonn.training.build_demo_model import main as build_main

    assert build_main(["--output_dir", str(tmp_path / "demo")]) == 0
    build = json.loads((tmp_path / "demo" / "demo_build.json").read_text())
    assert build["held_out_accuracy"] >= 0.9
