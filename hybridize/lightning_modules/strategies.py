"""FSDP for hybrids: shard by decoder layer, whatever the model family.

Lightning's FSDPStrategy takes the classes to wrap up front, but a stage only knows its model after it has
loaded it. `DecoderLayerFSDP` finds the decoder layer class (and the teacher attention beside each mixer stays
inside its layer's unit) when the strategy wraps the module. Frozen and trainable parameters share units, so
`use_orig_params=True`; checkpoints are gathered whole (`state_dict_type="full"`) so the stage keeps only the
trainable tensors in them.

    trainer:
      strategy: {class_path: hybridize.lightning_modules.strategies.DecoderLayerFSDP}
"""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from hybridize.converters.discovery import find_decoder_layout


class DecoderLayerFSDP(FSDPStrategy):
    def __init__(self, **kwargs):
        kwargs.setdefault("use_orig_params", True)
        kwargs.setdefault("state_dict_type", "full")
        super().__init__(**kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if "auto_wrap_policy" not in self.kwargs:
            layers = find_decoder_layout(self.lightning_module.hybrid).layers
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy({type(layer) for layer in layers})
        return super()._setup_model(model)
