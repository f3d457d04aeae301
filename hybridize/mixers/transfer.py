"""Teacher attention weights in the shapes a linear mixer's projections take them (attention transfer).

Every mixer that copies weights from the attention it replaces needs the same four matrices: the query
projection, the key and value projections repeated over each GQA group (one copy per query head), and the
output projection. Teachers with q/k RMSNorms (Qwen3, Qwen3-VL) scale each head dimension after the norm;
that scale is folded into the projection rows, which is exact for mixers that L2-normalise q and k and the
closest linear match for the others. Biases (Qwen2-family q/k/v) are not carried: the mixers' projections
have none, as in fla and mamba-ssm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybridize.mixers.base import AttentionSpec


@dataclass
class TeacherProjections:
    """Teacher weights, (out_features, in_features) like nn.Linear: q, k, v are (heads * head_dim, hidden) with
    k and v GQA-repeated; o is (hidden, heads * head_dim)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor


def _norm_scale(attention: nn.Module, name: str) -> torch.Tensor | None:
    norm = getattr(attention, name, None)
    weight = getattr(norm, "weight", None)
    return weight.detach() if isinstance(weight, torch.Tensor) else None


@torch.no_grad()
def teacher_projections(attention: nn.Module, spec: AttentionSpec) -> TeacherProjections:
    d, groups = spec.head_dim, spec.kv_groups

    def per_head(weight: torch.Tensor, heads: int, norm: str | None) -> torch.Tensor:
        weight = weight.detach().view(heads, d, -1)  # (heads * d, hidden) -> (heads, d, hidden)
        scale = _norm_scale(attention, norm) if norm else None
        if scale is not None and scale.numel() == d:
            weight = weight * scale.to(weight.dtype)[None, :, None]
        return weight

    q = per_head(attention.q_proj.weight, spec.num_heads, "q_norm")
    k = per_head(attention.k_proj.weight, spec.num_kv_heads, "k_norm").repeat_interleave(groups, dim=0)
    v = per_head(attention.v_proj.weight, spec.num_kv_heads, None).repeat_interleave(groups, dim=0)
    return TeacherProjections(
        q=q.reshape(spec.num_heads * d, -1),
        k=k.reshape(spec.num_heads * d, -1),
        v=v.reshape(spec.num_heads * d, -1),
        o=attention.o_proj.weight.detach(),
    )


def check_transfer_shapes(mixer: str, spec: AttentionSpec, num_heads: int, head_dim: int, what: str) -> None:
    """attention_transfer copies per-head weights: the mixer must have the teacher's heads and head size."""
    if num_heads != spec.num_heads or head_dim != spec.head_dim:
        raise ValueError(
            f"{mixer} init='attention_transfer' needs num_heads == {spec.num_heads} and {what} == "
            f"{spec.head_dim} (the teacher's), got {num_heads} and {head_dim}; use the default sizes or "
            "init='mimic'."
        )
