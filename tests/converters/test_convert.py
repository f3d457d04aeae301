"""Converting a tiny Qwen2.5-VL: exactness at ratio 1, all-linear at ratio 0, parameter accounting."""

from __future__ import annotations

import pytest
import torch

from hybridize.converters import convert, find_decoder_layout, plan_layers
from hybridize.inference.chat import chat_inputs
from hybridize.mixers import GatedDeltaNetMixer
from hybridize.presets import tiny_qwen2_5_vl
from tests.conftest import make_image


@pytest.fixture(scope="module")
def image_batch(tiny_teacher):
    _, processor = tiny_teacher
    return chat_inputs(processor, ["Describe the picture.", "Hi"], [[make_image(0)], []])


def test_ratio_one_reproduces_the_teacher_exactly(tiny_teacher, image_batch):
    teacher, _ = tiny_teacher
    hybrid, report = convert(teacher, plan_layers(8, "1", window=4096), progress=False)
    assert report.params_added == report.params_removed == 0
    assert hybrid.config.text_config.layer_types == ["sliding_attention"] * 8
    with torch.no_grad():
        expected = teacher(**image_batch).logits
        got = hybrid(**image_batch).logits
    assert (expected - got).abs().max().item() <= 1e-6


def test_ratio_one_with_small_window_differs(tiny_teacher, image_batch):
    teacher, _ = tiny_teacher
    hybrid, _ = convert(teacher, plan_layers(8, "1", window=4), progress=False)
    with torch.no_grad():
        assert (teacher(**image_batch).logits - hybrid(**image_batch).logits).abs().max() > 1e-3


def test_ratio_one_quarter_layout(tiny_hybrid):
    layers = find_decoder_layout(tiny_hybrid).layers
    kinds = ["swa" if not isinstance(layer.self_attn, GatedDeltaNetMixer) else "gdn" for layer in layers]
    assert kinds == ["swa", "gdn", "gdn", "gdn", "swa", "gdn", "gdn", "gdn"]
    assert tiny_hybrid.config.text_config.sliding_window == 8
    assert tiny_hybrid.config.hybridize["native_layers"] == [0, 4]


def test_parameter_count_on_36_layers():
    teacher, _ = tiny_qwen2_5_vl(num_hidden_layers=36)
    hybrid, report = convert(teacher, plan_layers(36, "1/4"), progress=False)
    count = sum(p.numel() for p in hybrid.parameters())
    assert (
        report.hybrid_params == count == report.teacher_params - report.params_removed + report.params_added
    )
    assert [item.layer for item in report.layers if item.mixer == "sliding_window"] == list(range(0, 36, 4))
    assert report.params_added > report.params_removed > 0
    assert "teacher" in report.table() and f"{count:,}" in report.table()


def test_conversion_leaves_the_teacher_untouched(tiny_teacher):
    teacher, _ = tiny_teacher
    before = {name: p.clone() for name, p in teacher.named_parameters()}
    hybrid, _ = convert(
        teacher,
        plan_layers(8, "1/4", options={"gated_deltanet": {"init": "attention_transfer"}}),
        progress=False,
    )
    for p in hybrid.parameters():
        p.data.add_(1.0)
    for name, p in teacher.named_parameters():
        assert torch.equal(p, before[name]), name
    assert all(isinstance(m, torch.nn.Module) for m in find_decoder_layout(teacher).layers)
    assert not any(
        isinstance(layer.self_attn, GatedDeltaNetMixer) for layer in find_decoder_layout(teacher).layers
    )


def test_shared_weights_are_copied(tiny_teacher):
    teacher, _ = tiny_teacher
    hybrid, _ = convert(teacher, plan_layers(8, "1/4"), progress=False)
    teacher_state = teacher.state_dict()
    for key, value in hybrid.state_dict().items():
        if ".self_attn." in key and not key.split(".layers.")[1].startswith(("0.", "4.")):
            continue
        assert torch.equal(value, teacher_state[key]), key


def test_ratio_zero_is_all_linear_and_runs(tiny_teacher, image_batch):
    teacher, _ = tiny_teacher
    hybrid, _ = convert(teacher, plan_layers(8, "0"), progress=False)
    assert all(
        isinstance(layer.self_attn, GatedDeltaNetMixer) for layer in find_decoder_layout(hybrid).layers
    )
    with torch.no_grad():
        out = hybrid.generate(**image_batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, image_batch["input_ids"].shape[1] + 4)
