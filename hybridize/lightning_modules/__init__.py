"""The training stages as Lightning modules (recipes) and the pieces they share."""

from hybridize.lightning_modules.distillation import (
    EndToEndDistillation,
    LayerwiseDistillation,
    distillation_kl,
    freeze_except,
)
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
]
