"""The recall experiment (examples/recall): the task generator, the teacher's stacking, and the reduced sweep's
qualitative result: the distilled hybrid recalls beyond the window, sliding-window-only conversion cannot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

RECALL = Path(__file__).resolve().parent.parent / "examples" / "recall"
sys.path.insert(0, str(RECALL))

from mqar import IGNORE, MQARBatches, MQARTask, accuracy_in_bins  # noqa: E402
from sweep import (  # noqa: E402
    SETTINGS,
    VARIANTS,
    load_teacher,
    place_layers,
    run_sweep,
    stack_layers,
    teacher_config,
)

SHIPPED_TEACHER = RECALL / "teachers" / "cpu"


def test_every_query_is_labelled_with_the_value_after_its_key():
    task = MQARTask(num_pairs=5, num_queries=9, num_keys=12, num_values=7, seq_len=48)
    batch = task.sample(16, torch.Generator().manual_seed(0))
    ids, labels, distance = batch["input_ids"], batch["labels"], batch["distance"]
    for row in range(16):
        queries = (labels[row, 1:] != IGNORE).nonzero().flatten()
        assert len(queries) == task.num_queries
        assert set(ids[row, queries].tolist()) <= set(range(1, 13))  # the asked token is a key
        for position in queries.tolist():
            key_position = position - distance[row, position].item()
            assert key_position % 2 == 0 and key_position < 2 * task.num_pairs
            assert ids[row, key_position] == ids[row, position]  # the same key...
            assert labels[row, position + 1] == ids[row, key_position + 1]  # ...labelled with its value
    assert (
        ids[:, 2 * task.num_pairs :] <= task.num_keys
    ).all()  # no value after the pairs: no answer is given
    keys = ids[:, 0 : 2 * task.num_pairs : 2]
    assert all(len(set(row.tolist())) == task.num_pairs for row in keys)  # distinct keys per sequence


def test_curriculum_batches_start_short_and_are_reproducible():
    task = MQARTask(num_pairs=4, num_queries=8, num_keys=16, num_values=16, seq_len=200)
    batches = MQARBatches(task, num_batches=10, batch_size=8, seed=3, curriculum=0.5, min_span=8)
    first = batches[0]["labels"][:, 1:] != IGNORE
    assert first.nonzero()[:, 1].max() < 2 * task.num_pairs + 8  # queries within the first span
    assert torch.equal(batches[7]["input_ids"], batches[7]["input_ids"])
    assert not torch.equal(batches[7]["input_ids"], batches[8]["input_ids"])


def test_task_errors_name_the_fix():
    with pytest.raises(ValueError, match="num_keys"):
        MQARTask(num_pairs=10, num_keys=8)
    with pytest.raises(ValueError, match="lengthen the sequence"):
        MQARTask(num_pairs=8, num_queries=40, seq_len=40)


def test_accuracy_bins_are_left_open_right_closed():
    recall = {"distance": torch.tensor([1, 2, 3, 4]), "correct": torch.tensor([True, False, True, True])}
    assert accuracy_in_bins(recall, [0, 2, 4, 6]) == [0.5, 1.0, None]


def test_stacked_teacher_repeats_the_layers_in_order():
    setting = SETTINGS["cpu"]
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(teacher_config(setting, 2))
    stacked = stack_layers(model, 6)
    assert stacked.config.num_hidden_layers == 6
    for idx in range(6):
        for (name, p), q in zip(
            stacked.model.layers[idx].named_parameters(),
            model.model.layers[idx % 2].parameters(),
            strict=True,
        ):
            assert torch.equal(p, q), (idx, name)
    assert torch.equal(stacked.lm_head.weight, model.lm_head.weight)


def test_a_spread_teacher_computes_what_its_seed_computes():
    """cpu_spread: the seed teacher's layers at 0 and 4 of 8, the others adding nothing to the residual stream."""
    seed = load_teacher(SHIPPED_TEACHER, SETTINGS["cpu"])
    spread = load_teacher(SHIPPED_TEACHER, SETTINGS["cpu_spread"])
    assert spread.config.num_hidden_layers == 8
    ids = MQARBatches(SETTINGS["cpu"].task, 1, 4, seed=0)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            spread(input_ids=ids).logits, seed(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )
    assert torch.equal(place_layers(seed, [1, None]).model.layers[0].mlp.up_proj.weight,
                       seed.model.layers[1].mlp.up_proj.weight)  # fmt: skip


def test_variant_plans_place_the_sliding_window_layers():
    assert VARIANTS["ivl_mimic"].plan_arguments(8, 32) == {
        "ratio": "1/4",
        "window": 32,
        "mixer": "gated_deltanet",
    }
    moved = VARIANTS["swa_on_lookup_layers"].plan_arguments(8, 32)
    assert moved == {
        "swa_layers": "1,5",
        "window": 32,
        "mixer": "gated_deltanet",
    }  # the stacked teacher's lookups
    assert VARIANTS["swa_on_lookup_layers"].plan_arguments(2, 8)["swa_layers"] == "1"


def test_a_teacher_of_another_setting_is_refused(tmp_path):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(teacher_config(SETTINGS["cpu"], 2)).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="not trained for this setting"):
        load_teacher(tmp_path / "teacher", SETTINGS["gpu"])
    with pytest.raises(FileNotFoundError, match="teacher_model"):
        load_teacher(tmp_path / "missing", SETTINGS["cpu"])


def test_distilled_hybrid_recalls_beyond_the_window_where_swa_only_cannot(tmp_path):
    """The reduced sweep (2 layers, window 8, distances up to 8 W) from the shipped teacher, fixed seeds."""
    report = run_sweep(
        "cpu", tmp_path, results=tmp_path / "results", device="cpu", teacher_dir=SHIPPED_TEACHER
    )
    models, chance = report["models"], report["chance"]
    assert min(v for v in models["teacher"]["table"] if v is not None) >= 0.99
    swa, hybrid = models["swa_only"], models["ivl_transfer"]
    assert swa["within_window"] >= 0.9  # the window keeps what it can see...
    assert swa["beyond_window"] <= 3 * chance  # ...and loses the rest
    assert hybrid["beyond_window"] >= swa["beyond_window"] + 0.5
    assert {p.suffix for p in (tmp_path / "results").iterdir()} == {".json", ".md", ".png"}
