"""GPU check of whole converted models on the fla path.

1. The tiny Qwen2.5-VL in the InfiniteVL layout on CUDA (fp32): greedy generate() with the hybrid cache
   (fla chunked prefill, fused-recurrent decode) against an uncached argmax loop, with an image, batch of 2,
   left padding.
2. The real Qwen2.5-VL-3B architecture (random bf16 weights) converted at ratio 1/4: parameter accounting,
   a forward pass over 8192 tokens, and generation, with wall times and peak memory.

    python benchmarks/check_gpu_model.py --out benchmarks/results/gpu_model_check.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

import hybridize
from hybridize.converters import convert, plan_layers
from hybridize.inference.chat import chat_inputs
from hybridize.presets import qwen2_5_vl_3b_config, tiny_qwen2_5_vl
from hybridize.testing import greedy_decode_without_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from common import require_fla  # noqa: E402

try:
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover
    from transformers.modeling_utils import no_init_weights


def check_tiny_generation(device) -> dict:
    teacher, processor = tiny_qwen2_5_vl()
    torch.manual_seed(0)
    hybrid, _ = convert(teacher, plan_layers(8, "1/4", window=8), progress=False)
    hybrid = hybrid.to(device)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (84, 112, 3), dtype=np.uint8))
    inputs = chat_inputs(processor, ["Describe this image in detail, please.", "Hi"], [[image], []])
    inputs = {key: value.to(device) for key, value in inputs.items()}
    steps = 12
    with torch.no_grad():
        cached = hybrid.generate(**inputs, max_new_tokens=steps, do_sample=False)
    uncached = greedy_decode_without_cache(hybrid, inputs, steps)
    new = slice(inputs["input_ids"].shape[1], None)
    return {
        "tokens_equal": bool(torch.equal(cached, uncached)),
        "cached_new_tokens": cached[:, new].tolist(),
        "uncached_new_tokens": uncached[:, new].tolist(),
    }


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def check_3b(device) -> dict:
    torch.manual_seed(0)
    with no_init_weights(), torch.device(device):
        teacher = Qwen2_5_VLForConditionalGeneration._from_config(
            qwen2_5_vl_3b_config(), dtype=torch.bfloat16
        )
    for parameter in teacher.parameters():  # random values; no_init_weights leaves memory uninitialised
        parameter.data.normal_(0, 0.02)
    teacher.eval()
    torch.cuda.synchronize()
    start = time.perf_counter()
    hybrid, report = convert(teacher, plan_layers(36, "1/4", window=8192), progress=False)
    torch.cuda.synchronize()
    convert_s = time.perf_counter() - start
    del teacher
    torch.cuda.empty_cache()
    layers = hybrid.model.language_model.layers
    result = {
        "convert_s": convert_s,
        "teacher_params": report.teacher_params,
        "hybrid_params": report.hybrid_params,
        "params_removed": report.params_removed,
        "params_added": report.params_added,
        "swa_layers": [
            i for i, name in enumerate(hybrid.config.hybridize["layers"]) if name == "sliding_window"
        ],
        "gdn_layer_1": type(layers[1].self_attn).__name__,
    }
    ids = torch.randint(0, 150000, (1, 8192), device=device)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        logits, forward_s = timed(lambda: hybrid(ids).logits)
        logits, forward_s = timed(lambda: hybrid(ids).logits)
    result.update(
        forward_8192_s=forward_s,
        forward_finite=bool(torch.isfinite(logits).all()),
        forward_peak_gib=torch.cuda.max_memory_allocated() / 2**30,
    )
    prompt = ids[:, :1024]
    with torch.no_grad():
        hybrid.generate(prompt, max_new_tokens=4, do_sample=False)
        out, generate_s = timed(
            lambda: hybrid.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        )
    result.update(generate_64_tokens_after_1024_s=generate_s, generated_shape=list(out.shape))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    require_fla(device, cpu_hint=False)
    report = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "fla": __import__("fla").__version__,
            "hybridize": hybridize.__version__,
        },
        "tiny_generation_fp32": check_tiny_generation(device),
        "qwen2_5_vl_3b_ratio_1_4_bf16": check_3b(device),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
