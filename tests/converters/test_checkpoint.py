"""Saving and loading hybrids (hybridize.load and the transformers Auto class) and loading teachers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText

import hybridize
from hybridize.converters import convert, load, load_base_model, plan_layers, read_plan, save_hybrid
from hybridize.converters.checkpoint import saved_tensor_shapes
from hybridize.inference.chat import chat_inputs
from hybridize.presets import tiny_qwen2_5_vl_processor
from tests.conftest import make_image

pytestmark = pytest.mark.transformers_surface  # also run on the oldest supported transformers


@pytest.fixture(scope="module")
def saved_hybrid(tiny_teacher, tiny_hybrid, tmp_path_factory):
    path = tmp_path_factory.mktemp("hybrid")
    save_hybrid(tiny_hybrid, path, tiny_teacher[1], overwrite=True)
    return path


@pytest.fixture(scope="module")
def batch(tiny_teacher):
    return chat_inputs(tiny_teacher[1], ["What is shown?", "Hello there"], [[make_image(1)], []])


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_both_load_routes_give_identical_logits(tiny_hybrid, saved_hybrid, batch):
    expected = logits(tiny_hybrid, batch)
    via_hybridize = hybridize.load(saved_hybrid)
    via_auto, info = AutoModelForImageTextToText.from_pretrained(saved_hybrid, output_loading_info=True)
    assert type(via_auto).__name__ == "HybridQwen2_5_VLForConditionalGeneration"
    assert not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(logits(via_hybridize, batch), expected)
    assert torch.equal(logits(via_auto.eval(), batch), expected)


def test_new_parameters_load_exactly(tiny_hybrid, saved_hybrid):
    loaded = dict(hybridize.load(saved_hybrid).named_parameters())
    for name, parameter in tiny_hybrid.named_parameters():
        assert torch.equal(loaded[name], parameter), name
    a_log = [p for n, p in loaded.items() if n.endswith("A_log")]
    assert len(a_log) == 6 and all(torch.isfinite(p).all() for p in a_log)


def test_saved_config_records_the_plan(saved_hybrid):
    data = json.loads((saved_hybrid / "config.json").read_text())
    assert data["model_type"] == "hybrid_qwen2_5_vl"
    plan = data["hybridize"]
    assert plan["layers"] == ["sliding_window", *["gated_deltanet"] * 3] * 2
    assert plan["mixers"]["gated_deltanet"]["num_heads"] == 4
    assert data["text_config"]["use_sliding_window"] is True and data["text_config"]["sliding_window"] == 8
    assert read_plan(saved_hybrid)["hybridize"] == plan
    assert list(saved_hybrid.glob("*.safetensors"))


def test_auto_class_loads_in_a_fresh_process_after_import(saved_hybrid):
    code = (
        "import hybridize, sys; from transformers import AutoModelForImageTextToText as A; "
        f"m = A.from_pretrained({str(saved_hybrid)!r}); print(type(m).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("HybridQwen2_5_VLForConditionalGeneration")


def test_teacher_loads_from_a_local_directory(tiny_teacher, tmp_path, batch):
    teacher, processor = tiny_teacher
    teacher.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_base_model(str(tmp_path))
    assert loaded_processor is not None
    assert torch.equal(logits(loaded, batch), logits(teacher, batch))


def test_loading_a_non_hybrid_is_a_clear_error(tiny_teacher, tmp_path):
    tiny_teacher[0].save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a hybridize checkpoint"):
        hybridize.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        hybridize.load(tmp_path / "nowhere")


def test_save_refuses_a_non_empty_directory(tiny_hybrid, tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_hybrid(tiny_hybrid, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_tied_teacher_gives_a_tied_hybrid_that_saves_and_loads(tmp_path, batch):
    """Qwen2.5-VL-3B ties lm_head to the embeddings: the hybrid keeps the tie, saves one copy, and loads (the
    weight check knows that the missing lm_head is the embedding)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from hybridize.presets import tiny_qwen2_5_vl_config  # noqa: I001

    config = tiny_qwen2_5_vl_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    teacher = Qwen2_5_VLForConditionalGeneration(config).eval()
    hybrid, _ = convert(teacher, plan_layers(8, "1/4", window=8), progress=False)
    assert hybrid.lm_head.weight is hybrid.get_input_embeddings().weight
    save_hybrid(hybrid, tmp_path / "tied", tiny_qwen2_5_vl_processor())
    assert not any("lm_head" in name for name in saved_tensor_shapes(tmp_path / "tied"))
    loaded = load(tmp_path / "tied")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, hybrid(**batch).logits, rtol=0, atol=0)
