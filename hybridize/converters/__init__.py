"""Model surgery: find layers in a HF model, plan them, convert, save and load hybrids."""

from hybridize.converters.checkpoint import (
    SHORT_NAMES,
    TESTED_MODEL_TYPES,
    load,
    load_base_model,
    load_processor,
    read_plan,
    save_hybrid,
)
from hybridize.converters.convert import ConversionReport, build_hybrid_config, convert
from hybridize.converters.discovery import DecoderLayout, attention_spec, find_decoder_layout
from hybridize.converters.hybrid_model import hybrid_model_class, layer_plan, register_hybrid_family
from hybridize.converters.plan import LayerPlan, parse_ratio, plan_layers

__all__ = [
    "SHORT_NAMES",
    "TESTED_MODEL_TYPES",
    "ConversionReport",
    "DecoderLayout",
    "LayerPlan",
    "attention_spec",
    "build_hybrid_config",
    "convert",
    "find_decoder_layout",
    "hybrid_model_class",
    "layer_plan",
    "load",
    "load_base_model",
    "load_processor",
    "parse_ratio",
    "plan_layers",
    "read_plan",
    "register_hybrid_family",
    "save_hybrid",
]
