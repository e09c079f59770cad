"""Parity of the default decode (the original's beam search: 4 beams, 200 new tokens) on fixture A."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_parity import _inputs, converted  # noqa: F401  (module fixture: the converted fixture A)
from tests.utils import FIXTURE_A


GOLDEN_BEAM = json.loads((FIXTURE_A / "golden_beam.json").read_text())
CASES = sorted(GOLDEN_BEAM["inputs"])


def test_golden_beam_covers_every_clip_at_both_scalings():
    clips = {name.split("@")[0] for name in CASES}
    assert len(clips) == 5
    assert set(CASES) == clips | {f"{clip}@lora2" for clip in clips}
    assert GOLDEN_BEAM["generate_cfg"]["num_beams"] == 4 and GOLDEN_BEAM["generate_cfg"]["max_new_tokens"] == 200


@pytest.mark.parametrize("case", CASES)
def test_default_generate_reproduces_original_beam_search(converted, case):  # noqa: F811
    model, processor = converted
    clip, _, variant = case.partition("@")
    inputs = _inputs(processor, clip)
    scaling = 2.0 if variant == "lora2" else 4.0
    previous = model.set_lora_scaling(scaling)
    try:
        with torch.no_grad():
            ids = model.generate(**inputs)  # the checkpoint's generation_config: the original's decode settings
    finally:
        model.set_lora_scaling(previous)
    new = ids[0, inputs["input_ids"].shape[1] :].tolist()
    # Drop the dummy BOS that transformers 4.28 put before the generated ids of an inputs_embeds generation.
    expected = GOLDEN_BEAM["inputs"][case]["generated_ids_with_dummy_bos"][1:]
    assert new == expected
