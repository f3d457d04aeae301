"""Stage 1 of the recipe: layer-wise (1a) and end-to-end (1b) distillation of a hybrid from its teacher.

Both stages run the teacher inside the hybrid (`teacher.attach_teacher`): only the converted layers'
attention modules are kept beside their mixers, so the shared frozen weights exist once.

1a `LayerwiseDistillation`: one forward per batch with every converted layer in "layerwise" mode. Each
   mixer sees exactly the teacher's input to that layer and is trained by MSE (over real tokens) to the
   teacher attention's output; later layers keep receiving the teacher's activations.
1b `EndToEndDistillation`: the teacher's logits (hybrid in "teacher" mode, no grad) against the student's
   (hybrid in "student" mode): KL(teacher || student) at a temperature, averaged over real tokens, plus an
   optional cross-entropy term.
"""

from __future__ import annotations

import re

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from hybridize.lightning_modules.losses import distillation_kl
from hybridize.lightning_modules.teacher import attach_teacher, distillation_mode

# Which parameters train, as regular expressions over parameter names: the converted layers' mixers.
MIXER_PARAMETERS = (r"\.self_attn\.student\.",)


def freeze_except(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> dict[str, int]:
    """Train exactly the parameters whose name matches one of `patterns`; return the counts."""
    compiled = [re.compile(pattern) for pattern in patterns]
    counts = {"trainable": 0, "frozen": 0}
    for name, parameter in model.named_parameters():
        train = any(pattern.search(name) for pattern in compiled)
        parameter.requires_grad_(train)
        counts["trainable" if train else "frozen"] += parameter.numel()
    if counts["trainable"] == 0:
        raise ValueError(f"No parameter name matches the trainable patterns {list(patterns)}.")
    return counts


class DistillationStage(L.LightningModule):
    """Shared parts: the hybrid with its teacher attached, the trainable set, AdamW, trainable-only checkpoints."""

    def __init__(
        self,
        hybrid: nn.Module,
        teacher: nn.Module,
        *,
        trainable: tuple[str, ...] | list[str] = MIXER_PARAMETERS,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
    ):
        super().__init__()
        self.hybrid = hybrid
        attach_teacher(hybrid, teacher)
        self.parameter_counts = freeze_except(hybrid, trainable)
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.strict_loading = False  # checkpoints hold only the trainable parameters

    def on_fit_start(self) -> None:
        counts = self.parameter_counts
        self.print(
            f"{type(self).__name__}: {counts['trainable']:,} trainable / {counts['frozen']:,} frozen parameters"
        )

    def configure_optimizers(self):
        parameters = [p for p in self.hybrid.parameters() if p.requires_grad]
        return torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {f"hybrid.{name}" for name, p in self.hybrid.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    @staticmethod
    def model_inputs(batch: dict) -> dict:
        return {key: value for key, value in batch.items() if key != "labels"}


class LayerwiseDistillation(DistillationStage):
    """Stage 1a: every mixer regresses its teacher attention's output on the teacher's input (MSE)."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with distillation_mode(self.hybrid, "layerwise") as layers, torch.no_grad():
            self.hybrid(**self.model_inputs(batch), use_cache=False)
        losses = torch.stack([layer.loss for layer in layers])
        loss = losses.mean()
        self.log("train/layerwise_mse", loss, prog_bar=True)
        return loss


class EndToEndDistillation(DistillationStage):
    """Stage 1b: KL(teacher || student) on the logits at `temperature`, over real tokens, plus `ce_weight` * CE."""

    def __init__(
        self,
        hybrid: nn.Module,
        teacher: nn.Module,
        *,
        temperature: float = 2.0,
        ce_weight: float = 0.0,
        ignore_token_ids: tuple[int, ...] | list[int] = (),
        **kwargs,
    ):
        super().__init__(hybrid, teacher, **kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.temperature, self.ce_weight = temperature, ce_weight
        self.ignore_token_ids = tuple(ignore_token_ids)  # e.g. image placeholder tokens

    def valid_tokens(self, batch: dict) -> torch.Tensor:
        valid = batch["attention_mask"].bool()
        for token_id in self.ignore_token_ids:
            valid = valid & (batch["input_ids"] != token_id)
        return valid

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """ "loss" (what trains), "kl" and, with ce_weight, "ce" for one batch."""
        inputs = self.model_inputs(batch)
        with distillation_mode(self.hybrid, "teacher"), torch.no_grad():
            teacher_logits = self.hybrid(**inputs, use_cache=False).logits
        with distillation_mode(self.hybrid, "student"):
            student_logits = self.hybrid(**inputs, use_cache=False).logits
        kl = distillation_kl(student_logits, teacher_logits, self.valid_tokens(batch), self.temperature)
        losses = {"loss": kl, "kl": kl}
        if self.ce_weight:
            labels = batch["labels"][:, 1:]
            ce = F.cross_entropy(
                student_logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100
            )
            losses.update(ce=ce, loss=kl + self.ce_weight * ce)
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        self.log_dict({f"train/{name}": value for name, value in losses.items()}, prog_bar=True)
        return losses["loss"]
