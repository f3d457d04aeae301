"""hybridize: turn pretrained Hugging Face transformers into linear-complexity hybrids.

Importing the package registers the hybrid model classes of the supported families with transformers'
Auto classes, so saved hybrids load with `AutoModelForImageTextToText.from_pretrained(path)`.
"""

from hybridize import presets  # noqa: F401  (registers the tiny processor class with AutoProcessor)
from hybridize.converters import (
    TESTED_MODEL_TYPES,
    ConversionReport,
    LayerPlan,
    convert,
    load,
    load_base_model,
    load_processor,
    plan_layers,
    register_hybrid_family,
    save_hybrid,
)
from hybridize.mixers import (
    AttentionSpec,
    MixerConfig,
    TokenMixer,
    available_mixers,
    build_mixer,
    register_mixer,
)

for _model_type in TESTED_MODEL_TYPES:
    register_hybrid_family(_model_type)

__version__ = "0.1.0"
__all__ = [
    "AttentionSpec",
    "ConversionReport",
    "LayerPlan",
    "MixerConfig",
    "TokenMixer",
    "available_mixers",
    "build_mixer",
    "convert",
    "load",
    "load_base_model",
    "load_processor",
    "plan_layers",
    "register_hybrid_family",
    "register_mixer",
    "save_hybrid",
]
