"""The training stages as Lightning modules (recipes), their data module and the pieces they share."""

from hybridize.lightning_modules.distillation import EndToEndDistillation, LayerwiseDistillation
from hybridize.lightning_modules.losses import (
    distillation_kl,
    head_cross_entropy,
    head_distillation_kl,
    masked_mean,
    masked_mse,
    token_cross_entropy,
)
from hybridize.lightning_modules.sft import LongSequenceSFT, SupervisedFineTuning
from hybridize.lightning_modules.stage import (
    TRAINABLE_PRESETS,
    HybridStage,
    parameter_table,
    select_trainable,
)
from hybridize.lightning_modules.teacher import (
    DistilledLayer,
    attach_teacher,
    detach_teacher,
    distillation_mode,
    teacher_detached,
)

STAGES = {
    stage.stage: stage
    for stage in (LayerwiseDistillation, EndToEndDistillation, SupervisedFineTuning, LongSequenceSFT)
}

__all__ = [
    "STAGES",
    "TRAINABLE_PRESETS",
    "DistilledLayer",
    "EndToEndDistillation",
    "HybridStage",
    "LayerwiseDistillation",
    "LongSequenceSFT",
    "SupervisedFineTuning",
    "attach_teacher",
    "detach_teacher",
    "distillation_kl",
    "distillation_mode",
    "head_cross_entropy",
    "head_distillation_kl",
    "masked_mean",
    "masked_mse",
    "parameter_table",
    "select_trainable",
    "teacher_detached",
    "token_cross_entropy",
]
