"""Distillation losses, averaged over real tokens only (padding and, where asked, image placeholders)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridize.mixers.ops.dtypes import compute_dtype


def masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token `values` (B, T) over the tokens where `valid` (B, T) is True (None: all tokens)."""
    if valid is None:
        return values.mean()
    return (values * valid).sum() / valid.sum().clamp(min=1)


def masked_mse(output: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over real tokens, fp32 (fp64 for fp64 inputs)."""
    dtype = compute_dtype(output)
    return masked_mean((output.to(dtype) - target.to(dtype)).pow(2).mean(-1), valid)


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor | None,
    temperature: float = 2.0,
) -> torch.Tensor:
    """KL(teacher || student) per token at `temperature`, scaled by temperature^2 (so gradients keep their size
    across temperatures), averaged over the tokens where `valid` (B, T) is True; fp32 (fp64 for fp64 logits)."""
    dtype = compute_dtype(student_logits)
    teacher = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    return masked_mean((teacher.exp() * (teacher - student)).sum(-1), valid) * temperature**2
