"""Gated DeltaNet (Yang et al., 2025) as InfiniteVL uses it in place of softmax attention.

q, k, v go through a short causal depthwise convolution (SiLU); q and k are L2-normalised;
beta = sigmoid(b_proj x); the log decay g = -exp(A_log) * softplus(a_proj x + dt_bias); the output is
gated (RMSNorm(o) * silu(g_proj x)) before o_proj. No positional encoding. Parameter names follow fla's
`GatedDeltaNet` layer so checkpoints line up with fla-based code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from hybridize.mixers.base import INIT_POLICIES, AttentionSpec, MixerConfig, TokenMixer
from hybridize.mixers.modules import GatedRMSNorm, ShortConvolution, convolve_qkv
from hybridize.mixers.ops.backends import check_backend
from hybridize.mixers.ops.gated_delta_rule import gated_delta_rule
from hybridize.mixers.registry import register_mixer
from hybridize.mixers.transfer import check_transfer_shapes, teacher_projections


@dataclass
class GatedDeltaNetConfig(MixerConfig):
    """Sizes default to the teacher's: heads = its query heads, head_k_dim = its head_dim, expand_v 2.

    On Qwen2.5-VL-3B that is InfiniteVL's layer: 16 heads, head_k_dim 128, head_v_dim 256.
    """

    num_heads: int | None = None
    head_k_dim: int | None = None
    expand_v: float = 2.0
    conv_size: int = 4
    norm_eps: float | None = None
    init: str = "mimic"  # "mimic" (InfiniteVL: no teacher weights) or "attention_transfer"
    dt_init: float = 1e-3  # decay step of the mimic/attention_transfer init: alpha = exp(-dt) ~ 0.999
    backend: str = "auto"  # "auto", "torch" or "fla"

    def resolve(self, spec: AttentionSpec) -> GatedDeltaNetConfig:
        resolved = GatedDeltaNetConfig(
            **{
                **self.to_dict(),
                "num_heads": self.num_heads or spec.num_heads,
                "head_k_dim": self.head_k_dim or spec.head_dim,
                "norm_eps": self.norm_eps if self.norm_eps is not None else spec.rms_norm_eps,
            }
        )
        if resolved.init not in INIT_POLICIES:
            raise ValueError(f"init={resolved.init!r} is not one of {INIT_POLICIES}.")
        check_backend(resolved.backend, GatedDeltaNetMixer.kernels, "gated_deltanet")
        if resolved.conv_size < 1 or resolved.num_heads < 1 or resolved.head_k_dim < 1:
            raise ValueError(f"Gated DeltaNet sizes must be positive, got {resolved}.")
        if not float(resolved.head_k_dim * resolved.expand_v).is_integer() or resolved.expand_v <= 0:
            raise ValueError(
                f"expand_v={resolved.expand_v} times head_k_dim={resolved.head_k_dim} must be a positive integer."
            )
        if resolved.init == "attention_transfer":
            check_transfer_shapes(
                "gated_deltanet", spec, resolved.num_heads, resolved.head_k_dim, "head_k_dim"
            )
            if resolved.head_v_dim % spec.head_dim:
                raise ValueError(
                    f"gated_deltanet init='attention_transfer' needs head_v_dim ({resolved.head_v_dim}) to be a "
                    f"multiple of the teacher's head_dim ({spec.head_dim}); use an integer expand_v or init='mimic'."
                )
        return resolved

    @property
    def head_v_dim(self) -> int:
        return int(self.head_k_dim * self.expand_v)


@register_mixer("gated_deltanet")
class GatedDeltaNetMixer(TokenMixer):
    config_class = GatedDeltaNetConfig
    kernels = ("fla",)
    varlen_kernels = True
    input_projections = ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj")

    def __init__(self, config: GatedDeltaNetConfig, spec: AttentionSpec, layer_idx: int, attention=None):
        super().__init__(config, spec, layer_idx)
        hidden, heads = spec.hidden_size, config.num_heads
        self.num_heads, self.head_k_dim, self.head_v_dim = heads, config.head_k_dim, config.head_v_dim
        key_dim, value_dim = heads * self.head_k_dim, heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, value_dim, bias=False)
        self.a_proj = nn.Linear(hidden, heads, bias=False)
        self.b_proj = nn.Linear(hidden, heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(heads))
        self.dt_bias = nn.Parameter(torch.empty(heads))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.q_conv1d = ShortConvolution(key_dim, config.conv_size, backend=config.backend)
        self.k_conv1d = ShortConvolution(key_dim, config.conv_size, backend=config.backend)
        self.v_conv1d = ShortConvolution(value_dim, config.conv_size, backend=config.backend)
        self.g_proj = nn.Linear(hidden, value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, config.norm_eps, backend=config.backend)
        self.o_proj = nn.Linear(value_dim, hidden, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fla's initialisation: A ~ U(0, 16), dt log-uniform in [1e-3, 0.1], default Linear/Conv init."""
        for module in (
            self.q_proj,
            self.k_proj,
            self.v_proj,
            self.a_proj,
            self.b_proj,
            self.g_proj,
            self.o_proj,
        ):
            module.reset_parameters()
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.reset_parameters()
        self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(0, 16).log())
        dt = torch.exp(
            torch.rand_like(self.dt_bias, dtype=torch.float32) * (math.log(0.1) - math.log(1e-3))
            + math.log(1e-3)
        ).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.o_norm.weight.fill_(1.0)

    @torch.no_grad()
    def initialize_from_teacher(self, teacher_attention: nn.Module, policy: str) -> None:
        """mimic: InfiniteVL's init, no teacher weights (a/b zero, A_log 0, dt = dt_init, identity conv taps).
        attention_transfer: the same, plus q, k (GQA-repeated), v and o copied from the teacher where the
        shapes allow; v is tiled over the expand_v copies of each head and o split between them, so that
        o_proj(v) equals the teacher's o_proj(v) before the gate and norm.
        """
        dataclasses.replace(self.config, init=policy).resolve(self.spec)  # checks the policy fits the sizes
        self.reset_parameters()
        self.a_proj.weight.zero_()
        self.b_proj.weight.zero_()
        self.A_log.zero_()
        dt = torch.full_like(self.dt_bias, self.config.dt_init, dtype=torch.float32)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.set_identity()
        if policy == "attention_transfer":
            self._transfer_attention_weights(teacher_attention)

    def _transfer_attention_weights(self, teacher: nn.Module) -> None:
        copies = self.head_v_dim // self.spec.head_dim
        weights = teacher_projections(teacher, self.spec)
        heads, d = self.num_heads, self.spec.head_dim
        self.q_proj.weight.copy_(weights.q)
        self.k_proj.weight.copy_(weights.k)
        # v is tiled over the expand_v copies of each head: (heads * d, hidden) -> (heads * copies * d, hidden)
        self.v_proj.weight.copy_(
            weights.v.view(heads, 1, d, -1).expand(-1, copies, -1, -1).reshape(heads * self.head_v_dim, -1)
        )
        # o_proj input (heads * d) -> (heads * copies * d), each copy carrying 1/copies of the teacher's columns
        o = weights.o.view(-1, heads, 1, d) / copies
        self.o_proj.weight.copy_(o.expand(-1, heads, copies, d).reshape(-1, heads * self.head_v_dim))

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
        # Zeroed inputs with beta = 0 and g = 0 leave conv and recurrent states exactly as unpadded.
        hidden_states, valid, slot, states = self.begin_recurrent_forward(
            hidden_states, attention_mask, cache
        )

        q, k, v, a, b, gate = self.project_inputs(hidden_states)
        q, k, v, conv_states = convolve_qkv(self, q, k, v, states, cu_seqlens, keep=slot is not None)
        # (B, T, H*D) -> (B, T, H, D)
        q = q.view(batch, length, self.num_heads, self.head_k_dim)
        k = k.view(batch, length, self.num_heads, self.head_k_dim)
        v = v.view(batch, length, self.num_heads, self.head_v_dim)
        if valid is not None:  # padded positions neither decay nor write (g = 0, beta = 0)
            a, b = (x.masked_fill(~valid[..., None], float("-inf")) for x in (a, b))

        # the gates a, b -> g, beta are computed by the kernel where it can (fla's decode step)
        out, recurrent = gated_delta_rule(
            q,
            k,
            v,
            a,
            b,
            gate_params=(self.A_log, self.dt_bias),
            initial_state=states.get("recurrent"),
            output_final_state=slot is not None,
            backend=self.config.backend,
            cu_seqlens=cu_seqlens,
        )
        if slot is not None:
            slot.store(**conv_states, recurrent=recurrent)
            slot.advance(length)

        gate = gate.view(batch, length, self.num_heads, self.head_v_dim)
        out = self.o_norm(out, gate).reshape(batch, length, -1)
        return self.o_proj(out), None
