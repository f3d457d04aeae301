"""Which mixer each decoder layer gets: from a softmax ratio or an explicit list of sliding-window layers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from hybridize.mixers.registry import get_mixer_class

SOFTMAX_MIXER = "sliding_window"


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


def softmax_layers_for_ratio(num_layers: int, ratio: Fraction) -> list[int]:
    """Interleaved softmax layers. A ratio 1/k keeps layers i % k == 0 (InfiniteVL: 0, 4, ..., 32 of 36);
    other ratios spread round(ratio * num_layers) layers evenly, starting at layer 0."""
    if ratio == 0:
        return []
    if ratio.numerator == 1:
        return list(range(0, num_layers, ratio.denominator))
    count = max(1, round(ratio * num_layers))
    return sorted({math.floor(i * num_layers / count) for i in range(count)})


def parse_layer_list(value: str | list[int], num_layers: int) -> list[int]:
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
    bad = [idx for idx in layers if not 0 <= idx < num_layers]
    if bad:
        raise ValueError(f"swa layer indices {bad} are outside the model's layers 0..{num_layers - 1}.")
    if len(set(layers)) != len(layers):
        raise ValueError(f"swa layers {layers} list a layer more than once.")
    return sorted(layers)


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
    swa_layers: str | list[int] | None = None,
    mixer: str = "gated_deltanet",
    window: int = 8192,
    mixer_options: dict[str, Any] | None = None,
) -> LayerPlan:
    """Plan a conversion: layers chosen by `ratio` (or listed in `swa_layers`) become sliding-window
    attention with `window`, every other layer becomes `mixer` with `mixer_options`."""
    if (ratio is None) == (swa_layers is None):
        raise ValueError("Give exactly one of ratio (e.g. '1/4') or swa_layers (e.g. '0,4,8').")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ValueError(f"window must be a positive number of tokens, got {window!r}.")
    get_mixer_class(mixer)
    if ratio is not None:
        parsed = parse_ratio(ratio)
        softmax = softmax_layers_for_ratio(num_layers, parsed)
        ratio_text = str(parsed)
    else:
        softmax = parse_layer_list(swa_layers, num_layers)
        ratio_text = str(Fraction(len(softmax), num_layers))
    layers = [SOFTMAX_MIXER if idx in softmax else mixer for idx in range(num_layers)]
    mixers: dict[str, dict[str, Any]] = {}
    if softmax:
        mixers[SOFTMAX_MIXER] = {"window": window}
    if len(softmax) < num_layers:
        mixers[mixer] = {**mixers.get(mixer, {}), **(mixer_options or {})}
    return LayerPlan(layers=layers, mixers=mixers, ratio=ratio_text)
