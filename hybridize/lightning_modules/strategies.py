"""FSDP for hybrids: shard by decoder layer, whatever the model family.

Lightning's FSDPStrategy takes the classes to wrap up front, but a stage only knows its model after it has
loaded it. `DecoderLayerFSDP` finds the decoder layer class and the mixer classes when the strategy wraps the
module (a mixer trains in fp32 beside its layer's bf16 frozen weights, and FSDP flattens one dtype per unit).
Run on CPU (gloo) only so far; the multi-GPU runs used DDP. LoRA adapters (fp32 inside bf16 linear layers)
need `dtype: fp32` under FSDP. Frozen and trainable parameters share units, so
`use_orig_params=True`; checkpoints are gathered whole (`state_dict_type="full"`) so the stage keeps only the
trainable tensors in them.

    trainer:
      strategy: {class_path: hybridize.lightning_modules.strategies.DecoderLayerFSDP}
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from hybridize.converters.discovery import find_decoder_layout
from hybridize.mixers.base import TokenMixer


class DecoderLayerFSDP(FSDPStrategy):
    def __init__(self, **kwargs):
        kwargs.setdefault("use_orig_params", True)
        kwargs.setdefault("state_dict_type", "full")
        super().__init__(**kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if "auto_wrap_policy" not in self.kwargs:
            hybrid = self.lightning_module.hybrid
            classes = {type(layer) for layer in find_decoder_layout(hybrid).layers}
            # Mixers are units of their own: they train in fp32 while their layer's frozen weights may be bf16,
            # and FSDP flattens one dtype per unit.
            classes |= {
                type(m) for m in hybrid.modules() if isinstance(m, TokenMixer) and not m.wraps_attention
            }
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(classes)
        return super()._setup_model(model)


def leave_process_group() -> None:
    """Every rank leaves the default process group together: a barrier, then `destroy_process_group`. For the
    end of a process hybridize owns (`hybridize train`, the workers a layer selection spawns), where nothing uses
    the group afterwards. Left to each process's exit (Lightning's atexit hook), a rank could tear its group down
    after rank 0, which holds the group's store, had already gone: two gloo ranks on CPU then aborted now and then
    at exit (SIGABRT, "terminate called without an active exception") after a run that had finished. Nothing
    happens in a process without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class LeaveProcessGroup(L.Callback):
    """`leave_process_group` as a Trainer's last hook, for workers that end with their `fit` (Lightning's
    ddp_spawn: its launcher collects rank 0's weights without collectives). Not for a process that goes on to
    use the group (a `state_dict` gathered under FSDP after `fit`, another `fit` on the same trainer)."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        leave_process_group()
