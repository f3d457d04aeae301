"""`select_layers`: choose which layers of a teacher keep softmax attention, by a method of `methods.METHODS`.

A selection reuses the recipe's pieces: `convert` for every candidate, stage 1a (`LayerwiseDistillation`) to
align an all-linear student once, stage 1b (`EndToEndDistillation`) for the KL method's short runs, each on a
Lightning Trainer at the run's precision. With an output folder it records every score as it is computed
(`progress.json`, the aligned mixers in `aligned_mixers.safetensors`), so that a rerun of the same command
skips finished work, and writes the result: `plan.yaml` (`plan_layers` arguments, read unchanged by
`hybridize convert --layers` and a stage config's `plan`), `scores.json` (per-layer scores, settings, cost)
and `scores.png`.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import pickle
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hybridize.converters.convert import convert
from hybridize.converters.discovery import find_decoder_layout
from hybridize.converters.plan import plan_layers
from hybridize.evaluation.metrics import answer_positions
from hybridize.lightning_modules.strategies import LeaveProcessGroup
from hybridize.selection.methods import get_method
from hybridize.selection.probe import attach_probes, token_count

PROGRESS_FILE, ALIGNED_FILE = "progress.json", "aligned_mixers.safetensors"
PLAN_FILE, SCORES_FILE, PLOT_FILE = "plan.yaml", "scores.json", "scores.png"


def parse_budget(value: str | int | Fraction, num_layers: int) -> int:
    """Softmax layers to keep: a count ("9") or a fraction of the layers ("1/4" -> 9 of 36)."""
    try:
        number = Fraction(str(value).strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(
            f"budget {value!r} is not a layer count (9) or a fraction of the layers (1/4)."
        ) from None
    count = number * num_layers if "/" in str(value) or "." in str(value) else number
    if count.denominator != 1:
        raise ValueError(
            f"budget {value} of {num_layers} layers is {float(count):.2f} layers; give a whole number of layers."
        )
    if not 0 <= count <= num_layers:
        raise ValueError(
            f"budget {value} is {int(count)} layers; the model has 0..{num_layers} to choose from."
        )
    return int(count)


@dataclass
class SelectionSettings:
    """What a selection is; a rerun resumes only when these are the same."""

    method: str
    budget: int
    window: int
    mixer: str = "gated_deltanet"
    init: str | None = None
    align_steps: int | None = None  # None: the method's default
    train_steps: int | None = None
    eval_batches: int = 8
    learning_rate: float = 1e-3
    greedy: bool = False
    seed: int = 0
    devices: int = 1  # processes the training steps run on (DDP, one device each, spawned)
    source: dict[str, Any] = field(default_factory=dict)  # base model and data, as given

    def __post_init__(self) -> None:
        method = get_method(self.method)
        for key, default in method.defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, default)
        if self.greedy and not method.supports_greedy:
            raise ValueError(f"method {self.method!r} has no greedy re-scoring; drop greedy (--greedy).")
        counts = {"align_steps": self.align_steps, "train_steps": self.train_steps}
        if any(value < 0 for value in counts.values()) or self.eval_batches < 1:
            raise ValueError(
                f"Need align/train steps >= 0 and eval_batches >= 1; got {counts}, {self.eval_batches}."
            )
        if self.window <= 0:
            raise ValueError(f"window must be a positive number of tokens, got {self.window}.")
        if not isinstance(self.devices, int) or self.devices < 1:
            raise ValueError(f"devices must be a whole number >= 1, got {self.devices!r}.")


def check_data_length(batches: list[Mapping], window: int) -> None:
    """Scoring compares a layer's windowed attention with its linear mixer; on samples no longer than the
    window the two forms of softmax attention are one and the window's cost is invisible."""
    longest = max(
        int(b["attention_mask"].sum(-1).max()) if "attention_mask" in b else b["input_ids"].shape[-1]
        for b in batches
    )
    if longest <= window:
        raise ValueError(
            f"The selection data is too short for the window: its longest sample has {longest} tokens, the window "
            f"{window}. Give samples longer than the window (longer data or --max-length), or a smaller --window."
        )


def hold_out(batches: Iterable[Mapping], settings: SelectionSettings) -> tuple[list[Mapping], list[Mapping]]:
    """The first `eval_batches` batches, held out for scoring, and up to the most steps the method trains after
    them (the held-out ones when nothing follows), checked: enough batches, samples longer than the window."""
    batches = iter(batches)
    held_out = list(itertools.islice(batches, settings.eval_batches))
    if len(held_out) < settings.eval_batches:
        raise ValueError(
            f"The selection data gives {len(held_out)} batches; eval_batches={settings.eval_batches} are held out "
            "for scoring (and training needs more): give more data or fewer --eval-batches."
        )
    check_data_length(held_out, settings.window)
    training = list(itertools.islice(batches, max(settings.align_steps, settings.train_steps)))
    return held_out, training or held_out


def check_out_dir(out: Path, settings: SelectionSettings) -> dict | None:
    """Refuse an --out that holds anything but an unfinished selection with these settings (resumed)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is a file; give a directory.")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    progress = out / PROGRESS_FILE
    if (out / PLAN_FILE).exists() or not progress.is_file():
        what = "a finished selection" if (out / PLAN_FILE).exists() else "other files"
        raise FileExistsError(f"--out {str(out)!r} is not empty (it holds {what}); give a new directory.")
    record = json.loads(progress.read_text())
    if record.get("settings") != dataclasses.asdict(settings):
        saved = record.get("settings", {})
        different = {
            k: (saved.get(k), v) for k, v in dataclasses.asdict(settings).items() if saved.get(k) != v
        }
        raise ValueError(
            f"--out {str(out)!r} holds an unfinished selection with other settings (saved, now: {different}); rerun "
            "it with its own settings to resume, or give a new directory."
        )
    return record


class SelectionRun:
    """The teacher, the data and the record of work done, with the recipe steps the methods are built from."""

    def __init__(
        self,
        teacher: nn.Module,
        batches: Iterable[Mapping],
        settings: SelectionSettings,
        *,
        out: str | Path | None = None,
        progress: bool = True,
    ):
        self.teacher, self.settings, self.progress = teacher.eval(), settings, progress
        self.out = Path(out) if out is not None else None
        saved = check_out_dir(self.out, settings) if self.out is not None else None
        self.record = saved or {
            "settings": dataclasses.asdict(settings), "rounds": [], "distilled_kl": {}, "tokens": 0, "seconds": 0.0,
        }  # fmt: skip
        self.num_layers = len(find_decoder_layout(teacher).layers)
        self.budget, self.greedy, self.window = settings.budget, settings.greedy, settings.window
        if self.budget > self.num_layers:
            raise ValueError(f"budget {self.budget} is more than the model's {self.num_layers} layers.")
        self.eval_batches, self.train_batches = hold_out(batches, settings)
        self.device = next(teacher.parameters()).device
        low_precision = next(teacher.parameters()).dtype in (torch.bfloat16, torch.float16)
        self.precision = "bf16-mixed" if low_precision else "32-true"
        self._aligned: dict[int, dict[str, torch.Tensor]] | None = None
        self._probe: nn.Module | None = None
        self._clock = time.perf_counter()

    # --- bookkeeping --------------------------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager:
        if self.precision == "32-true":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def count_eval_tokens(self) -> None:
        self.record["tokens"] += sum(token_count(batch) for batch in self.eval_batches)

    def count_train_tokens(self, steps: int) -> None:
        pool = self.train_batches  # every process takes its own batch per step
        self.record["tokens"] += sum(
            token_count(pool[step % len(pool)]) for step in range(steps * self.settings.devices)
        )

    def save(self) -> None:
        now = time.perf_counter()
        self.record["seconds"] += now - self._clock
        self._clock = now
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            temporary = self.out / f"{PROGRESS_FILE}.tmp"
            temporary.write_text(json.dumps(self.record, indent=1))
            temporary.replace(self.out / PROGRESS_FILE)

    def scores(
        self, round_index: int, chosen: list[int], layers: list[int], score: Callable
    ) -> dict[int, float]:
        """Scores of `layers` in this round, computed by `score(run, chosen, layers_left)` where not recorded."""
        while len(self.record["rounds"]) <= round_index:
            self.record["rounds"].append({"chosen": list(chosen), "scores": {}})
        done = self.record["rounds"][round_index]["scores"]
        todo = [idx for idx in layers if str(idx) not in done]
        description = f"{self.settings.method}: scoring layers" + (
            f" (pick {round_index + 1})" if self.greedy else ""
        )
        with tqdm(
            total=len(layers), initial=len(layers) - len(todo), desc=description, disable=not self.progress
        ) as bar:
            for idx, value in score(self, chosen, todo) if todo else ():
                done[str(idx)] = float(value)
                self.save()
                bar.update()
        return {idx: done[str(idx)] for idx in layers}

    # --- the recipe's steps -------------------------------------------------------------------------------
    def trainer(self, steps: int) -> L.Trainer:
        """A Trainer for `steps` steps at the run's precision. On several devices its workers are spawned: only the
        training runs in them, and the trained weights come back to this process, where the scoring goes on."""
        devices = self.settings.devices
        return L.Trainer(
            max_steps=steps,
            accelerator="gpu" if self.device.type == "cuda" else "cpu",
            devices=devices,
            strategy="ddp_spawn" if devices > 1 else "auto",
            callbacks=[LeaveProcessGroup()] if devices > 1 else None,  # the spawned workers end with the fit
            precision=self.precision,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=self.progress,
            gradient_clip_val=1.0,
        )

    def fit(self, stage: L.LightningModule, steps: int) -> None:
        """Train `stage` for `steps` steps on the run's batches (in spawned workers on several devices)."""
        try:
            self.trainer(steps).fit(stage, self.train_loader(steps))
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            if self.settings.devices == 1 or "pickle" not in str(error).lower():
                raise
            raise ValueError(
                f"The model cannot be sent to spawned training processes ({error}); a model that ran with "
                "output_attentions/output_hidden_states carries transformers' capture hooks: load the teacher "
                "afresh, or use devices=1."
            ) from None

    def train_loader(self, steps: int) -> DataLoader:
        """`steps` batches for every process (Lightning's distributed sampler deals them out)."""
        pool = self.train_batches
        batches = [pool[step % len(pool)] for step in range(steps * self.settings.devices)]
        return DataLoader(batches, batch_size=None)

    def stage_arguments(self) -> dict[str, Any]:
        return dict(
            teacher=self.teacher,
            previous_stage=None,
            learning_rate=self.settings.learning_rate,
            warmup_ratio=0.05,
        )

    def hybrid(self, softmax_layers: list[int], *, aligned: bool = True) -> nn.Module:
        """The teacher converted with `softmax_layers` as sliding-window attention and the mixer elsewhere,
        the mixers as the alignment left them."""
        options = {self.settings.mixer: {"init": self.settings.init}} if self.settings.init else None
        plan = plan_layers(
            self.num_layers,
            swa_layers=softmax_layers,
            window=self.window,
            mixer=self.settings.mixer,
            options=options,
        )
        torch.manual_seed(self.settings.seed)
        hybrid, _ = convert(self.teacher, plan, progress=False)
        if aligned:
            layout = find_decoder_layout(hybrid)
            for idx, state in self.aligned_mixers().items():
                if idx not in softmax_layers:
                    layout.attention(idx).load_state_dict(state)
        return hybrid

    def aligned_mixers(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every layer's mixer after `align_steps` of stage 1a on the all-linear student (computed once, saved)."""
        if self._aligned is not None:
            return self._aligned
        stored = self.out / ALIGNED_FILE if self.out is not None else None
        if stored is not None and stored.is_file():
            from safetensors.torch import load_file

            flat = load_file(stored)
        else:
            from hybridize.lightning_modules.distillation import LayerwiseDistillation

            hybrid = self.hybrid([], aligned=False)
            layout = find_decoder_layout(hybrid)
            mixers = [layout.attention(idx) for idx in range(self.num_layers)]
            if self.settings.align_steps:
                L.seed_everything(self.settings.seed, verbose=False)
                stage = LayerwiseDistillation(hybrid, **self.stage_arguments())
                self.fit(stage, self.settings.align_steps)
                self.count_train_tokens(self.settings.align_steps)
                del stage
            flat = {
                f"{idx}/{name}": value.detach().float().cpu().contiguous()
                for idx, mixer in enumerate(mixers)
                for name, value in mixer.state_dict().items()
            }
            del hybrid, mixers
            if stored is not None:
                from safetensors.torch import save_file

                stored.parent.mkdir(parents=True, exist_ok=True)
                save_file(flat, stored)
            self.save()
            release_memory()
        self._aligned = {}
        for key, value in flat.items():
            idx, name = key.split("/", 1)
            self._aligned.setdefault(int(idx), {})[name] = value
        return self._aligned

    def probe(self) -> nn.Module:
        """The aligned all-linear student with every layer a `ProbeLayer` (built once)."""
        if self._probe is None:
            from hybridize.lightning_modules.teacher import attach_teacher

            hybrid = self.hybrid([]).to(self.device)
            attach_teacher(hybrid, self.teacher)
            attach_probes(hybrid, self.window)
            self._probe = hybrid.eval()
        return self._probe

    def distilled_kl(self, softmax_layers: list[int]) -> float:
        """Held-out KL(teacher || hybrid) on the answer tokens (labels) of the aligned hybrid with `softmax_layers`
        windowed, after `train_steps` of stage 1b on every token (recorded: a resumed run and a greedy round
        reuse it)."""
        key = ",".join(map(str, sorted(softmax_layers)))
        if key in self.record["distilled_kl"]:
            return self.record["distilled_kl"][key]
        from hybridize.lightning_modules.distillation import EndToEndDistillation

        L.seed_everything(self.settings.seed, verbose=False)
        stage = EndToEndDistillation(self.hybrid(sorted(softmax_layers)), **self.stage_arguments())
        if self.settings.train_steps:
            self.fit(stage, self.settings.train_steps)
            self.count_train_tokens(self.settings.train_steps)
        stage.to(self.device).eval()
        total = count = 0.0
        with torch.no_grad(), self.autocast():
            for batch in self.eval_batches:
                batch = {key: value.to(self.device) for key, value in batch.items() if torch.is_tensor(value)}
                valid = stage.valid_tokens(batch) & answer_positions(batch["labels"])
                tokens = float(valid.sum())
                total += float(stage.teacher_student_kl(batch, valid)[0]) * tokens
                count += tokens
        self.count_eval_tokens()
        del stage
        release_memory()
        self.record["distilled_kl"][key] = total / max(count, 1.0)
        return self.record["distilled_kl"][key]


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class SelectionResult:
    softmax_layers: list[int]
    scores: dict[int, float]  # the first round's score of every layer (empty for `uniform`)
    settings: SelectionSettings
    num_layers: int
    rounds: list[dict] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    def plan_arguments(self) -> dict[str, Any]:
        arguments = {
            "swa_layers": self.softmax_layers,
            "window": self.settings.window,
            "mixer": self.settings.mixer,
        }
        if self.settings.init:
            arguments["options"] = {self.settings.mixer: {"init": self.settings.init}}
        return arguments


def select_layers(
    teacher: nn.Module,
    batches: Iterable[Mapping],
    settings: SelectionSettings,
    *,
    out: str | Path | None = None,
    progress: bool = True,
) -> SelectionResult:
    """Choose `settings.budget` softmax layers of `teacher` by `settings.method`, scoring on the first
    `settings.eval_batches` of `batches` and training (where the method does) on the ones after. With `out`,
    progress is saved as it is made (a rerun resumes) and the plan, scores and plot are written there."""
    run = SelectionRun(teacher, batches, settings, out=out, progress=progress)
    chosen = get_method(settings.method)().select(run)
    run.save()
    rounds = run.record["rounds"]
    result = SelectionResult(
        softmax_layers=chosen,
        scores={int(k): v for k, v in rounds[0]["scores"].items()} if rounds else {},
        settings=settings,
        num_layers=run.num_layers,
        rounds=rounds,
        tokens=run.record["tokens"],
        seconds=run.record["seconds"],
    )
    if out is not None:
        write_result(result, Path(out))
    return result


def write_result(result: SelectionResult, out: Path) -> None:
    import yaml

    settings = result.settings
    header = (
        f"# hybridize select: method {settings.method}, budget {settings.budget}, window {settings.window}, "
        f"base {settings.source.get('base', '?')}\n# scores in {SCORES_FILE}; use with `hybridize convert --layers "
        f"{out / PLAN_FILE}` or a stage config's `plan: {out / PLAN_FILE}`\n"
    )
    report = {
        "softmax_layers": result.softmax_layers,
        "scores": {str(k): v for k, v in sorted(result.scores.items())},
        "rounds": result.rounds,
        "settings": dataclasses.asdict(settings),
        "cost": {"tokens": result.tokens, "seconds": round(result.seconds, 2)},
    }
    (out / SCORES_FILE).write_text(json.dumps(report, indent=1))
    plot_scores(result, out / PLOT_FILE)
    # The plan last: its presence marks the selection finished.
    (out / PLAN_FILE).write_text(header + yaml.safe_dump(result.plan_arguments(), sort_keys=False))


def plot_scores(result: SelectionResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers = result.num_layers
    layers = list(range(num_layers))
    values = [result.scores.get(idx, 0.0) for idx in layers]
    colours = ["tab:orange" if idx in result.softmax_layers else "tab:blue" for idx in layers]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.3 * num_layers), 3.2))
    axis.bar(layers, values if result.scores else [1.0] * num_layers, color=colours)
    axis.set_xlabel("layer (orange: keeps softmax attention)")
    axis.set_ylabel("score (higher: keep softmax)" if result.scores else "placement")
    axis.set_title(f"hybridize select --method {result.settings.method} (budget {result.settings.budget})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
