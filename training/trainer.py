"""`Trainer` with SALMONN's optimiser groups, learning-rate schedule and (optionally) trainable-only checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
from functools import partial

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import EvalPrediction

from .export import TRAINABLE_EXPORT_NAME, load_trainable_export, save_trainable_export


logger = logging.getLogger(__name__)


def salmonn_lr_lambda(step: int, init_lr: float, warmup_start_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """
    The original `LinearWarmupCosineLRScheduler`, as a factor of `init_lr`: linear from `warmup_start_lr` to `init_lr`
    over `warmup_steps`, then cosine from `init_lr` to `min_lr` where the cosine's phase counts every step from 0
    (so it starts slightly below `init_lr` once warm-up ends, as the original does).
    """
    if step < warmup_steps:
        lr = min(init_lr, warmup_start_lr + (init_lr - warmup_start_lr) * step / max(1, warmup_steps))
    else:
        lr = (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps))) + min_lr
    return lr / init_lr if init_lr > 0 else 0.0


class NonFiniteTrainingError(ValueError):
    """Training met a NaN or infinite gradient or weight; it stops before the bad update or save."""


class DatasetEpochCallback(TrainerCallback):
    """Tells the training dataset the epoch, so that each epoch draws its own prompts (same ones after resuming)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))


def preprocess_logits_for_accuracy(logits, labels):
    """Keeps only the argmax so that evaluation never holds full-vocabulary logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def token_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """Next-token accuracy on the answer tokens: the original's model-selection metric."""
    predictions, labels = prediction.predictions, prediction.label_ids
    predictions, labels = np.asarray(predictions)[:, :-1], np.asarray(labels)[:, 1:]
    mask = labels != -100
    total = int(mask.sum())
    return {"token_accuracy": float((predictions[mask] == labels[mask]).sum() / total) if total else 0.0}


class SalmonnTrainer(Trainer):
    """
    The stock Trainer plus what SALMONN's recipe needs:

    - weight decay on matrices only (`decay_matrices_only`; the original decays every parameter with 2 or more
      dimensions, the window query included, and no bias or LayerNorm);
    - `lr_schedule="salmonn"`: linear warm-up from `warmup_start_lr` and a cosine down to `min_lr`;
    - `checkpoint_trainable_only`: checkpoints hold only the trainable weights (plus optimizer, scheduler and RNG
      states), so a 13B run does not write the frozen 26 GB every time; resuming works the same;
    - `record_data_order`: each rank appends the ids of the examples of every batch it trains on to
      `data_order/rank{N}.jsonl`.
    """

    def __init__(
        self,
        *args,
        lr_schedule: str = "salmonn",
        warmup_start_lr: float = 1e-6,
        min_lr: float = 1e-5,
        decay_matrices_only: bool = True,
        checkpoint_trainable_only: bool = False,
        record_data_order: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if lr_schedule not in ("salmonn", "trainer"):
            raise ValueError(f"`lr_schedule` must be 'salmonn' or 'trainer', got {lr_schedule!r}")
        self.lr_schedule = lr_schedule
        self.warmup_start_lr = warmup_start_lr
        self.min_lr = min_lr
        self.decay_matrices_only = decay_matrices_only
        self.checkpoint_trainable_only = checkpoint_trainable_only
        self.record_data_order = record_data_order
        if checkpoint_trainable_only and self.args.load_best_model_at_end:
            raise ValueError("--checkpoint_trainable_only cannot be combined with --load_best_model_at_end")
        # --max_grad_norm 0 turns clipping off (as in Trainer); a negative one would too, silently, and NaN poisons every step.
        checked = (
            ("--learning_rate", self.args.learning_rate), ("--warmup_start_lr", warmup_start_lr), ("--min_lr", min_lr),
            ("--max_grad_norm", self.args.max_grad_norm),
        )
        for flag, value in checked:
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{flag} must be a finite number >= 0, got {value}")
        self._last_batch_ids = None

    # -- optimiser and schedule -----------------------------------------------------------------------------

    def get_decay_parameter_names(self, model) -> list[str]:
        if not self.decay_matrices_only:
            return super().get_decay_parameter_names(model)
        return [name for name, param in model.named_parameters() if param.ndim >= 2 and "bias" not in name]

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_schedule != "salmonn" or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer if optimizer is not None else self.optimizer
        lr_lambda = partial(
            salmonn_lr_lambda,
            init_lr=self.args.learning_rate,
            warmup_start_lr=self.warmup_start_lr,
            min_lr=self.min_lr,
            warmup_steps=self.args.get_warmup_steps(num_training_steps),
            total_steps=num_training_steps,
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # -- inputs -----------------------------------------------------------------------------------------------

    def _prepare_inputs(self, inputs):
        inputs = dict(inputs)
        ids = inputs.pop("ids", None)
        if self.model.training:
            self._last_batch_ids = ids
        if self.record_data_order and ids is not None and self.model.training:
            folder = os.path.join(self.args.output_dir, "data_order")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"rank{self.args.process_index}.jsonl"), "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": self.state.global_step, "ids": ids}) + "\n")
        return super()._prepare_inputs(inputs)

    # -- non-finite values -------------------------------------------------------------------------------------

    def _get_grad_norm(self, model, grad_norm=None):
        # Checked before the optimizer step, so a NaN/inf gradient never reaches the weights (one host sync per
        # step). With fp16 loss scaling, inf gradients are part of the normal scale search (the step is skipped).
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(grad_norm) if grad_norm is not None else 0.0
        if not math.isfinite(value) and not self.args.fp16:
            batch = f" (batch ids {self._last_batch_ids})" if self._last_batch_ids else ""
            raise NonFiniteTrainingError(
                f"step {self.state.global_step + 1}: the gradient norm is {value}{batch}; training stopped before "
                "this update, nothing more is saved. Check that batch's audio and labels, or lower --learning_rate"
            )
        return grad_norm

    def _check_finite_weights(self) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        bad = [name for name, param in model.named_parameters() if param.requires_grad and not torch.isfinite(param).all()]
        if bad:
            raise NonFiniteTrainingError(
                f"step {self.state.global_step}: {len(bad)} trainable weight(s) hold NaN or inf (first: {bad[:3]}); "
                "they are not saved. Lower --learning_rate or check the training data"
            )

    # -- checkpoints ------------------------------------------------------------------------------------------

    def _trainable_only_applies(self) -> bool:
        return self.checkpoint_trainable_only and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Only the Trainer's own checkpoint folders are trainable-only; the final model (also what push_to_hub
        # saves into output_dir) is always complete.
        self._check_finite_weights()
        is_checkpoint = output_dir is not None and os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir)
        if not (_internal_call and is_checkpoint and self._trainable_only_applies()):
            return super().save_model(output_dir, _internal_call=_internal_call)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_trainable_export(model, os.path.join(output_dir, TRAINABLE_EXPORT_NAME))
        model.config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        export = os.path.join(resume_from_checkpoint, TRAINABLE_EXPORT_NAME)
        has_full = any(
            os.path.isfile(os.path.join(resume_from_checkpoint, name))
            for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
        )
        if os.path.isfile(export) and not has_full:
            target = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
            load_trainable_export(target, export)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    # -- sharing --------------------------------------------------------------------------------------------

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """SALMONN's card (the one writer of every save and push path) instead of the Trainer's generic draft."""
        if not self.is_world_process_zero():
            return
        from modeling_salmonn.modelcard_salmonn import saved_model_card

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        datasets = [dataset_tags] if isinstance(dataset_tags, str) else list(dataset_tags or [])
        card = saved_model_card(model, repo_id=self.hub_model_id, tags=tags, datasets=datasets or None)
        if license is not None:
            card.data.license = license
        card.save(os.path.join(self.args.output_dir, "README.md"))
