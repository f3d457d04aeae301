"""`hybridize eval fidelity`: how closely a hybrid follows the teacher it was converted from.

The teacher runs inside the hybrid, as in distillation (`lightning_modules.teacher`): the converted layers get
their teacher attention back beside the mixer, so the shared weights exist once. Two forwards per batch:

1. the teacher: every converted layer in "layerwise" mode (it returns the teacher attention's output, and its
   mixer runs on the same input, which hooks capture) and every sliding-window layer attending to the whole
   sequence (`full_attention`), so the logits are the teacher's;
2. the hybrid: every converted layer in "student" mode, sliding windows as planned.

Per token: KL(teacher || hybrid) on answer tokens (labelled by the chat data) and on all text tokens, top-1
agreement, each model's perplexity on the answers; per converted layer the mixer's relative MSE and cosine
against the teacher attention. Each is reported overall and by token position relative to the window.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from hybridize.converters.checkpoint import (
    base_layer_specs,
    check_output_dir,
    load,
    load_base_config,
    load_base_model,
    load_processor,
    read_plan,
)
from hybridize.converters.discovery import find_decoder_layout
from hybridize.converters.hybrid_model import HYBRID_PREFIX, layer_plan
from hybridize.evaluation import default_placement, metrics
from hybridize.evaluation.report import write_fidelity_report
from hybridize.lightning_modules.data import ChatDataset, collate, expand_data_files
from hybridize.lightning_modules.distillation import check_shared_weights
from hybridize.lightning_modules.teacher import (
    DistilledLayer,
    attach_teacher,
    detach_teacher,
    distillation_mode,
    full_attention,
)
from hybridize.mixers.base import TokenMixer

# Token metrics: name -> (per-token value, which tokens); "answer" tokens are labelled, "text" any real text token.
TOKEN_METRICS = {
    "kl_answer": ("kl", "answer"),
    "kl_text": ("kl", "text"),
    "agreement_answer": ("agreement", "answer"),
    "agreement_text": ("agreement", "text"),
    "teacher_nll": ("teacher_nll", "answer"),
    "hybrid_nll": ("hybrid_nll", "answer"),
}
LAYER_METRICS = ("relative_mse", "cosine")


def sliding_window(hybrid: nn.Module) -> int | None:
    """The window of the hybrid's sliding-window layers (None if it has none)."""
    plan = layer_plan(hybrid.config)
    return plan.mixers.get("sliding_window", {}).get("window") if "sliding_window" in plan.layers else None


class PositionTotals:
    """Sums and counts of per-token values per metric and position bucket, over all batches."""

    def __init__(self, num_buckets: int):
        self.num_buckets = num_buckets
        self.sums = defaultdict(lambda: torch.zeros(num_buckets, dtype=torch.float64))
        self.counts = defaultdict(lambda: torch.zeros(num_buckets, dtype=torch.long))

    def add(self, name: str, values: torch.Tensor, mask: torch.Tensor, buckets: torch.Tensor) -> None:
        sums, counts = metrics.bucket_sums(values, mask, buckets, self.num_buckets)
        self.sums[name] += sums
        self.counts[name] += counts

    def mean(self, name: str) -> dict:
        """{"all": mean over every token, "by_position": [mean per bucket, None where empty], "tokens": [...]}."""
        sums, counts = self.sums[name], self.counts[name]
        by_position = [(s / c).item() if c else None for s, c in zip(sums, counts, strict=True)]
        total = counts.sum().item()
        return {
            "all": (sums.sum() / total).item() if total else None,
            "by_position": by_position,
            "tokens": counts.tolist(),
        }

    def ratio(self, numerator: str, denominator: str) -> dict:
        """Ratio of two summed quantities, overall and per bucket (relative MSE = sum of errors / sum of energy)."""
        top, bottom = self.sums[numerator], self.sums[denominator]
        return {
            "all": (top.sum() / bottom.sum()).item() if bottom.sum() > 0 else None,
            "by_position": [(t / b).item() if b > 0 else None for t, b in zip(top, bottom, strict=True)],
            "tokens": self.counts[numerator].tolist(),
        }


@contextlib.contextmanager
def teacher_inside(hybrid: nn.Module, teacher: nn.Module) -> Iterator[None]:
    """The teacher's converted attention beside the hybrid's mixers for the duration (`attach_teacher`), after
    checking that every shared weight is the teacher's (else ValueError naming the first that differs). Only
    those attention modules are kept: the caller may drop the teacher once inside."""
    check_shared_weights(hybrid, teacher)
    layout = find_decoder_layout(hybrid)
    converted = any(
        isinstance(layout.attention(idx), TokenMixer) and not layout.attention(idx).wraps_attention
        for idx in range(len(layout.layers))
    )
    if converted:  # a hybrid that only has sliding-window layers has no attention to put back
        attach_teacher(hybrid, teacher)
    del teacher
    try:
        yield
    finally:
        detach_teacher(hybrid)


@torch.no_grad()
def measure_fidelity(
    hybrid: nn.Module,
    batches: Iterable[dict],
    *,
    vision_token_ids: tuple[int, ...] = (),
    progress: bool = True,
    total: int | None = None,
) -> dict:
    """Fidelity of `hybrid` (inside `teacher_inside(hybrid, teacher)`) to its teacher over padded `batches`
    (input_ids, attention_mask, labels and any vision inputs, as `lightning_modules.data.collate` makes them)."""
    layout = find_decoder_layout(hybrid)
    layers = {
        idx: layout.attention(idx)
        for idx in range(len(layout.layers))
        if isinstance(layout.attention(idx), DistilledLayer)
    }
    window = sliding_window(hybrid)
    buckets_named = metrics.bucket_names(window)
    totals = PositionTotals(len(buckets_named))
    device = next(hybrid.parameters()).device
    hybrid.eval()
    for batch in tqdm(batches, desc="fidelity", unit="batch", total=total, disable=not progress):
        batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
        labels = batch.pop("labels")
        buckets = metrics.position_buckets(labels.shape[1], window, device)
        valid = batch["attention_mask"].bool()
        outputs: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        with contextlib.ExitStack() as stack:
            # the teacher's pass: sliding-window layers attend to everything (distillation_mode does it when
            # there are mixers to distil; a hybrid without any still needs it)
            stack.enter_context(distillation_mode(hybrid, "layerwise") if layers else full_attention(hybrid))
            for idx, layer in layers.items():
                for role in ("teacher", "student"):
                    hook = partial(_capture, outputs[idx], role)
                    stack.callback(getattr(layer, role).register_forward_hook(hook).remove)
            teacher_logits = hybrid(**batch, use_cache=False).logits
        with distillation_mode(hybrid, "student") if layers else contextlib.nullcontext():
            hybrid_logits = hybrid(**batch, use_cache=False).logits
        per_token = metrics.token_fidelity(teacher_logits, hybrid_logits, labels)
        masks = {
            "answer": metrics.answer_positions(labels) & valid,
            "text": metrics.text_positions(batch["input_ids"], batch["attention_mask"], vision_token_ids),
        }
        for name, (value, tokens) in TOKEN_METRICS.items():
            totals.add(name, per_token[value], masks[tokens], buckets)
        for idx, captured in outputs.items():
            for name, values in metrics.output_errors(captured["student"], captured["teacher"]).items():
                totals.add(f"layer{idx}.{name}", values, valid, buckets)
    return fidelity_report(totals, window, buckets_named, list(layers), layer_plan(hybrid.config).layers)


def _capture(store: dict, role: str, module: nn.Module, args, output) -> None:
    store[role] = output[0]


def fidelity_report(
    totals: PositionTotals, window: int | None, buckets: tuple[str, ...], layers: list[int], mixers: list[str]
) -> dict:
    """The measured totals as the report written to JSON: token metrics, perplexities, per-layer errors."""
    report = {"window": window, "buckets": list(buckets), "metrics": {}, "layers": []}
    for name in TOKEN_METRICS:
        report["metrics"][name] = totals.mean(name)
    for model in ("teacher", "hybrid"):
        nll = report["metrics"][f"{model}_nll"]
        report["metrics"][f"{model}_perplexity"] = {
            "all": metrics.perplexity(nll["all"]),
            "by_position": [metrics.perplexity(value) for value in nll["by_position"]],
            "tokens": nll["tokens"],
        }
    for idx in layers:
        report["layers"].append(
            {
                "layer": idx,
                "mixer": mixers[idx],
                "relative_mse": totals.ratio(f"layer{idx}.squared_error", f"layer{idx}.target_energy"),
                "cosine": totals.mean(f"layer{idx}.cosine"),
            }
        )
    return report


def vision_token_ids(config) -> tuple[int, ...]:
    """Image / video placeholder token ids of a model config (left out of the text-token metrics)."""
    ids = (getattr(config, key, None) for key in ("image_token_id", "video_token_id"))
    return tuple(token for token in ids if token is not None)


def check_fidelity_arguments(
    hybrid: str,
    teacher: str,
    data: list[str],
    out: str,
    max_samples: int | None,
    max_length: int,
    batch_size: int,
) -> list[Path]:
    """Everything checkable before a model is loaded: paths, the teacher's family and depth, the numbers, and
    an empty output folder. Returns the data files."""
    for flag, value in (
        ("--max-samples", max_samples),
        ("--max-length", max_length),
        ("--batch-size", batch_size),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}.")
    check_output_dir(out, overwrite=False)
    saved = read_plan(hybrid)
    base_type = saved["model_type"].removeprefix(HYBRID_PREFIX)
    teacher_config = load_base_config(teacher)
    if teacher_config.model_type != base_type:
        raise ValueError(
            f"--teacher {teacher!r} is a {teacher_config.model_type} model, but {hybrid!r} was converted from a "
            f"{base_type} model ({saved['hybridize'].get('base_model') or 'base not recorded'}); give that base."
        )
    layers = len(saved["hybridize"]["layers"])
    teacher_layers = len(base_layer_specs(teacher_config, teacher))
    if teacher_layers != layers:
        raise ValueError(
            f"--teacher {teacher!r} has {teacher_layers} decoder layers, the hybrid {layers}: it is not this "
            "hybrid's teacher; give the base model it was converted from."
        )
    try:
        return expand_data_files(data)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"--data: {error}".replace("data.train_files / data.val_files", "--data")
        ) from None


def evaluate_fidelity(
    hybrid: str,
    teacher: str,
    data: list[str],
    out: str,
    *,
    max_samples: int | None = None,
    max_length: int = 4096,
    batch_size: int = 4,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> dict:
    """The `hybridize eval fidelity` command: check, read the data, load, measure, write the report to `out`."""
    files = check_fidelity_arguments(hybrid, teacher, data, out, max_samples, max_length, batch_size)
    device, dtype = default_placement(device, dtype)
    processor = load_processor(hybrid)
    if processor is None:
        raise ValueError(f"{hybrid!r} has no saved processor or tokenizer to encode --data with.")
    dataset = ChatDataset(files, processor, max_length=max_length, name="--data", progress=progress)
    pad_token_id = dataset.encoder.pad_token_id
    if max_samples is not None:
        dataset = Subset(dataset, range(min(max_samples, len(dataset))))
    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=partial(collate, pad_token_id=pad_token_id)
    )
    model = load(hybrid, dtype=dtype, device=device).requires_grad_(False)
    with teacher_inside(model, load_base_model(teacher, dtype=dtype, device=device)[0]):
        report = measure_fidelity(
            model,
            loader,
            vision_token_ids=vision_token_ids(model.config),
            progress=progress,
            total=len(loader),
        )
    report.update(
        hybrid=str(hybrid), teacher=str(teacher), data=[str(f) for f in files], samples=len(dataset)
    )
    write_fidelity_report(report, out)
    return report
