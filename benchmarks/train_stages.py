"""Training throughput, peak memory and MFU of the four stages against the stock model, at 8K, 32K and 64K tokens.

Each variant trains the Qwen2.5-VL-3B architecture (random weights, text-only batches of random token ids,
batch 1) on one GPU the way a user runs it: a Lightning Trainer, `precision="bf16-mixed"`, frozen weights in
bf16 and trainable ones as fp32 master weights (AdamW), gradient checkpointing as each stage's recipe config
(configs/infinitevl/) sets it. The hybrid is converted at ratio 1/4 (SWA window 8192, Gated DeltaNet).

- `stage1a_layerwise`, `stage1b_end_to_end`: the distillation stages (mixers train) against
  `stock_converted_attention`: the stock model training the attention of the layers the hybrid converts;
  `stage1b_end_to_end_no_ckpt` (only when named in `--variants`): stage 1b without its recipe's checkpointing;
- `stage2_sft` (its default trainable set: mixers, output projections, MLPs) against `stock_sft` (the converted
  layers' attention, every output projection and MLP);
- `stage3_lora` (LoRA as the long-SFT config sets it) against `stock_lora` (the same adapters on the stock
  decoder's linear layers);
- `stage3_lora_packed8`: stage 3 on rows of 8 packed samples (the data module's packing format: position ids
  restarting per sample, `cu_seq_lens`) against `stage3_lora` on one sample of the same length;
  `stage3_lora_packed8_dense_masks`: the same rows with the softmax layers under SDPA and transformers' dense
  block-diagonal window masks instead of the flash-window kernel the stages use (`hybridize.mixers.flash_window`).
Stages 2 and 3 and the stock variants take the stages' next-token loss (`next_token_loss`: the output head and
the cross-entropy in 4K-token chunks). The stock model runs SDPA attention (causal, no mask: its FlashAttention
kernel); the hybrid's softmax layers (the SWA layers, stage 1's teacher attention) run PyTorch's flash kernel with
their window, varlen for packed rows. A variant without checkpointing that runs out of memory runs again with it
(not stage 1a: its forward runs without gradients, so checkpointing changes nothing there); one that still does
is recorded as "oom" and the run goes on.

Runs go most important first (stages 2 and 3 against stock at the packed length, then 8K, then the rest), and
the JSON, a markdown table and a PNG plot (tokens/s against length per stage) are rewritten after each, so a
timeout keeps what finished; runs not started within `--time-budget-s` are recorded as skipped.
After `--warmup` steps (the first fla call autotunes for minutes on a fresh machine), `--steps` steps are
timed one by one (CUDA synchronised around each: forward, backward and optimizer step). Stage 1b's teacher
forward is timed inside those steps too (`teacher_forward_s`).

MFU = model FLOPs per step / step time / peak (989 TFLOP/s: H100 SXM bf16 dense). Model FLOPs, with T tokens,
P the weights of the matmuls a token passes through (decoder linear layers and output head), P_train the
trainable parameters and A the forward FLOPs of the softmax attention layers (4 * heads * head_dim per
attended query-key pair: causal, within the window, within each packed sample):
    training pass (stock, stages 2 and 3, stage 1b's student):  (4 P + 2 P_train) T + 3 A
    stage 1b: the training pass + the teacher's forward 2 P_teacher T + A_teacher (every layer full attention)
    stage 1a: the teacher's forward + 6 P_mixers T (each mixer's forward and backward on the teacher's input)
Checkpointing's recomputation is not counted, nor the linear mixers' state arithmetic (< 2% of a layer).

    python benchmarks/train_stages.py --lengths 8192    # H100: 194 s for every variant (after fla's autotune)
    python benchmarks/train_stages.py                   # every length: longer than one 10-minute device call,
    python benchmarks/train_stages.py --resume          # so run it again with --resume until nothing is skipped
    python benchmarks/train_stages.py --resume --variants stage3_lora --lengths 32768 --remeasure stage3_lora@32768
                                                        # one run again (after a change to its code), the rest kept
    python benchmarks/train_stages.py --config tiny --device cpu --steps 1 --warmup 1   # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
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
import yaml
from peft import LoraConfig, get_peft_model
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import hybridize
from hybridize.converters import convert, plan_layers
from hybridize.converters.discovery import find_decoder_layout
from hybridize.lightning_modules import (
    DistilledLayer,
    EndToEndDistillation,
    LayerwiseDistillation,
    LongSequenceSFT,
    SupervisedFineTuning,
    select_trainable,
)
from hybridize.lightning_modules.data.collation import collate
from hybridize.lightning_modules.sft import adapters_follow_autocast, lora_target_modules
from hybridize.lightning_modules.stage import next_token_loss
from hybridize.presets import qwen2_5_vl_3b_config, tiny_qwen2_5_vl_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from common import free, is_oom, pyplot, require_fla, top_operators  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = Path(__file__).resolve().parent.parent / "configs" / "infinitevl"
H100_BF16_DENSE_TFLOPS = 989.0


@dataclass(frozen=True)
class Shape:
    """A model size to benchmark: decoder layers, the SWA layers' window, the tokens per step to run and the
    length at which packed rows are compared with one sample."""

    layers: int
    window: int
    lengths: tuple[int, ...]
    packed_length: int


SHAPES = {
    "3b": Shape(layers=36, window=8192, lengths=(8192, 32768, 65536), packed_length=32768),
    "tiny": Shape(layers=8, window=64, lengths=(32, 64), packed_length=64),
}


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


def packed_token_batches(count: int, samples: int, length: int, limit: int, seed: int) -> list[dict]:
    """`count` batches of one row of `length` tokens: `samples` samples of random ids in [0, limit), packed the
    way the data module packs them (position ids restarting per sample, `cu_seq_lens`, first labels -100)."""
    if length % samples:
        raise ValueError(f"{length} tokens do not split into {samples} equal samples; pick a multiple.")
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(0, limit, (samples, length // samples), generator=generator)
        rows = [{"input_ids": ids, "labels": ids.clone()} for ids in input_ids]
        batches.append(collate(rows, pad_token_id=0, pack=True, max_length=length))
    return batches


class StockTraining(L.LightningModule):
    """A baseline: the stock model training `trainable` (presets or regular expressions, as the stages take
    them), optionally through LoRA adapters, on next-token cross-entropy, with the stages' fp32 master weights
    and AdamW."""

    def __init__(
        self, model, trainable: list[str], learning_rate: float, gradient_checkpointing: bool, lora=None
    ):
        super().__init__()
        if lora is not None:
            lora.target_modules = lora_target_modules(model, lora.target_modules)
            model = get_peft_model(model, lora)
        self.model, self.learning_rate = model, learning_rate
        self.parameter_counts = select_trainable(model, trainable)
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
                parameter.data = parameter.data.float()  # fp32 master weights, as the stages keep them
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()

    def setup(self, stage: str) -> None:
        adapters_follow_autocast(self.model, self.trainer.precision)  # as stage 3 does

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return next_token_loss(self.model, inputs, batch["labels"], self.trainer.strategy)  # the stages' loss

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.learning_rate)


class StepTimer(L.Callback):
    """Wall time of every training step (forward, backward, optimizer step; CUDA synchronised around it) and
    its loss averaged over all processes (the global batch's loss when every process has as many tokens)."""

    def __init__(self, name: str = "", profile_step: int | None = None):
        self.name, self.seconds, self.losses = name, [], []
        self.profile_step, self.profiler, self.profile = profile_step, None, None

    @staticmethod
    def synchronize(trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.synchronize(trainer)
        if batch_idx == self.profile_step:
            self.profiler = torch.profiler.profile()
            self.profiler.__enter__()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.synchronize(trainer)
        self.seconds.append(time.perf_counter() - self.start)
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profile, self.profiler = top_operators(self.profiler), None
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


@dataclass(frozen=True)
class Variant:
    """One model training one stage's set of parameters: the stage (its recipe config sets the checkpointing and
    the adapters), the model, the samples packed into each row and the variant its speed is compared with."""

    stage: str  # "1a", "1b", "2" or "3"
    model: str  # "hybrid" or "stock"
    baseline: str | None = None
    packed_samples: int = 1
    dense_masks: bool = False  # softmax layers under SDPA's dense masks instead of the flash-window kernel
    checkpointing: bool | None = None  # None: as the stage's recipe config sets it


# In the order they run at one length (see run_order).
VARIANTS = {
    "stage2_sft": Variant("2", "hybrid", baseline="stock_sft"),
    "stock_sft": Variant("2", "stock"),
    "stage3_lora": Variant("3", "hybrid", baseline="stock_lora"),
    "stock_lora": Variant("3", "stock"),
    "stage3_lora_packed8": Variant("3", "hybrid", baseline="stage3_lora", packed_samples=8),
    "stage3_lora_packed8_dense_masks": Variant(
        "3", "hybrid", baseline="stage3_lora_packed8", packed_samples=8, dense_masks=True
    ),
    "stage1a_layerwise": Variant("1a", "hybrid", baseline="stock_converted_attention"),
    "stage1b_end_to_end": Variant("1b", "hybrid", baseline="stock_converted_attention"),
    # stage 1b without the recipe's checkpointing (again with it after an out-of-memory error)
    "stage1b_end_to_end_no_ckpt": Variant(
        "1b", "hybrid", baseline="stock_converted_attention", checkpointing=False
    ),
    "stock_converted_attention": Variant("1a", "stock"),  # stage 1's set; 1a's recipe: no checkpointing
}
# Run only when named in --variants.
OPT_IN = ("stage1b_end_to_end_no_ckpt",)
RECIPE_CONFIGS = {
    "1a": "stage1_layerwise.yaml",
    "1b": "stage1_e2e.yaml",
    "2": "stage2_sft.yaml",
    "3": "stage3_long_sft.yaml",
}
LORA_OPTIONS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def recipe_options(stage: str) -> dict:
    """The model options (`model.init_args`) of a stage's recipe config."""
    return yaml.safe_load((RECIPE / RECIPE_CONFIGS[stage]).read_text())["model"]["init_args"]


def stock_trainable(stage: str, plan) -> list[str]:
    """The stock model's counterpart of a stage's default trainable set: a converted layer's mixer is the
    attention it replaced; stage 3's adapters are the same LoRA on the stock decoder."""
    converted = "|".join(str(idx) for idx, mixer in enumerate(plan.layers) if mixer != "sliding_window")
    replaced_attention = rf"\.layers\.({converted})\.self_attn\."
    if stage in ("1a", "1b"):
        return [replaced_attention]
    if stage == "2":  # SupervisedFineTuning.default_trainable
        return [replaced_attention, r"\.self_attn\.o_proj\.", r"\.mlp\."]
    return ["lora"]


def stock_lora_model(model, lora: dict):
    """`model` with the adapters LongSequenceSFT adds (the same options) on its decoder's linear layers."""
    targets = lora_target_modules(model, lora.get("lora_targets"))
    config = LoraConfig(
        r=lora["lora_rank"],
        lora_alpha=lora["lora_alpha"],
        lora_dropout=lora["lora_dropout"],
        target_modules=targets,
    )
    return get_peft_model(model, config)


def build_module(name: str, checkpointing: bool, config, shape: Shape, device, dtype, args):
    """The LightningModule of variant `name`, its model built on `device` (frozen weights in `dtype`)."""
    variant = VARIANTS[name]
    recipe = recipe_options(variant.stage)
    lora = {key: recipe[key] for key in LORA_OPTIONS if key in recipe} if variant.stage == "3" else None
    plan = plan_layers(shape.layers, "1/4", window=shape.window)
    teacher = build_teacher(config, device, dtype, args.seed)
    if variant.model == "stock":
        model = stock_lora_model(teacher, lora) if lora else teacher
        return StockTraining(model, stock_trainable(variant.stage, plan), args.learning_rate, checkpointing)
    torch.manual_seed(args.seed)
    hybrid, _ = convert(teacher, plan, progress=False)
    options = dict(
        previous_stage=None,
        dtype=dtype,
        learning_rate=args.learning_rate,
        schedule="constant",
        gradient_checkpointing=checkpointing,
        flash_window=not variant.dense_masks,
    )
    if variant.stage in ("1a", "1b"):
        stage = LayerwiseDistillation if variant.stage == "1a" else EndToEndDistillation
        return stage(hybrid, teacher=teacher, **options)  # only its converted layers' attention is kept
    if variant.stage == "2":
        return SupervisedFineTuning(hybrid, **options)
    return LongSequenceSFT(hybrid, **lora, **options)


# --- model FLOPs (see the module docstring) ------------------------------------------------------------


def matmul_weights(modules) -> int:
    return sum(module.weight.numel() for module in modules if isinstance(module, torch.nn.Linear))


def path_weights(model, path: str) -> int:
    """Weights of the matmuls a token passes through: the decoder layers' linear layers and the output head, as
    the "student" (skipping the teacher attention kept beside each mixer) or the "teacher" (skipping the
    mixers). LoRA adapters count as the linear layers they are."""
    layers = find_decoder_layout(model).layers
    skipped = set()
    for module in layers.modules():
        if isinstance(module, DistilledLayer):
            skipped |= {id(m) for m in (module.teacher if path == "student" else module.student).modules()}
    inside = matmul_weights(m for m in layers.modules() if id(m) not in skipped)
    return inside + model.get_output_embeddings().weight.numel()


def attention_pairs(segments: list[int], window: int | None) -> int:
    """Query-key pairs of causal attention over samples of these lengths, within `window` (None: no window)."""
    pairs = 0
    for length in segments:
        span = min(window or length, length)
        pairs += span * (span + 1) // 2 + (length - span) * span
    return pairs


def step_flops(module, name: str, segments: list[int], config, plan, window: int) -> float:
    """Model FLOPs of one training step of variant `name` over samples of `segments` tokens."""
    variant, tokens = VARIANTS[name], sum(segments)
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads

    def attention(layers: int, window: int | None) -> float:  # forward FLOPs of `layers` softmax layers
        return layers * 4 * heads * head_dim * attention_pairs(segments, window)

    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if variant.model == "stock":
        return (4 * path_weights(module.model, "student") + 2 * trainable) * tokens + 3 * attention(
            text.num_hidden_layers, None
        )
    hybrid = module.hybrid
    student = (4 * path_weights(hybrid, "student") + 2 * trainable) * tokens + 3 * attention(
        len(plan.layers_with("sliding_window")), window
    )
    if variant.stage not in ("1a", "1b"):
        return student
    teacher = 2 * path_weights(hybrid, "teacher") * tokens + attention(text.num_hidden_layers, None)
    if variant.stage == "1b":
        return teacher + student
    mixers = sum(
        matmul_weights(m.student.modules()) for m in hybrid.modules() if isinstance(m, DistilledLayer)
    )
    return teacher + 6 * mixers * tokens


# --- running ------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_teacher_forward(module: EndToEndDistillation, device: torch.device) -> list[float]:
    """From now on, the wall time of every teacher forward of stage 1b (CUDA synchronised around it), up to its
    last hidden states where its head runs inside the loss (`head_distillation_kl`)."""
    seconds, forward = [], module.teacher_features

    def timed(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        features = forward(*args, **kwargs)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        return features

    module.teacher_features = timed
    return seconds


def run_variant(
    name: str, length: int, checkpointing: bool, args, config, shape: Shape, device, dtype
) -> dict:
    variant, cuda = VARIANTS[name], device.type == "cuda"
    start = time.perf_counter()
    module = build_module(name, checkpointing, config, shape, device, dtype, args)
    free()  # the teacher: only the parts the module holds stay
    setup_s = time.perf_counter() - start
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    label = f"{name}@{length}"
    print(f"{label}: built in {setup_s:.1f} s, {trainable:,} trainable parameters", flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        model_gib = torch.cuda.memory_allocated(device) / 2**30
    # With --profile, one more step after the timed ones is profiled (the profiler slows it).
    steps, limit, samples = (
        args.warmup + args.steps + args.profile,
        token_limit(config),
        variant.packed_samples,
    )
    if samples > 1:
        batches = packed_token_batches(steps, samples, length, limit, args.seed)
    else:
        batches = random_token_batches(steps, 1, length, limit, args.seed)
    timer = StepTimer(label, profile_step=steps - 1 if args.profile else None)
    teacher_seconds = time_teacher_forward(module, device) if variant.stage == "1b" else None
    trainer = quiet_trainer(
        accelerator=device.type, devices=1, precision=args.precision, max_steps=steps, callbacks=[timer]
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    timed = timer.seconds[args.warmup : args.warmup + args.steps]
    median = statistics.median(timed)
    segments = [length // samples] * samples
    flops = step_flops(
        module, name, segments, config, plan_layers(shape.layers, "1/4", window=shape.window), shape.window
    )
    result = {
        "tokens_per_step": length,
        "packed_samples": samples,
        "gradient_checkpointing": checkpointing,
        "trainable_params": trainable,
        "setup_s": round(setup_s, 2),
        "warmup_step_s": [round(s, 4) for s in timer.seconds[: args.warmup]],
        "step_s": [round(s, 4) for s in timed],
        "median_step_s": round(median, 4),
        "tokens_per_s": round(length / median, 1),
        "model_tflop_per_step": float(f"{flops / 1e12:.4g}"),
        "mfu": float(f"{flops / median / (args.peak_tflops * 1e12):.4g}"),
        "loss_first": timer.losses[0],
        "loss_last": timer.losses[-1],
        "wall_s": round(time.perf_counter() - start, 2),
    }
    if timer.profile is not None:
        result["profile"] = timer.profile
    if teacher_seconds is not None:
        result["teacher_forward_s"] = round(statistics.median(teacher_seconds[args.warmup :]), 4)
    if cuda:
        result.update(
            model_gib=round(model_gib, 2), peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        )
    return result


def measure(name: str, length: int, args, config, shape: Shape, device, dtype) -> dict:
    """Run a variant with its checkpointing (the recipe's unless the variant sets it); after an out-of-memory error
    without checkpointing, again with it (not stage 1a's hybrid: its forward runs without gradients, where
    checkpointing changes nothing)."""
    variant = VARIANTS[name]
    checkpointing = variant.checkpointing
    if checkpointing is None:
        checkpointing = bool(recipe_options(variant.stage).get("gradient_checkpointing", False))
    retry = not checkpointing and not (variant.model == "hybrid" and variant.stage == "1a")
    for attempt in (checkpointing, True) if retry else (checkpointing,):
        try:
            return run_variant(name, length, attempt, args, config, shape, device, dtype) | {
                "retried_after_oom": attempt != checkpointing
            }
        except Exception as error:  # noqa: BLE001 (only out of memory is recorded; anything else is a bug)
            if not is_oom(error):
                raise
            print(f"{name}@{length}: out of memory (checkpointing {attempt})", flush=True)
        free()
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    return {"error": "oom", "gradient_checkpointing": True if retry else checkpointing, "peak_gib": peak}


RESUME_KEYS = ("config", "device", "precision", "warmup_steps", "timed_steps", "window", "packed_length")


def resumed_runs(report: dict, out: Path) -> dict:
    """The finished runs (measured, or out of memory) of the report an earlier call wrote to `out`, which must
    have been made with the same settings; the commands of the calls so far go into `report["commands"]`."""
    if not out.is_file():
        raise SystemExit(f"--resume: {out} does not exist; run without --resume first.")
    earlier = json.loads(out.read_text())
    different = {
        key: (earlier.get(key), report[key]) for key in RESUME_KEYS if earlier.get(key) != report[key]
    }
    if different:
        raise SystemExit(f"--resume: {out} was made with other settings (its, this call's): {different}.")
    report["commands"] = [*earlier.get("commands", [earlier["command"]]), report["command"]]
    return {
        name: {
            length: result
            for length, result in by_length.items()
            if "error" not in result or result["error"] == "oom"
        }
        for name, by_length in earlier["runs"].items()
    }


def remeasured_runs(items: list[str], variants: list[str], lengths: list[int]) -> list[tuple[str, int]]:
    """VARIANT@LENGTH items -> (variant, length), each a run this call makes (a variant it names, a length it
    runs); anything else is refused before a model is built."""
    runs = []
    for item in items:
        name, _, length = item.partition("@")
        if name not in variants or not length.isdigit() or int(length) not in lengths:
            raise SystemExit(
                f"--remeasure {item}: give VARIANT@LENGTH with a variant of --variants ({', '.join(variants)}) "
                f"and a length of --lengths ({', '.join(map(str, lengths))})."
            )
        runs.append((name, int(length)))
    return runs


def run_order(names: list[str], lengths: list[int], packed_length: int) -> list[tuple[str, int]]:
    """(variant, length) pairs, most important first: stages 2 and 3 and their baselines at the packed length,
    then every variant at the shortest length, then the rest by length. Packed rows run at the packed length."""
    pairs = [
        (name, length)
        for length in lengths
        for name in names
        if VARIANTS[name].packed_samples == 1 or length == packed_length
    ]

    def rank(pair: tuple[str, int]) -> int:
        name, length = pair
        if length == packed_length and VARIANTS[name].stage in ("2", "3"):
            return 0
        return 1 if length == min(lengths) else 2

    return sorted(pairs, key=rank)  # stable: by length, then in VARIANTS order within a rank


# --- the report ---------------------------------------------------------------------------------------

STAGE_TITLES = {
    "1a": "stage 1a (layer-wise)",
    "1b": "stage 1b (end-to-end)",
    "2": "stage 2 (SFT)",
    "3": "stage 3 (LoRA)",
}


def markdown_table(report: dict) -> str:
    rows = [
        "| variant | tokens | trainable params | checkpointing | median step (s) | tokens/s | vs baseline "
        "| MFU | peak memory (GiB) | teacher forward | loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = report["runs"]
    for name in VARIANTS:
        for length, result in sorted(runs.get(name, {}).items(), key=lambda item: int(item[0])):
            tokens = f"{int(length):,}" + (
                f" ({VARIANTS[name].packed_samples} packed)" if VARIANTS[name].packed_samples > 1 else ""
            )
            if "error" in result:
                checkpointing = {True: "yes", False: "no"}.get(result.get("gradient_checkpointing"), "")
                rows.append(
                    f"| {name} | {tokens} | | {checkpointing} | {result['error']} | | | | {result.get('peak_gib') or ''} | | |"
                )
                continue
            baseline = runs.get(VARIANTS[name].baseline or "", {}).get(length, {})
            ratio = (
                f"{result['tokens_per_s'] / baseline['tokens_per_s']:.2f}x"
                if "tokens_per_s" in baseline
                else ""
            )
            checkpointing = (
                "yes" + (" (after an OOM)" if result["retried_after_oom"] else "")
                if result["gradient_checkpointing"]
                else "no"
            )
            teacher = ""
            if "teacher_forward_s" in result:
                teacher = f"{result['teacher_forward_s']:.3f} s ({result['teacher_forward_s'] / result['median_step_s']:.0%})"
            rows.append(
                f"| {name} | {tokens} | {result['trainable_params'] / 1e6:.1f}M | {checkpointing} | "
                f"{result['median_step_s']:.3f} | {result['tokens_per_s']:,.0f} | {ratio} | {result['mfu']:.1%} | "
                f"{result.get('peak_gib', '')} | {teacher} | {result['loss_first']:.4g} -> {result['loss_last']:.4g} |"
            )
    return "\n".join(rows)


def plot(report: dict, path: Path) -> bool:
    """Tokens/s against tokens per step, one panel per stage: the hybrid solid, its stock baseline dashed, packed
    rows as stars."""
    plt = pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(1, len(STAGE_TITLES), figsize=(4.2 * len(STAGE_TITLES), 4), sharey=True)
    for axis, (stage, title) in zip(axes, STAGE_TITLES.items(), strict=True):
        drawn = set()  # a baseline shared by two variants of the stage is drawn once
        for name, variant in VARIANTS.items():
            if variant.stage != stage or variant.model != "hybrid":
                continue
            lines = [
                (
                    name,
                    "-" if variant.packed_samples == 1 else "",
                    "x" if variant.dense_masks else "o" if variant.packed_samples == 1 else "*",
                )
            ]
            if variant.packed_samples == 1 and variant.baseline:
                lines.append((variant.baseline, "--", "s"))
            for line_name, style, marker in lines:
                if line_name in drawn:
                    continue
                drawn.add(line_name)
                points = sorted(
                    (int(length), result["tokens_per_s"])
                    for length, result in report["runs"].get(line_name, {}).items()
                    if "tokens_per_s" in result
                )
                if points:
                    axis.plot(
                        *zip(*points, strict=True),
                        linestyle=style,
                        marker=marker,
                        markersize=9 if marker == "*" else 5,
                        label=line_name,
                    )
        axis.set_xscale("log", base=2)
        axis.set_title(title)
        axis.set_xlabel("tokens per step")
        axis.grid(True, which="both", alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    axes[0].set_ylabel("tokens/s")
    figure.suptitle(
        f"Training throughput, Qwen2.5-VL-3B architecture vs its hybrid, batch 1, {report['device']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    commands = "\n".join(report.get("commands", [report["command"]]))  # a resumed sweep: every call's
    head = f"{commands}\n{report['device']}, {report['date']}, " + ", ".join(
        f"{k} {v}" for k, v in report["versions"].items()
    )
    formula = f"MFU against {report['peak_tflops']:g} TFLOP/s; model FLOPs per step: {report['flop_formula']}"
    out.with_suffix(".md").write_text(f"{head}\n\n{markdown_table(report)}\n\n{formula}\n")
    plot(report, out.with_suffix(".png"))


FLOP_FORMULA = (
    "training pass (4 P + 2 P_train) T + 3 A; stage 1b adds the teacher forward 2 P_teacher T + A_teacher; "
    "stage 1a = teacher forward + 6 P_mixers T (P: matmul weights on the token's path, T: tokens, A: softmax "
    "attention forward FLOPs, 4 heads head_dim per causal query-key pair within window and sample; "
    "recomputation and the linear mixers' state arithmetic not counted)"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(SHAPES), default="3b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=[name for name in VARIANTS if name not in OPT_IN],
        help=f"default: all but {', '.join(OPT_IN)}",
    )
    parser.add_argument(
        "--lengths", nargs="+", type=int, default=None, help="tokens per step (default: the config's)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed steps first (fla autotunes on the first)"
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps")
    parser.add_argument(
        "--time-budget-s", type=float, default=420.0, help="runs not started by then are recorded as skipped"
    )
    parser.add_argument(
        "--precision", default=None, help="Lightning precision (default: bf16-mixed on cuda, 32-true on cpu)"
    )
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="the MFU's peak")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the last step of each run: its 25 costliest operators go into the JSON (slows that step)",
    )
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (.md table and .png plot beside it)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs an earlier call wrote to --out (same config, steps and precision) and measure the "
        "rest: a whole sweep over several device calls",
    )
    parser.add_argument(
        "--remeasure",
        nargs="+",
        default=[],
        metavar="VARIANT@LENGTH",
        help="with --resume: measure these runs again (a variant this call names, at one of its lengths), "
        "e.g. after a change to the code they run",
    )
    args = parser.parse_args()
    if args.remeasure and not args.resume:
        raise SystemExit("--remeasure replaces runs of an earlier call: it needs --resume.")
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit(f"Need --warmup >= 1 and --steps >= 1, got {args.warmup} and {args.steps}.")
    device = torch.device(args.device)
    require_fla(device)
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    dtype = frozen_dtype(args.precision)
    shape = SHAPES[args.config]
    lengths = args.lengths or list(shape.lengths)
    config = model_config(args.config, shape.layers)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    report = {
        **environment(device, "train_stages.py"),
        "config": args.config,
        "layers": shape.layers,
        "window": shape.window,
        "lengths": lengths,
        "packed_length": shape.packed_length,
        "batch_size": 1,
        "precision": args.precision,
        "frozen_dtype": str(dtype).removeprefix("torch."),
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "peak_tflops": args.peak_tflops,
        "flop_formula": FLOP_FORMULA,
        "runs": {},
    }
    tag = report["device_tag"] if args.config == "3b" else f"{args.config}_{report['device_tag']}"
    out = args.out or RESULTS / f"train_stages_{tag}.json"
    remeasure = remeasured_runs(args.remeasure, args.variants, lengths)
    done = resumed_runs(report, out) if args.resume else {}
    # every finished run of the earlier calls stays in the report from its first write on (a run to be measured
    # again until it is), so a call stopped half-way (a time limit, a lost machine) loses none of them
    report["runs"] = {name: dict(by_length) for name, by_length in done.items()}
    for name, length in remeasure:
        done.get(name, {}).pop(str(length), None)
    report["lengths"] = sorted(
        {*lengths, *(int(length) for by_length in report["runs"].values() for length in by_length)}
    )
    start = time.perf_counter()
    for name, length in run_order(args.variants, lengths, shape.packed_length):
        if str(length) in done.get(name, {}):
            continue
        if time.perf_counter() - start > args.time_budget_s:
            result = {"error": "skipped (time budget)"}
        else:
            result = measure(name, length, args, config, shape, device, dtype)
        report["runs"].setdefault(name, {})[str(length)] = result
        free()
        print(f"{name}@{length}", json.dumps(result), flush=True)
        write_report(report, out)
    print(markdown_table(report), flush=True)
    print(f"Wrote {out} and the .md and .png beside it ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
