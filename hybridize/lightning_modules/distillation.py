"""Stage 1 of the recipe: layer-wise (1a) and end-to-end (1b) distillation of a hybrid from its teacher.

Both stages run the teacher inside the hybrid (`teacher.attach_teacher`): only the converted layers'
attention modules are kept beside their mixers, so the shared frozen weights exist once.

1a `LayerwiseDistillation`: one forward per batch with every converted layer in "layerwise" mode. Each
   mixer sees exactly the teacher's input to that layer and is trained by MSE (over real tokens) to the
   teacher attention's output; later layers keep receiving the teacher's activations.
1b `EndToEndDistillation`: the teacher's logits (hybrid in "teacher" mode, no grad) against the student's
   (hybrid in "student" mode): KL(teacher || student) at a temperature, averaged over real tokens, plus an
   optional cross-entropy term. Both models' last hidden states go to the loss, which runs the output head on
   a chunk of positions at a time (`head_distillation_kl`): no (T, vocab) logits are held.

Neither model projects more positions onto the vocabulary than its loss reads: 1a reads no logits
(`logits_to_keep`), and 1b's KL reads only the positions of real tokens (image placeholders can be most of a
sample).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from hybridize.converters.checkpoint import load_base_model
from hybridize.converters.hybrid_model import PLAN_KEY
from hybridize.lightning_modules.losses import head_cross_entropy, head_distillation_kl
from hybridize.lightning_modules.stage import (
    CONVERTED,
    HybridStage,
    last_features,
    logits_kept,
    parameter_categories,
)
from hybridize.lightning_modules.teacher import attach_teacher, distillation_mode, teacher_detached


def check_shared_weights(hybrid: nn.Module, teacher: nn.Module) -> None:
    """Every weight the hybrid shares with its teacher (all but the converted attention) must be the teacher's:
    the teacher runs inside the hybrid, so another teacher would make a chimera."""
    teacher_weights = dict(teacher.named_parameters())
    categories = parameter_categories(hybrid)
    shared = [
        (name, p)
        for name, p in hybrid.named_parameters()
        if name in teacher_weights and categories[name] != "mixer"
    ]
    different = [
        name
        for name, parameter in shared
        if parameter.shape != teacher_weights[name].shape
        or not torch.equal(parameter, teacher_weights[name].to(parameter.device, parameter.dtype))
    ]
    if not shared or different:
        raise ValueError(
            f"The teacher is not the model this hybrid was converted from: {len(different) or 'no'} of its "
            f"{len(shared)} shared weights differ (e.g. {(different or ['none shared'])[0]}). Set model.teacher "
            "to the base model given to `hybridize convert` (and the same dtype)."
        )


def valid_positions(valid: torch.Tensor) -> torch.Tensor | None:
    """The positions (1-D) where any row of `valid` (B, T) has a real token; None when every position has one
    (or none has: the loss is then zero over all of them, with its graph)."""
    any_row = valid.any(0)  # (T,)
    count = int(any_row.sum())
    return None if count in (0, any_row.numel()) else any_row.nonzero().squeeze(1)


class DistillationStage(HybridStage):
    """Stage 1 parts: the teacher's attention attached beside each mixer; only the mixers may train."""

    default_trainable = ("mixers",)

    def __init__(self, checkpoint, *, teacher: str | nn.Module | None = None, **kwargs):
        """
        Args:
            teacher: the base model the hybrid was converted from (an embedded name, a directory, a hub id or a
                model); default: the base model recorded in the hybrid's plan.
        """
        self._teacher = (teacher,)  # a tuple: nn.Module refuses module attributes before its __init__
        super().__init__(checkpoint, **kwargs)
        outside = [
            category
            for category, row in self.parameter_counts.items()
            if row["trainable"] and category != "mixer"
        ]
        if outside:
            raise ValueError(
                f"Stage {self.stage!r} runs the teacher inside the hybrid, so only the mixers can train; "
                f"trainable={list(self.trainable)} also selects {outside} parameters, which would change the "
                "teacher. Train those in the SFT stage."
            )

    def prepare_model(self) -> None:
        (teacher,) = self._teacher
        del self._teacher  # only its attention modules are kept (copied into the hybrid)
        if teacher is None:
            teacher = getattr(self.hybrid.config, PLAN_KEY).get("base_model")
            if not teacher:
                raise ValueError("The hybrid does not record its base model; set model.teacher.")
        if isinstance(teacher, str):
            teacher, _ = load_base_model(teacher, dtype=self.dtype_frozen or self.hybrid.dtype)
        check_shared_weights(self.hybrid, teacher)
        attach_teacher(self.hybrid, teacher)

    @contextmanager
    def exporting(self):
        with teacher_detached(self.hybrid) as model:
            yield model


class LayerwiseDistillation(DistillationStage):
    """Stage 1a: every mixer regresses its teacher attention's output on the teacher's input (MSE)."""

    stage = "layerwise_distillation"
    default_previous_stage = CONVERTED

    def __init__(self, checkpoint, *, mse_weight: float = 1.0, **kwargs):
        """
        Args:
            mse_weight: scale of the loss (the mean of the layers' MSEs); InfiniteVL uses 1000.
        """
        if mse_weight <= 0:
            raise ValueError(f"mse_weight must be positive, got {mse_weight}.")
        super().__init__(checkpoint, **kwargs)
        self.mse_weight = mse_weight

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        # Training: each layer takes its mixer's gradients as soon as its loss exists, and frees that graph.
        eager_backward = self.training and torch.is_grad_enabled()
        with (
            distillation_mode(self.hybrid, "layerwise", eager_backward=eager_backward) as layers,
            torch.no_grad(),
        ):
            # The loss is in the layers; the head projects one position instead of all of them.
            self.hybrid(**self.model_inputs(batch), use_cache=False, **logits_kept(self.hybrid, 1))
        mse = torch.stack([layer.loss for layer in layers]).mean()
        return {"loss": self.mse_weight * mse, "layerwise_mse": mse}


class EndToEndDistillation(DistillationStage):
    """Stage 1b: KL(teacher || student) on the logits at `temperature`, over real tokens, plus `ce_weight` * CE."""

    stage = "end_to_end_distillation"
    default_previous_stage = "layerwise_distillation"

    def __init__(
        self,
        checkpoint,
        *,
        temperature: float = 2.0,
        ce_weight: float = 0.0,
        ignore_vision_tokens: bool = True,
        ignore_token_ids: list[int] | None = None,
        **kwargs,
    ):
        """
        Args:
            temperature: softmax temperature of the KL (the loss is scaled by temperature^2).
            ce_weight: weight of an added cross-entropy term on the batch's labels (0: KL only).
            ignore_vision_tokens: leave the image/video placeholder tokens (the model config's image_token_id
                and video_token_id) out of the KL: their logits predict nothing the model is asked for.
            ignore_token_ids: further token ids left out of the KL (padding always is).
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        super().__init__(checkpoint, **kwargs)
        self.temperature, self.ce_weight = temperature, ce_weight
        vision = [getattr(self.hybrid.config, key, None) for key in ("image_token_id", "video_token_id")]
        vision = [token for token in vision if token is not None] if ignore_vision_tokens else []
        self.ignore_token_ids = tuple(dict.fromkeys([*vision, *(ignore_token_ids or ())]))

    def valid_tokens(self, batch: dict) -> torch.Tensor:
        """Real tokens: the attention mask, or in packed batches (which have none) every non-pad token."""
        mask = batch.get("attention_mask")
        if mask is not None:
            valid = mask.bool()
        else:
            pad_id = getattr(getattr(self.processor, "tokenizer", self.processor), "pad_token_id", None)
            valid = batch["input_ids"] != (pad_id if pad_id is not None else -1)
        for token_id in self.ignore_token_ids:
            valid = valid & (batch["input_ids"] != token_id)
        return valid

    def teacher_features(
        self, inputs: dict, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, nn.Module]:
        """The teacher's `last_features` (the hybrid in "teacher" mode): no gradients, no cache."""
        with distillation_mode(self.hybrid, "teacher"), torch.no_grad():
            return last_features(self.hybrid, inputs, self.training_strategy, positions)

    def teacher_student_kl(
        self, batch: dict, valid: torch.Tensor, *, every_position: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, nn.Module]]:
        """KL(teacher || student) at the stage's temperature over the `valid` (B, T) positions, and the student's
        `last_features` (features, head): of those positions only, or of every position if asked. The heads run
        inside the loss, a chunk of positions at a time, where they can (`head_distillation_kl`)."""
        inputs = self.model_inputs(batch)
        positions = None if every_position else valid_positions(valid)
        if positions is not None:
            valid = valid[:, positions]
        teacher, head = self.teacher_features(inputs, positions)  # (B, T or kept positions, hidden or V)
        with distillation_mode(self.hybrid, "student"):
            student, _ = last_features(self.hybrid, inputs, self.training_strategy, positions)
        kl = head_distillation_kl(student, teacher, head, valid, self.temperature)
        return kl, (student, head)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        # The KL reads only positions with real tokens; the CE term needs every position.
        kl, (student, head) = self.teacher_student_kl(
            batch, self.valid_tokens(batch), every_position=bool(self.ce_weight)
        )
        losses = {"loss": kl, "kl": kl}
        if self.ce_weight:
            ce = head_cross_entropy(student, head, batch["labels"])
            losses.update(ce=ce, loss=kl + self.ce_weight * ce)
        return losses
