"""Stages 2 and 3 of the recipe: instruction SFT (cross-entropy on assistant tokens) and long-sequence SFT with
LoRA adapters (peft) on packed long samples, merged back into the hybrid at export."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from hybridize.converters.discovery import find_decoder_layout
from hybridize.lightning_modules.stage import HybridStage


class SupervisedFineTuning(HybridStage):
    """Stage 2: next-token cross-entropy on the assistant tokens (the data module labels only those).

    Trains, as InfiniteVL does, the mixers, the attention output projections and the MLPs; embeddings, norms,
    the kept attention's q/k/v and the vision tower stay frozen (`trainable` overrides)."""

    stage = "supervised_fine_tuning"
    default_previous_stage = "end_to_end_distillation"
    default_trainable = ("mixers", r"\.self_attn\.o_proj\.", r"\.mlp\.")

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        ce = self.next_token_loss(batch)
        return {"loss": ce, "ce": ce}


def lora_target_modules(model: nn.Module, names: list[str] | None) -> list[str]:
    """Full names of the linear layers inside the decoder layers (not the vision tower, not the head) whose own
    name is in `names` (None: every one)."""
    layout = find_decoder_layout(model)
    layer_ids = {id(layer) for layer in layout.layers}
    targets, found = [], set()
    for layer_name, layer in model.named_modules():
        if id(layer) not in layer_ids:
            continue
        for name, module in layer.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) and (names is None or leaf in names):
                targets.append(f"{layer_name}.{name}")
                found.add(leaf)
    missing = sorted(set(names or ()) - found)
    if missing or not targets:
        available = sorted(
            {n.rsplit(".", 1)[-1] for n, m in layout.layers.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"lora_targets {missing or names} name no linear layer of the decoder; it has: {available}."
        )
    return targets


def adapters_follow_autocast(model: nn.Module, precision: str) -> None:
    """Under mixed precision ("bf16-mixed", "16-mixed"), LoRA layers take their input as it comes (bf16) instead
    of casting it to their fp32 weights' dtype first (peft's default): autocast casts it back to bf16 for the
    matrix product anyway, so the cast only made an fp32 copy of every adapted layer's input, and its dropout ran
    in fp32. Same values (the dropout's random mask aside); elsewhere the cast stays."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = not str(precision).endswith("-mixed")


class LongSequenceSFT(SupervisedFineTuning):
    """Stage 3: LoRA adapters on the decoder's linear layers, trained on long (packed) samples, merged at export."""

    stage = "long_sequence_sft"
    default_previous_stage = "supervised_fine_tuning"
    default_trainable = ("lora",)

    def __init__(
        self,
        checkpoint,
        *,
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.05,
        lora_targets: list[str] | None = None,
        **kwargs,
    ):
        """
        Args:
            lora_rank, lora_alpha, lora_dropout: the adapters (peft LoraConfig r, lora_alpha, lora_dropout).
            lora_targets: names of the linear layers that get adapters (e.g. [q_proj, v_proj, o_proj]);
                default: every linear layer of the decoder layers (attention, mixers, MLP).
        """
        if lora_rank <= 0:
            raise ValueError(f"lora_rank must be positive, got {lora_rank}.")
        self._lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        self._lora_targets = lora_targets
        super().__init__(checkpoint, **kwargs)

    def prepare_model(self) -> None:
        self._lora.target_modules = lora_target_modules(self.hybrid, self._lora_targets)
        self.hybrid = get_peft_model(self.hybrid, self._lora)

    def setup(self, stage: str) -> None:
        adapters_follow_autocast(self.hybrid, self.trainer.precision)

    @contextmanager
    def exporting(self):
        yield self.hybrid.merge_and_unload()
