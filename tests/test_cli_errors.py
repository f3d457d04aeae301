"""Every bad input a user can give the CLI: exit code 2, one line that names the problem and the fix, no
traceback, and no file written or changed (checksums of the whole working folder before and after)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from hybridize.cli import build_parser, main
from hybridize.testing.synthetic import write_synthetic_chat_data
from tests.conftest import make_image
from tests.inference.test_streaming import write_video

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "infinitevl"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A folder with good and broken hybrids, media and training data, built once."""
    root = tmp_path_factory.mktemp("bad-inputs")
    good = root / "good"
    assert (
        main(["convert", "--base", "tiny-qwen2.5-vl", "--ratio", "1/4", "--window", "16", "--out", str(good)])
        == 0
    )
    text = root / "text-only"
    assert (
        main(["convert", "--base", "tiny-llama", "--ratio", "1/4", "--window", "16", "--out", str(text)]) == 0
    )

    def broken(name: str, edit) -> None:
        shutil.copytree(good, root / name)
        edit(root / name)

    def edit_plan(change):
        def edit(path):
            config = json.loads((path / "config.json").read_text())
            change(config)
            (path / "config.json").write_text(json.dumps(config))

        return edit

    def swap_layers(config):
        layers = config["hybridize"]["layers"]
        layers[0], layers[1] = layers[1], layers[0]

    def more_heads(config):
        config["hybridize"]["mixers"]["gated_deltanet"]["num_heads"] = 2

    broken("swapped", edit_plan(swap_layers))
    broken("heads", edit_plan(more_heads))
    broken(
        "truncated",
        lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]),
    )
    broken("random", lambda p: (p / "model.safetensors").write_bytes(bytes(range(256)) * 40))
    broken("deleted", lambda p: (p / "model.safetensors").unlink())

    (root / "not-an-image.png").write_text("hello")
    make_image(1, (64, 64)).save(root / "picture.png")
    (root / "truncated.png").write_bytes((root / "picture.png").read_bytes()[:200])
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("keep me")
    if importlib.util.find_spec("av") is not None:  # the stream rows need a video (PyAV, the `video` extra)
        write_video(root / "clip.mp4", seconds=1.0)
    write_synthetic_chat_data(root / "train.jsonl", 4, seed=0)
    return root


def checksums(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def train_args(
    root: Path, stage: str = "stage1_layerwise", checkpoint: str = "good", *extra: str
) -> list[str]:
    return [
        "train", "--config", str(CONFIGS / f"{stage}.yaml"), "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "1", "--trainer.default_root_dir", str(root / "train-run"),
        "--model.init_args.checkpoint", str(root / checkpoint), "--model.init_args.dtype", "null",
        "--model.init_args.plan", "null", "--model.init_args.export_dir", "null",
        "--data.init_args.train_files", f"[{root / 'train.jsonl'}]", "--data.init_args.num_workers", "0", *extra,
    ]  # fmt: skip


def generate(root, model: str, *extra: str) -> list[str]:
    return ["generate", str(root / model), "--prompt", "Hi", "--max-new-tokens", "2", *extra]


def stream(root, model: str, *extra: str) -> list[str]:
    return [
        "stream",
        str(root / "clip.mp4"),
        str(root / model),
        "--ask",
        "What?",
        "--frame-size",
        "56",
        *extra,
    ]


CONVERT = ["convert", "--base", "tiny-qwen2.5-vl", "--out"]

# (name, arguments given the fixture folder, what the one line must say)
BAD_INPUTS = [
    ("plan edited", lambda r: generate(r, "swapped"), "the weights do not match the plan in its config.json"),
    ("plan edited, inspect", lambda r: ["inspect", str(r / "swapped")], "Was config.json's plan edited"),
    ("plan edited, stream", lambda r: stream(r, "swapped"), "the weights do not match the plan"),
    ("num_heads edited", lambda r: generate(r, "heads"), "of another shape"),
    ("truncated weights", lambda r: generate(r, "truncated"), "model.safetensors' is not a readable safetensors"),
    ("truncated weights, inspect", lambda r: ["inspect", str(r / "truncated")], "cut short or damaged"),
    ("truncated weights, stream", lambda r: stream(r, "truncated"), "cut short or damaged"),
    ("random bytes", lambda r: generate(r, "random"), "not a readable safetensors file"),
    ("deleted weights", lambda r: generate(r, "deleted"), "holds no weights"),
    ("deleted weights, inspect", lambda r: ["inspect", str(r / "deleted")], "holds no weights"),
    ("not an image", lambda r: generate(r, "good", "--image", str(r / "not-an-image.png")), "cannot be read"),
    ("truncated image", lambda r: generate(r, "good", "--image", str(r / "truncated.png")), "cannot be read"),
    ("missing image", lambda r: generate(r, "good", "--image", str(r / "nope.png")), "does not exist"),
    ("image, text-only model", lambda r: generate(r, "text-only", "--image", str(r / "picture.png")), "drop --image"),
    ("no such device", lambda r: generate(r, "good", "--device", "tpu"), "is not a device name"),
    ("empty prompt", lambda r: ["generate", str(r / "good"), "--prompt", " "], "--prompt is empty"),
    ("empty question", lambda r: ["stream", str(r / "clip.mp4"), str(r / "good"), "--ask", ""], "--ask is empty"),
    ("overwrite another folder", lambda r: [*CONVERT, str(r / "notes"), "--ratio", "1/4", "--overwrite"],
     "holds files that are not a saved hybrid (e.g. notes.txt)"),
    ("ratio not placeable", lambda r: [*CONVERT, str(r / "new"), "--ratio", "0.3"],
     "3/10 of 8 layers is 2.40 layers; give 1/4 (2 layers) or 3/8 (3 layers)"),
    ("window twice", lambda r: [*CONVERT, str(r / "new"), "--ratio", "1/4", "--window", "64",
                                "--option", "sliding_window.window=10"], "The window is given twice"),
    ("option of the wrong type", lambda r: [*CONVERT, str(r / "new"), "--ratio", "1/4",
                                            "--option", "gated_deltanet.expand_v=abc"],
     "Option gated_deltanet.expand_v='abc' must be float, not str"),
    ("train: key typo", lambda r: train_args(r, "stage1_layerwise", "good", "--model.init_args.learnin_rate", "1"),
     "Option 'learnin_rate' is not accepted"),
    ("train: trainer typo", lambda r: train_args(r, "stage1_layerwise", "good", "--trainer.max_stepz", "1"),
     "unrecognized arguments: --trainer.max_stepz"),
    ("train: wrong stage", lambda r: train_args(r, "stage1_e2e"), "starts from the output of 'layerwise_distillation'"),
    ("train: no checkpoint", lambda r: train_args(r, "stage1_layerwise", "nope"), "model.checkpoint"),
    ("train: export folder", lambda r: train_args(r, "stage1_layerwise", "good", "--model.init_args.export_dir",
                                                  str(r / "notes")), "pass model.init_args.overwrite_export"),
    ("train: missing data", lambda r: [*train_args(r), "--data.init_args.train_files", f"[{r / 'nope.jsonl'}]"],
     "does not exist"),
]  # fmt: skip
if not torch.cuda.is_available():
    BAD_INPUTS.append(("no CUDA", lambda r: generate(r, "good", "--device", "cuda"), "has no CUDA device"))


@pytest.mark.parametrize(("name", "arguments", "message"), BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(root, capsys, recwarn, name, arguments, message):
    arguments = arguments(root)
    if str(root / "clip.mp4") in arguments and not (root / "clip.mp4").exists():
        pytest.skip("the stream rows need PyAV (the `video` extra) to write their video")
    before = checksums(root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2, captured.err
    assert len(errors) == 1 and message in errors[0], captured.err
    assert "Traceback" not in captured.err and "Sliding Window Attention is enabled" not in captured.err
    assert not [str(w.message) for w in recwarn if "LightningCLI's args parameter" in str(w.message)]
    assert checksums(root) == before
    assert not (root / "new").exists() and not (root / "train-run").exists()  # no folder left behind


def test_debug_shows_the_traceback(root):
    with pytest.raises(ValueError, match="--prompt is empty"):
        main(["generate", str(root / "good"), "--prompt", "", "--debug"])


def test_every_option_has_help_text():
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    for name, verb in verbs.items():
        for action in verb._actions:
            if name != "train" and action.dest != "help":
                assert action.help, f"hybridize {name} {action.option_strings or action.dest} has no help"
    assert "required" in verbs["convert"]._option_string_actions["--ratio"].help


def test_inspect_says_the_weights_were_checked(root, capsys):
    assert main(["inspect", str(root / "good")]) == 0
    assert "each present with the shape the plan builds" in capsys.readouterr().out


def test_a_good_round_ratio_converts(root, tmp_path):
    out = tmp_path / "rounded"
    assert main([*CONVERT, str(out), "--ratio", "0.3", "--round", "--window", "16"]) == 0
    assert json.loads((out / "config.json").read_text())["hybridize"]["ratio"] == "1/4"
