"""Which mixer each decoder layer gets.

A plan starts from a softmax ratio placed by a pattern (interleave, first, last) or an explicit list of
sliding-window layers, gives the other layers one linear mixer or several in turn, and can then be
overridden layer by layer with a map ("0-3:sliding_window,4:mamba2"). Without a ratio or layer list, the
layers a map does not name keep their attention as it is (`full_attention`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from hybridize.mixers.registry import get_mixer_class

SOFTMAX_MIXER = "sliding_window"
KEEP_MIXER = "full_attention"
PATTERNS = ("interleave", "first", "last")
DEFAULT_WINDOW = 8192  # InfiniteVL's
LayerMap = str | Mapping[int | str, str] | Sequence[str]


def parse_ratio(value: str | float | Fraction) -> Fraction:
    """The fraction of layers that keep softmax attention: "1/4", "0.25", 0.25, "0" and "1" are accepted."""
    try:
        ratio = Fraction(str(value).strip()).limit_denominator(1000)
    except (ValueError, ZeroDivisionError):
        raise ValueError(
            f"ratio {value!r} is not a number; give the fraction of layers that keep softmax attention, "
            'e.g. "1/4" or "0.25".'
        ) from None
    if not 0 <= ratio <= 1:
        raise ValueError(
            f"ratio {value!r} must be between 0 and 1 (the fraction of layers that keep softmax attention)."
        )
    return ratio


def softmax_layers_for_ratio(
    num_layers: int, ratio: Fraction, pattern: str = "interleave", *, round_to_layers: bool = False
) -> list[int]:
    """The softmax layers of a ratio. interleave: a ratio 1/k keeps layers i % k == 0 (InfiniteVL: 0, 4, ...,
    32 of 36), other ratios spread ratio * num_layers layers evenly from layer 0; first / last: that many
    layers at the bottom / top of the stack.

    A ratio that is no whole number of layers (0.3 of 8) is an error naming the nearest ones that are, unless
    `round_to_layers` takes round(ratio * num_layers) layers.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern {pattern!r} is not one of {', '.join(PATTERNS)}.")
    if ratio == 0:
        return []
    if pattern == "interleave" and ratio.numerator == 1:
        return list(range(0, num_layers, ratio.denominator))
    exact = ratio * num_layers
    if exact.denominator != 1 and not round_to_layers:
        below, above = math.floor(exact), math.ceil(exact)
        nearest = " or ".join(
            f"{Fraction(count, num_layers)} ({count} layers)" for count in (below, above) if count > 0
        )
        raise ValueError(
            f"ratio {ratio} of {num_layers} layers is {float(exact):.2f} layers; give {nearest}, a ratio 1/k, "
            "or --round to take the nearest whole number."
        )
    count = max(1, round(exact))
    if pattern == "first":
        return list(range(count))
    if pattern == "last":
        return list(range(num_layers - count, num_layers))
    return sorted({math.floor(i * num_layers / count) for i in range(count)})


def _check_indices(layers: list[int], num_layers: int, what: str) -> None:
    bad = [idx for idx in layers if not 0 <= idx < num_layers]
    if bad:
        raise ValueError(f"{what} {bad} are outside the model's layers 0..{num_layers - 1}.")


def parse_layer_list(value: str | Sequence[int], num_layers: int) -> list[int]:
    """ "0,4,8" or [0, 4, 8] -> [0, 4, 8], checked against the model's layer count."""
    if isinstance(value, str):
        try:
            layers = [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"swa layers {value!r} must be comma-separated layer indices, e.g. 0,4,8."
            ) from None
    else:
        layers = [int(part) for part in value]
    _check_indices(layers, num_layers, "swa layer indices")
    if len(set(layers)) != len(layers):
        raise ValueError(f"swa layers {layers} list a layer more than once.")
    return sorted(layers)


def _layer_range(text: str, num_layers: int) -> list[int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if match is None:
        raise ValueError(f"layer range {text!r} is not 'i' or 'i-j' (e.g. 4 or 0-3).")
    start = int(match.group(1))
    stop = int(match.group(2)) if match.group(2) is not None else start
    if stop < start:
        raise ValueError(f"layer range {text!r} runs backwards; write it as {stop}-{start}.")
    layers = list(range(start, stop + 1))
    _check_indices(layers, num_layers, f"layers of {text.strip()!r}")
    return layers


def parse_layer_map(value: LayerMap, num_layers: int) -> dict[int, str]:
    """Layer index -> mixer name from "0-3:sliding_window,4:mamba2", {"0-3": "sliding_window", 4: "mamba2"}
    or a list with one mixer name per layer. Overlapping entries and unknown mixers are errors."""
    if isinstance(value, str):
        items = []
        for item in (part for part in value.split(",") if part.strip()):
            if ":" not in item:
                raise ValueError(
                    f"layer map entry {item.strip()!r} is not 'LAYERS:MIXER' (e.g. 0-3:sliding_window,4:mamba2)."
                )
            layers, mixer = item.rsplit(":", 1)
            items.append((layers, mixer.strip()))
    elif isinstance(value, Mapping):
        items = [(str(layers), str(mixer)) for layers, mixer in value.items()]
    else:
        names = [str(name) for name in value]
        if len(names) != num_layers:
            raise ValueError(
                f"a layer list needs one mixer per layer: the model has {num_layers} layers, the list {len(names)}."
            )
        items = [(str(idx), name) for idx, name in enumerate(names)]
    assigned: dict[int, str] = {}
    source: dict[int, str] = {}
    for layers, mixer in items:
        get_mixer_class(mixer)
        for idx in _layer_range(layers, num_layers):
            if idx in assigned:
                raise ValueError(
                    f"layer {idx} is given twice in the layer map ({source[idx]!r} and "
                    f"'{layers.strip()}:{mixer}'); give each layer one mixer."
                )
            assigned[idx], source[idx] = mixer, f"{layers.strip()}:{mixer}"
    return assigned


@dataclass
class LayerPlan:
    """The mixer name of every decoder layer and the options of each mixer used."""

    layers: list[str]
    mixers: dict[str, dict[str, Any]] = field(default_factory=dict)
    native_layers: list[int] = field(default_factory=list)  # layers converted by a config change
    ratio: str | None = None

    def __post_init__(self) -> None:
        for name in set(self.layers):
            get_mixer_class(name)  # raises with the registered names
        unused = sorted(set(self.mixers) - set(self.layers))
        if unused:
            raise ValueError(f"Options given for mixer(s) {unused} that no layer uses.")

    def layers_with(self, name: str) -> list[int]:
        return [idx for idx, mixer in enumerate(self.layers) if mixer == name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "mixers": {name: dict(options) for name, options in self.mixers.items()},
            "native_layers": list(self.native_layers),
            "ratio": self.ratio,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerPlan:
        return cls(
            layers=list(data["layers"]),
            mixers={name: dict(options) for name, options in data.get("mixers", {}).items()},
            native_layers=list(data.get("native_layers", [])),
            ratio=data.get("ratio"),
        )


def plan_layers(
    num_layers: int,
    ratio: str | float | Fraction | None = None,
    *,
    swa_layers: str | Sequence[int] | None = None,
    layers: LayerMap | None = None,
    pattern: str = "interleave",
    mixer: str | Sequence[str] = "gated_deltanet",
    window: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    round_to_layers: bool = False,
) -> LayerPlan:
    """Plan a conversion.

    ratio (placed by `pattern`) or swa_layers: those layers become sliding-window attention with `window`
    (default 8192; or the option sliding_window.window, not both); the others get `mixer` (several names, as a
    list or "gated_deltanet,mamba2", take turns). round_to_layers: see `softmax_layers_for_ratio`.
    layers: a per-layer map applied on top; alone, it converts only the layers it names.
    options: per-mixer options, e.g. {"gated_deltanet": {"init": "attention_transfer"}}.
    """
    if ratio is not None and swa_layers is not None:
        raise ValueError("Give ratio (e.g. '1/4') or swa_layers (e.g. '0,4,8'), not both.")
    if ratio is None and swa_layers is None and layers is None:
        raise ValueError("Give a ratio (e.g. '1/4'), swa_layers (e.g. '0,4,8') or a layer map.")
    option_window = (options or {}).get(SOFTMAX_MIXER, {}).get("window")
    if window is not None and option_window is not None and option_window != window:
        raise ValueError(
            f"The window is given twice: window={window} and the option sliding_window.window={option_window}; "
            "give it once."
        )
    window = next((w for w in (window, option_window) if w is not None), DEFAULT_WINDOW)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ValueError(f"window must be a positive number of tokens, got {window!r}.")
    linear = [name.strip() for name in mixer.split(",")] if isinstance(mixer, str) else list(mixer)
    if not linear:
        raise ValueError("mixer names no mixer; give one, e.g. 'gated_deltanet'.")
    for name in linear:
        get_mixer_class(name)

    if ratio is not None:
        softmax = softmax_layers_for_ratio(
            num_layers, parse_ratio(ratio), pattern, round_to_layers=round_to_layers
        )
    elif swa_layers is not None:
        softmax = parse_layer_list(swa_layers, num_layers)
    else:
        softmax = None  # a layer map alone: every other layer keeps its attention
    if softmax is None:
        names = [KEEP_MIXER] * num_layers
    else:
        others = [idx for idx in range(num_layers) if idx not in softmax]
        names = [SOFTMAX_MIXER] * num_layers
        for turn, idx in enumerate(others):
            names[idx] = linear[turn % len(linear)]
    for idx, name in parse_layer_map(layers, num_layers).items() if layers is not None else ():
        names[idx] = name

    options = {name: dict(values) for name, values in (options or {}).items()}
    for name in options:
        get_mixer_class(name)
    if SOFTMAX_MIXER in names:
        options[SOFTMAX_MIXER] = {"window": window, **options.get(SOFTMAX_MIXER, {})}
    unused = sorted(set(options) - set(names))
    if unused:
        raise ValueError(f"options given for mixer(s) {unused} that no layer of the plan uses.")
    mixers = {name: options.get(name, {}) for name in dict.fromkeys(names)}
    softmax_count = sum(name in (SOFTMAX_MIXER, KEEP_MIXER) for name in names)
    return LayerPlan(layers=names, mixers=mixers, ratio=str(Fraction(softmax_count, num_layers)))


PLAN_ARGUMENTS = (
    "ratio", "swa_layers", "layers", "pattern", "mixer", "window", "options", "round_to_layers",
)  # fmt: skip


def is_plan_file_content(data: Any) -> bool:
    """A plan file holds `plan_layers` arguments (a mapping keyed by their names); a layer map's keys are
    layer indices or ranges, so the two never look alike."""
    return isinstance(data, Mapping) and bool(data) and all(key in PLAN_ARGUMENTS for key in data)


def read_layers_file(path: str, what: str = "layers file") -> list | dict:
    """A YAML or JSON file holding a layer map (a list with one mixer per layer, or a mapping) or a plan file's
    `plan_layers` arguments; `what` names it in errors (e.g. "--layers file")."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist.")
    data = yaml.safe_load(file.read_text())
    if not isinstance(data, (list, dict)):
        raise ValueError(
            f"{what} {str(path)!r} must hold a list (one mixer per layer), a mapping or a plan file's arguments."
        )
    return data


def read_plan_file(path: str) -> dict[str, Any]:
    """The `plan_layers` arguments in a plan file (YAML or JSON), as `hybridize select` writes it:
    `{swa_layers: [5, 17], window: 8192, mixer: gated_deltanet}`. `hybridize convert --layers FILE` and a stage
    config's `plan: FILE` read it unchanged."""
    data = read_layers_file(path, "plan file")
    if not is_plan_file_content(data):
        names = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(
            f"plan file {str(path)!r} must be a mapping of plan arguments ({', '.join(PLAN_ARGUMENTS)}); "
            f"it holds {names}."
        )
    return dict(data)
