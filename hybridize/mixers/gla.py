"""Gated Linear Attention (Yang et al., 2024) in place of softmax attention.

A linear-attention state with a data-dependent decay per key dimension: gk = logsigmoid(gk_proj x) /
gate_logit_normalizer, where gk_proj is a low-rank (hidden -> gate_low_rank_dim -> key_dim) projection;
the output is gated (RMSNorm(o) * silu(g_proj x)) before o_proj; optional short causal convolutions on
q, k, v. No positional encoding. Parameter names follow fla's `GatedLinearAttention` layer with its default
fused swish-gated norm, so checkpoints line up with fla-based code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybridize.mixers.base import INIT_POLICIES, AttentionSpec, MixerConfig, TokenMixer
from hybridize.mixers.modules import GatedRMSNorm, ShortConvolution, convolve_qkv
from hybridize.mixers.ops.backends import check_backend
from hybridize.mixers.ops.dtypes import compute_dtype
from hybridize.mixers.ops.gla import gla
from hybridize.mixers.registry import register_mixer
from hybridize.mixers.transfer import check_transfer_shapes, teacher_projections

# fla's models initialise every Linear with N(0, initializer_range = 0.02) and zero bias.
GATE_INIT_STD = 0.02


@dataclass
class GLAConfig(MixerConfig):
    """Sizes default to the teacher's: heads = its query heads, head_k_dim = head_v_dim = its head_dim, which
    is what attention_transfer needs to copy q, k, v and o. On Qwen2.5-VL-3B: 16 heads of 128."""

    num_heads: int | None = None
    head_k_dim: int | None = None
    head_v_dim: int | None = None
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    use_short_conv: bool = False
    conv_size: int = 4
    norm_eps: float | None = None
    init: str = "attention_transfer"  # "attention_transfer" (q, k, v, o from the teacher) or "mimic"
    backend: str = "auto"  # "auto", "torch" or "fla"

    def resolve(self, spec: AttentionSpec) -> GLAConfig:
        resolved = GLAConfig(
            **{
                **self.to_dict(),
                "num_heads": self.num_heads or spec.num_heads,
                "head_k_dim": self.head_k_dim or spec.head_dim,
                "head_v_dim": self.head_v_dim or spec.head_dim,
                "norm_eps": self.norm_eps if self.norm_eps is not None else spec.rms_norm_eps,
            }
        )
        if resolved.init not in INIT_POLICIES:
            raise ValueError(f"gla init={resolved.init!r} is not one of {INIT_POLICIES}.")
        check_backend(resolved.backend, GLAMixer.kernels, "gla")
        for name in ("num_heads", "head_k_dim", "head_v_dim", "gate_low_rank_dim", "conv_size"):
            value = getattr(resolved, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"gla {name}={value!r} must be a positive integer; leave num_heads/head_k_dim/head_v_dim "
                    "unset to take the teacher's sizes."
                )
        if resolved.gate_logit_normalizer <= 0:
            raise ValueError(
                f"gla gate_logit_normalizer={resolved.gate_logit_normalizer!r} must be positive (fla uses 16)."
            )
        if resolved.init == "attention_transfer":
            check_transfer_shapes("gla", spec, resolved.num_heads, resolved.head_k_dim, "head_k_dim")
            if resolved.head_v_dim != spec.head_dim:
                raise ValueError(
                    f"gla init='attention_transfer' needs head_v_dim == {spec.head_dim} (the teacher's head_dim), "
                    f"got {resolved.head_v_dim}; leave head_v_dim unset or use init='mimic'."
                )
        return resolved


@register_mixer("gla")
class GLAMixer(TokenMixer):
    config_class = GLAConfig
    kernels = ("fla",)
    varlen_kernels = True
    input_projections = ("q_proj", "k_proj", "v_proj", "g_proj")

    def __init__(self, config: GLAConfig, spec: AttentionSpec, layer_idx: int, attention=None):
        super().__init__(config, spec, layer_idx)
        hidden, heads = spec.hidden_size, config.num_heads
        self.num_heads, self.head_k_dim, self.head_v_dim = heads, config.head_k_dim, config.head_v_dim
        key_dim, value_dim = heads * self.head_k_dim, heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, value_dim, bias=False)
        self.g_proj = nn.Linear(hidden, value_dim, bias=False)
        if config.use_short_conv:
            self.q_conv1d = ShortConvolution(key_dim, config.conv_size, backend=config.backend)
            self.k_conv1d = ShortConvolution(key_dim, config.conv_size, backend=config.backend)
            self.v_conv1d = ShortConvolution(value_dim, config.conv_size, backend=config.backend)
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden, config.gate_low_rank_dim, bias=False),
            nn.Linear(config.gate_low_rank_dim, key_dim, bias=True),
        )
        self.g_norm_swish_gate = GatedRMSNorm(
            self.head_v_dim, config.norm_eps, norm_before_gate=True, backend=config.backend
        )
        self.o_proj = nn.Linear(value_dim, hidden, bias=False)
        self.reset_parameters()

    def _convs(self) -> tuple[ShortConvolution, ...]:
        return (self.q_conv1d, self.k_conv1d, self.v_conv1d) if self.config.use_short_conv else ()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Default Linear/Conv init for the projections; the gate as fla's models initialise it (N(0, 0.02)
        weights, zero bias), so every token starts with the same slow decay, logsigmoid(0) / gate_logit_normalizer
        (-0.043 per step at 16), instead of a random per-dimension forgetting rate."""
        for module in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj, *self._convs()):
            module.reset_parameters()
        for linear in self.gk_proj:
            nn.init.normal_(linear.weight, std=GATE_INIT_STD)
        nn.init.zeros_(self.gk_proj[1].bias)
        self.g_norm_swish_gate.reset_parameters()

    @torch.no_grad()
    def initialize_from_teacher(self, teacher_attention: nn.Module, policy: str) -> None:
        """mimic: the default init, no teacher weights.
        attention_transfer: the default init, then q, k, v (GQA-repeated) and o copied from the teacher, so the
        mixer starts from the teacher's query, key, value and output maps with softmax replaced by the gated
        linear kernel (the LoLCATs/Liger transfer); short convolutions, if any, start as identity taps so they
        pass the copied q, k, v through.
        """
        dataclasses.replace(self.config, init=policy).resolve(self.spec)  # checks the policy fits the sizes
        self.reset_parameters()
        if policy != "attention_transfer":
            return
        weights = teacher_projections(teacher_attention, self.spec)
        self.q_proj.weight.copy_(weights.q)
        self.k_proj.weight.copy_(weights.k)
        self.v_proj.weight.copy_(weights.v)
        self.o_proj.weight.copy_(weights.o)
        for conv in self._convs():
            conv.set_identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """cu_seqlens (N+1,): hidden_states (1, T, hidden) is N sequences packed in one row, each mixed from
        empty conv and recurrent states (`TokenMixer.forward_varlen`)."""
        batch, length, _ = hidden_states.shape
        # Zeroed inputs give k = 0 (nothing written) and zero conv inputs; with gk = 0 below nothing decays
        # either, so left padding leaves the conv and recurrent states exactly as without it.
        hidden_states, valid, slot, states = self.begin_recurrent_forward(
            hidden_states, attention_mask, cache
        )

        q, k, v, gate = self.project_inputs(hidden_states)
        conv_states = {}
        if self.config.use_short_conv:
            q, k, v, conv_states = convolve_qkv(self, q, k, v, states, cu_seqlens, keep=slot is not None)
        # (B, T, H*D) -> (B, T, H, D)
        q = q.view(batch, length, self.num_heads, self.head_k_dim)
        k = k.view(batch, length, self.num_heads, self.head_k_dim)
        v = v.view(batch, length, self.num_heads, self.head_v_dim)
        gate_logits = self.gk_proj(hidden_states).to(compute_dtype(hidden_states))
        gk = F.logsigmoid(gate_logits).view_as(k) / self.config.gate_logit_normalizer  # (B, T, H, K), <= 0
        if valid is not None:
            gk = gk * valid[..., None, None]

        out, recurrent = gla(
            q,
            k,
            v,
            gk,
            initial_state=states.get("recurrent"),
            output_final_state=slot is not None,
            backend=self.config.backend,
            cu_seqlens=cu_seqlens,
        )
        if slot is not None:
            slot.store(recurrent=recurrent, **conv_states)  # recurrent (B, H, K, V) fp32
            slot.advance(length)

        gate = gate.view(batch, length, self.num_heads, self.head_v_dim)
        out = self.g_norm_swish_gate(out, gate).reshape(batch, length, -1)
        return self.o_proj(out), None
