"""Load InfiniteVL's released checkpoints (`hustvl/InfiniteVL`, stage 2; `hustvl/InfiniteVL-LongSFT`, stage 3)
without their remote code, which was written for transformers 4.5x.

Their model is Qwen2.5-VL whose `linear_attention` layers hold a Gated DeltaNet at `self_attn` with fla's
parameter names, which is our `gated_deltanet` mixer tensor for tensor, and whose `sliding_attention` layers are
Qwen2.5-VL attention with a window. So their config.json translates into a hybrid Qwen2.5-VL config with a layer
plan, and their safetensors load by name once every name and shape has been checked against that plan.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from hybridize.compat import no_init_weights
from hybridize.converters.checkpoint import (
    DTYPES,
    check_output_dir,
    checkpoint_tensors,
    load_processor,
    local_folder,
    parse_dtype,
    save_hybrid,
)
from hybridize.converters.convert import build_hybrid_config
from hybridize.converters.discovery import layer_specs
from hybridize.converters.hybrid_model import PLAN_KEY, hybrid_model_class
from hybridize.converters.plan import LayerPlan, plan_layers

MODEL_TYPE = "infinite_vl"
# Their text config's class defaults, which the released config.json leaves out (InfiniteVL's layer: 16 heads,
# head_k_dim 128, head_v_dim 256).
LINEAR_DEFAULTS = {
    "num_linear_heads": 16,
    "num_linear_key_value_heads": 16,
    "linear_head_dim": 128,
    "expand_v": 2,
    "conv_size": 4,
    "use_gate": True,
    "use_short_conv": True,
    "norm_eps": 1e-5,
}
# Their text fields (top level of config.json) that Qwen2.5-VL's text config takes as they are. Not taken:
# use_cache (false in their export, a training setting), max_window_layers (layer_types decide), head_dim (their
# attention uses hidden_size // num_attention_heads, as Qwen2.5-VL's does) and the linear fields (the plan).
TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
VISION_FIELDS = (
    "depth",
    "hidden_size",
    "hidden_act",
    "intermediate_size",
    "num_heads",
    "in_channels",
    "patch_size",
    "spatial_merge_size",
    "temporal_patch_size",
    "tokens_per_second",
    "window_size",
    "out_hidden_size",
    "fullatt_block_indexes",
    "initializer_range",
)
TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
# The training stage a released checkpoint is the output of, recorded in the plan's `stages` history
# (hybridize.lightning_modules.stage.STAGES_KEY) so that `hybridize train` chains from it: hustvl/InfiniteVL is
# their stage 2 (SFT); pass stage="long_sequence_sft" for hustvl/InfiniteVL-LongSFT.
RELEASED_STAGE = "supervised_fine_tuning"
STAGES_KEY = "stages"
# Files a hub snapshot needs: config, weights, tokenizer, processor, chat template, generation config.


def read_infinitevl_config(path: str | Path) -> dict:
    """Their config.json as a dict; an error unless it is one (model_type infinite_vl)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{str(path)!r} has no config.json; give an InfiniteVL checkpoint folder or hub id.")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as error:
        raise ValueError(f"{str(config_file)!r} is not JSON ({error}); download it again.") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != MODEL_TYPE:
        raise ValueError(
            f"{str(path)!r} has model_type {model_type!r}, not {MODEL_TYPE!r}: not an InfiniteVL checkpoint "
            "(`hybridize.load` reads hybrids, `hybridize convert --base` converts transformers models)."
        )
    return config


def is_infinitevl_checkpoint(path: str | Path) -> bool:
    """Whether a local folder holds an InfiniteVL checkpoint (reads its config.json only)."""
    try:
        read_infinitevl_config(path)
    except (ValueError, OSError):
        return False
    return True


def _linear_fields(config: dict) -> dict:
    """Their Gated DeltaNet fields with class defaults filled in; those our mixer cannot express are refused."""
    fields = {**LINEAR_DEFAULTS, **{key: config[key] for key in LINEAR_DEFAULTS if key in config}}
    refused = {
        "use_gate": (
            fields["use_gate"] is not True,
            "our gated_deltanet always has the output gate (g_proj)",
        ),
        "use_short_conv": (
            fields["use_short_conv"] is not True,
            "our gated_deltanet always has the short convolutions (their code refuses False too)",
        ),
        "num_linear_key_value_heads": (
            fields["num_linear_key_value_heads"] != fields["num_linear_heads"],
            f"our gated_deltanet has as many key/value heads as query heads ({fields['num_linear_heads']})",
        ),
    }
    for name, (bad, why) in refused.items():
        if bad:
            raise ValueError(f"InfiniteVL config field {name}={fields[name]!r} is not supported: {why}.")
    # conv_bias and mode need nothing: their layer builds its convolutions without bias whatever conv_bias says
    # (a checkpoint with conv biases fails the tensor check by name), and mode only picks an fla kernel.
    return fields


def infinitevl_plan(config: dict) -> LayerPlan:
    """Their layer_types as our plan: `linear_attention` -> gated_deltanet with their sizes and norm_eps,
    `sliding_attention` -> sliding_window with their window (full attention when use_sliding_window is off, as
    their config then drops the window), `full_attention` kept. Default layer_types: sliding at i % 4 == 0."""
    num_layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types") or [
        "sliding_attention" if idx % 4 == 0 else "linear_attention" for idx in range(num_layers)
    ]
    if len(layer_types) != num_layers:
        raise ValueError(
            f"InfiniteVL config has {len(layer_types)} layer_types for num_hidden_layers={num_layers}; "
            "give one per layer."
        )
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    mixers = {
        "linear_attention": "gated_deltanet",
        "sliding_attention": "sliding_window" if window else "full_attention",
        "full_attention": "full_attention",
    }
    unknown = sorted({kind for kind in layer_types if kind not in mixers})
    if unknown:
        raise ValueError(f"InfiniteVL layer_types {unknown} are not one of {sorted(mixers)}.")
    names = [mixers[kind] for kind in layer_types]
    options = {}
    if "gated_deltanet" in names:
        fields = _linear_fields(config)
        options["gated_deltanet"] = {
            "num_heads": fields["num_linear_heads"],
            "head_k_dim": fields["linear_head_dim"],
            "expand_v": float(fields["expand_v"]),
            "conv_size": fields["conv_size"],
            "norm_eps": fields["norm_eps"],  # theirs (1e-5), not the teacher-derived rms_norm_eps (1e-6)
        }
    window_argument = {"window": window} if "sliding_window" in names else {}
    return plan_layers(num_layers, layers=names, options=options, **window_argument)


def _teacher_config(config: dict, dtype: torch.dtype) -> Qwen2_5_VLConfig:
    """Their config as the Qwen2.5-VL config the plan is applied to (every layer full attention)."""
    rope = dict(config.get("rope_scaling") or {})
    legacy_type = rope.pop("type", None)
    rope["rope_type"] = rope.get("rope_type") or (
        "default" if legacy_type in (None, "mrope") else legacy_type
    )
    rope["rope_theta"] = config.get("rope_theta", 1000000.0)
    if "mrope_section" not in rope:
        raise ValueError(
            "InfiniteVL config has no rope_scaling.mrope_section; Qwen2.5-VL needs its M-RoPE sections."
        )
    text_config = {key: config[key] for key in TEXT_FIELDS if key in config}
    text_config.update(
        rope_parameters=rope,
        layer_types=["full_attention"] * config["num_hidden_layers"],
        use_sliding_window=False,
    )
    vision = config.get("vision_config") or {}
    vision_config = {key: vision[key] for key in VISION_FIELDS if key in vision}
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        tie_word_embeddings=config.get("tie_word_embeddings", False),  # their text config's default
        dtype=dtype,
        **{key: config[key] for key in TOKEN_FIELDS if key in config},
    )


def infinitevl_config(
    config: dict,
    *,
    dtype: torch.dtype = torch.float32,
    stage: str = RELEASED_STAGE,
    source: str | None = None,
):
    """Our hybrid Qwen2.5-VL config of their config.json: the plan of `infinitevl_plan`, with a stage history
    that says which training stage the checkpoint (`source`) is the output of."""
    teacher_config = _teacher_config(config, dtype)
    hybrid_config = build_hybrid_config(teacher_config, infinitevl_plan(config), layer_specs(teacher_config))
    section = getattr(hybrid_config, PLAN_KEY)
    # Their config does not record the teacher of their distillation; a distillation stage asks for one.
    section["base_model"] = None
    section[STAGES_KEY] = [{"stage": stage, "imported_from": source}]
    return hybrid_config


def checkpoint_key(name: str) -> str:
    """A tensor name of their checkpoint in our model: the legacy layout (`visual.*`, `model.layers.N.*`, as
    transformers 4.x saves Qwen2.5-VL) or the new one (`model.visual.*`, `model.language_model.*`)."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + name.removeprefix("model.")
    return name


def check_tensors(
    tensors: dict[str, tuple[Path, tuple[int, ...]]], expected: dict[str, tuple[int, ...]], tied: bool
) -> dict[str, str]:
    """Their tensor names -> ours, after checking that they are exactly the tensors the plan builds, with its
    shapes. The error names the first tensor that differs."""
    mapped: dict[str, str] = {}  # our name -> theirs
    for key, (file, shape) in tensors.items():
        name = checkpoint_key(key)
        if name in mapped:
            raise ValueError(
                f"The checkpoint holds {name} twice, as {mapped[name]} and {key}; keep one layout."
            )
        if name not in expected:
            raise ValueError(
                f"The checkpoint holds {key} ({file.name}), which the model built from its config.json does not "
                "have; is the config from another checkpoint?"
            )
        if shape != expected[name]:
            raise ValueError(
                f"The checkpoint holds {key} ({file.name}) as {list(shape)}, but its config.json builds "
                f"{list(expected[name])}; the config's sizes (linear fields, heads, vocab) and the weights disagree."
            )
        mapped[name] = key
    # A tied output head is the input embedding: absent from the files, or ignored as their code ignores it.
    optional = {"lm_head.weight"} if tied else set()
    missing = [name for name in expected if name not in mapped and name not in optional]
    if missing:
        raise ValueError(
            f"The checkpoint lacks {missing[0]} {list(expected[missing[0]])} ({len(missing)} tensors missing); "
            "download every shard, or check that config.json belongs to these weights."
        )
    return {key: name for name, key in mapped.items() if name not in optional}


def _stored_dtype(config: dict) -> torch.dtype:
    stored = config.get("torch_dtype") or config.get("dtype") or "float32"
    if stored not in DTYPES:
        raise ValueError(
            f"InfiniteVL config has torch_dtype {stored!r}, not one of {sorted(DTYPES)}; pass dtype."
        )
    return DTYPES[stored]


def load_infinitevl(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    attn_implementation: str | None = None,
    stage: str = RELEASED_STAGE,
):
    """Our hybrid Qwen2.5-VL with an InfiniteVL checkpoint's weights (a local folder or hub id; no remote code).

    Every tensor's name and shape is checked from the file headers before any is read. dtype: default the
    checkpoint's (bf16 for the released ones). stage: the training stage the checkpoint is the output of.
    """
    return _load_folder(local_folder(path), str(path), dtype, device, attn_implementation, stage)


def check_infinitevl(
    folder: str | Path, *, dtype=None, stage: str = RELEASED_STAGE, source: str | None = None
):
    """Check a local InfiniteVL folder without reading a tensor: its config translates into our plan, and its
    files hold exactly the tensors that plan builds, with their shapes. Returns (our config, their tensor name ->
    ours, the tensors' files and shapes); the error names the first problem."""
    folder = Path(folder)
    config_dict = read_infinitevl_config(folder)
    dtype = parse_dtype(dtype) or _stored_dtype(config_dict)
    config = infinitevl_config(config_dict, dtype=dtype, stage=stage, source=source or str(folder))
    with torch.device("meta"):
        expected = hybrid_model_class(Qwen2_5_VLForConditionalGeneration)._from_config(config).state_dict()
    tensors = checkpoint_tensors(folder)
    names = check_tensors(
        tensors, {name: tuple(t.shape) for name, t in expected.items()}, config.tie_word_embeddings
    )
    return config, names, tensors


@torch.no_grad()
def _load_folder(folder: Path, source: str, dtype, device, attn_implementation, stage: str):
    from safetensors import safe_open

    dtype = parse_dtype(dtype) or _stored_dtype(read_infinitevl_config(folder))
    config, names, tensors = check_infinitevl(folder, dtype=dtype, stage=stage, source=source)
    model_class = hybrid_model_class(Qwen2_5_VLForConditionalGeneration)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}

    with no_init_weights(), torch.device(device or "cpu"):
        model = model_class._from_config(config, dtype=dtype, **kwargs)
    state = model.state_dict()
    by_file: dict[Path, list[str]] = {}
    for key in names:
        by_file.setdefault(tensors[key][0], []).append(key)
    for file, keys in by_file.items():
        with safe_open(str(file), "pt") as handle:
            for key in keys:  # copy_ casts: A_log / dt_bias may be stored in bf16
                state[names[key]].copy_(handle.get_tensor(key))
    if config.tie_word_embeddings:
        model.tie_weights()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def import_infinitevl(
    source: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    stage: str = RELEASED_STAGE,
) -> Path:
    """Write an InfiniteVL checkpoint as a hybridize checkpoint (with its processor when it has one), which
    `hybridize.load`, `hybridize generate`/`stream` and the training stages read."""
    out = check_output_dir(out, overwrite)
    folder = local_folder(source)
    model = _load_folder(folder, str(source), dtype, None, None, stage)
    return save_hybrid(model, out, load_processor(folder), overwrite=overwrite)
