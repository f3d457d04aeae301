"""The lmms-eval model: `lmms-eval --model hybridize` end to end on a local task, against the same computation done
directly (skipped where lmms-eval, the `eval` extra, is not installed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch

pytest.importorskip("lmms_eval")

from hybridize.converters import convert, plan_layers, save_hybrid  # noqa: E402
from hybridize.evaluation.tasks import SHORT_ANSWER, generate_texts, load_model  # noqa: E402
from hybridize.presets import tiny_qwen2_5_vl  # noqa: E402
from hybridize.testing.synthetic import COLOURS, square_image  # noqa: E402

UTILS = """
from PIL import Image

from hybridize.evaluation.metrics import exact_match
from hybridize.evaluation.tasks import SHORT_ANSWER


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return f"{doc['question']}\\n{SHORT_ANSWER}"


def process_results(doc, results):
    return {"exact_match": exact_match(results[0], doc["answers"])}
"""


def task_yaml(data_file) -> str:
    return textwrap.dedent(f"""\
        task: hybridize_tiny_colours
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data_file}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 4
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """)


def plugin_path(tmp_path) -> str:
    """Where the entry point is not installed yet (pyproject's `lmms_eval.models` group), a distribution that
    declares it, so that lmms-eval finds the model exactly as it will after `pip install hybridize[eval]`."""
    if any(ep.name == "hybridize" for ep in entry_points(group="lmms_eval.models")):
        return ""
    info = tmp_path / "plugin" / "hybridize_lmms_plugin-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hybridize-lmms-plugin\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[lmms_eval.models]\nhybridize = hybridize.evaluation.lmms_eval_plugin:manifest\n"
    )
    return str(info.parent)


def test_lmms_eval_scores_what_the_model_answers_directly(tmp_path):
    teacher, processor = tiny_qwen2_5_vl(seed=0)
    teacher.name_or_path = "tiny-qwen2.5-vl"
    hybrid, _ = convert(teacher, plan_layers(8, "1/4", window=64), progress=False)
    path = save_hybrid(hybrid, tmp_path / "hybrid", processor)
    docs = []
    for index, colour in enumerate(list(COLOURS)[:4]):
        image = tmp_path / f"{index}.png"
        square_image(colour, "top left").save(image)
        docs.append({"question": "What colour is the square?", "image": str(image), "answer": colour})
    # The model's own answers, computed directly: half the documents take them as the reference, so the score
    # lmms-eval reports is 0.5 exactly when it ran the same prompts through the same generation.
    model, processor = load_model(str(path), dtype="fp32", device="cpu")
    prompts = [f"{doc['question']}\n{SHORT_ANSWER}" for doc in docs]
    images = [[square_image(colour, "top left")] for colour in list(COLOURS)[:4]]
    direct = generate_texts(model, processor, prompts, images, [None] * 4, max_new_tokens=4)
    for doc, answer, own in zip(docs, direct, (True, False, True, False), strict=True):
        doc["answers"] = [answer] if own else [answer + " (not this)"]
    data = tmp_path / "colours.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "colours.yaml").write_text(task_yaml(data))
    (tasks / "utils.py").write_text(UTILS)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [plugin_path(tmp_path), os.getcwd()])))
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"))
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "hybridize", "--model_args", f"pretrained={path},device=cpu",
        "--tasks", "hybridize_tiny_colours", "--include_path", str(tasks), "--batch_size", "2",
        "--output_path", str(tmp_path / "results"), "--log_samples",
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (results,) = (tmp_path / "results").rglob("*results.json")
    scores = json.loads(results.read_text())["results"]["hybridize_tiny_colours"]
    assert scores["exact_match,none"] == 0.5
    samples = [
        json.loads(line) for file in (tmp_path / "results").rglob("*samples*.jsonl") for line in open(file)
    ]
    assert [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])] == direct


def test_loglikelihood_is_the_continuations_log_probability(tmp_path):
    from lmms_eval.api.instance import Instance

    from hybridize.evaluation.lmms_eval_model import HybridizeModel

    teacher, processor = tiny_qwen2_5_vl(seed=0)
    path = save_hybrid(
        convert(teacher, plan_layers(8, "1/4", window=64), progress=False)[0], tmp_path / "h", processor
    )
    model = HybridizeModel(pretrained=str(path), device="cpu")
    image = square_image("red", "top left")
    model.task_dict = {"t": {"test": [{"image": image}]}}
    arguments = ("What colour?", " red", lambda doc: [doc["image"]], 0, "t", "test")
    request = Instance("loglikelihood", arguments, 0, {"task": "t", "doc_id": 0, "repeats": 1})
    ((logprob, greedy),) = model.loglikelihood([request])
    # the same by hand: the whole text through the processor, the continuation's tokens scored
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompt = processor(text=[text], images=[image], return_tensors="pt")
    full = processor(text=[text + " red"], images=[image], return_tensors="pt")
    added = full["input_ids"].shape[1] - prompt["input_ids"].shape[1]
    with torch.no_grad():
        logits = model.model(**full).logits[0, -added - 1 : -1].log_softmax(-1)
    expected = logits.gather(-1, full["input_ids"][0, -added:, None]).sum().item()
    assert logprob == pytest.approx(expected, abs=1e-4) and logprob < 0
    assert greedy == bool((logits.argmax(-1) == full["input_ids"][0, -added:]).all())
