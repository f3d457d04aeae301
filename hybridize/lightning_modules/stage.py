"""What every training stage shares: the hybrid it starts from (checked before any weight loads), which
parameters train, optimiser and schedule, trainable-only checkpoints, and the export the next stage starts from.

A stage's output is a hybrid checkpoint directory (`export_dir`) whose config records the stages run so far
(`hybridize.stages`). The next stage names that directory as its `checkpoint` and checks on start that the
last recorded stage is the one it follows (`previous_stage`) and that the plan is the one its config expects
(`plan`): a wrong or missing previous stage is an error, not a silent restart from the converted model.
"""

from __future__ import annotations

import inspect
import math
import re
from collections import defaultdict
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

from hybridize.converters.checkpoint import (
    check_output_dir,
    load,
    load_processor,
    parse_dtype,
    read_plan,
    save_hybrid,
)
from hybridize.converters.discovery import find_decoder_layout, use_attention_implementation
from hybridize.converters.hybrid_model import PLAN_KEY
from hybridize.converters.plan import LayerPlan, plan_layers, read_plan_file
from hybridize.lightning_modules.losses import head_cross_entropy
from hybridize.lightning_modules.packing import packed_position_ids
from hybridize.mixers.base import TokenMixer
from hybridize.mixers.flash_window import FLASH_WINDOW

STAGES_KEY = "stages"  # in the config's `hybridize` section: the stages run on this checkpoint, in order
CONVERTED = "convert"  # `previous_stage` of a stage that starts from a freshly converted hybrid
SCHEDULES = ("cosine", "constant")
# Config fields with which a family changes its logits after the output head (Gemma 2, Cohere, Granite).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# Named sets of parameters for `trainable` (anything else is a regular expression over parameter names).
TRAINABLE_PRESETS = {
    "mixers": ("mixer",),  # the converted layers' new token mixers
    "language_model": ("mixer", "attention", "decoder", "embeddings"),  # the text model, not the vision tower
    "vision": ("vision",),  # the vision tower and projector
    "all": ("mixer", "attention", "decoder", "embeddings", "vision"),
    "lora": ("lora",),  # adapter weights (the long-sequence stage)
}


def parameter_categories(model: nn.Module) -> dict[str, str]:
    """Parameter name -> what it belongs to: "mixer" (a converted layer's token mixer), "teacher attention"
    (the frozen attention kept beside a mixer for distillation), "attention" (softmax attention the hybrid
    keeps), "decoder" (the rest of the decoder layers), "embeddings" (embeddings, final norm, output head),
    "vision" (everything else: the vision tower and projector) or "lora" (adapter weights)."""
    from hybridize.lightning_modules.teacher import DistilledLayer

    layout = find_decoder_layout(model)
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # Outer owners first; each inner one below overrides them for its own parameters.
    owners = {
        id(p): "embeddings"
        for module in (layout.decoder, output_embeddings)
        if module
        for p in module.parameters()
    }
    for layer in layout.layers:
        for parameter in layer.parameters():
            owners[id(parameter)] = "decoder"
        attention = layer.self_attn
        for parameter in attention.parameters():
            owners[id(parameter)] = "attention"
        for module in attention.modules():
            if isinstance(module, DistilledLayer):
                for parameter in module.teacher.parameters():
                    owners[id(parameter)] = "teacher attention"
            if isinstance(module, TokenMixer) and not module.wraps_attention:
                for parameter in module.parameters():
                    owners[id(parameter)] = "mixer"
    categories = {}
    for name, parameter in model.named_parameters():
        categories[name] = "lora" if ".lora_" in name else owners.get(id(parameter), "vision")
    return categories


def select_trainable(model: nn.Module, trainable: tuple[str, ...] | list[str]) -> dict[str, dict[str, int]]:
    """Train exactly the parameters named by `trainable` (preset names from TRAINABLE_PRESETS, or regular
    expressions over parameter names); freeze the rest. Returns {category: {"trainable": n, "frozen": n}}.

    Regular expressions select among the text model's parameters only: vision towers have blocks named like
    the decoder's (`mlp`, `attn`), so `\\.mlp\\.` must not unfreeze them; the `vision` preset does."""
    categories = parameter_categories(model)
    wanted_categories = {c for entry in trainable for c in TRAINABLE_PRESETS.get(entry, ())}
    patterns = [re.compile(entry) for entry in trainable if entry not in TRAINABLE_PRESETS]
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"trainable": 0, "frozen": 0})
    for name, parameter in model.named_parameters():
        category = categories[name]
        matched = category != "vision" and any(pattern.search(name) for pattern in patterns)
        train = category in wanted_categories or matched
        parameter.requires_grad_(train)
        counts[category]["trainable" if train else "frozen"] += parameter.numel()
    if not any(row["trainable"] for row in counts.values()):
        raise ValueError(
            f"No parameter matches trainable={list(trainable)}: give preset names ({', '.join(TRAINABLE_PRESETS)}) "
            "or regular expressions over parameter names."
        )
    return dict(counts)


def parameter_table(counts: dict[str, dict[str, int]]) -> str:
    rows = [("parameters", "trainable", "frozen")]
    rows += [
        (category, f"{row['trainable']:,}", f"{row['frozen']:,}") for category, row in sorted(counts.items())
    ]
    total = {key: sum(row[key] for row in counts.values()) for key in ("trainable", "frozen")}
    rows.append(("total", f"{total['trainable']:,}", f"{total['frozen']:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}" for row in rows)


def stage_history(plan_section: dict) -> list[dict]:
    return list(plan_section.get(STAGES_KEY) or [])


def check_previous_stage(plan_section: dict, previous_stage: str | None, stage: str, source: str) -> None:
    """The checkpoint must be the output of `previous_stage` ("convert": of `hybridize convert`)."""
    if previous_stage is None:
        return
    history = stage_history(plan_section)
    last = history[-1]["stage"] if history else CONVERTED
    if last != previous_stage:
        raise ValueError(
            f"Stage {stage!r} starts from the output of {previous_stage!r}, but {source} is the output of "
            f"{last!r} (stages run on it: {[entry['stage'] for entry in history] or 'none, freshly converted'}). "
            f"Point model.checkpoint at the {previous_stage!r} stage's export_dir, or set "
            "model.previous_stage: null to skip this check."
        )


def check_plan(actual: LayerPlan, expected: dict[str, Any] | str | None, source: str) -> None:
    """The checkpoint's plan must be what `expected` (arguments of `plan_layers`, or a plan file holding them)
    builds for its layer count: the same mixer in every layer, and every option the expected plan sets."""
    if not expected:
        return
    if isinstance(expected, str):
        expected = read_plan_file(expected)
    try:
        wanted = plan_layers(len(actual.layers), **expected)
    except TypeError as error:
        raise ValueError(f"model.plan {expected} is not a set of plan_layers arguments: {error}") from None
    differences = [
        f"layer {idx}: {have} (expected {want})"
        for idx, (have, want) in enumerate(zip(actual.layers, wanted.layers, strict=True))
        if have != want
    ]
    for name, options in wanted.mixers.items():
        for key, value in options.items():
            have = actual.mixers.get(name, {}).get(key)
            if have != value:
                differences.append(f"{name}.{key} = {have!r} (expected {value!r})")
    if differences:
        shown = "; ".join(differences[:6]) + (
            f"; and {len(differences) - 6} more" if len(differences) > 6 else ""
        )
        raise ValueError(
            f"The hybrid at {source} does not have the plan this stage expects (model.plan = {expected}): "
            f"{shown}. Point model.checkpoint at the right run, or fix model.plan."
        )


def head_is_last(model: nn.Module) -> bool:
    """Whether a model's logits are its output head applied to its inner model's last hidden states, nothing
    after (no soft-capping or scaling of the logits), so that the head can run outside its forward."""
    inner = getattr(model, getattr(model, "base_model_prefix", ""), None)
    text_config = model.config.get_text_config()
    return (
        isinstance(inner, nn.Module)
        and inner is not model
        and isinstance(model.get_output_embeddings(), nn.Linear)
        and all(getattr(text_config, key, None) in (None, 1, 1.0) for key in LOGIT_TRANSFORMS)
    )


def last_features(
    model: nn.Module, inputs: dict, strategy=None, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, nn.Module]:
    """What a loss over the vocabulary reads from a model (a peft wrapper too) on `inputs`: (features, head) with
    logits = head(features). Where the logits are the output head's, as they are (`head_is_last`), the features
    are the inner model's last hidden states and the head is the output head, to run in chunks inside the loss
    (no (T, vocab) logits held); else, and under sharding strategies (whose head weights exist only inside the
    model's own forward), the model's logits and an identity. positions (1-D): only these positions are kept."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    unsharded = strategy is None or isinstance(strategy, (SingleDeviceStrategy, DDPStrategy))
    if unsharded and head_is_last(base):
        hidden_states = getattr(base, base.base_model_prefix)(**inputs, use_cache=False).last_hidden_state
        if positions is not None:
            hidden_states = hidden_states[:, positions]
        return hidden_states, base.get_output_embeddings()
    kept = {} if positions is None else logits_kept(model, positions)
    logits = model(**inputs, use_cache=False, **kept).logits
    if positions is not None and not kept:  # a forward without logits_to_keep projected every position
        logits = logits[:, positions]
    return logits, nn.Identity()


def logits_kept(model: nn.Module, positions: int | torch.Tensor) -> dict:
    """The forward keyword that projects only `positions` onto the vocabulary (an int: that many last
    positions; a 1-D tensor: these positions), or nothing for a model whose forward does not take it."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return {}
    return {"logits_to_keep": positions}


def next_token_loss(model: nn.Module, inputs: dict, labels: torch.Tensor, strategy=None) -> torch.Tensor:
    """Cross-entropy of `labels` for a model (a peft wrapper too) on `inputs`, over `last_features` (the head and
    the loss in chunks where the head can run outside the forward)."""
    features, head = last_features(model, inputs, strategy)
    return head_cross_entropy(features, head, labels)


class HybridStage(L.LightningModule):
    """Base of the training stages. Subclasses set `stage`, `default_previous_stage`, `default_trainable` and
    implement `losses(batch) -> {"loss": ..., other logged values}`."""

    stage: ClassVar[str] = ""
    default_previous_stage: ClassVar[str | None] = None
    default_trainable: ClassVar[tuple[str, ...]] = ("mixers",)

    def __init__(
        self,
        checkpoint: str | nn.Module,
        *,
        previous_stage: str | None = "default",
        plan: dict[str, Any] | str | None = None,
        trainable: list[str] | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        schedule: str = "cosine",
        min_learning_rate_ratio: float = 0.1,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        flash_window: bool = True,
        export_dir: str | None = None,
        overwrite_export: bool = False,
        processor: Any = None,
    ):
        """
        Args:
            checkpoint: the hybrid to train: a hybrid checkpoint directory (the previous stage's `export_dir` or
                `hybridize convert --out`), or a hybrid model object (Python API).
            previous_stage: the stage whose output `checkpoint` must be ("convert" for a converted hybrid);
                "default" is this stage's place in the recipe, None skips the check.
            plan: `plan_layers` arguments (ratio, window, mixer, layers, ...) the checkpoint's plan must match, or
                a plan file holding them (the plan.yaml of `hybridize select`).
            trainable: preset names (mixers, language_model, all) or regular expressions over parameter names;
                default: the stage's preset.
            learning_rate, weight_decay, warmup_ratio, schedule, min_learning_rate_ratio: AdamW (no decay on
                biases and norms) with linear warm-up, then cosine (or constant) decay.
            dtype: dtype of the frozen weights (trainable ones stay fp32); pair bf16 with precision bf16-mixed.
            flash_window: softmax layers (kept, sliding-window, the teacher's) attend through PyTorch's flash kernel
                with their window, packed and padded rows as varlen boundaries, instead of dense masks (on CUDA
                in bf16/fp16; elsewhere the same attention through SDPA). False keeps the checkpoint's own.
            export_dir: where the trained hybrid is written at the end of fit (refused up front if not empty,
                unless overwrite_export).
        """
        super().__init__()
        # Objects (a model given directly, a teacher model, a processor) are not hyper-parameters.
        self.save_hyperparameters(
            ignore=["processor", "teacher"] + ["checkpoint"] * isinstance(checkpoint, nn.Module)
        )
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}.")
        if learning_rate <= 0 or not 0 <= warmup_ratio < 1 or not 0 <= min_learning_rate_ratio <= 1:
            raise ValueError(
                "Need learning_rate > 0, 0 <= warmup_ratio < 1 and 0 <= min_learning_rate_ratio <= 1; got "
                f"{learning_rate}, {warmup_ratio}, {min_learning_rate_ratio}."
            )
        if previous_stage == "default":
            previous_stage = self.default_previous_stage
        if export_dir is not None:
            check_output_dir(
                export_dir,
                overwrite_export,
                flag="model.init_args.export_dir",
                overwrite_flag="model.init_args.overwrite_export",
            )
        # Everything about the checkpoint is checked from its config.json before a weight is read.
        if isinstance(checkpoint, nn.Module):
            source, section = "the given model", dict(getattr(checkpoint.config, PLAN_KEY, None) or {})
        else:
            source = repr(str(checkpoint))
            if not Path(checkpoint).is_dir():
                raise FileNotFoundError(
                    f"model.checkpoint {source} does not exist. Run the previous stage first (its export_dir) "
                    "or `hybridize convert --out` for the first stage."
                )
            section = read_plan(checkpoint)[PLAN_KEY]
        if "layers" not in section:
            raise ValueError(f"{source} is not a hybrid (no layer plan); convert the model first.")
        self.plan = LayerPlan.from_dict(section)
        check_previous_stage(section, previous_stage, self.stage, source)
        check_plan(self.plan, plan, source)

        self.dtype_frozen = parse_dtype(dtype)
        if isinstance(checkpoint, nn.Module):
            self.hybrid, self.processor = checkpoint, processor
            if self.dtype_frozen is not None:
                self.hybrid.to(self.dtype_frozen)
        else:
            self.hybrid = load(checkpoint, dtype=self.dtype_frozen)
            self.processor = processor if processor is not None else load_processor(checkpoint)
        self.source = source
        self.export_dir, self.overwrite_export = export_dir, overwrite_export
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.warmup_ratio, self.schedule, self.min_learning_rate_ratio = (
            warmup_ratio,
            schedule,
            min_learning_rate_ratio,
        )
        self.trainable = tuple(trainable if trainable is not None else self.default_trainable)
        self.gradient_checkpointing = gradient_checkpointing
        self.strict_loading = False  # checkpoints hold only the trainable parameters
        self.prepare_model()
        if flash_window:
            use_attention_implementation(self.hybrid, FLASH_WINDOW)
        self.parameter_counts = select_trainable(self.hybrid, self.trainable)
        for parameter in self.hybrid.parameters():
            if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
                parameter.data = parameter.data.float()  # fp32 master weights whatever the frozen dtype
        if gradient_checkpointing:
            self.hybrid.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.hybrid.train()

    # --- hooks for subclasses -------------------------------------------------------------------------
    def prepare_model(self) -> None:
        """Change the model before the trainable set is chosen (attach the teacher, add adapters)."""

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @contextmanager
    def exporting(self):
        """The hybrid as it is saved (subclasses detach the teacher, merge adapters)."""
        yield self.hybrid

    # --- the loop -------------------------------------------------------------------------------------
    def next_token_loss(self, batch: dict) -> torch.Tensor:
        """Cross-entropy of the batch's labels (`next_token_loss`)."""
        return next_token_loss(self.hybrid, self.model_inputs(batch), batch["labels"], self.training_strategy)

    @property
    def training_strategy(self):
        """The Lightning strategy this stage trains under (None outside a Trainer)."""
        return self._trainer.strategy if self._trainer is not None else None

    def model_inputs(self, batch: dict) -> dict:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        if "cu_seq_lens_q" in inputs:
            inputs["position_ids"] = packed_position_ids(self.hybrid, inputs)
        return inputs

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        size = batch["input_ids"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=size)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        losses = self.losses(batch)
        size = batch["input_ids"].shape[0]
        self.log_dict(
            {f"val/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=size, sync_dist=True
        )

    def on_fit_start(self) -> None:
        self.print(
            f"{type(self).__name__} ({self.stage}) on {self.source}:\n{parameter_table(self.parameter_counts)}"
        )

    def configure_optimizers(self):
        parameters = [p for p in self.hybrid.parameters() if p.requires_grad]
        decay = [p for p in parameters if p.ndim >= 2]
        no_decay = [p for p in parameters if p.ndim < 2]  # biases, norms, gates' scalars
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.learning_rate,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(self.learning_rate_factor, total=self.scheduled_steps())
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def scheduled_steps(self) -> int:
        """The optimizer steps the schedule spans: the Trainer's estimate (max_steps, or epochs x batches)."""
        if self._trainer is None:
            return 1
        estimated = self.trainer.estimated_stepping_batches  # an iterable without max_steps: -1 (or inf)
        if not math.isfinite(estimated) or estimated < 1:
            raise ValueError(
                "The training data is a stream of unknown length (data.sources), so the learning-rate schedule "
                "has no end; set trainer.max_steps (e.g. --trainer.max_steps 10000)."
            )
        return max(1, int(estimated))

    def learning_rate_factor(self, step: int, total: int) -> float:
        """Linear warm-up over `warmup_ratio` of the steps, then constant or cosine decay to
        `min_learning_rate_ratio` at the last step."""
        warmup = round(self.warmup_ratio * total)
        if step < warmup:
            return (step + 1) / warmup
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        floor = self.min_learning_rate_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    # --- checkpoints and export -----------------------------------------------------------------------
    def trainable_keys(self) -> set[str]:
        return {f"hybrid.{name}" for name, p in self.hybrid.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[PLAN_KEY] = {"stage": self.stage, "layers": list(self.plan.layers)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get(PLAN_KEY)
        if saved is None:
            raise ValueError("ckpt_path is not a hybridize training checkpoint (no `hybridize` entry).")
        if saved["stage"] != self.stage or saved["layers"] != list(self.plan.layers):
            raise ValueError(
                f"ckpt_path was saved by stage {saved['stage']!r} with plan {saved['layers']}; this run is stage "
                f"{self.stage!r} with plan {list(self.plan.layers)}. Resume with a checkpoint of this run."
            )
        unexpected = set(checkpoint["state_dict"]) - self.trainable_keys()
        if unexpected:
            raise ValueError(
                f"ckpt_path holds {len(unexpected)} tensors this stage does not train (e.g. {sorted(unexpected)[0]}): "
                "it was saved with another `trainable` setting."
            )

    def on_fit_end(self) -> None:
        if self.export_dir is not None and self.trainer.is_global_zero:
            self.export(self.export_dir, overwrite=self.overwrite_export)

    def export(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write the trained hybrid as a checkpoint `hybridize.load` reads, with this stage in its history."""
        with self.exporting() as model:
            return self._save(model, out, overwrite)

    def _save(self, model: nn.Module, out: str | Path, overwrite: bool) -> Path:
        section = dict(getattr(model.config, PLAN_KEY))
        entry = {
            "stage": self.stage,
            "steps": int(self.trainer.global_step) if self._trainer is not None else 0,
            "trainable": list(self.trainable),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        section[STAGES_KEY] = [*stage_history(section), entry]
        setattr(model.config, PLAN_KEY, section)
        if self.dtype_frozen is not None:
            model.to(self.dtype_frozen)  # one dtype on disk; training is over
        out = save_hybrid(model, out, self.processor, overwrite=overwrite)
        self.print(f"Exported the {self.stage} hybrid to {out}")
        return out
