"""Layer plans from a softmax ratio or an explicit layer list, and their errors."""

from __future__ import annotations

from fractions import Fraction

import pytest

from hybridize.converters.plan import LayerPlan, parse_ratio, plan_layers


def test_infinitevl_ratio_on_36_layers():
    plan = plan_layers(36, "1/4", window=8192)
    assert plan.layers_with("sliding_window") == list(range(0, 36, 4))
    assert plan.layers_with("gated_deltanet") == [i for i in range(36) if i % 4]
    assert plan.mixers == {"sliding_window": {"window": 8192}, "gated_deltanet": {}}


@pytest.mark.parametrize(
    ("ratio", "softmax_layers"),
    [
        ("1/4", [0, 4, 8, 12, 16, 20, 24, 28, 32]),
        ("0.25", [0, 4, 8, 12, 16, 20, 24, 28, 32]),
        ("1/8", [0, 8, 16, 24, 32]),
        ("1/2", list(range(0, 36, 2))),
        ("0", []),
        ("1", list(range(36))),
        ("3/8", [0, 2, 5, 7, 10, 12, 15, 18, 20, 23, 25, 28, 30, 33]),  # 14 = round(13.5) spread evenly
    ],
)
def test_ratios(ratio, softmax_layers):
    assert plan_layers(36, ratio).layers_with("sliding_window") == softmax_layers


def test_ratio_parsing():
    assert parse_ratio("1/4") == parse_ratio("0.25") == parse_ratio(0.25) == Fraction(1, 4)


@pytest.mark.parametrize("ratio", ["3/2", "-1", "abc", "1/0", ""])
def test_bad_ratios(ratio):
    with pytest.raises(ValueError, match="ratio"):
        plan_layers(36, ratio)


def test_explicit_swa_layers():
    plan = plan_layers(8, swa_layers="0, 5")
    assert plan.layers_with("sliding_window") == [0, 5]
    assert plan.ratio == "1/4"
    with pytest.raises(ValueError, match="outside"):
        plan_layers(8, swa_layers="0,8")
    with pytest.raises(ValueError, match="more than once"):
        plan_layers(8, swa_layers="1,1")
    with pytest.raises(ValueError, match="exactly one"):
        plan_layers(8, "1/4", swa_layers="0")


@pytest.mark.parametrize("window", [0, -5, 2.5])
def test_bad_window(window):
    with pytest.raises(ValueError, match="window"):
        plan_layers(8, "1/4", window=window)


def test_unknown_mixer_lists_registered_ones():
    with pytest.raises(ValueError, match="gated_deltanet, sliding_window"):
        plan_layers(8, "1/4", mixer="retnet")


def test_plan_round_trips_through_dict():
    plan = plan_layers(8, "1/2", mixer_options={"init": "attention_transfer"})
    assert LayerPlan.from_dict(plan.to_dict()) == plan
