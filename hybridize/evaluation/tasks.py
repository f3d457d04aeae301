"""`hybridize eval tasks`: generation-based accuracy on local task files, for a hybrid or its base model.

A task file is JSONL (or parquet, with pandas): one question per record,

    {"question": "What colour is the square?", "image": "images/0.png", "answers": ["red"], "metric": "exact_match"}
    {"question": "Which corner?", "images": ["a.png"], "choices": ["top left", "top right"], "answers": ["B"],
     "metric": "multiple_choice"}
    {"question": "What happens?", "video": "clips/0.mp4", "answers": ["cooking"], "metric": "anls"}

`metric` is one of METRICS; `answers` the reference answers (any matching one counts; the option letter for
multiple choice, whose `choices` are a list, lettered A, B, ... or a mapping letter -> text); media paths are
relative to the task file. Every record is checked before a model is loaded. The model answers greedily with
its chat template, in batches; on CUDA through the static-cache decode (`inference.decode.generate_fast`).
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hybridize.converters.checkpoint import (
    check_output_dir,
    load,
    load_base_config,
    load_base_model,
    load_processor,
)
from hybridize.converters.hybrid_model import HYBRID_PREFIX
from hybridize.evaluation import default_placement, metrics
from hybridize.evaluation.report import write_task_report
from hybridize.inference.chat import chat_inputs
from hybridize.media import load_image

METRICS: dict[str, Callable] = {
    "exact_match": metrics.exact_match,
    "relaxed_accuracy": metrics.relaxed_accuracy,
    "anls": metrics.anls,
    "multiple_choice": metrics.multiple_choice,
}
SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE_ANSWER = "Answer with the option's letter from the given choices directly."
VIDEO_FPS = 1.0


@dataclass
class TaskRecord:
    question: str
    answers: list[str]
    metric: str
    images: list[Path] = field(default_factory=list)
    video: Path | None = None
    choices: dict[str, str] = field(default_factory=dict)  # letter -> option text (multiple choice)
    source: str = ""  # file:line, for messages

    def prompt(self) -> str:
        """The question as the model is asked it (lmms-eval's post-prompts for short answers and options)."""
        if self.choices:
            options = "\n".join(f"{letter}. {text}" for letter, text in self.choices.items())
            return f"{self.question}\n{options}\n{CHOICE_ANSWER}"
        return f"{self.question}\n{SHORT_ANSWER}"

    def score(self, prediction: str) -> float:
        if self.metric == "multiple_choice":
            return metrics.multiple_choice(prediction, self.answers, self.choices)
        return METRICS[self.metric](prediction, self.answers)


def _rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of a JSONL or parquet file."""
    if path.suffix == ".parquet":
        try:
            import pandas
        except ImportError:
            raise ImportError(
                f"Task file {str(path)!r} is parquet, which needs pandas: pip install pandas."
            ) from None
        return [(index + 1, row) for index, row in enumerate(pandas.read_parquet(path).to_dict("records"))]
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{number} is not JSON ({error}); a task file has one record per line."
                ) from None
    return rows


def _listed(record: dict, *keys: str) -> list:
    values = []
    for key in keys:
        value = record.get(key)
        values += [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
    return values


def parse_record(record: dict, source: str, root: Path) -> TaskRecord:
    """One task record checked: a question, reference answers, a known metric, existing media, and for
    multiple choice options whose letters the answers are."""
    if not isinstance(record, dict):
        raise ValueError(f"{source}: a record must be a JSON object, got {type(record).__name__}.")
    metric = record.get("metric")
    if metric not in METRICS:
        raise ValueError(
            f"{source}: metric {metric!r} is not one of {', '.join(METRICS)}; set `metric` to one."
        )
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{source}: no `question` text.")
    answers = [str(answer) for answer in _listed(record, "answers", "answer")]
    if not answers or not any(answer.strip() for answer in answers):
        raise ValueError(f"{source}: no reference answers; give `answers` (a list) or `answer`.")
    choices = record.get("choices")
    if metric == "multiple_choice":
        if isinstance(choices, (list, tuple)) and 2 <= len(choices) <= 26:
            choices = dict(zip(string.ascii_uppercase, map(str, choices), strict=False))
        if not isinstance(choices, dict) or len(choices) < 2:
            raise ValueError(
                f"{source}: multiple_choice needs `choices`: a list of 2 to 26 options or letter -> text."
            )
        choices = {str(letter).strip().upper(): str(text) for letter, text in choices.items()}
        wrong = [answer for answer in answers if answer.strip().upper() not in choices]
        if wrong:
            raise ValueError(f"{source}: answers {wrong} are not option letters ({', '.join(choices)}).")
    elif choices:
        raise ValueError(f"{source}: `choices` are only read for metric multiple_choice, not {metric}.")
    images = [root / str(path) for path in _listed(record, "image", "images")]
    videos = [root / str(path) for path in _listed(record, "video", "videos")]
    if len(videos) > 1 or (videos and images):
        raise ValueError(f"{source}: give images or one video, not both or several videos.")
    for path in images + videos:
        if not path.is_file():
            raise FileNotFoundError(
                f"{source}: media file {str(path)!r} does not exist (paths are relative to the task file)."
            )
    return TaskRecord(question, answers, metric, images, videos[0] if videos else None, choices or {}, source)


def read_task_file(path: str | Path) -> list[TaskRecord]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Task file {str(path)!r} does not exist.")
    records = [parse_record(record, f"{path}:{number}", path.parent) for number, record in _rows(path)]
    if not records:
        raise ValueError(f"Task file {str(path)!r} has no records.")
    return records


def task_name(path: str | Path) -> str:
    return Path(path).stem


def is_hybrid(model: str) -> bool:
    config = Path(model) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type", "").startswith(HYBRID_PREFIX)


def check_model(model: str, flag: str) -> None:
    """A saved hybrid directory, or a base model that `load_base_model` can load (its config is read)."""
    if not is_hybrid(model):
        try:
            load_base_config(model)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"{flag}: {error}") from None


def load_model(model: str, *, dtype: str | None, device: str):
    """(model, processor): a hybrid through `hybridize.load`, anything else as a base model."""
    if is_hybrid(model):
        return load(model, dtype=dtype, device=device), load_processor(model)
    return load_base_model(model, dtype=dtype, device=device)


def video_frames(path: str | Path, fps: float = VIDEO_FPS) -> list:
    """(H, W, 3) uint8 frames of a video file sampled at `fps` (PyAV, the `video` extra)."""
    from hybridize.media import sample_video

    return [frame for _, frame in sample_video(path, fps)]


@torch.no_grad()
def generate_texts(
    model,
    processor,
    prompts: list[str],
    images: list[list],
    videos: list[list | None],
    *,
    max_new_tokens: int,
) -> list[str]:
    """Greedy replies to a batch of chats (`chat_inputs`); on CUDA decoded over the static hybrid cache."""
    from hybridize.inference.decode import generate_fast

    inputs = {
        key: value.to(model.device) for key, value in chat_inputs(processor, prompts, images, videos).items()
    }
    decode = partial(generate_fast, model) if model.device.type == "cuda" else model.generate
    output = decode(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def generate_answers(
    model,
    processor,
    records: list[TaskRecord],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to `records`, `batch_size` at a time."""
    answers = []
    for start in tqdm(
        range(0, len(records), batch_size), desc="answering", unit="batch", disable=not progress
    ):
        batch = records[start : start + batch_size]
        answers += generate_texts(
            model,
            processor,
            [record.prompt() for record in batch],
            [[load_image(path) for path in record.images] for record in batch],
            [video_frames(record.video) if record.video else None for record in batch],
            max_new_tokens=max_new_tokens,
        )
    return answers


def score_task(records: list[TaskRecord], predictions: list[str]) -> dict:
    scores = [record.score(prediction) for record, prediction in zip(records, predictions, strict=True)]
    return {
        "score": sum(scores) / len(scores),
        "predictions": [
            {"source": r.source, "prediction": p, "answers": r.answers, "score": s}
            for r, p, s in zip(records, predictions, scores, strict=True)
        ],
    }


def evaluate_tasks(
    model: str,
    task_files: list[str],
    out: str,
    *,
    compare: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> dict:
    """The `hybridize eval tasks` command: every task file checked, then each model (MODEL, and --compare) loaded
    in turn, answering every task; scores per task (and their difference) printed and written to `out`."""
    for flag, value in (("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}.")
    names = [task_name(path) for path in task_files]
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks: two task files share a name ({names}); task names are the file names.")
    check_output_dir(out, overwrite=False)
    tasks = {name: read_task_file(path) for name, path in zip(names, task_files, strict=True)}
    models = [model] + ([compare] if compare else [])
    for name, flag in zip(models, ("MODEL", "--compare"), strict=False):
        check_model(name, flag)
    device, dtype = default_placement(device, dtype)
    results = {
        "tasks": {
            name: {"file": str(path), "metric": _metrics_of(tasks[name]), "samples": len(tasks[name])}
            for name, path in zip(names, task_files, strict=True)
        },
        "models": {},
    }
    for name in models:
        loaded, processor = load_model(name, dtype=dtype, device=device)
        results["models"][name] = {
            task: score_task(
                records,
                generate_answers(
                    loaded,
                    processor,
                    records,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    progress=progress,
                ),
            )
            for task, records in tasks.items()
        }
        del loaded
    write_task_report(results, out)
    return results


def _metrics_of(records: list[TaskRecord]) -> str:
    return ", ".join(dict.fromkeys(record.metric for record in records))
