"""`hybridize eval tasks` and the refusals of bad input: one line, before any model is loaded, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybridize.converters import convert, plan_layers, save_hybrid
from hybridize.evaluation import fidelity, tasks
from hybridize.presets import tiny_qwen2_5_vl
from tests.evaluation.conftest import run_eval

TASKS = Path(__file__).resolve().parents[2] / "examples" / "tasks"


@pytest.fixture(scope="module")
def saved_tiny_hybrid(tmp_path_factory):
    teacher, processor = tiny_qwen2_5_vl(seed=0)
    teacher.name_or_path = "tiny-qwen2.5-vl"
    hybrid, _ = convert(teacher, plan_layers(8, "1/4", window=64), progress=False)
    return save_hybrid(hybrid, tmp_path_factory.mktemp("hybrid") / "tiny-ivl", processor)


def test_shipped_task_files_are_valid():
    for path in sorted(TASKS.glob("*.jsonl")):
        assert tasks.read_task_file(path), path


def test_hybrid_and_base_side_by_side(saved_tiny_hybrid, tmp_path):
    out = tmp_path / "out"
    files = [str(TASKS / "colours.jsonl"), str(TASKS / "corners.jsonl")]
    run_eval(
        "tasks", str(saved_tiny_hybrid), "--tasks", *files, "--compare", "tiny-qwen2.5-vl",
        "--max-new-tokens", "4", "--batch-size", "3", "--out", str(out),
    )  # fmt: skip
    results = json.loads((out / "tasks.json").read_text())
    assert list(results["models"]) == [str(saved_tiny_hybrid), "tiny-qwen2.5-vl"]
    for model in results["models"].values():
        for task in ("colours", "corners"):
            predictions = model[task]["predictions"]
            assert len(predictions) == 4
            assert model[task]["score"] == sum(p["score"] for p in predictions) / 4
    assert "difference" in (out / "tasks.md").read_text()


def write_lines(path: Path, *records: dict) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def refuse_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for module, name in ((fidelity, "load"), (fidelity, "load_base_model"), (tasks, "load_model")):
        monkeypatch.setattr(module, name, fail)


@pytest.mark.parametrize(
    ("record", "error", "message"),
    [
        ({"question": "q", "answers": ["a"], "metric": "bleu"}, ValueError, r"metric 'bleu' is not one of"),
        ({"question": "q", "answers": [], "metric": "exact_match"}, ValueError, "no reference answers"),
        ({"question": "q", "answers": ["E"], "choices": ["x", "y"], "metric": "multiple_choice"}, ValueError,
         r"not option letters \(A, B\)"),
        ({"question": "q", "image": "gone.png", "answers": ["a"], "metric": "exact_match"}, FileNotFoundError,
         "gone.png' does not exist"),
    ],
)  # fmt: skip
def test_bad_task_files_are_refused(tmp_path, monkeypatch, record, error, message):
    refuse_loading(monkeypatch)
    task_file = write_lines(
        tmp_path / "task.jsonl", {"question": "ok", "answers": ["a"], "metric": "anls"}, record
    )
    with pytest.raises(error, match=message) as raised:
        run_eval("tasks", "tiny-qwen2.5-vl", "--tasks", task_file, "--out", str(tmp_path / "out"))
    assert "task.jsonl:2" in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_bad_fidelity_input_is_refused(saved_tiny_hybrid, tmp_path, monkeypatch):
    refuse_loading(monkeypatch)
    data = write_lines(tmp_path / "chat.jsonl", {"conversations": [{"from": "human", "value": "hi"}]})
    out = str(tmp_path / "out")
    hybrid = str(saved_tiny_hybrid)
    cases = [
        ((str(tmp_path / "missing"), "tiny-qwen2.5-vl", data, out), FileNotFoundError, "has no config.json"),
        ((hybrid, "tiny-qwen2.5-vl", str(tmp_path / "none.jsonl"), out), FileNotFoundError, "--data"),
        ((hybrid, "tiny-llama", data, out), ValueError, "is a llama model, but .* qwen2_5_vl"),
        ((hybrid, "tiny-qwen2.5-vl", data, str(TASKS)), FileExistsError, "not empty"),
    ]
    for (model, teacher, data_file, out_dir), error, message in cases:
        with pytest.raises(error, match=message) as raised:
            run_eval("fidelity", model, "--teacher", teacher, "--data", data_file, "--out", out_dir)
        assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileExistsError, match="not empty"):
        run_eval("tasks", hybrid, "--tasks", str(TASKS / "sums.jsonl"), "--out", str(TASKS))
    with pytest.raises(FileNotFoundError, match="MODEL"):
        run_eval("tasks", str(tmp_path / "nothing"), "--tasks", str(TASKS / "sums.jsonl"), "--out", out)
