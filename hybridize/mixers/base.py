"""The mixer contract: what a token mixer receives from the decoder layer and what it knows of its teacher.

A mixer takes the place of a decoder layer's `self_attn`. Transformers 5.x decoder layers call
`self_attn(hidden_states=..., attention_mask=..., position_ids=..., <cache>=..., use_cache=...,
position_embeddings=(cos, sin), **kwargs)` with keywords only and use the first returned value, so a mixer
returns `(output, None)` with output shaped like hidden_states. The cache keyword is `past_key_values` up to
transformers 5.23 and `cache` from 5.24; `TokenMixer.__call__` hands it to `forward` as `cache` on every
version (`hybridize.compat.pop_cache`), so mixers are written once.

Packed training rows arrive with transformers' flash-attention packing kwargs (`cu_seq_lens_q`: the sample
boundaries over the flattened batch). A mixer whose kernels take packed sequences gets them as one row with
`cu_seqlens` (`forward_varlen`: one call, the boundaries left on the device); otherwise, and on the
pure-PyTorch path, it runs once per sample (`forward_per_sequence`, the reference).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from hybridize.compat import pop_cache
from hybridize.mixers.cache import mixer_cache_layer
from hybridize.mixers.masks import key_padding_mask
from hybridize.mixers.ops.backends import resolve_backend

INIT_POLICIES = ("mimic", "attention_transfer")


@dataclass(frozen=True)
class AttentionSpec:
    """What a mixer needs to know about the teacher attention it replaces."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    qk_norm: bool = False
    rope: str = "rope"  # "rope" (1-D) or "mrope" (Qwen-VL multimodal rotary)
    rms_norm_eps: float = 1e-6

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class MixerConfig:
    """Base of every mixer's config. Fields left as None are derived from the teacher by `resolve`."""

    def resolve(self, spec: AttentionSpec) -> MixerConfig:
        """Return a copy with every teacher-derived default filled in and the values checked."""
        return dataclasses.replace(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TokenMixer(nn.Module):
    """Base of every mixer that replaces a decoder layer's attention module.

    Subclasses set `config_class`, build their parameters from a resolved config and an `AttentionSpec`,
    and implement `forward`, `reset_parameters` (the default initialisation, also used by
    `from_pretrained` for missing weights) and `initialize_from_teacher` (the weight-transfer policy).
    Buffers must be persistent (saved with the weights): `from_pretrained` builds the model on the meta
    device and does not recompute the non-persistent buffers of modules it does not know.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MixerConfig]] = MixerConfig
    # A mixer whose conversion is a config change on families that support it natively (sliding window on
    # Qwen2-family models) says so here; the converter then edits the config instead of swapping modules.
    native_config_support: ClassVar[bool] = False
    # A mixer that wraps the layer's own attention module (instead of replacing it) receives it as `attention`.
    wraps_attention: ClassVar[bool] = False
    # Kernel libraries with a fast path for this mixer, in order of preference (see ops/backends.py); the
    # pure-PyTorch reference ("torch") is always there.
    kernels: ClassVar[tuple[str, ...]] = ()
    # A mixer that resets its state at the boundaries of packed sequences itself (reading `cu_seq_lens_q`)
    # says so here; otherwise `__call__` runs it once per packed sequence (or once per row: `varlen_kernels`).
    supports_packing: ClassVar[bool] = False
    # True when every library in `kernels` takes packed sequences in one call: where the mixer's backend (its
    # config's `backend`, resolved for the input's device) is one of them, `forward` gets a packed batch as one
    # row (1, B*T, D) with `cu_seqlens`, the sample boundaries, and restarts its states there itself.
    varlen_kernels: ClassVar[bool] = False
    # Linear layers (attribute paths) that each read the mixer's input hidden states, in the order
    # `project_inputs` returns them. `hybridize.inference.fusion.fuse_projections` lays their weights out side by
    # side in one matrix, so that inference computes them in one matrix product (the `fused_input_projection` hook).
    input_projections: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, config: MixerConfig, spec: AttentionSpec, layer_idx: int, attention: nn.Module | None = None
    ):
        super().__init__()
        self.config = config
        self.spec = spec
        # The hook for inference-time fusion: None, or a callable of the hidden states returning the outputs of
        # `input_projections` in order, which `project_inputs` uses under no_grad while it is `current()`. Set and
        # cleared only by `hybridize.inference.fusion` (fuse_projections / unfuse_projections).
        self.fused_input_projection = None
        self.layer_idx = layer_idx

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        kwargs["cache"] = pop_cache(kwargs)
        boundaries = kwargs.get("cu_seq_lens_q")
        if boundaries is None or self.supports_packing:
            return super().__call__(*args, **kwargs)
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.packs_in_one_call(hidden_states.device):
            return self.forward_varlen(boundaries, *args, **kwargs)
        return self.forward_per_sequence(boundaries, *args, **kwargs)

    def packs_in_one_call(self, device: torch.device) -> bool:
        """True when a packed batch on `device` runs through this mixer's varlen kernels (`forward_varlen`)."""
        if not self.varlen_kernels:
            return False
        return resolve_backend(self.config.backend, device, self.name, self.kernels) != "torch"

    def forward_varlen(
        self, boundaries: torch.Tensor, hidden_states: torch.Tensor, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        """Packed sequences in one call: the batch as one row (1, B*T, D), `forward` given the boundaries as
        `cu_seqlens`. The boundaries stay on the device, unread (checking their values would stall the host
        on every layer); `forward_per_sequence` checks them."""
        batch, length, _ = hidden_states.shape
        row, common = self._packed_row(boundaries, hidden_states, kwargs)
        out = super().__call__(hidden_states=row, cu_seqlens=boundaries, **common)[0]
        return out.view(batch, length, -1), None

    def forward_per_sequence(
        self, boundaries: torch.Tensor, hidden_states: torch.Tensor, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        """Packed sequences one at a time: the mixer on each sequence alone, from an empty state. The reference
        for `forward_varlen`, and the path of every mixer and backend without varlen kernels."""
        batch, length, _ = hidden_states.shape
        bounds = boundaries.tolist()
        if bounds[0] != 0 or bounds[-1] != batch * length or sorted(bounds) != bounds:
            raise ValueError(
                f"cu_seq_lens_q must rise from 0 to batch * length = {batch * length}; got {bounds}."
            )
        row, common = self._packed_row(boundaries, hidden_states, kwargs)
        rotary = common["position_embeddings"]
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=False):
            if end > start:
                if rotary is not None:
                    common["position_embeddings"] = tuple(part[:, start:end] for part in rotary)
                outputs.append(super().__call__(hidden_states=row[:, start:end], **common)[0])
        return torch.cat(outputs, dim=1).view(batch, length, -1), None

    def _packed_row(
        self, boundaries: torch.Tensor, hidden_states: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The packed batch as one row (1, B*T, D) and the keywords `forward` runs on it: rotary tables
        flattened alike, no mask, cache or positions (the boundaries say where each sequence starts)."""
        if kwargs.get("cache") is not None and kwargs.get("use_cache"):
            raise ValueError(
                "Packed sequences (cu_seq_lens_q) are a training input; generation with a cache takes one "
                "sequence per row (pad instead of packing)."
            )
        if boundaries.dim() != 1 or boundaries.numel() < 2:
            raise ValueError(
                "cu_seq_lens_q must be the N+1 boundaries of N packed sequences (1-D), got shape "
                f"{tuple(boundaries.shape)}."
            )
        batch, length, width = hidden_states.shape
        rotary = kwargs.get("position_embeddings")
        if rotary is not None:  # (B, T, D) cos and sin -> (1, B*T, D), laid out like the tokens
            rotary = tuple(
                part.expand(batch, *part.shape[1:]).reshape(1, batch * length, -1) for part in rotary
            )
        dropped = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids")
        common = {key: value for key, value in kwargs.items() if key not in dropped}
        common.update(attention_mask=None, cache=None, use_cache=False, position_embeddings=rotary)
        return hidden_states.reshape(1, batch * length, width), common

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """`cache`: the model's transformers cache (None without one); a recurrent mixer keeps its state in this
        layer's slot of it (`begin_recurrent_forward`, `hybridize.mixers.cache.mixer_cache_layer`)."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Default initialisation of the mixer's own parameters (no teacher)."""
        raise NotImplementedError

    @torch.no_grad()
    def initialize_from_teacher(self, teacher_attention: nn.Module, policy: str) -> None:
        """Initialise from the teacher attention module this mixer replaces, following `policy`."""
        raise NotImplementedError

    def begin_recurrent_forward(self, hidden_states, attention_mask, cache):
        """The common start of a recurrent mixer's forward: recover padding from the attention mask and zero
        the padded positions' inputs, and find this layer's state slot in the cache.

        Returns (hidden_states, valid (B, T) bool or None when nothing is padded, cache slot or None, its
        states dict, empty without a cache). The mixer must also neutralise its decay/write at invalid
        positions, so that (left) padding leaves its states exactly as without it.
        """
        valid = key_padding_mask(attention_mask, hidden_states.shape[1])
        if valid is not None:
            hidden_states = hidden_states * valid[..., None].to(hidden_states.dtype)
        slot = mixer_cache_layer(cache, self.layer_idx)
        return hidden_states, valid, slot, (slot.states if slot is not None else {})

    def project_inputs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The `input_projections` of hidden_states: one matrix product when they are fused and autograd is off
        (the fused weight is not what the optimiser updates), else one per layer."""
        fused = self.fused_input_projection
        if fused is not None and not torch.is_grad_enabled() and fused.current():
            return fused(hidden_states)
        return tuple(self.get_submodule(name)(hidden_states) for name in self.input_projections)

    @classmethod
    def configure_natively(cls, text_config: Any, layer_idx: int, config: MixerConfig) -> bool:
        """Edit `text_config` so the model builds this layer itself; return False when it cannot."""
        return False

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, {self.config}"
