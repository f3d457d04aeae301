"""Stage 1b on several devices gives the losses of one device with the same global batch (DDP; FSDP optional).

A run trains `EndToEndDistillation` for `--steps` steps on a fixed synthetic dataset: global batches of
`--global-batch` sequences of `--length` random tokens, split over `--devices` processes (process r takes
sequences r, r + N, ... of each global batch). Every token is real, so each process has as many tokens, the
mean of the processes' losses is the global batch's loss and DDP's gradient average is its gradient. Every
process builds the same seeded teacher and converts it with the same seed; the learning rate is constant.
Process 0 writes the loss of every global batch and the trainable parameters before and after training.

`--both` runs one device, then `--devices N`, each in its own interpreter (Lightning's DDP launcher starts
the other processes by running this script again with the same arguments), and compares them; `--compare
A B` compares two runs' JSON files. They match when the loss curves agree within a relative tolerance: 1e-5
in fp32 (only the order of the gradient all-reduce's additions differs), 1e-2 in bf16-mixed (the batch of one
process is half as large, so every matmul has another shape and rounds differently, and that noise grows
over the steps). The learning rate defaults to 1e-4, below the stages' 1e-3: AdamW normalises every gradient
element, so rounding in the smallest ones turns into whole updates, and at 1e-3 the tiny model's fp32 runs
drift apart to 1e-4 relative within 10 steps (at 1e-4 they stay within 3e-6).

    # 2 GPUs: the Qwen2.5-VL-3B architecture with 8 text layers, 4 x 2048 tokens per step (~3 minutes)
    python benchmarks/distributed_loss_match.py --both --devices 2
    # CPU check of the script's logic: the tiny model in fp32, two gloo processes
    python benchmarks/distributed_loss_match.py --config tiny --accelerator cpu --both --devices 2
    # the pieces: one run each, then the comparison
    python benchmarks/distributed_loss_match.py --devices 2 --out /tmp/run2.json
    python benchmarks/distributed_loss_match.py --compare /tmp/run1.json /tmp/run2.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from hybridize.converters import convert, plan_layers
from hybridize.lightning_modules import EndToEndDistillation
from hybridize.lightning_modules.strategies import DecoderLayerFSDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_stages import (  # noqa: E402  (the sibling benchmark's model and data builders)
    RESULTS,
    SHAPES,
    StepTimer,
    build_teacher,
    environment,
    frozen_dtype,
    model_config,
    quiet_trainer,
    random_token_batches,
    token_limit,
)

DEFAULT_LENGTH = {"3b": 2048, "tiny": 64}
# Largest relative difference of the loss curves that counts as a match, by the runs' precision.
LOSS_TOLERANCE = {"64-true": 1e-9, "32-true": 1e-5, "bf16-mixed": 1e-2}
# Same for the trainable parameters' updates: ||final_a - final_b|| / ||final_a - initial||.
UPDATE_TOLERANCE = {"64-true": 1e-6, "32-true": 1e-3, "bf16-mixed": 1e-1}

# The options of a run, passed on by --both to each run and recorded in its JSON.
RUN_OPTIONS = (
    "config",
    "layers",
    "length",
    "global_batch",
    "accelerator",
    "strategy",
    "precision",
    "steps",
    "learning_rate",
    "seed",
)


@rank_zero_only
def say(*values) -> None:
    print(*values, flush=True)


class SequencesInOrder(L.LightningDataModule):
    """The sequences in order, `global_batch` per step, process r of N taking sequences r, r + N, ... (the
    sampler Lightning puts in under DDP shuffles every training set whatever the loader's `shuffle`, so its
    global batches would not be one device's)."""

    def __init__(self, sequences: list[dict], global_batch: int):
        super().__init__()
        self.sequences, self.global_batch = sequences, global_batch

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        processes, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = torch.utils.data.DistributedSampler(
            self.sequences, num_replicas=processes, rank=rank, shuffle=False
        )
        return torch.utils.data.DataLoader(
            self.sequences, batch_size=self.global_batch // processes, sampler=sampler
        )


def fsdp_strategy(precision: str):
    """`DecoderLayerFSDP` (decoder layers and mixers as units) with gradients reduced and buffers kept in fp32 as
    under DDP (Lightning's bf16-mixed default for FSDP would round the rotary embedding's `inv_freq` to bf16 and
    reduce gradients in bf16)."""
    from torch.distributed.fsdp import MixedPrecision

    mixed_precision = MixedPrecision(
        param_dtype=frozen_dtype(precision), reduce_dtype=torch.float32, buffer_dtype=torch.float32
    )
    return DecoderLayerFSDP(mixed_precision=mixed_precision)


def run(args) -> None:
    """One training run on `args.devices` devices; process 0 writes `args.out` and the parameters beside it."""
    if args.global_batch % args.devices:
        raise SystemExit(
            f"--global-batch {args.global_batch} does not split over --devices {args.devices}; "
            "give a multiple of the device count."
        )
    if args.accelerator == "gpu":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # set in the launched processes
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.devices))
    dtype = frozen_dtype(args.precision)
    window = SHAPES[args.config].window
    config = model_config(args.config, args.layers)
    teacher = build_teacher(config, device, dtype, args.seed)
    torch.manual_seed(args.seed)
    hybrid, _ = convert(teacher, plan_layers(args.layers, "1/4", window=window), progress=False)
    module = EndToEndDistillation(
        hybrid,
        teacher=teacher,
        previous_stage=None,
        dtype=dtype,
        learning_rate=args.learning_rate,
        schedule="constant",
    )
    del teacher
    trainable = {f"hybrid.{n}": p for n, p in module.hybrid.named_parameters() if p.requires_grad}
    initial = {name: p.detach().cpu().clone() for name, p in trainable.items()}

    sequences = args.steps * args.global_batch
    rows = random_token_batches(1, sequences, args.length, token_limit(config), args.seed)[0]
    data = SequencesInOrder(
        [{key: value[i] for key, value in rows.items()} for i in range(sequences)], args.global_batch
    )
    if args.devices == 1:
        strategy = "auto"
    else:
        strategy = "ddp" if args.strategy == "ddp" else fsdp_strategy(args.precision)
    timer = StepTimer(f"{args.devices} device(s)")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    trainer = quiet_trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        precision=args.precision,
        max_steps=args.steps,
        callbacks=[timer],
        use_distributed_sampler=False,  # SequencesInOrder splits the data itself
    )
    trainer.fit(module, datamodule=data)
    state = trainer.strategy.lightning_module_state_dict()  # collective under FSDP: every process calls it
    if not trainer.is_global_zero:
        return
    final = {name: state[name].detach().cpu().clone() for name in trainable}
    params = args.out.with_suffix(".params.pt")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"initial": initial, "final": final}, params)
    report = {
        **environment(device, "distributed_loss_match.py"),
        **{key: getattr(args, key) for key in RUN_OPTIONS},
        "devices": args.devices,
        "per_device_batch": args.global_batch // args.devices,
        "losses": timer.losses,
        "step_s": [round(s, 4) for s in timer.seconds],
        "trainable_params": sum(p.numel() for p in final.values()),
        "params_file": str(params),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"Wrote {args.out} and {params}")


def compare(path_a: Path, path_b: Path) -> dict:
    """Differences between two runs' loss curves and trained parameters, and whether they match."""
    a, b = (json.loads(Path(path).read_text()) for path in (path_a, path_b))
    if len(a["losses"]) != len(b["losses"]):
        raise SystemExit(
            f"{path_a} has {len(a['losses'])} steps and {path_b} {len(b['losses'])}: run both with the same "
            "--steps."
        )
    losses_a, losses_b = (torch.tensor(run["losses"], dtype=torch.float64) for run in (a, b))
    loss_difference = (losses_a - losses_b).abs()
    params_a, params_b = (torch.load(run["params_file"]) for run in (a, b))
    initial, final_a, final_b = (
        {name: tensor.double() for name, tensor in params.items()}
        for params in (params_a["initial"], params_a["final"], params_b["final"])
    )
    initial_difference = max(
        (initial[name] - params_b["initial"][name].double()).abs().max().item() for name in initial
    )
    difference = torch.stack([(final_a[name] - final_b[name]).norm() for name in final_a]).norm()
    update = torch.stack([(final_a[name] - initial[name]).norm() for name in final_a]).norm()
    # Runs of two precisions are held to the looser tolerance.
    precision = a["precision"] if a["precision"] == b["precision"] else "bf16-mixed"
    result = {
        "devices": [a["devices"], b["devices"]],
        "steps": len(losses_a),
        "precision": precision,
        "loss_max_abs_diff": loss_difference.max().item(),
        "loss_max_rel_diff": (loss_difference / losses_a.abs()).max().item(),
        "loss_rel_diff_per_step": (loss_difference / losses_a.abs()).tolist(),
        "loss_first": [a["losses"][0], b["losses"][0]],
        "loss_last": [a["losses"][-1], b["losses"][-1]],
        "initial_params_max_abs_diff": initial_difference,
        "final_params_max_abs_diff": max(
            (final_a[name] - final_b[name]).abs().max().item() for name in final_a
        ),
        "update_norm": update.item(),
        "update_rel_diff": (difference / update).item(),
        "final_params_checksum": [
            sum(p.sum().item() for p in final.values()) for final in (final_a, final_b)
        ],
        "loss_tolerance": LOSS_TOLERANCE.get(precision, LOSS_TOLERANCE["bf16-mixed"]),
        "update_tolerance": UPDATE_TOLERANCE.get(precision, UPDATE_TOLERANCE["bf16-mixed"]),
    }
    result["match"] = (
        initial_difference == 0
        and result["loss_max_rel_diff"] <= result["loss_tolerance"]
        and result["update_rel_diff"] <= result["update_tolerance"]
    )
    return result


def describe(result: dict) -> str:
    one, many = result["devices"]
    return (
        f"{one} vs {many} device(s) over {result['steps']} steps: losses differ by at most "
        f"{result['loss_max_abs_diff']:.3g} ({result['loss_max_rel_diff']:.3g} relative; tolerance "
        f"{result['loss_tolerance']:g}), loss {result['loss_first'][0]:.6g} -> {result['loss_last'][0]:.6g} vs "
        f"{result['loss_first'][1]:.6g} -> {result['loss_last'][1]:.6g}; trained parameters differ by at most "
        f"{result['final_params_max_abs_diff']:.3g}, {result['update_rel_diff']:.3g} of the update's norm "
        f"({result['update_norm']:.4g}; tolerance {result['update_tolerance']:g}); initial parameters "
        f"{'identical' if result['initial_params_max_abs_diff'] == 0 else 'DIFFERENT'}. "
        + ("MATCH" if result["match"] else "NO MATCH")
    )


def run_both(args) -> None:
    """One device, then `args.devices`, each in a fresh interpreter; then the comparison, written to `args.out`."""
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="distributed_loss_match_"))
    options = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in RUN_OPTIONS]
    runs = {}
    for devices in (1, args.devices):
        out = work / f"devices_{devices}.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            *options,
            f"--devices={devices}",
            f"--out={out}",
        ]
        print(f"== {devices} device(s): {' '.join(command)}", flush=True)
        subprocess.run(command, check=True)
        runs[devices] = out
    result = compare(runs[1], runs[args.devices])
    single, multiple = (json.loads(runs[n].read_text()) for n in (1, args.devices))
    head = {key: multiple[key] for key in ("date", "device", "device_tag", "versions")}
    report = {
        **head,
        "command": "python benchmarks/distributed_loss_match.py " + " ".join(sys.argv[1:]),
        "runs": {f"devices_{run['devices']}": run for run in (single, multiple)},
        "comparison": result,
    }
    tag = multiple["device_tag"] if args.config == "3b" else f"{args.config}_{multiple['device_tag']}"
    out = args.out or RESULTS / f"distributed_loss_match_{args.strategy}_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(describe(result), flush=True)
    print(f"Wrote {out} (runs and parameters in {work})", flush=True)
    if not result["match"]:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(SHAPES), default="3b")
    parser.add_argument(
        "--layers", type=int, default=8, help="text decoder layers (ratio 1/4: SWA at 0, 4, ...)"
    )
    parser.add_argument("--length", type=int, default=None, help="tokens per sequence (3b: 2048, tiny: 64)")
    parser.add_argument("--global-batch", type=int, default=4, help="sequences per step over all devices")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument(
        "--strategy", choices=["ddp", "fsdp"], default="ddp", help="with more than one device"
    )
    parser.add_argument(
        "--precision", default=None, help="Lightning precision (default: bf16-mixed on gpu, 32-true on cpu)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--learning-rate", type=float, default=1e-4, help="small enough not to amplify rounding (see above)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="a run's JSON, or with --both the comparison's"
    )
    parser.add_argument("--both", action="store_true", help="run 1 device and --devices, then compare them")
    parser.add_argument("--work-dir", type=Path, default=None, help="with --both: where the two runs write")
    parser.add_argument(
        "--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two runs' JSON files"
    )
    args = parser.parse_args()
    if args.compare:
        result = compare(*args.compare)
        print(json.dumps(result, indent=2))
        print(describe(result), flush=True)
        raise SystemExit(0 if result["match"] else 1)
    if args.strategy == "fsdp" and args.accelerator == "cpu":
        raise SystemExit("Lightning runs FSDP on GPUs only; use --strategy ddp with --accelerator cpu.")
    args.length = args.length or DEFAULT_LENGTH[args.config]
    args.precision = args.precision or ("bf16-mixed" if args.accelerator == "gpu" else "32-true")
    if args.both:
        run_both(args)
    else:
        args.out = (
            args.out or Path(tempfile.gettempdir()) / f"distributed_loss_match_devices_{args.devices}.json"
        )
        run(args)


if __name__ == "__main__":
    main()
