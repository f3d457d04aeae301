"""Distillation losses, averaged over real tokens only (padding and, where asked, image placeholders)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def _token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of each row of (N, V) logits at `temperature`, in the compute dtype."""
    dtype = compute_dtype(student_logits)
    teacher = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1)


def _recomputed(function, *args) -> torch.Tensor:
    """`function(*args)` on a chunk of a loss; when its first argument needs gradients, under activation
    checkpointing, so that the chunk's (rows, vocab) intermediates are recomputed in the backward pass, not
    held."""
    if torch.is_grad_enabled() and args[0].requires_grad:
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def _head_token_kl(
    student: torch.Tensor, teacher: torch.Tensor, head: torch.nn.Module, temperature: float
) -> torch.Tensor:
    with torch.no_grad():
        teacher_logits = head(teacher)
    return _token_kl(head(student), teacher_logits, temperature)


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor | None,
    temperature: float = 2.0,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """KL(teacher || student) per token at `temperature`, scaled by temperature^2 (so gradients keep their size
    across temperatures), averaged over the tokens where `valid` (B, T) is True; fp32 (fp64 for fp64 logits).

    Computed `chunk_tokens` tokens at a time, each chunk recomputed in the backward pass: the fp32 softmaxes of
    a 152K vocabulary over 8K tokens would otherwise hold ~30 GB at once."""
    return head_distillation_kl(
        student_logits, teacher_logits, torch.nn.Identity(), valid, temperature, chunk_tokens
    )


def head_distillation_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    head: torch.nn.Module,
    valid: torch.Tensor | None,
    temperature: float = 2.0,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """`distillation_kl` of the logits `head(student_hidden)` and `head(teacher_hidden)` ((B, T, hidden): the last
    normed hidden states of each), without ever holding them: `chunk_tokens` positions go through the head (the
    teacher's without gradients) and the KL at a time, recomputed in the backward pass. At 64K tokens and a 152K
    vocabulary the two models' bf16 logits and the student's gradient would be 60 GB."""
    student = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    weights = torch.ones(student.shape[0], device=student.device) if valid is None else valid.reshape(-1)
    total = student.new_zeros((), dtype=compute_dtype(student))
    for start in range(0, student.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        per_token = _recomputed(_head_token_kl, student[rows], teacher[rows], head, temperature)
        total = total + (per_token * weights[rows]).sum()
    return total / weights.sum().clamp(min=1) * temperature**2


def _summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Sum of the cross-entropies of (N, V) logits against (N,) targets, in the compute dtype."""
    dtype = compute_dtype(logits)
    return F.cross_entropy(logits.to(dtype), targets, ignore_index=ignore_index, reduction="sum")


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, chunk_tokens: int = 4096
) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) at t predict labels (B, T) at t + 1 (transformers' unshifted
    labels), averaged over the labelled tokens (labels != ignore_index), in fp32 (fp64 for fp64 logits).

    Computed `chunk_tokens` positions at a time, each chunk recomputed in the backward pass (as the KL): the
    fp32 log-softmax of a 152K vocabulary over 32K tokens and its gradient would otherwise hold 40 GB at once."""
    return head_cross_entropy(logits, torch.nn.Identity(), labels, ignore_index, chunk_tokens)


def _summed_head_cross_entropy(
    hidden_states: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    return _summed_cross_entropy(head(hidden_states), targets, ignore_index)


def head_cross_entropy(
    hidden_states: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """`token_cross_entropy` of the logits `head(hidden_states)` (hidden_states (B, T, hidden): the model's last
    normed hidden states), without ever holding them: `chunk_tokens` positions go through the head and the loss at
    a time, recomputed in the backward pass. At 32K tokens and a 152K vocabulary the bf16 logits and their
    gradient are 20 GB; a chunk's are 2.5 GB."""
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index).reshape(
        -1
    )  # (B*T,); last positions predict none
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])  # (B*T, hidden)
    total = None
    for start in range(0, flat.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        if not bool((targets[rows] != ignore_index).any()):
            continue  # nothing labelled here: the head need not run
        part = _recomputed(_summed_head_cross_entropy, flat[rows], head, targets[rows], ignore_index)
        total = part if total is None else total + part
    if total is None:
        return hidden_states.sum() * 0  # nothing labelled in this batch: a zero loss that keeps the graph
    return total / (targets != ignore_index).sum()
