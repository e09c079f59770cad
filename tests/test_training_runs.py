"""Whole training runs: resuming after a kill, two-process DDP, and a learning check on synthetic audio."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.utils import REPO_ROOT, save_tiny_checkpoint
from salmonn.training.synthetic import SOUND_CLASSES, write_dataset


NON_SPEECH = [c for c in SOUND_CLASSES if c.kind != "speech"]


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    return env


def _train_cmd(base, manifest, out, *extra) -> list[str]:
    return [
        "-m", "salmonn.training.train", "--stage", "pretrain", "--model_name_or_path", str(base), "--train_file", str(manifest),
        "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--warmup_steps", "2",
        "--dataloader_num_workers", "0", "--use_cpu", "true", "--disable_tqdm", "true", "--logging_steps", "1", *extra,
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        "root": root,
        "base": save_tiny_checkpoint(root / "base"),
        "manifest": write_dataset(root / "data", 4, NON_SPEECH, seed=3),
    }


@pytest.mark.slow
def test_resume_after_a_kill_reaches_the_same_weights(setup, tmp_path):
    """Q-Former and LoRA dropout are on, the data is shuffled and prompts vary: RNG, sampler and prompt state must resume."""
    base, manifest, env = setup["base"], setup["manifest"], _env(tmp_path)
    steps = ["--max_steps", "16", "--seed", "11"]

    full = tmp_path / "full"
    subprocess.run([sys.executable, *_train_cmd(base, manifest, full, *steps, "--save_strategy", "no")],
                   env=env, cwd=REPO_ROOT, check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, *_train_cmd(base, manifest, killed, *steps, "--save_steps", "3")],
                               env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = killed / "checkpoint-3" / "trainer_state.json"

    def checkpoint_complete() -> bool:  # the Trainer writes trainer_state.json last
        try:
            return json.loads(state_file.read_text())["global_step"] == 3
        except (OSError, ValueError, KeyError):
            return False

    deadline = time.time() + 600
    while not checkpoint_complete() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state_file.exists(), "the run ended before its first checkpoint"
    assert not (killed / "model.safetensors").exists(), "the run finished before it was killed"

    subprocess.run([sys.executable, *_train_cmd(base, manifest, killed, *steps, "--save_steps", "3",
                                                "--resume_from_checkpoint", str(killed / "checkpoint-3"))],
                   env=env, cwd=REPO_ROOT, check=True, capture_output=True, timeout=600)

    expected, resumed = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    trainable = load_file(full / "salmonn_trainable.safetensors")
    before = load_file(base / "model.safetensors")
    assert any(not torch.equal(before[k], expected[k]) for k in trainable)
    diff = max(float((expected[k] - resumed[k]).abs().max()) for k in expected)
    print(f"resume max abs diff: {diff:.3g}")
    assert diff <= 1e-6
    # The checkpoints of the killed run hold only the trainable weights (the recipe's setting).
    assert sorted(p.name for p in (killed / "checkpoint-3").glob("*.safetensors")) == ["salmonn_trainable.safetensors"]


def test_two_process_ddp_trains_each_rank_on_its_own_data(setup, tmp_path):
    base, manifest, env = setup["base"], setup["manifest"], _env(tmp_path)
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
         *_train_cmd(base, manifest, out, "--max_steps", "2", "--save_steps", "2", "--record_data_order", "true")],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    orders = {rank: [json.loads(line) for line in (out / "data_order" / f"rank{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)}
    assert [len(o) for o in orders.values()] == [2, 2]
    for step in range(2):
        ids0, ids1 = orders[0][step]["ids"], orders[1][step]["ids"]
        assert len(ids0) == len(ids1) == 2 and not set(ids0) & set(ids1)
    # One checkpoint and one final model, written once.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 2
    assert (out / "model.safetensors").exists() and (out / "checkpoint-2" / "rng_state_1.pth").exists()
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in load_file(out / "salmonn_trainable.safetensors"))


@pytest.mark.slow
def test_fsdp2_recipe_runs_on_two_cpu_processes(setup, tmp_path):
    """training/recipes/fsdp.json (FSDP2, layers mixing frozen weights and LoRA) under torchrun with gloo."""
    base, manifest, env = setup["base"], setup["manifest"], _env(tmp_path)
    out = tmp_path / "fsdp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29632",
         *_train_cmd(base, manifest, out, "--max_steps", "2", "--save_steps", "2", "--fsdp", "full_shard auto_wrap",
                     "--fsdp_config", str(REPO_ROOT / "training" / "recipes" / "fsdp.json"))],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    trainable = load_file(out / "salmonn_trainable.safetensors")
    assert before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in trainable)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in trainable)
    assert all(torch.equal(trainable[k], after[k]) for k in trainable)


@pytest.mark.slow
def test_the_whole_path_learns_synthetic_audio(tmp_path):
    """
    Tones, chirps, noise and (with espeak-ng) spoken words, each with its own answer: training through salmonn-train
    must cut the loss by 80% and answer held-out clips right 90% of the time, leaving every frozen weight untouched.
    """
    from transformers import AutoModel, AutoProcessor

    from salmonn.training.build_demo_model import held_out_accuracy, train_on_synthetic_audio
    from salmonn.training.synthetic import available_classes

    classes = available_classes()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the data loader worker takes the other core
    try:
        result = train_on_synthetic_audio(tmp_path, classes, clips_per_class=64, max_steps=450, learning_rate=5e-3, seed=1)
    finally:
        torch.set_num_threads(threads)
    losses = result["losses"]
    drop = 1 - np.mean(losses[-3:]) / losses[0]
    model = AutoModel.from_pretrained(result["run"], trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(result["run"], trust_remote_code=True)
    accuracy, answers = held_out_accuracy(model, processor, classes, clips_per_class=10)
    print(f"classes {[c.name for c in classes]}; loss {losses[0]:.3f} -> {np.mean(losses[-3:]):.3f} ({drop:.1%} drop); "
          f"held-out accuracy {accuracy:.2f}; wrong: {[a for a in answers if not a[2]]}")
    assert drop >= 0.8
    assert accuracy >= 0.9

    before, after = load_file(result["base"] / "model.safetensors"), load_file(result["run"] / "model.safetensors")
    trainable = set(load_file(result["run"] / "salmonn_trainable.safetensors"))
    frozen = [k for k in before if k not in trainable]
    assert {k.split(".")[1] for k in frozen} >= {"speech_encoder", "beats", "language_model"}
    assert all(torch.equal(before[k], after[k]) for k in frozen)
