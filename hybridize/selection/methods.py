"""How `hybridize select` scores the layers: one small class per method behind one registry.

Every method answers the same question for each layer: how much better is the hybrid when this layer keeps
softmax attention (as sliding-window attention with the plan's window, which is what it will be) instead of
becoming the linear mixer? A higher score means keep softmax attention there. They differ in how much of
the recipe they run to answer it:

- `mse`: after a short layer-wise alignment (stage 1a), each layer's residual on the teacher's own input to it:
  the mean squared error of the mixer minus that of the windowed attention (stage 1a's loss), all layers in one
  pass. The cheapest; sees each layer alone.
- `nll`: the rise in answer-token NLL when this layer alone is the mixer, minus the rise when it alone is the
  windowed attention (every other layer the teacher's). Calibration forwards, no training beyond an optional
  alignment.
- `kl`: KL-guided selection (fla-org/hybrid-distillation): after the alignment of an all-linear student, restore
  one layer at a time (windowed), run a short end-to-end KL distillation (stage 1b) and score the layer by how
  far the held-out KL on the answer tokens falls below the all-linear student's after the same steps. `greedy` re-scores the
  remaining layers after each pick with the picks kept.
- `uniform`: the recipe's interleave (i % k == 0), no scores: the baseline the others are compared with.

A user's method subclasses `SelectionMethod`, sets `name` and `defaults`, implements `score` (or `select`) and
registers with `@register_method`.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from typing import TYPE_CHECKING, Any, ClassVar

from hybridize.converters.plan import softmax_layers_for_ratio
from hybridize.selection.probe import answer_nll, layer_forms, measure_residuals

if TYPE_CHECKING:
    from hybridize.selection.select import SelectionRun

METHODS: dict[str, type[SelectionMethod]] = {}


def register_method(cls: type[SelectionMethod]) -> type[SelectionMethod]:
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"Selection method {cls.name!r} has no name or is registered already.")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[SelectionMethod]:
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not one of {', '.join(sorted(METHODS))}.")
    return METHODS[name]


class SelectionMethod:
    """Scores layers (higher: keep softmax attention there). `defaults` are the step counts the method uses
    unless the caller sets them: align_steps (stage 1a steps of the all-linear student before scoring) and
    train_steps (stage 1b steps per scored layer), and whether it may re-score greedily."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {"align_steps": 0, "train_steps": 0}
    supports_greedy: ClassVar[bool] = False

    def score(self, run: SelectionRun, chosen: list[int], layers: list[int]) -> Iterator[tuple[int, float]]:
        """Yield (layer, score) for each of `layers`, with the layers in `chosen` already kept as softmax."""
        raise NotImplementedError

    def select(self, run: SelectionRun) -> list[int]:
        """The softmax layers: the highest scores (ties: the lower layer), re-scored after each pick if greedy."""
        chosen: list[int] = []
        rounds = run.budget if run.greedy else min(run.budget, 1)
        for round_index in range(rounds):
            remaining = [idx for idx in range(run.num_layers) if idx not in chosen]
            scores = run.scores(round_index, chosen, remaining, self.score)
            ranked = sorted(scores, key=lambda idx: (-scores[idx], idx))
            chosen += ranked[: 1 if run.greedy else run.budget]
        return sorted(chosen)


@register_method
class UniformMethod(SelectionMethod):
    name = "uniform"

    def select(self, run: SelectionRun) -> list[int]:
        ratio = Fraction(run.budget, run.num_layers)
        return softmax_layers_for_ratio(run.num_layers, ratio, "interleave", round_to_layers=True)


@register_method
class MseMethod(SelectionMethod):
    name = "mse"
    defaults = {"align_steps": 50, "train_steps": 0}

    def score(self, run, chosen, layers):
        probe = run.probe()
        with run.autocast():
            residuals = measure_residuals(probe, run.eval_batches, run.device)
        run.count_eval_tokens()
        for idx in layers:
            yield idx, residuals[idx]["linear"] - residuals[idx]["window"]


@register_method
class NllMethod(SelectionMethod):
    name = "nll"
    defaults = {"align_steps": 50, "train_steps": 0}

    def score(self, run, chosen, layers):
        probe = run.probe()
        for idx in layers:
            rises = {}
            for form in ("linear", "window"):
                with layer_forms(probe, {idx: form}), run.autocast():
                    rises[form] = answer_nll(probe, run.eval_batches, run.device)
                run.count_eval_tokens()
            yield idx, rises["linear"] - rises["window"]


@register_method
class KlMethod(SelectionMethod):
    name = "kl"
    defaults = {"align_steps": 100, "train_steps": 50}
    supports_greedy = True

    def score(self, run, chosen, layers):
        baseline = run.distilled_kl(chosen)
        for idx in layers:
            yield idx, baseline - run.distilled_kl(sorted([*chosen, idx]))
