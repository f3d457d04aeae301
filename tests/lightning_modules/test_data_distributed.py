"""A streamed epoch under DDP, through `hybridize train`: 2 ranks (Lightning's DDP launcher, gloo on CPU) x 2
DataLoader workers train the SFT stage on parquet with embedded PNGs. Every usable row is trained on once per epoch,
and a run resumed mid-epoch from its Lightning checkpoint trains on what the uninterrupted run does, in the same
order on each rank, with the same skipped counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import lightning as L
import pytest

from hybridize.converters import convert, plan_layers, save_hybrid
from hybridize.lightning_modules.data import ChatStream, StreamLoader, StreamProgress
from hybridize.presets import tiny_model, tiny_qwen2_5_vl_processor
from tests.lightning_modules.test_data_sources import module, rank_batches, rows, sample_ids, write_parquet

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.transformers_surface

ROOT = Path(__file__).resolve().parents[2]


class SampleLog(L.Callback):
    """Appends each step's sample ids to `folder`/rank<r>.jsonl and, at the end, the rank's data module counts to
    end<r>.json (the ranks are other processes)."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids = sample_ids(batch, trainer.datamodule.encoder.tokenizer)
        with (self.folder / f"rank{trainer.global_rank}.jsonl").open("a") as file:
            file.write(json.dumps({"step": trainer.global_step, "ids": ids}) + "\n")

    def on_train_end(self, trainer, pl_module):
        data = trainer.datamodule
        counts = {"skipped": data.skipped, "samples": data.progress.samples, "epoch": data.progress.epoch}
        (self.folder / f"end{trainer.global_rank}.json").write_text(json.dumps(counts))


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    teacher = tiny_model("qwen2_5_vl", 0, 2)
    teacher.name_or_path = "tiny-qwen2.5-vl"
    model, _ = convert(teacher, plan_layers(2, "1/2", window=8192), progress=False)
    return save_hybrid(model, tmp_path_factory.mktemp("hybrid") / "converted", tiny_qwen2_5_vl_processor())


def train(folder: Path, checkpoint: Path, data: Path, every: int, ckpt_path: Path | None = None):
    """`hybridize train` (stage 2's config) on 2 CPU ranks with 2 workers each: per rank, each step's sample ids,
    and the rank's data module counts at the end."""
    folder.mkdir()
    sample_log = {"class_path": f"{__name__}.SampleLog", "init_args": {"folder": str(folder)}}
    checkpoints = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(folder / "steps"), "every_n_train_steps": every, "save_top_k": -1},
    }
    command = [
        sys.executable, "-m", "hybridize.cli", "train", "--config", str(ROOT / "configs/infinitevl/stage2_sft.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.precision", "32-true", "--trainer.max_steps", "100", "--trainer.accumulate_grad_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(folder),
        f"--trainer.callbacks+={json.dumps(sample_log)}", f"--trainer.callbacks+={json.dumps(checkpoints)}",
        "--model.init_args.checkpoint", str(checkpoint), "--model.init_args.previous_stage", "null",
        "--model.init_args.dtype", "null", "--model.init_args.gradient_checkpointing", "false",
        "--model.init_args.export_dir", "null",
        "--data.init_args.train_files", "null", "--data.init_args.sources", json.dumps([str(data)]),
        "--data.init_args.streaming", "true", "--data.init_args.num_workers", "2", "--data.init_args.batch_size", "2",
        "--data.init_args.max_length", "128", "--data.init_args.on_bad_sample", "skip",
        "--data.init_args.shuffle_buffer", "4",
        *(["--ckpt_path", str(ckpt_path)] if ckpt_path else []),
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}  # the ranks import SampleLog from this module
    run = subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = [[json.loads(line) for line in (folder / f"rank{r}.jsonl").open()] for r in (0, 1)]
    ends = [json.loads((folder / f"end{r}.json").read_text()) for r in (0, 1)]
    return steps, ends


@pytest.mark.slow  # two `hybridize train` runs of 2 processes each: ~30 s on 2 CPU cores
def test_two_ranks_of_two_workers_train_on_every_row_once_and_resume_exactly(tmp_path, hybrid):
    """24 rows in 4 parquet files, the first row of each a broken PNG: the 4 partitions (ranks x workers) read one
    file each, 5 usable rows in batches of 2, 2 and 1, so both ranks have 6 steps and every usable row is trained on
    once. (Where the ranks' streams do not end together, the epoch ends with the shortest: see
    test_an_epoch_ends_on_every_rank_with_the_shortest_rank_stream.)

    A run killed after step 3 resumes from the checkpoint it wrote at step 3, which is the one the uninterrupted run
    writes at step 3, so that one stands in for it. 3 is odd: each rank resumes in the middle of its workers' turns."""
    records = rows("llava", range(24))
    broken = {0, 6, 12, 18}
    for i in broken:
        records[i]["image"] = {"bytes": b"not a png", "path": None}
    data = datasets.Dataset.from_list(records).cast_column("image", datasets.Image())
    folder = tmp_path / "data"
    for index in range(4):
        data.shard(4, index, contiguous=True).to_parquet(str(folder / f"part-{index}.parquet"))

    full, full_ends = train(tmp_path / "full", hybrid, folder, every=3)
    ids = [i for rank in full for step in rank for i in step["ids"]]
    assert sorted(ids) == sorted(set(range(24)) - broken)
    assert [len(rank) for rank in full] == [6, 6]
    skipped = Counter()
    for end in full_ends:
        skipped.update(end["skipped"])
    assert skipped == {"unreadable_media": 4}

    (checkpoint,) = (tmp_path / "full" / "steps").glob("*step=3.ckpt")
    resumed, resumed_ends = train(tmp_path / "resumed", hybrid, folder, every=3, ckpt_path=checkpoint)
    for rank in (0, 1):
        assert resumed[rank] == full[rank][3:]
        assert resumed_ends[rank] == full_ends[rank]  # skipped counts, samples, epoch


def test_an_epoch_ends_on_every_rank_with_the_shortest_rank_stream(tmp_path):
    """The remainder rule: 26 rows in 3 files (partitions keep rows by index) give the 4 partitions 7, 7, 6 and 6
    rows, so rank 0's stream has 8 batches of 2 and rank 1's 6. DDP steps ranks together, so both train on 6
    batches: the first 6 of their own streams, each row at most once; rank 0's last 2 batches are not trained on in this epoch.

    Two threads stand in for the ranks, agreeing through a barrier where DDP ranks all-reduce."""
    folder = write_parquet(tmp_path / "odd", "llava", range(26), files=3)
    data_module = module([str(folder)], tiny_qwen2_5_vl_processor(), num_workers=2)
    barrier, has = threading.Barrier(2, timeout=60), [None, None]

    def every_rank_has(rank):
        def agree(mine: bool) -> bool:
            has[rank] = mine
            barrier.wait()
            both = all(has)
            barrier.wait()  # both read `has` before either writes the next answer
            return both

        return agree

    def ids(batches):
        return [sample_ids(batch, data_module.encoder.tokenizer) for batch in batches]

    alone = [ids(rank_batches(data_module, rank, 2, 2)) for rank in (0, 1)]
    assert [len(batches) for batches in alone] == [8, 6]
    together = [None, None]

    def run(rank):
        stream = ChatStream(data_module.train_sources, [1.0], data_module.encoder, data_module.stream_options,
                            rank=rank, world_size=2, workers=2)  # fmt: skip
        loader = StreamLoader(stream, StreamProgress(), lambda: 0, 2, every_rank_has(rank))
        together[rank] = ids(batch for batch in loader)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == [alone[0][:6], alone[1]]
    seen = [i for rank in together for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == 24
