"""Does the distilled hybrid keep the long-range recall that sliding-window-only conversion loses?

The experiment, end to end, with hybridize's own stages:
1. Teacher: a small Llama-style full-attention model (built from a config) trained on MQAR (mqar.py) until it
   recalls every key at every distance. Attention learns MQAR in two layers within a couple of thousand steps
   while deeper stacks sit on a plateau for far longer, so the two-layer solution is trained first and then
   stacked (layers repeated in order) to the teacher's depth and fine-tuned as a whole.
2. Students, each converted from the teacher with `hybridize.convert`:
   - SWA only: every layer keeps its attention with a window W shorter than most key-query distances. It has
     no new weights, so there is nothing to distil; a second copy is fine-tuned on the task (all text weights,
     the SFT stage) for as many steps as the distilled students get, so that the window, not a lack of
     training, is what it is judged on.
   - InfiniteVL layout: 1/4 of the layers SWA, the others Gated DeltaNet, with both init policies (mimic,
     attention_transfer); the Mamba-2 and GLA mixers with their own default init; the ratios 1/8 and 1/2
     with the recipe's (mimic). The report names the better init of the two InfiniteVL-layout runs.
   The mixer students run stage 1a (layer-wise MSE) then stage 1b (end-to-end KL) of hybridize's recipe,
   each stage starting from the previous stage's export.
3. Recall as a function of the key-query distance, from inside the window to 8x the window and beyond, for
   the teacher and every student: a JSON file, a markdown table and a PNG plot in --results.

    python examples/recall/sweep.py --setting gpu --jobs 4 --out runs/recall --results examples/recall/results
    python examples/recall/sweep.py --setting cpu --out runs/recall-cpu     # the reduced CI version
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

# Share Triton's autotuning results between the variants' processes (fla tunes each kernel once per shape).
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mqar import MQARBatches, MQARTask, accuracy_in_bins, recall_by_distance  # noqa: E402

from hybridize.converters import convert, load, plan_layers  # noqa: E402
from hybridize.lightning_modules import EndToEndDistillation, LayerwiseDistillation, SupervisedFineTuning  # noqa: E402
from hybridize.lightning_modules.losses import token_cross_entropy  # noqa: E402
from hybridize.mixers import get_mixer_class  # noqa: E402
from hybridize.selection import SelectionSettings, select_layers  # noqa: E402


@dataclass(frozen=True)
class Variant:
    label: str
    ratio: str
    mixer: str = "gated_deltanet"
    init: str | None = None  # "mimic", "attention_transfer", or None: the mixer's own default
    training: str = "distil"  # "distil" (stages 1a + 1b), "sft" (the task's cross-entropy), "none"
    swa_offset: int = 0  # the SWA layers are i % k == swa_offset for ratio 1/k (0: the recipe's placement)
    selection: str | None = None  # a `hybridize select` method places the ratio's SWA layers instead

    def plan_arguments(self, num_layers: int, window: int) -> dict:
        """`plan_layers` arguments: the ratio, or with an offset the same number of SWA layers moved along."""
        if not self.swa_offset:
            return {"ratio": self.ratio, "window": window, "mixer": self.mixer}
        period = int(self.ratio.split("/")[1])
        layers = ",".join(str(i) for i in range(num_layers) if i % period == self.swa_offset % period)
        return {"swa_layers": layers, "window": window, "mixer": self.mixer}


VARIANTS = {
    "swa_only": Variant("SWA only, as converted", "1", training="none"),
    "swa_only_sft": Variant("SWA only, fine-tuned on the task", "1", training="sft"),
    "ivl_mimic": Variant("InfiniteVL layout (1/4 SWA + Gated DeltaNet), mimic init", "1/4", init="mimic"),
    "ivl_transfer": Variant(
        "InfiniteVL layout (1/4 SWA + Gated DeltaNet), attention_transfer init",
        "1/4",
        init="attention_transfer",
    ),
    "mamba2": Variant("1/4 SWA + Mamba-2", "1/4", mixer="mamba2"),
    "gla": Variant("1/4 SWA + GLA", "1/4", mixer="gla"),
    "ratio_1_8": Variant("1/8 SWA + Gated DeltaNet", "1/8", init="mimic"),
    "ratio_1_2": Variant("1/2 SWA + Gated DeltaNet", "1/2", init="mimic"),
    # The stacked teacher looks keys up in its odd layers; this plan puts the SWA layers exactly there.
    "swa_on_lookup_layers": Variant(
        "1/4 SWA on the teacher's lookup layers (i % 4 == 1) + Gated DeltaNet",
        "1/4",
        init="attention_transfer",
        swa_offset=1,
    ),
    # As many SWA layers as the ratio gives, placed by `hybridize select` on the task's data (window W).
    "select_kl": Variant(
        "1/4 SWA placed by select --method kl + Gated DeltaNet",
        "1/4",
        init="attention_transfer",
        selection="kl",
    ),
    "select_nll": Variant(
        "1/4 SWA placed by select --method nll + Gated DeltaNet",
        "1/4",
        init="attention_transfer",
        selection="nll",
    ),
}
EXTRA_VARIANTS = ("swa_on_lookup_layers", "select_kl", "select_nll")  # run only when named in --variants
INIT_CANDIDATES = {"ivl_mimic": "mimic", "ivl_transfer": "attention_transfer"}


@dataclass(frozen=True)
class Setting:
    task: MQARTask
    window: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int  # the teacher's depth
    seed_layers: int  # the depth trained from scratch before stacking
    teacher_steps: int
    stack_steps: int
    layerwise_steps: int
    end_to_end_steps: int
    batch_size: int
    teacher_learning_rate: float
    stage_learning_rate: float
    eval_sequences: int
    variants: tuple[str, ...] = field(
        default_factory=lambda: tuple(name for name in VARIANTS if name not in EXTRA_VARIANTS)
    )
    # The seed teacher's layers at these positions of a deeper teacher (None: a layer that adds nothing), instead
    # of stacking and fine-tuning: a teacher whose lookup sits exactly where a placement puts it.
    placement: tuple[int | None, ...] | None = None


SETTINGS = {
    # The committed results: 8 layers (so that 1/8, 1/4 and 1/2 differ), window 32, distances up to ~10 W.
    "gpu": Setting(
        task=MQARTask(num_pairs=16, num_queries=32, num_keys=64, num_values=64, seq_len=320),
        window=32, hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=8, seed_layers=2,
        teacher_steps=2500, stack_steps=400, layerwise_steps=300, end_to_end_steps=300, batch_size=64,
        teacher_learning_rate=1e-3, stage_learning_rate=3e-3, eval_sequences=1024,
    ),
    # CI on two CPU cores: two layers (one SWA, one Gated DeltaNet), window 8, distances up to ~8 W.
    "cpu": Setting(
        task=MQARTask(num_pairs=4, num_queries=8, num_keys=16, num_values=16, seq_len=72),
        window=8, hidden_size=64, num_heads=4, num_kv_heads=2, num_layers=2, seed_layers=2,
        teacher_steps=4000, stack_steps=0, layerwise_steps=100, end_to_end_steps=100, batch_size=32,
        teacher_learning_rate=1e-3, stage_learning_rate=3e-3, eval_sequences=256,
        variants=("swa_only", "ivl_transfer"),
    ),
    # The cpu teacher's two layers spread over eight: the binding layer at 0, the lookup at 4, where the recipe's
    # 1/4 puts its SWA layers (0 and 4), the others adding nothing. Uses the cpu setting's trained teacher.
    "cpu_spread": Setting(
        task=MQARTask(num_pairs=4, num_queries=8, num_keys=16, num_values=16, seq_len=72),
        window=8, hidden_size=64, num_heads=4, num_kv_heads=2, num_layers=8, seed_layers=2,
        teacher_steps=4000, stack_steps=0, layerwise_steps=100, end_to_end_steps=100, batch_size=32,
        teacher_learning_rate=1e-3, stage_learning_rate=3e-3, eval_sequences=256,
        variants=("ivl_transfer", "select_kl", "select_nll"), placement=(0, None, None, None, 1, None, None, None),
    ),
}  # fmt: skip


class TaskTraining(L.LightningModule):
    """Next-token cross-entropy on the task's labels for every weight of a plain transformers model (the
    teacher), AdamW with a linear warm-up."""

    def __init__(self, model: nn.Module, learning_rate: float, warmup_steps: int = 100):
        super().__init__()
        self.model, self.learning_rate, self.warmup_steps = model, learning_rate, warmup_steps

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = token_cross_entropy(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate, weight_decay=0.0)
        warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / self.warmup_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def teacher_config(setting: Setting, num_layers: int) -> LlamaConfig:
    task = setting.task
    return LlamaConfig(
        vocab_size=task.vocab_size,
        hidden_size=setting.hidden_size,
        intermediate_size=2 * setting.hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=setting.num_heads,
        num_key_value_heads=setting.num_kv_heads,
        max_position_embeddings=task.seq_len,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def stack_layers(model: LlamaForCausalLM, num_layers: int) -> LlamaForCausalLM:
    """A deeper copy of `model`: decoder layer i is a copy of layer i % (its depth); everything else shared."""
    depth = model.config.num_hidden_layers
    return place_layers(model, [idx % depth for idx in range(num_layers)])


def place_layers(model: LlamaForCausalLM, order: list[int | None]) -> LlamaForCausalLM:
    """A copy of `model` whose decoder layer i is a copy of its layer order[i], or for None a layer that adds
    nothing to the residual stream (zero attention output and MLP down projections): the same function, with the
    model's layers at the positions `order` puts them."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(order)
    placed = LlamaForCausalLM(config).to(next(model.parameters()).device)
    source = model.state_dict()

    def source_key(key: str) -> str:
        return re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{order[int(m.group(1))] or 0}.", key)

    state = {key: source[source_key(key)].clone() for key in placed.state_dict()}
    for idx, layer in enumerate(order):
        if layer is None:
            for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                state[f"model.layers.{idx}.{name}"].zero_()
    placed.load_state_dict(state)
    return placed


def trainer(steps: int, out: Path, accelerator: str) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator=accelerator,
        devices=1,
        precision="bf16-mixed" if accelerator == "gpu" else "32-true",
        # beside the stage's export folder, not in it: an export replaces only a folder that holds a saved hybrid
        logger=L.pytorch.loggers.CSVLogger(out.parent / "logs", name=out.name, version=""),
        log_every_n_steps=25,
        enable_checkpointing=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
    )


def batches(setting: Setting, steps: int, seed: int, curriculum: float = 0.0) -> DataLoader:
    dataset = MQARBatches(setting.task, steps, setting.batch_size, seed, curriculum, setting.task.num_queries)
    return DataLoader(dataset, batch_size=None, shuffle=False)


def train_teacher(setting: Setting, out: Path, accelerator: str) -> LlamaForCausalLM:
    L.seed_everything(0, verbose=False)
    model = LlamaForCausalLM(teacher_config(setting, setting.seed_layers))
    trainer(setting.teacher_steps, out / "teacher_seed", accelerator).fit(
        TaskTraining(model, setting.teacher_learning_rate),
        batches(setting, setting.teacher_steps, seed=1, curriculum=0.4),
    )
    if setting.placement:
        model = place_layers(model, list(setting.placement))
    elif setting.num_layers != setting.seed_layers:
        model = stack_layers(model, setting.num_layers)
        trainer(setting.stack_steps, out / "teacher", accelerator).fit(
            TaskTraining(model, setting.teacher_learning_rate / 3),
            batches(setting, setting.stack_steps, seed=2),
        )
    model.save_pretrained(out / "teacher_model")
    return model.eval()


def load_teacher(path: Path, setting: Setting) -> LlamaForCausalLM:
    """A teacher saved by an earlier run of this setting (its `teacher_model` directory)."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--teacher {str(path)!r} has no config.json; give a run's teacher_model directory."
        )
    teacher = LlamaForCausalLM.from_pretrained(path)
    if (
        setting.placement and teacher.config.num_hidden_layers == setting.seed_layers
    ):  # the seed teacher: place it
        teacher = place_layers(teacher, list(setting.placement))
    expected = teacher_config(setting, setting.num_layers)
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    different = {key: (getattr(teacher.config, key), getattr(expected, key)) for key in keys}
    different = {key: pair for key, pair in different.items() if pair[0] != pair[1]}
    if different:
        raise ValueError(
            f"--teacher {str(path)!r} was not trained for this setting: (its value, the setting's) {different}."
        )
    return teacher.eval()


def stage_arguments(setting: Setting, plan_arguments: dict) -> dict:
    return dict(
        plan=plan_arguments,
        learning_rate=setting.stage_learning_rate,
        warmup_ratio=0.05,
        overwrite_export=True,
    )


def train_student(
    name: str, variant: Variant, init: str, teacher: nn.Module, setting: Setting, out: Path, accelerator: str
) -> nn.Module:
    """Convert the teacher by `variant`'s plan and train the student as the variant says; the trained hybrid."""
    plan_arguments = variant.plan_arguments(setting.num_layers, setting.window)
    if variant.selection:
        plan_arguments = {
            **plan_arguments,
            "ratio": None,
            "swa_layers": selected_layers(variant, init, teacher, setting),
        }
    options = {variant.mixer: {"init": init}} if variant.ratio != "1" else {}
    L.seed_everything(0, verbose=False)
    hybrid, _ = convert(
        teacher, plan_layers(setting.num_layers, **plan_arguments, options=options), progress=False
    )
    run = out / name
    if variant.training == "none":
        return hybrid
    if (
        variant.training == "sft"
    ):  # every text weight on the task's cross-entropy, the distilled students' budget
        steps = setting.layerwise_steps + setting.end_to_end_steps
        stage = SupervisedFineTuning(
            hybrid,
            previous_stage="convert",
            trainable=["language_model"],
            **stage_arguments(setting, plan_arguments),
            export_dir=str(run / "sft"),
        )
        trainer(steps, run / "sft", accelerator).fit(stage, batches(setting, steps, seed=3))
        return load(run / "sft")
    layerwise = LayerwiseDistillation(
        hybrid, teacher=teacher, export_dir=str(run / "layerwise"), **stage_arguments(setting, plan_arguments)
    )
    trainer(setting.layerwise_steps, run / "layerwise", accelerator).fit(
        layerwise, batches(setting, setting.layerwise_steps, seed=3)
    )
    end_to_end = EndToEndDistillation(
        str(run / "layerwise"),
        teacher=teacher,
        export_dir=str(run / "end_to_end"),
        **stage_arguments(setting, plan_arguments),
    )
    trainer(setting.end_to_end_steps, run / "end_to_end", accelerator).fit(
        end_to_end, batches(setting, setting.end_to_end_steps, seed=4)
    )
    return load(run / "end_to_end")


def selected_layers(variant: Variant, init: str, teacher: nn.Module, setting: Setting) -> list[int]:
    """The SWA layers `hybridize select` picks for `variant` on the task's data: as many as the ratio keeps,
    scored with the window W on sequences longer than it (the layer-wise alignment as long as stage 1a)."""
    budget = len(
        plan_layers(setting.num_layers, variant.ratio, window=setting.window).layers_with("sliding_window")
    )
    settings = SelectionSettings(
        method=variant.selection, budget=budget, window=setting.window, mixer=variant.mixer, init=init,
        align_steps=setting.layerwise_steps, train_steps=setting.end_to_end_steps // 5 if variant.selection == "kl" else None,
        eval_batches=2, learning_rate=setting.stage_learning_rate,
    )  # fmt: skip
    data = MQARBatches(setting.task, settings.eval_batches + settings.align_steps, setting.batch_size, seed=6)
    result = select_layers(teacher, (data[i] for i in range(len(data))), settings, progress=False)
    print(
        f"{variant.selection} selection: SWA at {result.softmax_layers}, scores {result.scores}", flush=True
    )
    return result.softmax_layers


def distance_edges(setting: Setting, per_window: int) -> list[int]:
    """Bin edges: every W / per_window up to the longest distance."""
    step = setting.window // per_window
    edges = list(range(0, setting.task.max_distance + step, step))
    return edges if edges[-1] >= setting.task.max_distance else [*edges, setting.task.max_distance]


def evaluate(model: nn.Module, setting: Setting, device: torch.device) -> dict:
    model = model.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        recall = recall_by_distance(model, setting.task, setting.eval_sequences, 64, seed=12345)
    table_edges, plot_edges = distance_edges(setting, 1), distance_edges(setting, 2)
    return {
        "overall": recall["correct"].float().mean().item(),
        "within_window": recall["correct"][recall["distance"] <= setting.window].float().mean().item(),
        "beyond_window": recall["correct"][recall["distance"] > setting.window].float().mean().item(),
        "table_edges": table_edges,
        "table": accuracy_in_bins(recall, table_edges),
        "plot_edges": plot_edges,
        "plot": accuracy_in_bins(recall, plot_edges),
    }


def run_sweep(
    setting_name: str,
    out: Path,
    results: Path | None,
    variants: list[str] | None = None,
    device: str | None = None,
    teacher_dir: Path | None = None,
    jobs: int = 1,
) -> dict:
    """Train (or load) the teacher, then every variant, and write the report to `results` after each one. With
    jobs > 1 the variants run in that many processes at once (the tiny models leave a GPU mostly idle)."""
    setting = SETTINGS[setting_name]
    if variants:
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"Unknown variants {unknown}; choose from {list(VARIANTS)}.")
        setting = replace(setting, variants=tuple(variants))
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {
        "setting": setting_name,
        "config": {**asdict(setting), "task": setting.task.to_dict()},
        "chance": 1 / setting.task.num_values,
        "models": {},
        "seconds": {},
    }

    tick = time.perf_counter()
    if teacher_dir is not None:
        teacher = load_teacher(teacher_dir, setting).to(device)
    else:
        teacher = train_teacher(setting, out, accelerator).to(device)
        teacher_dir = out / "teacher_model"
    teacher_result = evaluate(teacher, setting, device)
    report["models"]["teacher"] = {
        "label": f"teacher ({setting.num_layers}-layer full attention)",
        **teacher_result,
    }
    report["seconds"]["teacher"] = time.perf_counter() - tick
    print(f"teacher recall by distance: {fmt(teacher_result['table'])}", flush=True)
    if min(v for v in teacher_result["table"] if v is not None) < 0.99:
        warnings.warn("The teacher recalls less than 99% at some distance: train it longer.", stacklevel=1)

    def record(name: str, result: dict) -> None:  # the report is rewritten after every variant
        report["seconds"][name] = result.pop("seconds")
        report["models"][name] = result
        order = ["teacher", *VARIANTS]
        report["models"] = dict(sorted(report["models"].items(), key=lambda item: order.index(item[0])))
        if results is not None:
            write_results({**report, "environment": environment(device, jobs)}, setting, results)

    if jobs > 1 and len(setting.variants) > 1:
        run_in_processes(setting.variants, setting_name, out, teacher_dir, device, jobs, record)
    else:
        for name in setting.variants:
            record(name, run_variant(name, teacher, setting, out, device))

    ran = {name: report["models"][name] for name in INIT_CANDIDATES if name in report["models"]}
    report["winning_init"] = winning_init(ran) if ran else None
    report["seconds"]["total"] = time.perf_counter() - started
    print(f"whole sweep: {report['seconds']['total']:.0f} s", flush=True)
    report["environment"] = environment(device, jobs)
    if results is not None:
        write_results(report, setting, results)
    return report


def run_variant(name: str, teacher: nn.Module, setting: Setting, out: Path, device: torch.device) -> dict:
    """Train one student and measure its recall: its report entry, with the seconds it took."""
    variant = VARIANTS[name]
    init = variant.init or get_mixer_class(variant.mixer).config_class().init
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    tick = time.perf_counter()
    student = train_student(name, variant, init, teacher, setting, out, accelerator)
    result = evaluate(student, setting, device)
    distilled = variant.training == "distil"
    label = variant.label + (f", {init} init" if distilled and "init" not in variant.label else "")
    print(f"{name} recall by distance: {fmt(result['table'])}", flush=True)
    return {
        "label": label,
        "init": init if distilled else None,
        **result,
        "seconds": time.perf_counter() - tick,
    }


def run_in_processes(
    names: tuple[str, ...],
    setting_name: str,
    out: Path,
    teacher_dir: Path,
    device: torch.device,
    jobs: int,
    record,
) -> None:
    """run_variant for each variant in its own process of this script (`--worker`), `jobs` at a time; each
    writes its entry to <out>/<variant>/result.json and its log to <out>/<variant>.log; `record` takes each
    entry as it comes."""

    def work(name: str) -> dict:
        result_file = out / name / "result.json"
        result_file.unlink(missing_ok=True)
        command = [
            sys.executable, __file__, "--setting", setting_name, "--out", str(out), "--teacher", str(teacher_dir),
            "--device", str(device), "--worker", name,
        ]  # fmt: skip
        with open(out / f"{name}.log", "w") as log:
            finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
        if finished.returncode or not result_file.is_file():
            raise RuntimeError(f"Variant {name!r} failed (exit {finished.returncode}); see {out / name}.log.")
        return json.loads(result_file.read_text())

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(work, name): name for name in names}
        for future in as_completed(futures):
            result = future.result()
            print(f"{futures[future]} recall by distance: {fmt(result['table'])}", flush=True)
            record(futures[future], result)


def winning_init(candidates: dict[str, dict]) -> str:
    """The init of the better InfiniteVL-layout run (ivl_mimic, ivl_transfer), by recall beyond the window."""
    best = max(candidates, key=lambda name: candidates[name]["beyond_window"])
    return INIT_CANDIDATES[best]


def fmt(values: list[float | None]) -> str:
    return " ".join("  -  " if v is None else f"{v:5.3f}" for v in values)


def environment(device: torch.device, jobs: int) -> dict:
    info = {
        "command": "python examples/recall/sweep.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": L.__version__,
        "jobs": jobs,
    }
    try:
        import fla

        info["fla"] = fla.__version__
    except ImportError:
        info["fla"] = None
    return info


def write_results(report: dict, setting: Setting, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    stem = f"recall_{report['setting']}"
    (results / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (results / f"{stem}.md").write_text(markdown_table(report, setting))
    plot(report, setting, results / f"{stem}.png")
    print(f"wrote {results / stem}.{{json,md,png}}")


def markdown_table(report: dict, setting: Setting) -> str:
    window = setting.window
    edges = report["models"]["teacher"]["table_edges"]
    headers = [f"{lo // window}-{hi / window:.3g} W" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    lines = [
        f"Recall (fraction of queries answered) by key-query distance, window W = {window} tokens; "
        f"chance = {report['chance']:.3f}.",
        "",
        "| model | " + " | ".join(headers) + " | beyond W | train s |",
        "|---|" + "---|" * (len(headers) + 2),
    ]
    for name, model in report["models"].items():
        cells = ["-" if v is None else f"{100 * v:.1f}" for v in model["table"]]
        seconds = report["seconds"].get(name)
        lines.append(
            f"| {model['label']} | " + " | ".join(cells) + f" | {100 * model['beyond_window']:.1f} | "
            f"{seconds:.0f} |"
        )
    env = report["environment"]
    total = report["seconds"].get("total")
    total = f"whole sweep {total:.0f} s" if total is not None else "partial: the sweep was still running"
    lines += [
        "",
        f"Command: `{env['command']}`; device: {env['device']}; torch {env['torch']}, transformers "
        f"{env['transformers']}, fla {env['fla']}; {env['date']}; {total}.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, setting: Setting, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 5))
    for name, model in report["models"].items():
        edges, values = model["plot_edges"], model["plot"]
        centres = [(lo + hi) / 2 / setting.window for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        points = [(x, v) for x, v in zip(centres, values, strict=True) if v is not None]
        style = {"color": "black", "linewidth": 2.5} if name == "teacher" else {}
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=model["label"], **style)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.text(1.02, 0.5, "window", color="grey", rotation=90, transform=ax.get_xaxis_transform())
    ax.axhline(report["chance"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("distance between key and query (multiples of the window W)")
    ax.set_ylabel("recall")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"MQAR recall by distance (W = {setting.window}, {setting.num_layers}-layer teacher)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="gpu")
    parser.add_argument("--out", type=Path, default=Path("runs/recall"), help="checkpoints and training logs")
    parser.add_argument(
        "--results", type=Path, default=None, help="where the JSON, table and plot go (default: --out)"
    )
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument(
        "--teacher", type=Path, default=None, help="a teacher_model directory of an earlier run"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="variants trained at once, each in its own process"
    )
    parser.add_argument(
        "--replot", type=Path, default=None, help="redraw the table and plot of a report JSON"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one variant, for --jobs
    args = parser.parse_args()
    if args.replot:
        report = json.loads(args.replot.read_text())
        setting = SETTINGS[report["setting"]]
        args.replot.with_suffix(".md").write_text(markdown_table(report, setting))
        plot(report, setting, args.replot.with_suffix(".png"))
        return
    if args.worker:
        setting, device = SETTINGS[args.setting], torch.device(args.device)
        teacher = load_teacher(args.teacher, setting).to(device)
        result = run_variant(args.worker, teacher, setting, args.out, device)
        (args.out / args.worker).mkdir(parents=True, exist_ok=True)
        (args.out / args.worker / "result.json").write_text(json.dumps(result))
        return
    variants = args.variants.split(",") if args.variants else None
    run_sweep(
        args.setting, args.out, args.results or args.out, variants, args.device, args.teacher, args.jobs
    )


if __name__ == "__main__":
    main()
