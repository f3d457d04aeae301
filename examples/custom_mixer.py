"""A custom token mixer, end to end: define a RetNet-style retention layer, register it, convert a model
with it, generate with its cache, and save and reload the hybrid.

Retention (Sun et al., 2023) is linear attention with a fixed per-head decay gamma_h:
    S_t = gamma S_{t-1} + k_t v_t^T,    o_t = q_t S_t
computed in parallel within a forward, o = ((q k^T) * D) v with D_ij = gamma^(i-j) for i >= j, and carried
between forwards (prefill, then one token at a time) in the layer's cache slot.

Run: python examples/custom_mixer.py
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
from torch import nn

import hybridize
from hybridize.mixers import INIT_POLICIES, teacher_projections
from hybridize.testing import greedy_decode_without_cache


@dataclass
class RetentionConfig(hybridize.MixerConfig):
    """Options of the mixer; a field left None is derived from the teacher in `resolve`."""

    num_heads: int | None = None
    init: str = "attention_transfer"  # copy q, k, v, o from the teacher attention, or "mimic" (random)

    def resolve(self, spec: hybridize.AttentionSpec) -> RetentionConfig:
        resolved = RetentionConfig(num_heads=self.num_heads or spec.num_heads, init=self.init)
        if resolved.init not in INIT_POLICIES:
            raise ValueError(f"retention init={resolved.init!r} is not one of {INIT_POLICIES}.")
        if resolved.init == "attention_transfer" and resolved.num_heads != spec.num_heads:
            raise ValueError(f"attention_transfer needs the teacher's {spec.num_heads} heads.")
        return resolved


@hybridize.register_mixer("retention")
class RetentionMixer(hybridize.TokenMixer):
    """RetNet-style multi-scale retention (a fixed decay per head) in place of softmax attention."""

    config_class = RetentionConfig

    def __init__(
        self, config: RetentionConfig, spec: hybridize.AttentionSpec, layer_idx: int, attention=None
    ):
        super().__init__(config, spec, layer_idx)
        self.num_heads, self.head_dim = config.num_heads, spec.head_dim
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(spec.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(spec.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, spec.hidden_size, bias=False)
        # RetNet's decays: gamma_h = 1 - 2^(-5 - h), one time scale per head. A buffer, not trained; persistent,
        # because from_pretrained does not recompute the non-persistent buffers of modules it does not know.
        heads = torch.arange(self.num_heads, dtype=torch.float32)
        self.register_buffer("log_gamma", torch.log1p(-(2.0 ** (-5.0 - heads))))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            linear.reset_parameters()

    @torch.no_grad()
    def initialize_from_teacher(self, teacher_attention: nn.Module, policy: str) -> None:
        self.reset_parameters()
        if policy == "attention_transfer":
            weights = teacher_projections(teacher_attention, self.spec)  # k, v repeated over GQA groups
            self.q_proj.weight.copy_(weights.q)
            self.k_proj.weight.copy_(weights.k)
            self.v_proj.weight.copy_(weights.v)
            self.o_proj.weight.copy_(weights.o)

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        batch, length, _ = hidden_states.shape
        # Padded positions (generate() pads on the left) get zero inputs; this layer's slot of the model's cache
        # (None without one) holds our state.
        hidden_states, valid, slot, states = self.begin_recurrent_forward(
            hidden_states, attention_mask, cache
        )

        def heads(x):  # (B, T, H*D) -> (B, H, T, D), in fp32 at least
            x = x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
            return x.to(torch.promote_types(x.dtype, torch.float32))

        q = heads(self.q_proj(hidden_states)) * self.head_dim**-0.5
        k, v = heads(self.k_proj(hidden_states)), heads(self.v_proj(hidden_states))
        log_gamma = self.log_gamma.to(q.dtype)[:, None]  # (H, 1)
        steps = torch.arange(length, device=q.device, dtype=q.dtype)
        distance = steps[:, None] - steps[None, :]  # (T, T): i - j
        decay = torch.where(distance >= 0, (log_gamma[..., None] * distance.clamp(min=0)).exp(), 0.0)
        out = (q @ k.transpose(-1, -2) * decay) @ v  # (B, H, T, D)

        if slot is not None:
            state = states.get("state")  # (B, H, D, D): what earlier forwards left
            if state is not None:
                out = out + (q * (log_gamma * (steps + 1)).exp()[..., None]) @ state
            else:
                state = q.new_zeros(batch, self.num_heads, self.head_dim, self.head_dim)
            weights = (log_gamma * (length - 1 - steps)).exp()[..., None]  # gamma^(T-1-j)
            slot.states["state"] = (
                state * (log_gamma * length).exp()[..., None] + (k * weights).transpose(-1, -2) @ v
            )
            slot.advance(length)

        out = out.transpose(1, 2).reshape(batch, length, -1).to(hidden_states.dtype)
        return self.o_proj(out), None


def main() -> None:
    teacher, processor = hybridize.load_base_model("tiny-qwen2.5-vl")
    plan = hybridize.plan_layers(num_layers=8, ratio="1/4", mixer="retention", window=16)
    hybrid, report = hybridize.convert(teacher, plan, progress=False)
    print(report.table())

    inputs = processor(text=["hello retention"], return_tensors="pt")
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        cached = hybrid.generate(**inputs, max_new_tokens=8, do_sample=False)
    uncached = greedy_decode_without_cache(hybrid, inputs, 8)
    print("generated token ids:", cached[0, inputs["input_ids"].shape[1] :].tolist())
    assert torch.equal(cached, uncached), "cached generation must match the uncached argmax loop"

    with tempfile.TemporaryDirectory() as out:
        hybridize.save_hybrid(hybrid, out, processor, overwrite=True)
        reloaded = hybridize.load(
            out
        )  # works while the "retention" mixer is registered (this module imported)
        with torch.no_grad():
            assert torch.equal(hybrid(**inputs).logits, reloaded(**inputs).logits)
    print("retention hybrid: cached generation == uncached loop, save/load round trip exact")


if __name__ == "__main__":
    main()
