"""`hybridize train`: the InfiniteVL configs parse and run through LightningCLI; bad chains fail cleanly."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
import yaml

from hybridize import cli
from hybridize.converters import convert, plan_layers, read_plan, save_hybrid
from hybridize.presets import tiny_qwen2_5_vl
from hybridize.testing.synthetic import write_synthetic_chat_data

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "infinitevl"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A converted tiny Qwen2.5-VL in the InfiniteVL layout and a small generated data set."""
    root = tmp_path_factory.mktemp("run")
    teacher, processor = tiny_qwen2_5_vl()
    teacher.name_or_path = "tiny-qwen2.5-vl"
    hybrid, _ = convert(teacher, plan_layers(8, "1/4", window=8192), progress=False)
    save_hybrid(hybrid, root / "converted", processor)
    write_synthetic_chat_data(root / "train.jsonl", 16, seed=0)
    return root


def train(stage, root, checkpoint, *extra):
    return cli.main(
        ["train", "--config", str(CONFIGS / f"{stage}.yaml"),
         "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "2",
         "--trainer.accumulate_grad_batches", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(root / stage),
         "--model.init_args.checkpoint", str(checkpoint), "--model.init_args.dtype", "null",
         "--data.init_args.train_files", f"[{root / 'train.jsonl'}]", "--data.init_args.num_workers", "0",
         "--data.init_args.max_length", "256", *extra]
    )  # fmt: skip


def test_a_stage_runs_from_its_config_and_exports(run, monkeypatch):
    monkeypatch.setattr("sys.argv", ["hybridize"])
    export = run / "stage1_layerwise" / "hybrid"
    assert train("stage1_layerwise", run, run / "converted", "--model.init_args.export_dir", str(export)) == 0
    assert read_plan(export)["hybridize"]["stages"][-1] | {"date": None} == {
        "stage": "layerwise_distillation", "steps": 2, "trainable": ["mixers"], "date": None,
    }  # fmt: skip


def test_an_interrupted_run_resumes_from_its_last_checkpoint(run, monkeypatch):
    monkeypatch.setattr("sys.argv", ["hybridize"])
    root = run / "interrupted"
    common = (
        "--trainer.default_root_dir",
        str(root),
        "--model.init_args.export_dir",
        "null",
        "--trainer.max_epochs",
        "3",
    )
    assert train("stage1_layerwise", run, run / "converted", *common) == 0
    (last,) = root.rglob("last.ckpt")  # ModelCheckpoint(save_last=True) from the config
    assert torch.load(last, weights_only=False)["global_step"] == 2
    # LightningCLI takes the model's arguments from the checkpoint: the resumed run is the same run.
    assert train("stage1_layerwise", run, run / "converted", *common, "--trainer.max_steps", "4",
                 "--ckpt_path", str(last)) == 0  # fmt: skip
    steps = sorted(torch.load(path, weights_only=False)["global_step"] for path in root.rglob("*.ckpt"))
    assert steps[-1] == 4


def test_a_stage_pointed_at_the_wrong_checkpoint_exits_with_the_reason(run, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["hybridize"])
    with pytest.raises(SystemExit) as exit_info:
        train("stage1_e2e", run, run / "converted")
    assert exit_info.value.code == 2
    assert "starts from the output of 'layerwise_distillation'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train("stage2_sft", run, run / "missing")
    assert "does not exist. Run the previous stage first" in capsys.readouterr().err


ABLATIONS = sorted((CONFIGS.parent / "ablations").glob("*/*.yaml"))


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_ablation_plans_match_their_conversion_commands(path):
    """The plan an ablation's stages check is the plan its header's `hybridize convert` command builds."""
    config = yaml.safe_load(path.read_text())
    command = next(line for line in path.read_text().splitlines() if "hybridize convert" in line)
    args = cli.build_parser().parse_args(shlex.split(command.split("hybridize", 1)[1]))
    from_command = cli.build_plan(args, 36)
    from_config = plan_layers(36, **config["model"]["init_args"]["plan"])
    assert from_command.layers == from_config.layers
    assert (CONFIGS / path.name).is_file()  # it layers over the InfiniteVL config of the same stage


def test_configs_layer_over_each_other(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["hybridize"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", str(CONFIGS / "stage1_e2e.yaml"),
                  "--config", str(CONFIGS.parent / "ablations" / "mixer_gla" / "stage1_e2e.yaml"), "--print_config"])  # fmt: skip
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]["init_args"]
    assert model["plan"]["mixer"] == "gla" and model["temperature"] == 2.0
    assert model["checkpoint"] == "runs/ablations/mixer_gla/stage1_layerwise/hybrid"
