"""Packed training batches through hybrids: every mixer restarts its state at each sample, so a packed row
gives each sample exactly the logits it has alone (fp64), for 1-D RoPE and for Qwen2.5-VL's M-RoPE with images."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from hybridize.converters import convert, plan_layers
from hybridize.lightning_modules import SupervisedFineTuning
from hybridize.lightning_modules.data import ChatDataset, collate
from hybridize.presets import tiny_model, tiny_model_with_tokenizer, tiny_qwen2_5_vl_processor

# Every mixer kind, the sliding window smaller than the samples so its window mask is exercised.
LAYERS = "0:sliding_window,1:gated_deltanet,2:mamba2,3:gla"


def packed(samples, pad_id):
    return collate(samples, pad_id, pack=True, max_length=sum(len(s["input_ids"]) for s in samples))


def assert_each_sample_matches(model, inputs, samples):
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.flatten(0, 1)
        start = 0
        for sample in samples:
            alone = {k: v for k, v in collate([sample], 0).items() if k != "labels"}
            expected = model(**alone, use_cache=False).logits[0]
            torch.testing.assert_close(logits[start : start + len(expected)], expected, rtol=1e-9, atol=1e-9)
            start += len(expected)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_packed_text_rows_give_every_sample_its_own_logits(model_type):
    teacher, tokenizer = tiny_model_with_tokenizer(model_type)(num_hidden_layers=4)
    hybrid, _ = convert(teacher.double(), plan_layers(4, layers=LAYERS, window=5), progress=False)
    hybrid.eval()
    generator = torch.Generator().manual_seed(0)
    samples = []
    for length in (9, 13, 6):
        ids = torch.randint(0, 256, (length,), generator=generator)
        samples.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    batch = packed(samples, tokenizer.pad_token_id)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert "attention_mask" not in inputs and inputs["cu_seq_lens_q"].tolist() == [0, 9, 22, 28]
    assert_each_sample_matches(hybrid, inputs, samples)


def test_packed_images_get_per_sample_mrope_positions(tmp_path):
    processor = tiny_qwen2_5_vl_processor()
    Image.new("RGB", (56, 56), (220, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (112, 56), (30, 30, 220)).save(tmp_path / "wide.png")
    records = [
        {
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nColour?"},
                {"from": "gpt", "value": "Red."},
            ],
        },
        {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
        {
            "image": "wide.png",
            "conversations": [
                {"from": "human", "value": "<image>\nAnd this?"},
                {"from": "gpt", "value": "Blue."},
            ],
        },
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = ChatDataset(tmp_path / "d.jsonl", processor, progress=False)
    samples = [data[i] for i in range(3)]
    teacher = tiny_model("qwen2_5_vl", num_hidden_layers=4).double()
    hybrid, _ = convert(
        teacher,
        plan_layers(4, layers=LAYERS.replace("0:sliding_window,", "0:full_attention,"), window=5),
        progress=False,
    )
    module = SupervisedFineTuning(hybrid.eval(), previous_stage=None)
    hybrid.eval()
    batch = packed(samples, processor.tokenizer.pad_token_id)
    inputs = module.model_inputs(batch)
    assert inputs["position_ids"].shape[0] == 4  # text positions over the three M-RoPE axes
    batch_double = {k: (v.double() if k.startswith("pixel") else v) for k, v in inputs.items()}
    doubled = [{k: (v.double() if k.startswith("pixel") else v) for k, v in s.items()} for s in samples]
    assert_each_sample_matches(hybrid, batch_double, doubled)
