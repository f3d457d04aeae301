"""Layer plans: ratios and patterns, explicit layer lists and maps, mixed mixers, and their errors."""

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
        ("2/9", [0, 4, 9, 13, 18, 22, 27, 31]),  # 8 layers spread evenly
    ],
)
def test_ratios(ratio, softmax_layers):
    assert plan_layers(36, ratio).layers_with("sliding_window") == softmax_layers


def test_a_ratio_that_is_no_whole_number_of_layers_is_refused_unless_rounded():
    with pytest.raises(
        ValueError, match=r"3/10 of 8 layers is 2\.40 layers; give 1/4 \(2 layers\) or 3/8 \(3 layers\)"
    ):
        plan_layers(8, "0.3")
    with pytest.raises(ValueError, match="13.50 layers"):
        plan_layers(36, "3/8", pattern="first")
    plan = plan_layers(36, "3/8", round_to_layers=True)  # 14 = round(13.5) spread evenly
    assert plan.layers_with("sliding_window") == [0, 2, 5, 7, 10, 12, 15, 18, 20, 23, 25, 28, 30, 33]
    assert plan.ratio == "7/18"  # what the plan holds, not what was asked


def test_the_window_is_given_once():
    assert plan_layers(8, "1/4").mixers["sliding_window"] == {"window": 8192}
    options = {"sliding_window": {"window": 10}}
    assert plan_layers(8, "1/4", options=options).mixers["sliding_window"] == {"window": 10}
    assert plan_layers(8, "1/4", window=10, options=options).mixers["sliding_window"] == {"window": 10}
    with pytest.raises(ValueError, match="window=64 and the option sliding_window.window=10"):
        plan_layers(8, "1/4", window=64, options=options)


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
    with pytest.raises(ValueError, match="not both"):
        plan_layers(8, "1/4", swa_layers="0")
    with pytest.raises(ValueError, match="layer map"):
        plan_layers(8)


@pytest.mark.parametrize("window", [0, -5, 2.5])
def test_bad_window(window):
    with pytest.raises(ValueError, match="window"):
        plan_layers(8, "1/4", window=window)


def test_unknown_mixer_lists_registered_ones():
    with pytest.raises(ValueError, match="full_attention, gated_deltanet"):
        plan_layers(8, "1/4", mixer="retnet")


def test_plan_round_trips_through_dict():
    plan = plan_layers(8, "1/2", options={"gated_deltanet": {"init": "attention_transfer"}})
    assert LayerPlan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize(
    ("pattern", "softmax_layers"),
    [("interleave", [0, 4]), ("first", [0, 1]), ("last", [6, 7])],
)
def test_patterns(pattern, softmax_layers):
    assert plan_layers(8, "1/4", pattern=pattern).layers_with("sliding_window") == softmax_layers
    with pytest.raises(ValueError, match="pattern"):
        plan_layers(8, "1/4", pattern="middle")


def test_several_linear_mixers_take_turns():
    plan = plan_layers(8, "1/4", mixer="gated_deltanet,mamba2")
    swa, gdn, mamba2 = "sliding_window", "gated_deltanet", "mamba2"
    assert plan.layers == [swa, gdn, mamba2, gdn, swa, mamba2, gdn, mamba2]
    assert set(plan.mixers) == {"sliding_window", "gated_deltanet", "mamba2"}


def test_layer_map_alone_keeps_the_other_layers():
    plan = plan_layers(8, layers="0-3:sliding_window,4:mamba2", window=16)
    assert plan.layers == ["sliding_window"] * 4 + ["mamba2"] + ["full_attention"] * 3
    assert plan.mixers["sliding_window"] == {"window": 16}
    assert plan.ratio == "7/8"


def test_layer_map_on_top_of_a_ratio_and_in_other_forms():
    on_top = plan_layers(8, "1/4", layers={"1": "gla", 5: "full_attention"})
    assert on_top.layers[:2] == ["sliding_window", "gla"] and on_top.layers[5] == "full_attention"
    names = ["sliding_window", "gla", "mamba2", "gated_deltanet"] * 2
    assert plan_layers(8, layers=names).layers == names


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ("0-3:sliding_window,2:mamba2", "layer 2 is given twice"),
        ("7-9:mamba2", r"\[8, 9\] are outside"),
        ("3-1:mamba2", "runs backwards"),
        ("x:mamba2", "is not 'i' or 'i-j'"),
        ("0-3", "LAYERS:MIXER"),
        ("0:retnet", "Unknown mixer 'retnet'"),
        (["gla"] * 3, "one mixer per layer"),
    ],
)
def test_bad_layer_maps(layers, message):
    with pytest.raises(ValueError, match=message):
        plan_layers(8, layers=layers)


def test_options_for_unused_mixers_are_rejected():
    with pytest.raises(ValueError, match="no layer of the plan uses"):
        plan_layers(8, "1/4", options={"mamba2": {"num_groups": 2}})
