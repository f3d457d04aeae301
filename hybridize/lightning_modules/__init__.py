"""The training stages as Lightning modules (recipes) and the pieces they share."""

from hybridize.lightning_modules.distillation import (
    EndToEndDistillation,
    LayerwiseDistillation,
    freeze_except,
)
from hybridize.lightning_modules.losses import distillation_kl, masked_mean, masked_mse
from hybridize.lightning_modules.teacher import (
    DistilledLayer,
    attach_teacher,
    detach_teacher,
    distillation_mode,
)

__all__ = [
    "DistilledLayer",
    "EndToEndDistillation",
    "LayerwiseDistillation",
    "attach_teacher",
    "detach_teacher",
    "distillation_kl",
    "distillation_mode",
    "freeze_except",
    "masked_mean",
    "masked_mse",
]
