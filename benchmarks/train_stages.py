"""Training throughput and peak memory of stages 1a and 1b against fine-tuning the teacher's attention.

Each variant trains the Qwen2.5-VL-3B architecture (random weights, text-only batches of random token ids,
batch 1, 8192 tokens) on one GPU the way a user runs it: a Lightning Trainer, `precision="bf16-mixed"`,
frozen weights in bf16 and trainable ones as fp32 master weights (AdamW).

- `teacher_attention_ft`: the stock model (SDPA attention) with only q/k/v/o of every layer trained on
  next-token cross-entropy (the baseline: the teacher architecture trained the same way);
- `stage1a_layerwise`: `LayerwiseDistillation` of the hybrid converted at ratio 1/4 (SWA window 8192);
- `stage1b_end_to_end`: `EndToEndDistillation` of the same hybrid (teacher and student forward per step);
- `stage1b_end_to_end_ckpt`: the same with gradient checkpointing (not run unless named in --variants).

After `--warmup` steps (the first fla call autotunes for minutes on a fresh machine), `--steps` steps are
timed one by one (CUDA synchronised around each: forward, backward and optimizer step). Reports the median
step time, tokens/s, the peak of `torch.cuda.max_memory_allocated` during fit and the first and last loss.
The JSON (and a markdown table beside it) is rewritten after each variant, so a timeout keeps what finished.

    python benchmarks/train_stages.py                                                  # H100: ~6 minutes (estimate)
    python benchmarks/train_stages.py --config tiny --device cpu --steps 2 --warmup 1  # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import lightning as L
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import hybridize
from hybridize.converters import convert, plan_layers
from hybridize.lightning_modules import EndToEndDistillation, LayerwiseDistillation, select_trainable
from hybridize.lightning_modules.losses import token_cross_entropy
from hybridize.mixers.ops.backends import fla_available
from hybridize.presets import qwen2_5_vl_3b_config, tiny_qwen2_5_vl_config

RESULTS = Path(__file__).resolve().parent / "results"
# The baseline trains these (every text layer's attention projections, weights and biases).
ATTENTION_PROJECTIONS = r"language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\."


@dataclass(frozen=True)
class Shape:
    """A model size to benchmark: decoder layers, tokens per sequence and the SWA layers' window."""

    layers: int
    length: int
    window: int


SHAPES = {"3b": Shape(layers=36, length=8192, window=8192), "tiny": Shape(layers=8, length=256, window=64)}


def model_config(name: str, layers: int) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL-3B architecture or the tiny test model, with `layers` text decoder layers."""
    if name == "tiny":
        return tiny_qwen2_5_vl_config(layers)
    config = qwen2_5_vl_3b_config()
    text = config.text_config
    text.num_hidden_layers, text.layer_types = layers, text.layer_types[:layers]
    return config


def build_teacher(config: Qwen2_5_VLConfig, device: torch.device, dtype: torch.dtype, seed: int):
    """The stock model with the architecture's own random initialisation (seeded), built on `device` in `dtype`,
    with SDPA attention."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    return model.eval()


def frozen_dtype(precision: str) -> torch.dtype:
    """The dtype of the frozen weights that goes with a Lightning precision (the stages keep trainable ones in
    fp32 under bf16)."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    return torch.float64 if precision.startswith("64") else torch.float32


def token_limit(config: Qwen2_5_VLConfig) -> int:
    """Random ids stay below the first special token: vision placeholders without images are not text."""
    text = config.get_text_config(decoder=True)
    special = [text.bos_token_id, text.eos_token_id, config.image_token_id, config.vision_start_token_id]
    return min(token for token in special if token is not None)


def random_token_batches(count: int, batch_size: int, length: int, limit: int, seed: int) -> list[dict]:
    """`count` batches of random ids in [0, limit), (batch_size, length), every token real and labelled."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(0, limit, (batch_size, length), generator=generator)
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "labels": input_ids.clone(),
            }
        )
    return batches


class AttentionFineTune(L.LightningModule):
    """The baseline: a stock model with only its text attention projections trained on next-token CE."""

    def __init__(self, model, learning_rate: float):
        super().__init__()
        self.model, self.learning_rate = model, learning_rate
        self.parameter_counts = select_trainable(model, [ATTENTION_PROJECTIONS])
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
                parameter.data = parameter.data.float()  # fp32 master weights, as the stages keep them
        model.train()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        logits = self.model(**inputs, use_cache=False).logits
        return token_cross_entropy(logits, batch["labels"])

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.learning_rate)


class StepTimer(L.Callback):
    """Wall time of every training step (forward, backward, optimizer step; CUDA synchronised around it) and
    its loss averaged over all processes (the global batch's loss when every process has as many tokens)."""

    def __init__(self, name: str = ""):
        self.name, self.seconds, self.losses = name, [], []

    @staticmethod
    def synchronize(trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.synchronize(trainer)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.synchronize(trainer)
        self.seconds.append(time.perf_counter() - self.start)
        # a copy: the all-reduce works in place
        loss = trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean")
        self.losses.append(loss.item())
        if trainer.is_global_zero:
            print(
                f"  {self.name} step {len(self.losses)}: {self.seconds[-1]:.3f} s, loss {self.losses[-1]:.6g}",
                flush=True,
            )


def quiet_trainer(**kwargs) -> L.Trainer:
    """A Trainer without logger, checkpoints, progress bar or model summary (the benchmarks print their own)."""
    defaults = dict(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    return L.Trainer(**{**defaults, **kwargs})


def package_version(*distributions: str) -> str:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def device_tag(name: str) -> str:
    """ "h100" for "NVIDIA H100 80GB HBM3", "cpu" for the CPU: the suffix of a results file's name."""
    words = name.lower().replace("nvidia", "").split()
    return words[0] if words else "unknown"


def environment(device: torch.device, script: str) -> dict:
    """Date, command line, device and software versions, for the head of a results file."""
    name = device_name(device)
    return {
        "date": datetime.date.today().isoformat(),
        "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]),
        "device": name,
        "device_tag": device_tag(name),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": package_version("transformers"),
            "lightning": package_version("lightning"),
            "fla": package_version("flash-linear-attention", "fla-core"),
            "triton": package_version("triton", "pytorch-triton"),
            "hybridize": hybridize.__version__,
        },
    }


# --- the variants -------------------------------------------------------------------------------------

STAGES = {
    "stage1a_layerwise": (LayerwiseDistillation, {}),
    "stage1b_end_to_end": (EndToEndDistillation, {}),
    "stage1b_end_to_end_ckpt": (EndToEndDistillation, {"gradient_checkpointing": True}),
}
VARIANTS = ("teacher_attention_ft", *STAGES)
DEFAULT_VARIANTS = ("teacher_attention_ft", "stage1a_layerwise", "stage1b_end_to_end")


def build_variant(name: str, config, shape: Shape, device, dtype, learning_rate: float, seed: int):
    """The LightningModule of variant `name`, its model built on `device` (frozen weights in `dtype`)."""
    teacher = build_teacher(config, device, dtype, seed)
    if name == "teacher_attention_ft":
        return AttentionFineTune(teacher, learning_rate)
    torch.manual_seed(seed)
    hybrid, _ = convert(teacher, plan_layers(shape.layers, "1/4", window=shape.window), progress=False)
    stage, options = STAGES[name]
    return stage(
        hybrid,
        teacher=teacher,  # only its converted layers' attention is kept (inside the hybrid)
        previous_stage=None,
        dtype=dtype,
        learning_rate=learning_rate,
        schedule="constant",
        **options,
    )


def run_variant(name: str, args, config, shape: Shape, device, dtype) -> dict:
    cuda = device.type == "cuda"
    start = time.perf_counter()
    module = build_variant(name, config, shape, device, dtype, args.learning_rate, args.seed)
    gc.collect()  # the teacher: only the parts the module holds stay
    setup_s = time.perf_counter() - start
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    print(f"{name}: built in {setup_s:.1f} s, {trainable:,} trainable parameters", flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        model_gib = torch.cuda.memory_allocated(device) / 2**30
    batches = random_token_batches(args.warmup + args.steps, 1, shape.length, token_limit(config), args.seed)
    timer = StepTimer(name)
    trainer = quiet_trainer(
        accelerator=device.type,
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    timed = timer.seconds[args.warmup :]
    median = statistics.median(timed)
    result = {
        "trainable_params": trainable,
        "setup_s": round(setup_s, 2),
        "warmup_step_s": [round(s, 4) for s in timer.seconds[: args.warmup]],
        "step_s": [round(s, 4) for s in timed],
        "median_step_s": round(median, 4),
        "tokens_per_step": shape.length,
        "tokens_per_s": round(shape.length / median, 1),
        "loss_first": timer.losses[0],
        "loss_last": timer.losses[-1],
        "wall_s": round(time.perf_counter() - start, 2),
    }
    if cuda:
        result.update(
            model_gib=round(model_gib, 2), peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        )
    return result


def markdown_table(report: dict) -> str:
    rows = [
        "| variant | trainable params | median step (s) | tokens/s | step time vs baseline | peak memory (GiB) | loss first -> last |",
        "|---|---|---|---|---|---|---|",
    ]
    baseline = report["variants"].get("teacher_attention_ft", {}).get("median_step_s")
    for name, result in report["variants"].items():
        if "error" in result:
            rows.append(f"| {name} | | {result['error']} | | | | |")
            continue
        ratio = f"{result['median_step_s'] / baseline:.2f}x" if baseline else ""
        peak = result.get("peak_gib", "")
        rows.append(
            f"| {name} | {result['trainable_params'] / 1e6:.1f}M | {result['median_step_s']:.3f} | "
            f"{result['tokens_per_s']:,.0f} | {ratio} | {peak} | {result['loss_first']:.4g} -> {result['loss_last']:.4g} |"
        )
    return "\n".join(rows)


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    head = f"{report['command']}\n{report['device']}, {report['date']}, " + ", ".join(
        f"{k} {v}" for k, v in report["versions"].items()
    )
    out.with_suffix(".md").write_text(f"{head}\n\n{markdown_table(report)}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(SHAPES), default="3b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (fla autotunes on the first)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument(
        "--length", type=int, default=None, help="tokens per sequence (default: the config's)"
    )
    parser.add_argument(
        "--precision", default=None, help="Lightning precision (default: bf16-mixed on cuda, 32-true on cpu)"
    )
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (a .md table is written beside it)")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit(f"Need --warmup >= 1 and --steps >= 1, got {args.warmup} and {args.steps}.")
    device = torch.device(args.device)
    if device.type == "cuda" and not fla_available():
        raise SystemExit(
            "fla kernels are not available here: run on a CUDA machine with `pip install 'hybridize[cuda]'`, "
            "or pass --device cpu."
        )
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    dtype = frozen_dtype(args.precision)
    base = SHAPES[args.config]
    shape = Shape(base.layers, args.length or base.length, base.window)
    config = model_config(args.config, shape.layers)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    report = {
        **environment(device, "train_stages.py"),
        "config": args.config,
        "layers": shape.layers,
        "length": shape.length,
        "window": shape.window,
        "batch_size": 1,
        "precision": args.precision,
        "frozen_dtype": str(dtype).removeprefix("torch."),
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "variants": {},
    }
    tag = report["device_tag"] if args.config == "3b" else f"{args.config}_{report['device_tag']}"
    out = args.out or RESULTS / f"train_stages_{tag}.json"
    for name in args.variants:
        try:
            report["variants"][name] = run_variant(name, args, config, shape, device, dtype)
        except torch.OutOfMemoryError as error:  # record it and go on with the next variant
            report["variants"][name] = {
                "error": "out of memory: " + str(error).splitlines()[0],
                "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            }
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(name, json.dumps(report["variants"][name]), flush=True)
        write_report(report, out)
    table = markdown_table(report)
    print(table, flush=True)
    print(f"Wrote {out} and {out.with_suffix('.md')}", flush=True)


if __name__ == "__main__":
    main()
