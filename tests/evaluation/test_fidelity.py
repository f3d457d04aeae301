"""`hybridize eval fidelity`: a hybrid measured against the teacher running inside it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from hybridize.converters import convert, load, plan_layers, save_hybrid
from hybridize.evaluation.fidelity import measure_fidelity, teacher_inside
from hybridize.lightning_modules import EndToEndDistillation, LayerwiseDistillation, detach_teacher
from hybridize.presets import tiny_qwen2_5_vl
from hybridize.testing.synthetic import write_synthetic_chat_data
from tests.evaluation.conftest import run_eval
from tests.lightning_modules.conftest import batches, converted, fit

RECALL = Path(__file__).resolve().parents[2] / "examples" / "recall"


def test_ratio_one_with_a_window_wider_than_the_data_is_the_teacher(tmp_path):
    """End to end through the command: chat data with images, every layer kept as (native) sliding-window
    attention wider than any sample: KL 0 and 100% agreement, every file written."""
    teacher, processor = tiny_qwen2_5_vl(seed=0)
    teacher.name_or_path = "tiny-qwen2.5-vl"
    hybrid, _ = convert(teacher, plan_layers(8, "1", window=4096), progress=False)
    save_hybrid(hybrid, tmp_path / "hybrid", processor)
    data = write_synthetic_chat_data(tmp_path / "data" / "chat.jsonl", 6)
    out = tmp_path / "report"
    run_eval(
        "fidelity", str(tmp_path / "hybrid"), "--teacher", "tiny-qwen2.5-vl", "--data", str(data),
        "--max-samples", "5", "--batch-size", "2", "--out", str(out),
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["fidelity.json", "fidelity.md", "fidelity.png"]
    report = json.loads((out / "fidelity.json").read_text())
    assert report["samples"] == 5 and report["layers"] == []
    for name in ("kl_answer", "kl_text"):
        assert abs(report["metrics"][name]["all"]) < 1e-6, report["metrics"][name]
    for name in ("agreement_answer", "agreement_text"):
        assert report["metrics"][name]["all"] == 1.0
    perplexities = (
        report["metrics"]["teacher_perplexity"]["all"],
        report["metrics"]["hybrid_perplexity"]["all"],
    )
    assert perplexities[0] == pytest.approx(perplexities[1])
    assert "top-1 agreement, answer tokens" in (out / "fidelity.md").read_text()


def test_beyond_the_window_swa_only_agreement_falls_to_chance_and_the_distilled_hybrids_does_not():
    """The recall experiment's shipped teacher (2 layers, window 8, MQAR): queries are answered from the key-value
    pairs at the start, so a token's position is its distance to what it must recall."""
    sys.path.insert(0, str(RECALL))
    from mqar import MQARBatches
    from sweep import SETTINGS, load_teacher

    setting = SETTINGS["cpu"]
    task = setting.task

    def task_batches(steps, seed):
        return MQARBatches(task, steps, setting.batch_size, seed, 0.0, task.num_queries)

    teacher = load_teacher(RECALL / "teachers" / "cpu", setting)
    held_out = [setting.task.sample(64, torch.Generator().manual_seed(seed)) for seed in (100, 101)]
    held_out = [{k: b[k] for k in ("input_ids", "attention_mask", "labels")} for b in held_out]
    chance = 1 / setting.task.num_values

    swa_only, _ = convert(teacher, plan_layers(2, "1", window=setting.window), progress=False)
    torch.manual_seed(0)
    options = {"gated_deltanet": {"init": "attention_transfer"}}
    plan = dict(ratio="1/4", window=setting.window)
    hybrid, _ = convert(teacher, plan_layers(2, **plan, options=options), progress=False)
    stage = dict(learning_rate=setting.stage_learning_rate, plan=plan)
    fit(LayerwiseDistillation(hybrid, teacher=teacher, **stage), 40, task_batches(40, seed=3))
    detach_teacher(hybrid)
    end_to_end = EndToEndDistillation(hybrid, teacher=teacher, previous_stage=None, **stage)
    fit(end_to_end, 40, task_batches(40, seed=4))
    detach_teacher(hybrid)

    reports = {}
    for name, model in (("swa_only", swa_only), ("hybrid", hybrid)):
        with teacher_inside(model, teacher):
            reports[name] = measure_fidelity(model, held_out, progress=False)
    swa, distilled = (reports[name]["metrics"]["agreement_answer"] for name in ("swa_only", "hybrid"))
    assert reports["swa_only"]["buckets"] == ["inside", "1-2x", "2-4x", "4x+"]
    assert swa["tokens"][0] == 0 and min(swa["tokens"][2:]) > 100  # every query comes after the pairs
    for bucket in (2, 3):  # every key is more than one window back
        assert swa["by_position"][bucket] <= 3 * chance, swa
        assert distilled["by_position"][bucket] >= swa["by_position"][bucket] + 0.5, distilled
    assert reports["hybrid"]["layers"][0]["layer"] == 1  # the Gated DeltaNet layer, compared per position


def test_layerwise_distillation_lowers_the_kl_on_held_out_data(tmp_path):
    hybrid, teacher, tokenizer = converted()
    path = save_hybrid(hybrid, tmp_path / "converted", tokenizer)
    held_out = batches(2, seed=9)

    def kl(model):
        with teacher_inside(model, teacher):
            return measure_fidelity(model, held_out, progress=False)

    before = kl(load(path))
    stage = LayerwiseDistillation(
        str(path), teacher=teacher, learning_rate=3e-3, schedule="constant", export_dir=str(tmp_path / "1a")
    )
    fit(stage, 30, batches(30))
    after = kl(load(tmp_path / "1a"))
    assert after["metrics"]["kl_text"]["all"] < before["metrics"]["kl_text"]["all"]
    for layer_before, layer_after in zip(before["layers"], after["layers"], strict=True):
        assert layer_after["relative_mse"]["all"] < layer_before["relative_mse"]["all"]


def test_a_teacher_whose_shared_weights_differ_is_refused_naming_the_tensor():
    hybrid, _, _ = converted()
    other, _, _ = converted(seed=1)
    with pytest.raises(ValueError, match=r"shared weights differ \(e\.g\. model\.embed_tokens\.weight\)"):
        with teacher_inside(hybrid, other):
            pass
