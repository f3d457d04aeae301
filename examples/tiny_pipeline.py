"""The whole InfiniteVL recipe on the embedded tiny Qwen2.5-VL, on CPU, in a minute or two.

Converts the tiny teacher, then runs the four stages with the real configs in configs/infinitevl/ (only the
paths, the device and the length of each stage overridden) on generated image and text conversations: layer-wise
distillation, end-to-end distillation, SFT, LoRA long-sequence SFT with packing. Each stage starts from the
previous stage's export (checked on start), and the last export answers an image question.

    python examples/tiny_pipeline.py [--out runs/tiny-pipeline] [--steps 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hybridize import cli
from hybridize.converters import load, load_processor, read_plan
from hybridize.inference.chat import generate_reply
from hybridize.media import load_image
from hybridize.testing.synthetic import write_synthetic_chat_data

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "infinitevl"
STAGES = ("stage1_layerwise", "stage1_e2e", "stage2_sft", "stage3_long_sft")


def stage_arguments(stage: str, out: Path, previous: Path, data: Path, steps: int) -> list[str]:
    """`hybridize train` arguments: the stage's config, then what a CPU smoke run changes."""
    return [
        "train",
        "--config", str(CONFIGS / f"{stage}.yaml"),
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.precision", "32-true",
        "--trainer.max_steps", str(steps),
        "--trainer.accumulate_grad_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(out / stage),
        "--model.init_args.checkpoint", str(previous),
        "--model.init_args.export_dir", str(out / stage / "hybrid"),
        "--model.init_args.dtype", "null",
        "--model.init_args.learning_rate", "3e-3",
        "--data.init_args.train_files", f"[{data}]",
        "--data.init_args.max_length", "256",
        "--data.init_args.max_pixels", str(112 * 112),
        "--data.init_args.batch_size", "4",
        "--data.init_args.num_workers", "0",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tiny-pipeline"))
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per stage")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the stages get their arguments from stage_arguments, not this command line
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty; remove it or pick another directory.")

    data = write_synthetic_chat_data(out / "data" / "train.jsonl", 256, seed=0)
    converted = out / "converted"
    cli.main(
        ["convert", "--base", "tiny-qwen2.5-vl", "--ratio", "1/4", "--window", "8192", "--init", "mimic",
         "--out", str(converted)]
    )  # fmt: skip
    previous = converted
    for stage in STAGES:
        print(f"\n=== {stage} ===", flush=True)
        cli.main(stage_arguments(stage, out, previous, data, args.steps))
        previous = out / stage / "hybrid"

    history = [entry["stage"] for entry in read_plan(previous)["hybridize"]["stages"]]
    print("\nstages recorded in the final hybrid:", " -> ".join(history))
    model, processor = load(previous), load_processor(previous)
    image = load_image(str(out / "data" / "images" / "red_top_left_56.png"))
    reply = generate_reply(model, processor, "What colour is the square?", [image], max_new_tokens=8)
    print(f"reply of the final hybrid: {reply!r}")


if __name__ == "__main__":
    main()
