"""Mamba-2 (Dao & Gu, 2024) in place of softmax attention, the mixer of MambaInLlama and MaTVLM.

One input projection gives the output gate z, the SSM input x, the input and output maps B and C (shared by
the heads of a group) and the per-head step dt; x, B and C go through a short causal convolution (SiLU);
the SSD scan (ops/ssd.py) mixes the tokens; the output is RMSNorm(y * silu(z)), normalised per group, then
out_proj. No positional encoding. Parameters are named and laid out as in mamba-ssm's `Mamba2` and
transformers' `Mamba2Mixer`, so weights move between them as they are.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybridize.mixers.base import INIT_POLICIES, AttentionSpec, MixerConfig, TokenMixer
from hybridize.mixers.modules import GatedRMSNorm, ShortConvolution
from hybridize.mixers.ops.backends import check_backend
from hybridize.mixers.ops.dtypes import compute_dtype
from hybridize.mixers.ops.ssd import ssd
from hybridize.mixers.registry import register_mixer
from hybridize.mixers.transfer import check_transfer_shapes, teacher_projections


@dataclass
class Mamba2Config(MixerConfig):
    """Sizes default to the teacher's: heads = its query heads, head_dim and state_size = its head_dim, one
    group per head. That is what attention transfer needs (C <- q, B <- k, x <- v per query head); on
    Qwen2.5-VL-3B it gives 16 heads with P = N = 128.
    """

    num_heads: int | None = None
    head_dim: int | None = None  # P, the channels of x per head
    state_size: int | None = None  # N, the size of B and C
    num_groups: int | None = None  # G heads-groups sharing B and C; must divide num_heads
    conv_size: int = 4
    conv_bias: bool = True
    norm_eps: float | None = None
    init: str = "attention_transfer"  # "attention_transfer" (MambaInLlama) or "mimic" (no teacher weights)
    dt_min: float = 1e-3  # dt is initialised log-uniform in [dt_min, dt_max], at least dt_init_floor
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_min: float = 1.0  # A = -exp(A_log) is initialised with -A ~ U(A_init_min, A_init_max)
    A_init_max: float = 16.0
    backend: str = "auto"  # "auto", "torch", "fla" or "mamba_ssm"

    def resolve(self, spec: AttentionSpec) -> Mamba2Config:
        num_heads = self.num_heads or spec.num_heads
        resolved = Mamba2Config(
            **{
                **self.to_dict(),
                "num_heads": num_heads,
                "head_dim": self.head_dim or spec.head_dim,
                "state_size": self.state_size or spec.head_dim,
                "num_groups": self.num_groups or num_heads,
                "norm_eps": self.norm_eps if self.norm_eps is not None else spec.rms_norm_eps,
            }
        )
        if resolved.init not in INIT_POLICIES:
            raise ValueError(f"init={resolved.init!r} is not one of {INIT_POLICIES}.")
        check_backend(resolved.backend, Mamba2Mixer.kernels, "mamba2")
        sizes = ("num_heads", "head_dim", "state_size", "num_groups", "conv_size")
        if any(getattr(resolved, size) < 1 for size in sizes):
            raise ValueError(
                f"mamba2 sizes must be positive, got {', '.join(f'{s}={getattr(resolved, s)}' for s in sizes)}."
            )
        if resolved.num_heads % resolved.num_groups:
            raise ValueError(
                f"mamba2 num_groups={resolved.num_groups} must divide num_heads={resolved.num_heads}; "
                "pick a divisor (1 shares B and C between all heads, num_heads gives each head its own)."
            )
        if not 0 < resolved.dt_min <= resolved.dt_max or resolved.dt_init_floor < 0:
            raise ValueError(
                f"mamba2 needs 0 < dt_min <= dt_max and dt_init_floor >= 0, got dt_min={resolved.dt_min}, "
                f"dt_max={resolved.dt_max}, dt_init_floor={resolved.dt_init_floor}."
            )
        if not 0 < resolved.A_init_min <= resolved.A_init_max:
            raise ValueError(
                f"mamba2 needs 0 < A_init_min <= A_init_max (A_log = log of a value in that range), got "
                f"A_init_min={resolved.A_init_min}, A_init_max={resolved.A_init_max}."
            )
        if resolved.init == "attention_transfer":
            check_transfer_shapes("mamba2", spec, resolved.num_heads, resolved.head_dim, "head_dim")
            if resolved.state_size != spec.head_dim or resolved.num_groups != resolved.num_heads:
                raise ValueError(
                    f"mamba2 init='attention_transfer' copies q into C and k into B per query head, so it needs "
                    f"state_size == {spec.head_dim} (the teacher's head_dim) and num_groups == num_heads == "
                    f"{resolved.num_heads}, got state_size={resolved.state_size} and "
                    f"num_groups={resolved.num_groups}; use the default sizes or init='mimic'."
                )
        return resolved


@register_mixer("mamba2")
class Mamba2Mixer(TokenMixer):
    config_class = Mamba2Config
    kernels = ("mamba_ssm", "fla")
    varlen_kernels = True

    def __init__(self, config: Mamba2Config, spec: AttentionSpec, layer_idx: int, attention=None):
        super().__init__(config, spec, layer_idx)
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.num_groups, self.state_size = config.num_groups, config.state_size
        self.inner_size = self.num_heads * self.head_dim  # H*P
        self.group_dim = self.num_groups * self.state_size  # G*N
        self.conv_dim = self.inner_size + 2 * self.group_dim  # x | B | C
        # in_proj rows: z (H*P) | x (H*P) | B (G*N) | C (G*N) | dt (H), as in mamba-ssm
        self.in_proj = nn.Linear(
            spec.hidden_size, self.inner_size + self.conv_dim + self.num_heads, bias=False
        )
        # the convolution has fla's kernel only (mamba-ssm's needs the causal-conv1d package)
        conv_backend = "torch" if config.backend == "torch" else "auto"
        self.conv1d = ShortConvolution(
            self.conv_dim, config.conv_size, bias=config.conv_bias, backend=conv_backend
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        for parameter in (self.dt_bias, self.A_log, self.D):
            parameter._no_weight_decay = True
        # mamba-ssm's norm: RMSNorm(y * silu(z)) over each group of heads, one weight per channel
        self.norm = GatedRMSNorm(
            self.inner_size,
            config.norm_eps,
            norm_before_gate=False,
            group_size=self.inner_size // self.num_groups,
            backend=conv_backend,
        )
        self.out_proj = nn.Linear(self.inner_size, spec.hidden_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba-ssm's Mamba2 initialisation: dt log-uniform in [dt_min, dt_max] (at least dt_init_floor),
        stored as its inverse softplus in dt_bias; A ~ U(A_init_min, A_init_max), A_log = log A; D = 1;
        default Linear/Conv init; norm weight 1."""
        config = self.config
        for module in (self.in_proj, self.conv1d, self.out_proj, self.norm):
            module.reset_parameters()
        log_dt = torch.rand_like(self.dt_bias, dtype=torch.float32) * (
            math.log(config.dt_max) - math.log(config.dt_min)
        ) + math.log(config.dt_min)
        dt = log_dt.exp().clamp(min=config.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        A = torch.empty_like(self.A_log, dtype=torch.float32).uniform_(config.A_init_min, config.A_init_max)
        self.A_log.copy_(A.log())
        self.D.fill_(1.0)

    @torch.no_grad()
    def initialize_from_teacher(self, teacher_attention: nn.Module, policy: str) -> None:
        """mimic: the standard initialisation above, no teacher weights.
        attention_transfer (MambaInLlama, MaTVLM): the same, then the attention's linear-attention view is
        copied in, per query head (k and v GQA-repeated): x <- v, B <- k, C <- q rows of in_proj, and
        out_proj <- o. z, the dt rows, dt_bias, A, D and the convolution keep the standard initialisation.
        """
        dataclasses.replace(self.config, init=policy).resolve(self.spec)  # checks the policy fits the sizes
        self.reset_parameters()
        if policy == "attention_transfer":
            weights = teacher_projections(teacher_attention, self.spec)
            inner, group_dim = self.inner_size, self.group_dim
            rows = self.in_proj.weight
            rows[inner : 2 * inner].copy_(weights.v)
            rows[2 * inner : 2 * inner + group_dim].copy_(weights.k)
            rows[2 * inner + group_dim : 2 * inner + 2 * group_dim].copy_(weights.q)
            self.out_proj.weight.copy_(weights.o)

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
        # Zeroed inputs give zero conv inputs, and dt = 0 leaves the SSM state untouched: both states end
        # exactly as without the (left) padding.
        hidden_states, valid, slot, states = self.begin_recurrent_forward(
            hidden_states, attention_mask, cache
        )

        # (B, T, hidden) -> z (B, T, H*P), xBC (B, T, H*P + 2*G*N), dt (B, T, H)
        z, xBC, dt = self.in_proj(hidden_states).split(
            [self.inner_size, self.conv_dim, self.num_heads], dim=-1
        )
        xBC, conv_state = self.conv1d(xBC, states.get("conv"), cu_seqlens, output_state=slot is not None)
        x, Bm, Cm = xBC.split([self.inner_size, self.group_dim, self.group_dim], dim=-1)
        dtype = compute_dtype(hidden_states)
        dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))
        if valid is not None:
            dt = dt * valid[..., None]
        y, ssm_state = ssd(
            x.view(batch, length, self.num_heads, self.head_dim),
            dt,
            -self.A_log.to(dtype).exp(),
            Bm.view(batch, length, self.num_groups, self.state_size),
            Cm.view(batch, length, self.num_groups, self.state_size),
            D=self.D,
            initial_state=states.get("ssm"),
            output_final_state=slot is not None,
            backend=self.config.backend,
            cu_seqlens=cu_seqlens,
        )
        if slot is not None:
            slot.store(conv=conv_state, ssm=ssm_state)
            slot.advance(length)

        y = self.norm(y.reshape(batch, length, self.inner_size), z)
        return self.out_proj(y), None
