"""What the Trainer really does per step: the learning rates it applies, and validation during training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from salmonn.training.collator import SalmonnDataCollator
from salmonn.training.data import SalmonnTrainDataset, load_manifest
from salmonn.training.prompts import PromptPool
from salmonn.training.synthetic import write_dataset
from salmonn.training.train import main
from salmonn.training.trainer import token_accuracy
from tests.test_training import NON_SPEECH, _args
from tests.utils import save_tiny_checkpoint



@pytest.fixture(scope="module")
def run_with_validation(tmp_path_factory):
    """4 steps with warm-up over 2 steps, validation every 2 steps on the first 2 of the validation items."""
    root = tmp_path_factory.mktemp("schedule")
    base = save_tiny_checkpoint(root / "base")
    train = write_dataset(root / "train", 2, NON_SPEECH, seed=0)
    validation = write_dataset(root / "validation", 1, NON_SPEECH, seed=1)
    out = root / "out"
    learning_rates = []

    def record(optimizer, args, kwargs):
        learning_rates.append([group["lr"] for group in optimizer.param_groups])

    handle = register_optimizer_step_pre_hook(record)
    try:
        code = main(
            _args(base, train, out, "--max_steps", "4", "--warmup_start_lr", "1e-3", "--min_lr", "1e-4",
                  "--warmup_steps", "2", "--validation_file", str(validation), "--max_eval_samples", "2",
                  "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "no")
        )
    finally:
        handle.remove()
    assert code == 0
    return {"out": out, "validation": validation, "learning_rates": learning_rates}


def test_learning_rate_of_every_step(run_with_validation):
    # --learning_rate 1e-2 (from _args), warm-up from 1e-3 over 2 steps, then cosine to 1e-4 over the 4 steps:
    # step 0: 1e-3; step 1: 1e-3 + (1e-2 - 1e-3) / 2; steps 2, 3: 1e-4 + (1e-2 - 1e-4) / 2 * (1 + cos(pi * s / 4))
    expected = [1e-3, 5.5e-3, 5.05e-3, 1.5498214331265902e-3]
    rates = run_with_validation["learning_rates"]
    assert len(rates) == 4
    for step, (groups, lr) in enumerate(zip(rates, expected)):
        assert len(groups) == 2, step  # decayed matrices and the rest
        assert groups == [pytest.approx(lr, rel=1e-12)] * 2, step


def test_validation_during_training_reports_token_accuracy(run_with_validation):
    out = run_with_validation["out"]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in history if "eval_token_accuracy" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    final = json.loads((out / "eval_results.json").read_text())
    assert final["eval_samples"] == 2  # --max_eval_samples of the 5 validation items
    assert len(load_manifest(run_with_validation["validation"])) == len(NON_SPEECH) > 2

    # The same number by hand: the saved model on the first 2 validation items, argmax against the next answer token.
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    items = load_manifest(run_with_validation["validation"])[:2]
    dataset = SalmonnTrainDataset(items, PromptPool(), seed=42, name="validation")
    batch = SalmonnDataCollator(processor)([dataset[0], dataset[1]])
    labels = batch.pop("labels")
    batch.pop("ids")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1)
    shifted_predictions, shifted_labels = predictions[:, :-1], labels[:, 1:]
    mask = shifted_labels != -100
    correct, total = int((shifted_predictions[mask] == shifted_labels[mask]).sum()), int(mask.sum())
    assert total > 0
    assert final["eval_token_accuracy"] == evaluations[-1]["eval_token_accuracy"] == correct / total


def test_token_accuracy_counts_answer_tokens_only():
    from transformers.trainer_utils import EvalPrediction

    # Position t predicts label t + 1; -100 labels (prompt, padding) do not count.
    predictions = np.array([[5, 6, 7, 9], [1, 2, 3, 4]])
    labels = np.array([[-100, 5, 0, 7], [-100, -100, 2, -100]])
    # row 0: 5 == 5 right, 6 != 0 wrong, 7 == 7 right; row 1: 2 == 2 right -> 3 of 4
    assert token_accuracy(EvalPrediction(predictions=predictions, label_ids=labels)) == {"token_accuracy": 0.75}
    empty = np.full((1, 4), -100)
    assert token_accuracy(EvalPrediction(predictions=predictions[:1], label_ids=empty)) == {"token_accuracy": 0.0}
