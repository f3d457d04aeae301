"""Loading teachers (hub id, local directory or an embedded tiny model) and saving/loading hybrids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, PreTrainedConfig

from hybridize.compat import auto_model_class
from hybridize.converters.discovery import layer_specs
from hybridize.converters.hybrid_model import (
    HYBRID_PREFIX,
    PLAN_KEY,
    generation_auto_class,
    layer_plan,
    register_hybrid_family,
)

# Short names for official checkpoints of the tested families.
SHORT_NAMES = {
    "Qwen2.5-VL-3B": "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen2.5-VL-7B": "Qwen/Qwen2.5-VL-7B-Instruct",
    "Qwen2.5-VL-32B": "Qwen/Qwen2.5-VL-32B-Instruct",
    "Qwen2.5-VL-72B": "Qwen/Qwen2.5-VL-72B-Instruct",
    "Qwen2-VL-2B": "Qwen/Qwen2-VL-2B-Instruct",
    "Qwen2-VL-7B": "Qwen/Qwen2-VL-7B-Instruct",
    "Qwen3-VL-2B": "Qwen/Qwen3-VL-2B-Instruct",
    "Qwen3-VL-4B": "Qwen/Qwen3-VL-4B-Instruct",
    "Qwen3-VL-8B": "Qwen/Qwen3-VL-8B-Instruct",
    "LLaVA-1.5-7B": "llava-hf/llava-1.5-7b-hf",
    "Llama-3.2-1B": "meta-llama/Llama-3.2-1B-Instruct",
    "Llama-3.2-3B": "meta-llama/Llama-3.2-3B-Instruct",
    "Qwen2.5-1.5B": "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen3-1.7B": "Qwen/Qwen3-1.7B",
    "Mistral-7B": "mistralai/Mistral-7B-Instruct-v0.3",
}
# Families converted, generated with and reloaded in the tests (tiny configs in hybridize.presets); their
# hybrid classes are registered with the Auto classes on `import hybridize`. Other transformers models with
# a `get_decoder()`, decoder `layers` and q/k/v/o attention projections convert too (`layer_specs` checks).
TESTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava", "llama", "qwen2", "qwen3", "mistral")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def embedded_models() -> dict:
    """Tiny models built from a config in code (name -> (config builder, model+processor builder)): the
    README's offline default (`tiny-qwen2.5-vl`, with an image processor) and one per tested family
    (`tiny-llama`, `tiny-qwen3-vl`, ... with the byte-level tokenizer)."""
    from hybridize import presets

    models = {"tiny-qwen2.5-vl": (presets.tiny_qwen2_5_vl_config, presets.tiny_qwen2_5_vl)}
    for model_type, config_builder in presets.TINY_CONFIGS.items():
        name = "tiny-" + model_type.replace("_5", ".5").replace("_", "-")  # qwen2_5_vl -> tiny-qwen2.5-vl
        models.setdefault(
            name, (lambda build=config_builder: build(8), presets.tiny_model_with_tokenizer(model_type))
        )
    return models


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def resolve_base(base: str) -> str:
    """Short name -> hub id; local paths and hub ids pass through. Checks what can be checked offline."""
    if base in embedded_models():
        return base
    base = SHORT_NAMES.get(base, base)
    path = Path(base).expanduser()
    looks_local = path.exists() or base.startswith((".", "/", "~")) or base.count("/") != 1
    if looks_local:
        if not path.is_dir():
            known = ", ".join([*SHORT_NAMES, *embedded_models()])
            raise FileNotFoundError(
                f"Base model {base!r} is not a directory, a hub id (org/name) or a known name ({known})."
            )
        if not (path / "config.json").is_file():
            raise ValueError(f"{base!r} is not a transformers model directory: it has no config.json.")
    return base


def load_base_config(base: str) -> PreTrainedConfig:
    """The teacher's config (no weights): checks that `base` exists and that its layers can be converted."""
    embedded = embedded_models()
    if base in embedded:
        return embedded[base][0]()
    source = resolve_base(base)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read a transformers config from {base!r}: {error}") from None
    if config.model_type.startswith(HYBRID_PREFIX):
        raise ValueError(f"{base!r} is already a hybrid ({config.model_type}); convert its teacher instead.")
    return config


def base_layer_specs(config: PreTrainedConfig, base: str) -> list:
    """Every decoder layer's attention layout, read without weights; the error says what was not found."""
    try:
        return layer_specs(config)
    except ValueError as error:
        raise ValueError(f"{base!r} ({config.model_type}) cannot be converted: {error}") from None


def load_base_model(base: str, *, dtype: str | torch.dtype | None = None, device: str | None = None):
    """Load a teacher (and its processor, when it has one): an embedded name, a local directory or a hub id."""
    dtype = parse_dtype(dtype)
    embedded = embedded_models()
    if base in embedded:
        model, processor = embedded[base][1]()
        model.name_or_path = base  # recorded as the hybrid's base model
        return model.to(device=device or "cpu", dtype=dtype or model.dtype), processor
    config = load_base_config(base)
    source = resolve_base(base)
    model = generation_auto_class(type(config)).from_pretrained(
        source, dtype=dtype or "auto", device_map=device
    )
    return model.eval(), load_processor(source)


def load_processor(source: str | Path):
    """The processor saved with a model (VLMs), else its tokenizer, else None."""
    for loader in (AutoProcessor, AutoTokenizer):
        try:
            return loader.from_pretrained(source)
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return None


def check_output_dir(
    out: str | Path, overwrite: bool, *, flag: str = "--out", overwrite_flag: str = "--overwrite"
) -> Path:
    """Refuse an output directory up front, before any model is loaded or file written: a non-empty one unless
    `overwrite`, and even then one that holds anything but a saved hybrid (whose files `save_hybrid` replaces)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{flag} {str(out)!r} exists and is a file; give a directory path.")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise FileExistsError(
            f"{flag} {str(out)!r} exists and is not empty; pick a new directory or pass {overwrite_flag}."
        )
    try:
        read_plan(out)
    except (FileNotFoundError, ValueError):
        example = sorted(path.name for path in out.iterdir())[0]
        raise FileExistsError(
            f"{flag} {str(out)!r} holds files that are not a saved hybrid (e.g. {example}); {overwrite_flag} "
            "replaces only a hybrid: empty the folder or pick a new one."
        ) from None
    return out


def save_hybrid(model, out: str | Path, processor=None, *, overwrite: bool = False) -> Path:
    """Write a hybrid checkpoint (safetensors + config with the plan, and the processor) to `out`.

    With `overwrite`, a hybrid already in `out` is replaced as a whole (no file of it survives): the new one is
    written beside it first and swapped in, so a failed save leaves the old one as it was.
    """
    layer_plan(model.config)
    out = check_output_dir(out, overwrite)
    staging = out.with_name(f".{out.name}.saving")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def read_plan(path: str | Path) -> dict:
    """A saved hybrid's config.json as a dict (its plan under the `hybridize` key), read without loading any
    weight; an error when the folder has no config.json or the config no plan."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; is it a hybridize checkpoint directory?")
    data = json.loads(config_file.read_text())
    if PLAN_KEY not in data:
        raise ValueError(
            f"{str(path)!r} is not a hybridize checkpoint: its config.json has no `{PLAN_KEY}` section."
        )
    return data


HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja"]  # weights, configs, processor and chat template


def local_folder(source: str | Path) -> Path:
    """A checkpoint's local folder: a folder as it is, a hub id (org/name) downloaded with huggingface_hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(
            f"Checkpoint {text!r} does not exist (no folder with a config.json there) and is not a hub id (org/name)."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=HUB_FILES))
    except Exception as error:  # hub errors (not found, gated, offline) have no common base but Exception
        raise FileNotFoundError(
            f"Checkpoint {text!r} is not a local folder, and the hub gave no repository of that name "
            f"({type(error).__name__}); check the path or the hub id."
        ) from None


INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_tensors(path: str | Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Name -> (file, shape) of every tensor in a folder's safetensors (an index and its shards, or one file),
    from the file headers alone; the index must put each tensor in the shard that holds it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"{str(index)!r} is not a safetensors index ({error}); save or download it again."
            ) from None
    elif (path / SINGLE_FILE).is_file():
        weight_map, files = {}, [SINGLE_FILE]
    else:
        raise ValueError(
            f"{str(path)!r} holds no weights (no {SINGLE_FILE} or {INDEX_FILE}); save or download the checkpoint again."
        )
    tensors = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise ValueError(
                f"{str(path)!r} lacks the shard {name} that {INDEX_FILE} lists; save or download it again."
            )
        try:
            with safe_open(str(file), "pt") as handle:
                tensors.update(
                    {key: (file, tuple(handle.get_slice(key).get_shape())) for key in handle.keys()}
                )
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{str(file)!r} is not a readable safetensors file ({error}); it was cut short or damaged: "
                "save or download it again."
            ) from None
    for key, name in weight_map.items():
        if key not in tensors or tensors[key][0].name != name:
            raise ValueError(
                f"{INDEX_FILE} puts {key} in {name}, which does not hold it; save or download it again."
            )
    return tensors


def saved_tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint folder's safetensors files, from their headers alone."""
    return {name: shape for name, (_, shape) in checkpoint_tensors(path).items()}


def expected_tensor_shapes(config: PreTrainedConfig) -> tuple[dict[str, tuple[int, ...]], list[set[str]]]:
    """The tensors a checkpoint of `config` (plan included) must hold, under their saved names, built on the
    meta device; and the groups of names that share one tensor (tied weights: saving keeps one of each)."""
    from hybridize.compat import saved_tensor_names

    model_class = auto_model_class(generation_auto_class(type(config)), type(config))
    with torch.device("meta"):
        model = model_class._from_config(config)
    tensors = saved_tensor_names(model)
    groups: dict[int, set[str]] = {}
    for name, tensor in tensors.items():
        groups.setdefault(id(tensor), set()).add(name)
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}, list(groups.values())


def verify_checkpoint(path: str | Path, config: PreTrainedConfig | None = None) -> int:
    """Check, from the safetensors headers and without reading a tensor, that a hybrid folder holds exactly the
    tensors its config's plan builds, with their shapes; return how many. The error names the first tensor that
    differs and the likely cause."""
    config = config if config is not None else hybrid_config(path)
    saved = saved_tensor_shapes(path)
    expected, tied = expected_tensor_shapes(config)
    missing = [
        name for name in expected if name not in saved and not any(n in saved for n in _group(tied, name))
    ]
    unexpected = [name for name in saved if name not in expected]
    wrong = [name for name in expected if name in saved and saved[name] != expected[name]]
    problems = [f"lacks {name} {list(expected[name])}" for name in missing[:1]]
    problems += [f"holds {name}, which the plan does not build" for name in unexpected[:1]]
    problems += [
        f"holds {name} as {list(saved[name])}, the plan builds {list(expected[name])}" for name in wrong[:1]
    ]
    if problems:
        counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape"
        raise ValueError(
            f"{str(path)!r}: the weights do not match the plan in its config.json ({counts}): "
            f"the checkpoint {'; '.join(problems)}. Was config.json's plan edited, or is this the wrong folder?"
        )
    return len(saved)


def check_checkpoint(path: str | Path) -> dict:
    """The config.json of a saved hybrid or a released InfiniteVL folder, after checking from the file headers
    (no tensor read) that its weights are the ones its config builds: what the CLI does before loading."""
    from hybridize.converters.infinitevl import (
        check_infinitevl,
        is_infinitevl_checkpoint,
        read_infinitevl_config,
    )

    if is_infinitevl_checkpoint(path):
        check_infinitevl(path)
        return read_infinitevl_config(path)
    verify_checkpoint(path)
    return read_plan(path)


def _group(groups: list[set[str]], name: str) -> set[str]:
    return next((group for group in groups if name in group), {name})


def hybrid_config(path: str | Path) -> PreTrainedConfig:
    """The config of a saved hybrid (its family registered with the Auto classes first)."""
    model_type = read_plan(path).get("model_type", "")
    if not model_type.startswith(HYBRID_PREFIX):
        raise ValueError(f"{str(path)!r} has model_type {model_type!r}, not a hybrid ('{HYBRID_PREFIX}...').")
    register_hybrid_family(model_type.removeprefix(HYBRID_PREFIX))
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{str(path)!r}: config.json cannot be read as a hybrid config ({error}).") from None


def load(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    attn_implementation: str | None = None,
):
    """Load a hybrid checkpoint saved by `hybridize convert` or `save_hybrid` (or a released InfiniteVL one,
    `hybridize.converters.infinitevl`): a local folder or a hub id.

    The weights are checked against the plan in its config before any is read (`verify_checkpoint`), and
    transformers' own report of missing, unexpected or mis-shaped tensors is an error too: a layer is never
    left randomly initialised.
    """
    from hybridize.converters.infinitevl import is_infinitevl_checkpoint, load_infinitevl

    path = local_folder(path)
    if is_infinitevl_checkpoint(path):  # a released InfiniteVL checkpoint, read as it is
        return load_infinitevl(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    config = hybrid_config(path)
    verify_checkpoint(path, config)
    kwargs = {"dtype": parse_dtype(dtype) or "auto", "device_map": device, "ignore_mismatched_sizes": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    auto_class = generation_auto_class(type(config))
    model, info = auto_class.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    problems = {
        key: sorted(map(str, info.get(key) or []))
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if any(problems.values()):
        found = ", ".join(f"{key.replace('_', ' ')} {names[:3]}" for key, names in problems.items() if names)
        raise ValueError(f"{str(path)!r} does not load as its plan says ({found}); save the hybrid again.")
    return model.eval()
