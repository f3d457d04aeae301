"""The `lmms_eval.models` entry point: lmms-eval reads every plugin's manifest when it starts, so this module
stays light; the model (`lmms_eval_model.HybridizeModel`, torch and transformers) is imported when asked for."""

from __future__ import annotations

NAME = "hybridize"


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=NAME, simple_class_path="hybridize.evaluation.lmms_eval_model.HybridizeModel"
    )
